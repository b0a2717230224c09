"""What a client can see of the cluster: the task stream, logs, events, performance reports.

:class:`Diagnostics` is the part of a :class:`~zfabric.client.Client` with the methods
dask.distributed users know (``get_task_stream``, ``get_worker_logs``, ``get_scheduler_logs``,
``log_event``, ``get_events``); :class:`get_task_stream` and :class:`performance_report`
are context managers that collect the task stream while their block runs. Everything comes
from the scheduler's :mod:`~zfabric.scheduler.observe` records through requests; nothing here
touches a socket.
"""

from __future__ import annotations

import asyncio
import datetime
import threading
import time
import warnings
from typing import Any

from . import protocol
from .client_core import ClientCore
from .current import default_client
from .keys import from_wire as _from_wire
from .keys import group_label
from .logs import recent
from .report import render_report

__all__ = ["Diagnostics", "get_task_metadata", "get_task_stream", "performance_report"]

#: How often a performance_report fetches the task stream while its block runs (the
#: scheduler's ring is bounded: TASK_STREAM_LENGTH).
REPORT_POLL_S = 0.1

_UNITS_S = {"ms": 1e-3, "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0, "m": 60.0,
            "min": 60.0, "minute": 60.0, "minutes": 60.0, "h": 3600.0, "hour": 3600.0,
            "hours": 3600.0}


def as_wall_time(value, now: float | None = None) -> float | None:
    """A point in time for ``start=``/``stop=``: seconds since the epoch, a datetime, a
    timedelta or ``"20 s"``/``"5 minutes"`` (that long ago)."""
    if value is None:
        return None
    now = time.time() if now is None else now
    if isinstance(value, datetime.datetime):
        return value.timestamp()
    if isinstance(value, datetime.timedelta):
        return now - value.total_seconds()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        i = len(text)
        while i and not (text[i - 1].isdigit() or text[i - 1] == "."):
            i -= 1
        number, unit = text[:i].strip(), text[i:].strip() or "s"
        if number and unit in _UNITS_S:
            try:
                return now - float(number) * _UNITS_S[unit]
            except ValueError:
                pass
    raise ValueError(f"cannot read {value!r} as a time: give seconds since the epoch, a"
                     " datetime, a timedelta or a duration such as '20 s' (that long ago)")


class Diagnostics:
    """The Client's diagnostic methods (see the module docstring); ``run`` runs a function
    on the workers (``ClusterAdmin``'s)."""

    def __init__(self, client: Any, core: ClientCore, run):
        self.sync = client.sync
        self.request = core.request
        self.run = run

    def get_task_stream(self, start=None, stop=None, count: int | None = None,
                        plot: bool = False, filename: str | None = None):
        """Records of recently finished tasks, oldest first, in dask.distributed's shape:
        ``{"key", "worker", "thread", "status", "nbytes", "startstops": [{"action", "start",
        "stop"}], "group"}``. ``start``/``stop`` bound the time (see :func:`as_wall_time`),
        ``count`` keeps the newest. The scheduler remembers the last ``TASK_STREAM_LENGTH``."""
        if plot or filename is not None:
            _bokeh()  # raises, saying so, where bokeh is not installed
        if count is not None and (not isinstance(count, int) or count < 0):
            raise ValueError(f"count must be a non-negative integer, got {count!r}")
        args = {"start": as_wall_time(start), "stop": as_wall_time(stop), "count": count}
        records = self.sync(self._task_stream, args)
        if not plot and filename is None:
            return records
        return _plot_records(records, filename)

    async def _task_stream(self, args: dict) -> list[dict]:
        return as_dask_records((await self.request("task-stream", **args))["records"])

    def get_scheduler_logs(self, n: int | None = None):
        """The scheduler process's recent log records: ``[(level, message), ...]``."""
        return self.sync(self._logs, n)

    async def _logs(self, n):
        return [tuple(r) for r in await self.request("logs", n=n)]

    def get_worker_logs(self, n: int | None = None, nanny: bool = False, workers=None):
        """Each worker process's recent log records: ``{address: [(level, message), ...]}``."""
        if nanny:
            raise NotImplementedError("zfabric keeps no log of its nannies; call"
                                      " get_worker_logs() without nanny=")
        return self.sync(self._worker_logs, recent, n, workers)

    async def _worker_logs(self, recent, n, workers):
        out = await self.run(recent, (n,), {}, workers)
        return {addr: [tuple(r) for r in records] for addr, records in out.items()}

    def log_event(self, topic, msg):
        """Record ``msg`` (msgpack-able data) under ``topic`` (a string, or several) on the
        scheduler; read it back with :meth:`get_events`."""
        topics = [topic] if isinstance(topic, str) else list(topic)
        if not topics or not all(isinstance(t, str) for t in topics):
            raise TypeError(f"topic must be a string or a list of strings, got {topic!r}")
        try:
            protocol.encode([{"op": "check", "msg": msg}])
        except Exception as exc:
            raise TypeError(f"log_event needs msgpack-able data (dicts, lists, strings,"
                            f" numbers, bytes), not {type(msg).__name__}: {exc}") from None
        return self.sync(self.request, "log-event", topic=topics, msg=msg)

    def get_events(self, topic: str | None = None):
        """Events logged under ``topic`` as ``((time, msg), ...)``; with no topic, a dict of
        every topic's events. The scheduler logs its own under ``"scheduler"``."""
        return self.sync(self._events, topic)

    async def _events(self, topic):
        result = await self.request("events", topic=topic)
        if topic is None:
            return {t: tuple(tuple(e) for e in events) for t, events in result.items()}
        return tuple(tuple(e) for e in result)


