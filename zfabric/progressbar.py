"""``progress(*futures)``: live progress bars of futures, by task group.

In a terminal the bars redraw in place (one per task group with ``multi=True``) and the call
blocks until every future is done; with an asynchronous client it returns an awaitable; in a
notebook it returns at once with an ipywidgets view (text where ipywidgets is missing) that a
background thread keeps up to date. Output that is not a terminal (a log, a pipe) gets a frame
every ``PIPE_EVERY_S`` and the last one.

Progress is what the client knows of the futures given (finished, failed or cancelled, from
the messages it already receives): nothing extra is asked of the scheduler. Tasks they depend
on but that are not among them are not counted (dask.distributed counts those too).
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time

from .futures import futures_of
from .keys import group_label
from .scheduler.observe import key_group

__all__ = ["progress"]

#: How often the bars are redrawn.
INTERVAL_S = 0.1
#: How often a frame is written when the output is not a terminal.
PIPE_EVERY_S = 10.0
BAR_WIDTH = 40


class _Tracker:
    """Counts of done / erred / total futures by group, updated by polling their states."""

    def __init__(self, futures):
        self.groups: dict[str, list[int]] = {}  # name -> [done, erred, total]
        self.pending: list = []
        #: The other tasks of the dask graphs these futures come from (blocking clients):
        #: wire key -> its group's counts, asked of the scheduler as they run.
        self.upstream: dict[str, list[int]] = {}
        self.client = None
        outputs = set()
        for f in dict.fromkeys(futures):
            outputs.add(f._wkey)
            name = group_label(key_group(f._wkey))
            g = self.groups.setdefault(name, [0, 0, 0])
            g[2] += 1
            self.pending.append((f._state, g))
        for f in dict.fromkeys(futures):
            if f.client is None or f.client.asynchronous:
                continue
            for key in f.client.core.graph_keys.get(f._wkey, ()):
                if key not in outputs and key not in self.upstream:
                    g = self.groups.setdefault(group_label(key_group(key)), [0, 0, 0])
                    g[2] += 1
                    self.upstream[key] = g
                    self.client = f.client
        self.start = time.monotonic()

    def update(self) -> bool:
        """Look at the pending futures (and upstream tasks) again; True once every one is
        done."""
        still = []
        for st, g in self.pending:
            if st.done():
                g[0] += 1
                if st.status != "finished":
                    g[1] += 1
            else:
                still.append((st, g))
        self.pending = still
        if self.upstream:
            self._ask_upstream(finished=not still)
        return not still and not self.upstream

    def _ask_upstream(self, finished: bool) -> None:
        """Upstream tasks in memory, erred or forgotten (done and released) are done."""
        try:
            states = self.client.sync(self.client.core.request, "task-states",
                                      keys=list(self.upstream))
        except Exception:  # closing, or the scheduler is away: count them as done
            states = {}
            finished = True
        for key in list(self.upstream):
            state = states.get(key)
            if state in ("memory", "erred", None) or finished:
                g = self.upstream.pop(key)
                g[0] += 1
                if state == "erred":
                    g[1] += 1

    def totals(self) -> tuple[int, int, int]:
        done = sum(g[0] for g in self.groups.values())
        erred = sum(g[1] for g in self.groups.values())
        return done, erred, sum(g[2] for g in self.groups.values())


def _bar(done: int, total: int) -> str:
    frac = done / total if total else 1.0
    n = round(BAR_WIDTH * frac)
    return "[" + "#" * n + " " * (BAR_WIDTH - n) + f"] {frac * 100:3.0f}%"


class TextProgressBar:
    """Bars drawn as text on ``stream`` (see the module docstring)."""

    def __init__(self, futures, *, multi: bool = True, complete: bool = True, stream=None):
        self.tracker = _Tracker(futures)
        self.multi = multi
        self.complete = complete
        self.stream = stream if stream is not None else sys.stdout
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self._drawn = 0  # lines drawn last time (a terminal redraws over them)
        self._last_frame = 0.0

    def lines(self) -> list[str]:
        t = self.tracker
        done, erred, total = t.totals()
        elapsed = time.monotonic() - t.start
        head = f"{_bar(done, total)} Completed | {done}/{total} | {elapsed:5.1f}s"
        if erred:
            head += f" | {erred} erred"
        if not self.multi:
            return [head]
        width = max((len(n) for n in t.groups), default=0)
        out = [head]
        for name, (gdone, gerred, gtotal) in sorted(t.groups.items()):
            if not self.complete and gdone == gtotal and not gerred:
                continue
            line = f"{name.ljust(width)} {_bar(gdone, gtotal)} {gdone}/{gtotal}"
            if gerred:
                line += f" ({gerred} erred)"
            out.append(line)
        return out

    def draw(self, final: bool = False) -> None:
        now = time.monotonic()
        if not self.tty and not final and now - self._last_frame < PIPE_EVERY_S:
            return
        self._last_frame = now
        lines = self.lines()
        if self.tty:
            up = f"\x1b[{self._drawn}F" if self._drawn else ""
            text = up + "".join("\x1b[2K" + ln + "\n" for ln in lines)
            self._drawn = len(lines)
        else:
            text = "\n".join(lines) + "\n"
        self.stream.write(text)
        self.stream.flush()

    def step(self) -> bool:
        done = self.tracker.update()
        self.draw(final=done)
        return done

    def run(self) -> None:
        while not self.step():
            time.sleep(INTERVAL_S)

    async def run_async(self) -> None:
        while not self.step():
            await asyncio.sleep(INTERVAL_S)


class WidgetProgressBar:
    """An ipywidgets view of the bars, updated from a background thread."""

    def __init__(self, futures, *, multi: bool = True, complete: bool = True):
        import ipywidgets

        self.tracker = _Tracker(futures)
        self.complete = complete
        names = sorted(self.tracker.groups) if multi else ["total"]
        self.multi = multi
        self.bars = {n: ipywidgets.IntProgress(min=0, max=1, description=n[:20]) for n in names}
        self.labels = {n: ipywidgets.HTML() for n in names}
        self.rows = {n: ipywidgets.HBox([self.bars[n], self.labels[n]]) for n in names}
        self.widget = ipywidgets.VBox(list(self.rows.values()))
        self.thread = threading.Thread(target=self._run, name="zfabric-progress", daemon=True)

    def _refresh(self) -> None:
        groups = self.tracker.groups
        if not self.multi:
            done, erred, total = self.tracker.totals()
            groups = {"total": [done, erred, total]}
        for name, (done, erred, total) in groups.items():
            bar = self.bars[name]
            bar.max, bar.value = max(total, 1), done
            bar.bar_style = "danger" if erred else ("success" if done == total else "")
            self.labels[name].value = f"{done} / {total}" + (f" ({erred} erred)" if erred else "")
            if not self.complete and done == total and not erred:
                self.rows[name].layout.display = "none"

    def _run(self) -> None:
        while not self.tracker.update():
            self._refresh()
            time.sleep(INTERVAL_S * 2)
        self._refresh()

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    try:
        ip = shell.get_ipython()
    except Exception:
        return False
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


def progress(*futures, notebook: bool | None = None, multi: bool = True, complete: bool = True,
             group_by: str = "prefix", **kwargs):
    """Show the progress of futures (or lists/dicts of them, or persisted dask collections)
    as they finish.

    In a script it blocks until all are done; with an asynchronous client, await it; in a
    notebook it returns at once (a widget with ipywidgets, else text below the cell).
    ``multi``: one bar per task group (key prefix); ``complete``: keep the bars of groups that
    are done.
    """
    if kwargs:
        raise TypeError(f"progress got unexpected arguments: {', '.join(sorted(kwargs))}")
    if group_by != "prefix":
        raise NotImplementedError(f"group_by={group_by!r}: zfabric groups by key prefix only")
    flat = futures_of(list(futures))
    if len(futures) and not flat:
        raise TypeError("progress needs Futures (lists or dicts of them, or dask collections"
                        " that client.persist returned); got"
                        f" {', '.join(type(f).__name__ for f in futures)}")
    client = flat[0].client if flat else None
    if notebook is None:
        notebook = _in_notebook()
    if notebook:
        try:
            bar = WidgetProgressBar(flat, multi=multi, complete=complete)
        except ImportError:
            text = TextProgressBar(flat, multi=multi, complete=complete)
            threading.Thread(target=text.run, name="zfabric-progress", daemon=True).start()
            return None
        bar.thread.start()
        return bar
    text = TextProgressBar(flat, multi=multi, complete=complete)
    if client is not None and client.asynchronous:
        return text.run_async()
    text.run()
    return None
