"""Rich HTML for notebooks: what Jupyter shows for a Client, a cluster and a Future.

Each ``render_*`` takes plain values (what its object already knows, or asked for) and
returns a small self-contained HTML fragment: inline styles only, no script, nothing fetched
from the network, so it renders the same offline and in a saved notebook. The objects'
``_repr_html_`` methods call these; nothing here talks to a cluster.
"""

from __future__ import annotations

import html
from typing import Any

__all__ = ["format_bytes", "render_client", "render_cluster", "render_future",
           "render_cluster_of", "scheduler_info_of"]

_BOX = ("font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif;"
        " font-size: 13px; border: 1px solid #d0d7de; border-radius: 6px;"
        " padding: 8px 12px; max-width: 640px; background: #fafbfc; color: #1f2328")
_TITLE = "margin: 0 0 6px 0; font-size: 14px; font-weight: 600"
_CELL = "text-align: left; padding: 2px 12px 2px 0; vertical-align: top"
_STATUS_COLOURS = {"finished": "#1a7f37", "running": "#1a7f37", "pending": "#9a6700",
                   "error": "#cf222e", "cancelled": "#6e7781", "closed": "#6e7781",
                   "failed": "#cf222e"}


def format_bytes(n: float | None) -> str:
    """``1.50 GiB`` for 1610612736; ``-`` for None."""
    if n is None:
        return "-"
    for unit in ("B", "kiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} PiB"  # pragma: no cover


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _status(status: str) -> str:
    colour = _STATUS_COLOURS.get(status, "#1f2328")
    return f'<span style="color: {colour}; font-weight: 600">{_esc(status)}</span>'


def _table(rows: list[tuple[str, str]]) -> str:
    cells = "".join(f'<tr><th style="{_CELL}">{_esc(k)}</th><td style="{_CELL}">{v}</td></tr>'
                     for k, v in rows)
    return f'<table style="border-collapse: collapse">{cells}</table>'


def _link(url: str | None) -> str:
    if not url:
        return "none"
    return f'<a href="{_esc(url)}" target="_blank">{_esc(url)}</a>'


def _workers_rows(info: dict | None) -> list[tuple[str, str]]:
    if not info:
        return []
    workers = info.get("workers") or {}
    threads = info.get("total_threads", sum(w.get("nthreads", 0) for w in workers.values()))
    memory = info.get("total_memory", sum(w.get("memory_limit") or 0 for w in workers.values()))
    return [("Workers", _esc(info.get("n_workers", len(workers)))), ("Threads", _esc(threads)),
            ("Memory", _esc(format_bytes(memory)))]


def _workers_table(info: dict | None, most: int = 16) -> str:
    workers = list(((info or {}).get("workers") or {}).items())
    if not workers:
        return ""
    head = "".join(f'<th style="{_CELL}">{h}</th>'
                   for h in ("name", "address", "threads", "memory"))
    body = "".join(
        f'<tr><td style="{_CELL}">{_esc(w.get("name", ""))}</td>'
        f'<td style="{_CELL}"><code>{_esc(a)}</code></td>'
        f'<td style="{_CELL}">{_esc(w.get("nthreads", ""))}</td>'
        f'<td style="{_CELL}">{_esc(format_bytes(w.get("memory_limit")))}</td></tr>'
        for a, w in workers[:most])
    more = (f'<p style="margin: 4px 0 0 0">and {len(workers) - most} more</p>'
            if len(workers) > most else "")
    return (f'<details style="margin-top: 6px"><summary>Workers ({len(workers)})</summary>'
            f'<table style="border-collapse: collapse"><tr>{head}</tr>{body}</table>'
            f'{more}</details>')


def render_client(*, name: str, scheduler_address: str | None, status: str,
                  dashboard_link: str | None, cluster: str | None, info: dict | None) -> str:
    """A Client: its scheduler, dashboard link, status, cluster and workers (``info`` is
    ``scheduler_info()``'s answer, or None when it could not be asked)."""
    rows = [("Scheduler", f"<code>{_esc(scheduler_address or '-')}</code>"),
            ("Dashboard", _link(dashboard_link)), ("Status", _status(status))]
    if cluster:
        rows.append(("Cluster", _esc(cluster)))
    rows += _workers_rows(info)
    return (f'<div style="{_BOX}" class="zfabric-repr zfabric-client">'
            f'<p style="{_TITLE}">zfabric Client <span style="font-weight: 400">'
            f'{_esc(name)}</span></p>{_table(rows)}{_workers_table(info)}</div>')


def render_cluster(*, kind: str, name: str, scheduler_address: str | None, status: str,
                   dashboard_link: str | None, info: dict | None) -> str:
    """A cluster (LocalCluster, SpecCluster and its back-ends): scheduler, dashboard,
    status, workers, threads and memory."""
    rows = [("Scheduler", f"<code>{_esc(scheduler_address or '-')}</code>"),
            ("Dashboard", _link(dashboard_link)), ("Status", _status(status))]
    rows += _workers_rows(info)
    return (f'<div style="{_BOX}" class="zfabric-repr zfabric-cluster">'
            f'<p style="{_TITLE}">{_esc(kind)} <span style="font-weight: 400">'
            f'{_esc(name)}</span></p>{_table(rows)}{_workers_table(info)}</div>')


def render_future(future: Any) -> str:
    """A Future: its key, status and (finished, in a blocking client, asked once) type."""
    status = future.status
    rows = [("Key", f"<code>{_esc(future.key)}</code>"), ("Status", _status(status))]
    if status == "finished":
        try:
            kind = future.type
        except Exception:  # the cluster could not say: show what is known
            kind = None
        if kind is not None:
            rows.append(("Type", f"<code>{_esc(kind.__module__)}.{_esc(kind.__qualname__)}"
                                 "</code>"))
    return (f'<div style="{_BOX}" class="zfabric-repr zfabric-future">'
            f'<p style="{_TITLE}">Future</p>{_table(rows)}</div>')


def scheduler_info_of(scheduler: Any) -> dict | None:
    """``scheduler_info()`` of a scheduler running in this process (a Scheduler, or a
    cluster's in-process scheduler holding one as ``server``), read without a request; None
    when there is none here (a remote scheduler) or it changed while being read."""
    server = getattr(scheduler, "server", scheduler)
    state = getattr(server, "state", None)
    if state is None or not hasattr(state, "info"):
        return None
    try:
        return state.info()
    except Exception:  # it changed under us (another thread): show no workers
        return None


def render_cluster_of(cluster: Any) -> str:
    """:func:`render_cluster` for a LocalCluster or SpecCluster (duck-typed)."""
    return render_cluster(kind=type(cluster).__name__, name=str(cluster.name),
                          scheduler_address=cluster.scheduler_address,
                          status=str(cluster.status), dashboard_link=cluster.dashboard_link,
                          info=scheduler_info_of(cluster.scheduler))