def as_dask_records(records: list[dict]) -> list[dict]:
    """Task-stream records as dask.distributed's: the key as the user gave it, and its
    fields ``type``/``typename`` (None: zfabric's workers do not report the result's type),
    ``metadata`` and ``stimulus_id``."""
    for r in records:
        r["key"] = _from_wire(r["key"])
        if "group" in r:
            r["group"] = group_label(r["group"])
        r.setdefault("type", None)
        r.setdefault("typename", None)
        r.setdefault("metadata", {})
        stop = r["startstops"][-1]["stop"] if r.get("startstops") else None
        r.setdefault("stimulus_id", f"task-finished-{stop}")
    return records


def _bokeh():
    try:
        import bokeh.plotting  # an optional dependency
    except ImportError:
        raise ImportError("get_task_stream(plot=...) draws with bokeh, which is not"
                          " installed: pip install bokeh, or use the records (no plot=), the"
                          " dashboard, or performance_report(filename=...)") from None
    return bokeh.plotting


def _plot_records(records: list[dict], filename: str | None):
    """``(records, figure)``: one bar per task (row: worker and thread), as dask's plot; saved
    as HTML when ``filename`` is given."""
    plotting = _bokeh()
    rows = sorted({(r["worker"], r["thread"]) for r in records}, key=str)
    row = {w: i for i, w in enumerate(rows)}
    figure = plotting.figure(title="Task stream", x_axis_type="datetime", height=400,
                             width=800, tools="xpan,xwheel_zoom,reset,hover")
    for r in records:
        for ss in r.get("startstops") or ():
            figure.hbar(y=row[(r["worker"], r["thread"])], left=ss["start"] * 1000,
                        right=ss["stop"] * 1000, height=0.8,
                        color="#d62728" if r["status"] == "error" else "#1f77b4")
    if filename is not None:
        plotting.output_file(filename)
        plotting.save(figure)
    return records, figure


def _client(client):
    if client is None:
        return default_client()
    return client


class get_task_stream:
    """Collect the task stream of the block: ``with get_task_stream() as ts: ...``, then
    ``ts.data`` holds the records (see :meth:`Diagnostics.get_task_stream`)."""

    def __init__(self, client=None, plot: bool = False, filename: str | None = None):
        if plot or filename is not None:
            _bokeh()  # raises, saying so, where bokeh is not installed
        self.plot = plot
        self.filename = filename
        self.figure = None
        self.client = client
        self.data: list[dict] = []
        self._since = 0

    def __enter__(self):
        self.client = _client(self.client)
        self._since = self.client.sync(self.client.core.request, "task-stream", count=0)["next"]
        return self

    def __exit__(self, *exc):
        self._collect(self.client.sync(self.client.core.request, "task-stream", since=self._since))

    async def __aenter__(self):
        self.client = _client(self.client)
        self._since = (await self.client.core.request("task-stream", count=0))["next"]
        return self

    async def __aexit__(self, *exc):
        self._collect(await self.client.core.request("task-stream", since=self._since))

    def _collect(self, reply: dict) -> None:
        if reply["dropped"]:
            warnings.warn(f"{reply['dropped']} task-stream records were gone before they were"
                          " read (the scheduler keeps TASK_STREAM_LENGTH); raise"
                          " ZFABRIC_TASK_STREAM_LENGTH on the scheduler to keep them",
                          RuntimeWarning, stacklevel=3)
        self.data.extend(as_dask_records(reply["records"]))


