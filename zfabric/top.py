"""``zfabric top``: the dashboard's picture in a terminal, drawn with rich from a snapshot.

:func:`render` turns one scheduler snapshot (see :mod:`zfabric.scheduler.observe`) into a rich
renderable: workers with memory bars, progress by task group, throughput, recent events.
:func:`run` asks the scheduler for a snapshot every ``interval`` seconds and redraws it
full-screen (rich's live display), or prints one frame with ``once``.
"""

from __future__ import annotations

import time
from typing import Literal

from .client import Client
from .keys import group_label
from .reprs import format_bytes

#: Width of the text bars, in characters.
BAR = 24


def text_bar(frac: float, width: int = BAR) -> str:
    """``[#####.....]``-style bar of ``frac`` (clamped to 0..1)."""
    n = round(max(0.0, min(1.0, frac)) * width)
    return "[" + "#" * n + "." * (width - n) + "]"


def _memory_bar(w: dict):
    from rich.text import Text

    limit = w["memory_limit"] or max(w["memory"], 1)
    managed = min(w["managed"], w["memory"]) if w["memory"] else w["managed"]
    n_managed = round(BAR * min(1.0, managed / limit))
    n_total = round(BAR * min(1.0, w["memory"] / limit))
    bar = Text("[")
    bar.append("#" * n_managed, style="blue")
    bar.append("#" * max(0, n_total - n_managed), style="cyan")
    bar.append("." * (BAR - max(n_total, n_managed)))
    bar.append("] ")
    bar.append(f"{format_bytes(w['memory'])} / "
               f"{format_bytes(w['memory_limit']) if w['memory_limit'] else 'no limit'}")
    return bar


def render(snap: dict):
    """One frame of ``zfabric top`` for a snapshot."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    workers = sorted(snap["workers"], key=lambda w: str(w["name"]))
    threads = sum(w["nthreads"] for w in workers)
    t = snap["totals"]
    series = snap.get("series") or []
    rate = series[-1][1] if series else 0.0
    moved = series[-1][2] if series else 0.0
    head = Text(f"zfabric scheduler {snap['address']}", style="bold")
    head.append(f"   {len(workers)} worker{'' if len(workers) == 1 else 's'}, {threads}"
                f" thread{'' if threads == 1 else 's'} · {t['processing']} processing"
                f" · {t['new'] + t['waiting'] + t['queued']} waiting ·"
                f" {snap['counters']['finished']} finished · {rate:,.0f} tasks/s ·"
                f" {format_bytes(int(moved))}/s moved", style="")
    if snap.get("dashboard"):
        head.append(f"\ndashboard: {snap['dashboard']}", style="dim")

    wt = Table(title="Workers", title_justify="left", expand=False)
    columns: list[tuple[str, Literal["left", "right"]]] = [
        ("name", "left"), ("address", "left"), ("threads", "right"), ("memory", "left"),
        ("CPU", "right"), ("processing", "right"), ("held", "right"), ("bytes", "right")]
    for col, just in columns:
        wt.add_column(col, justify=just)
    for w in workers:
        name = str(w["name"])  # a CLI worker is named by its address: shown once
        wt.add_row("-" if name == w["address"] else name, w["address"], str(w["nthreads"]),
                   _memory_bar(w),
                   f"{w['cpu']:.0f} %", str(w["processing"]), str(w["held"]),
                   format_bytes(w["nbytes"]))

    gt = Table(title="Progress by task group", title_justify="left")
    columns = [("group", "left"), ("", "left"), ("done", "right"), ("processing", "right"),
               ("waiting", "right"), ("erred", "right")]
    for col, just in columns:
        gt.add_column(col, justify=just)
    for g in sorted(snap["groups"], key=lambda g: g["name"]):
        if not g["total"]:
            continue
        gt.add_row(group_label(g["name"]), text_bar(g["done"] / g["total"]),
                   f"{g['done']}/{g['total']}",
                   str(g["processing"]), str(g["waiting"]),
                   Text(str(g["erred"]), style="red" if g["erred"] else ""))
    events = Text("Events\n", style="italic")
    for when, text in snap["events"][-8:]:
        events.append(time.strftime("%H:%M:%S ", time.localtime(when)), style="dim")
        events.append(text + "\n")
    return Group(head, wt, gt, events)


def run(address: str, *, interval: float = 1.0, once: bool = False, timeout: float = 5.0,
        console=None) -> None:
    """Draw the cluster at ``address`` until interrupted (or once)."""
    from rich.console import Console
    from rich.live import Live

    if console is None:
        console = Console()
        if not console.is_terminal:  # a pipe or a file: do not squeeze the tables into 80
            console = Console(width=140)
    with Client(address, timeout=timeout, set_as_default=False) as client:
        def frame():
            return render(client.sync(client.core.request, "snapshot"))

        if once:
            console.print(frame())
            return
        with Live(frame(), console=console, screen=True, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(frame(), refresh=True)
