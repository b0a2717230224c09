"""Where task time goes: a statistical profiler of the threads that run tasks.

Theory of operation
-------------------
One sampler thread per worker wakes every :data:`INTERVAL_S` while a task runs (and every
:data:`IDLE_S` otherwise, only to see whether one started). Each wake it reads the stacks of the
threads in the executor's ``running`` map (thread id -> ``(key, start)``) with
``sys._current_frames()`` and adds one count along each stack to the tree of that task's group
(its key's prefix, named as the scheduler names it). Frames below the executor's own call into
the task are left out, so a tree's root holds the task's function.

A node is ``[count, {label: node}]``; a label is ``"function;file;first line"`` (one node per
function, not per line: the tree stays small). :meth:`Profiler.take` hands over what was
sampled since the last call, as the wire form the heartbeat carries (``{group: [label, count,
[children]]}``) and starts afresh: the scheduler merges these deltas
(:meth:`~zfabric.scheduler.observe.Observer.profiled`). Bounds: :data:`MAX_DEPTH` frames a
stack, :data:`MAX_NODES` nodes a delta (a sample that would need more is counted at the deepest
node already there).

The sampler's cost is a few microseconds a running thread each wake: at 50 samples a second
well under 1 % of a CPU (scripts/cpu_ab.py measures it against a build without it).
"""

from __future__ import annotations

import ctypes
import sys
import threading
from pathlib import Path

import psutil

from .. import logs
from ..scheduler.observe import key_group

#: Seconds between samples while a task runs, and between looks while none does.
INTERVAL_S = 0.02
IDLE_S = 0.1
#: Frames kept of one stack (from the task's function down), and nodes of one delta.
MAX_DEPTH = 64
MAX_NODES = 4000
#: Log lines one heartbeat carries at most, and characters of each.
LOG_LINES = 20
LOG_CHARS = 500

# The executor's frames (and this module's) are not the task's: a stack is cut there.
_OWN_FILES = frozenset(str(Path(__file__).with_name(name)) for name in ("execute.py",))


def label(code) -> str:
    """The node label of a code object: ``"name;file;first line"``."""
    return f"{code.co_name};{code.co_filename};{code.co_firstlineno}"


class Profiler:
    """``Profiler(running)`` samples the threads named in ``running`` (the executor's map of
    thread id -> ``(key, start)``, read without a lock: a copy is taken each time);
    :meth:`start` starts its thread, :meth:`close` stops and joins it."""

    def __init__(self, running: dict, interval_s: float = INTERVAL_S, name: str = ""):
        self.running = running
        self.interval_s = interval_s
        self.name = name
        self.samples = 0  # stacks sampled, ever
        self._trees: dict[str, list] = {}  # group -> [count, {label: node}]
        self._nodes = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._labels: dict = {}  # code object -> label
        self._groups: dict[str, str] = {}  # key -> group (the last few thousand)

    def start(self) -> None:
        if self._thread is None and self.interval_s > 0:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=f"zfabric-profiler {self.name}".strip())
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _run(self) -> None:
        _name_os_thread(b"zf-profiler")  # its CPU can be read apart (scripts/dashboard_*.py)
        wait = self._stop.wait
        running = self.running
        while not wait(self.interval_s if running else IDLE_S):
            if running:
                self.sample()

    def sample(self) -> None:
        """Add one count along the stack of each thread running a task."""
        tasks = self.running.copy()
        if not tasks:
            return
        frames = sys._current_frames()
        labels = self._labels
        own = _OWN_FILES
        with self._lock:
            for ident, (key, _start) in tasks.items():
                frame = frames.get(ident)
                if frame is None:
                    continue
                stack = []
                while frame is not None:
                    code = frame.f_code
                    if code.co_name == "_execute" and code.co_filename in own:
                        break
                    stack.append(code)
                    frame = frame.f_back
                if frame is None or not stack:
                    continue  # not (or no longer) inside a task
                if len(stack) > MAX_DEPTH:
                    stack = stack[-MAX_DEPTH:]
                group = self._group(key)
                tree = self._trees.get(group)
                if tree is None:
                    tree = self._trees[group] = [0, {}]
                    self._nodes += 1
                node = tree
                node[0] += 1
                for code in reversed(stack):  # from the task's function up to the frame now
                    text = labels.get(code)
                    if text is None:
                        if len(labels) > 20_000:
                            labels.clear()
                        text = labels[code] = label(code)
                    child = node[1].get(text)
                    if child is None:
                        if self._nodes >= MAX_NODES:
                            break
                        child = node[1][text] = [0, {}]
                        self._nodes += 1
                    child[0] += 1
                    node = child
                self.samples += 1
        del frames

    def _group(self, key: str) -> str:
        group = self._groups.get(key)
        if group is None:
            if len(self._groups) > 5000:
                self._groups.clear()
            group = self._groups[key] = key_group(key)
        return group

    def take(self) -> dict | None:
        """What was sampled since the last call, in wire form, or None when nothing was."""
        with self._lock:
            trees, self._trees, self._nodes = self._trees, {}, 0
        if not trees:
            return None
        return {group: _wire("", node) for group, node in trees.items()}


def _name_os_thread(name: bytes) -> None:
    try:
        ctypes.CDLL(None).prctl(15, name[:15], 0, 0, 0)  # PR_SET_NAME (Linux)
    except (OSError, AttributeError):
        pass


def _wire(text: str, node: list) -> list:
    return [text, node[0], [_wire(t, child) for t, child in node[1].items()]]


class LogTail:
    """The log records this process kept (:mod:`zfabric.logs`) that the scheduler has not
    seen: :meth:`take` returns the new ones (``[[level, text], ...]``, at most
    :data:`LOG_LINES`, each cut to :data:`LOG_CHARS`) for the heartbeat; the dashboard's
    worker page shows them."""

    def __init__(self) -> None:
        self.buffer = logs.install()
        self._last: tuple | None = None  # the newest record handed over (a new tuple each)

    def take(self) -> list | None:
        records = self.buffer.records
        if not records or records[-1] is self._last:
            return None
        new: list[list] = []
        for record in reversed(records):
            if record is self._last or len(new) >= LOG_LINES:
                break
            new.append([record[0], record[1][:LOG_CHARS]])
        self._last = records[-1]
        return new[::-1]


def heartbeat_extras(profiler: Profiler, tail: LogTail) -> dict:
    """What the heartbeat carries besides metrics: new profile samples and log lines."""
    out: dict = {}
    profile = profiler.take()
    if profile:
        out["profile"] = profile
    lines = tail.take()
    if lines:
        out["logs"] = lines
    return out


def io_metrics(process) -> dict:
    """The process's disk bytes and the host's network bytes so far (counters; the dashboard's
    system page draws their rates), for the heartbeat's metrics; {} where psutil cannot
    tell."""
    out = {}
    try:
        io = process.io_counters()
        out["disk_read"], out["disk_write"] = io.read_bytes, io.write_bytes
    except (AttributeError, OSError, psutil.Error):
        pass
    try:
        net = psutil.net_io_counters()
        out["net_recv"], out["net_sent"] = net.bytes_recv, net.bytes_sent
    except (AttributeError, OSError, psutil.Error):
        pass
    return out