class get_task_metadata:
    """Collect what the scheduler knows of the tasks submitted in the block, as
    dask.distributed's: ``with get_task_metadata() as tasks: x.compute()``, then
    ``tasks.state`` is ``{key: final state}`` and ``tasks.metadata`` ``{key: {...}}`` (for
    the tasks the task stream still remembers: worker, group, start and stop)."""

    def __init__(self, client=None):
        self.client = client
        self.keys: set[str] = set()
        self.metadata: dict | None = None
        self.state: dict | None = None

    def __enter__(self):
        self.client = _client(self.client)
        self.client.core.key_collectors.append(self.keys)
        return self

    def __exit__(self, *exc):
        self._stop()
        self._fill(*self.client.sync(self._ask))

    async def __aenter__(self):
        return self.__enter__()

    async def __aexit__(self, *exc):
        self._stop()
        self._fill(*await self._ask())

    def _stop(self) -> None:
        core = self.client.core
        with core.lock:
            core.key_collectors = [c for c in core.key_collectors if c is not self.keys]

    async def _ask(self):
        request = self.client.core.request
        keys = sorted(self.keys)
        states = await request("task-states", keys=keys) if keys else {}
        stream = (await request("task-stream"))["records"] if keys else []
        return states, stream

    def _fill(self, states: dict, stream: list) -> None:
        from_wire = _from_wire
        self.state = {from_wire(k): s for k, s in states.items()}
        wanted = {from_wire(k) for k in self.keys}
        self.metadata = {k: {} for k in wanted}
        for record in stream:
            key = _from_wire(record.get("key"))
            if key in self.metadata:
                self.metadata[key] = {
                    "worker": record.get("worker"), "group": record.get("group"),
                    "status": record.get("status"),
                    "startstops": record.get("startstops")}


class performance_report:
    """Write one self-contained HTML file about the block: task stream, time per task group,
    worker utilization and bytes moved. ``with performance_report(filename="report.html"):``
    (or ``async with`` on an asynchronous client); it opens with no network."""

    def __init__(self, filename: str = "dask-report.html", mode=None, storage_options=None,
                 client=None):
        if mode not in (None, "inline"):
            raise ValueError(f"mode={mode!r}: zfabric's report is always one self-contained"
                             " file (mode='inline')")
        if storage_options:
            raise NotImplementedError("performance_report writes a local file; storage_options"
                                      " (fsspec) are not supported")
        self.filename = str(filename)
        self.client = client
        self.records: list[dict] = []
        self.transfers: dict[tuple, None] = {}  # in order, without repeats
        self.dropped = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task | None = None

    # ---------------------------------------------------------------- sync

    def __enter__(self):
        self.client = _client(self.client)
        self._begin(self.client.sync(self._first))
        self._thread = threading.Thread(target=self._poll_thread, name="zfabric-report",
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._write(self.client.sync(self._last))

    def _poll_thread(self) -> None:
        while not self._stop.wait(REPORT_POLL_S):
            try:
                self._add(self.client.sync(self.client.core.request, "task-stream",
                                           since=self._since, transfers=self.start))
            except Exception:  # the block's own calls will report a broken client
                return

    # ---------------------------------------------------------------- async

    async def __aenter__(self):
        self.client = _client(self.client)
        self._begin(await self._first())
        self._task = asyncio.ensure_future(self._poll_task())
        return self

    async def __aexit__(self, *exc):
        self._task.cancel()
        try:
            await self._task
        except BaseException:
            pass
        self._write(await self._last())

    async def _poll_task(self) -> None:
        while True:
            await asyncio.sleep(REPORT_POLL_S)
            self._add(await self.client.core.request("task-stream", since=self._since,
                                                 transfers=self.start))

    # ---------------------------------------------------------------- shared

    async def _first(self):
        return (await self.client.core.request("task-stream", count=0),
                await self.client.core.request("snapshot"))

    async def _last(self):
        return (await self.client.core.request("task-stream", since=self._since,
                                           transfers=self.start),
                await self.client.core.request("snapshot"))

    def _begin(self, replies) -> None:
        reply, snap = replies
        self._since = reply["next"]
        self.start = time.time()
        self.first = snap

    def _add(self, reply: dict) -> None:
        self.records.extend(reply["records"])
        for t in reply.get("transfers") or ():
            self.transfers[tuple(t)] = None
        self.dropped += reply["dropped"]
        self._since = reply["next"]

    def _write(self, replies) -> None:
        reply, snap = replies
        self._add(reply)
        stop = time.time()
        html = render_report(self.records, [list(t) for t in self.transfers], self.first,
                             snap, self.start, stop, dropped=self.dropped)
        with open(self.filename, "w", encoding="utf-8") as f:
            f.write(html)
