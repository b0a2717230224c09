"""What the scheduler shows of itself: task groups, the task stream, throughput and events.

Theory of operation
-------------------
The hot path only counts. Every task belongs to a :class:`Group` (its key's prefix, as
dask.distributed's ``key_split`` gives it) chosen once when the task is created; a state move
adjusts two counters of that group (:meth:`Group.move`), a finished task appends one tuple to
a bounded ring (the task stream) and bumps its group's duration histogram. Nothing here scans
the tasks.

Reading is rare: :meth:`Observer.snapshot` turns the counters, the workers and the tail of the
ring into plain JSON-able data. The server shell builds one a few times a second while a
dashboard listens and hands it to the dashboard's thread, which encodes and serves it; clients
ask for one (``zfabric top``), for the task stream since a point (``get_task_stream``,
``performance_report``) or for events by topic.

Pure: no clock and no I/O. Worker-reported times are wall-clock seconds (``time.time()`` on
the worker); the scheduler's ``now`` is monotonic, and :attr:`Observer.wall_offset` (set by the
shell) turns one into the other for events.
"""

from __future__ import annotations

import bisect
import re
from array import array
from collections import deque
from collections.abc import Callable

from .feed import Feed, History, merge_profile, profile_wire

#: Upper bounds (seconds) of the task-duration histogram buckets, per group (+Inf is implied).
DURATION_BUCKETS_S = (0.0001, 0.001, 0.01, 0.1, 1.0, 10.0, 60.0)
#: Task-stream entries a snapshot carries (the newest), for the page's task stream.
SNAPSHOT_STREAM = 1000
#: Profiles a whole snapshot carries (the most sampled groups), and nodes of each.
SNAPSHOT_PROFILES = 10
SNAPSHOT_PROFILE_NODES = 200
#: Log lines kept per worker, and workers whose lines are kept.
WORKER_LOG_LINES = 100
MAX_LOGGED_WORKERS = 2000
#: Transfers a snapshot carries (the newest).
SNAPSHOT_TRANSFERS = 200
#: Groups kept once they have no live task; the oldest idle ones go first beyond this.
MAX_IDLE_GROUPS = 200
#: Samples of throughput kept (one per SAMPLE_INTERVAL_S).
SERIES_LENGTH = 600
SAMPLE_INTERVAL_S = 0.5
#: Messages kept per event topic.
TOPIC_LENGTH = 1000
#: Event topics kept at most (the oldest goes first).
MAX_TOPICS = 1000

#: Task states a group counts; ``forgotten`` counts tasks forgotten after finishing and
#: ``cancelled`` those forgotten before.
STATES = ("new", "waiting", "queued", "processing", "memory", "released", "erred",
          "forgotten", "cancelled")
LIVE = ("new", "waiting", "queued", "processing", "memory", "released", "erred")

_HEX = re.compile(r"^[0-9a-f]+$")
_NAN = float("nan")


def key_group(key) -> str:
    """The group (prefix) of a key: ``"inc-3f2a..."`` -> ``"inc"``, ``("x-1", 0)`` -> ``"x"``,
    ``"hello-world-1"`` -> ``"hello-world"``; 32 hex digits alone (a tokenized name) ->
    ``"data"``."""
    if type(key) is tuple:
        key = key[0] if key else ""
    if type(key) is bytes:
        key = key.decode(errors="replace")
    if not isinstance(key, str):
        return "Other"
    if key.startswith("\x1f"):  # a tuple key's wire form (zfabric.keys.to_wire)
        key = key[1:]
    if key.startswith("("):  # a stringified tuple key
        key = key[1:].split(",", 1)[0].strip("'\" ")
    if key.startswith("<"):  # "<module.Class object at 0x...>"
        key = key[1:].split(" ", 1)[0].rsplit(".", 1)[-1]
        return key or "Other"
    words = key.split("-")
    first = words[0]
    if len(words) == 1 and len(first) == 32 and _HEX.match(first):
        return "data"
    out = [first]
    for word in words[1:]:
        # as dask's key_split: an 8-letter word that starts like hex ends the name too
        if word.isalpha() and not (len(word) == 8 and word[0] in "abcdef"):
            out.append(word)
        else:
            break
    return "-".join(out) or "Other"


class Group:
    """Counters of the tasks with one key prefix."""

    __slots__ = ("counts", "deps", "duration_s", "hist", "last_active", "name", "nbytes",
                 "ndone", "nerred", "order")

    def __init__(self, name: str):
        self.name = name
        self.counts = dict.fromkeys(STATES, 0)
        self.duration_s = 0.0  # summed compute time of its finished tasks
        self.ndone = 0  # finished tasks whose time was reported
        self.nbytes = 0  # summed result sizes
        self.hist = [0] * (len(DURATION_BUCKETS_S) + 1)
        self.last_active = 0.0
        self.deps: dict[str, int] = {}  # group -> task edges from it into this one
        self.nerred = 0  # tasks that ever failed (stays when they are released)
        self.order = 0  # when it was first seen (the graph page lays groups out by it)

    def move(self, old: str, new: str) -> None:
        c = self.counts
        c[old] -= 1
        c[new] += 1

    def live(self) -> int:
        c = self.counts
        return sum(c[s] for s in LIVE)

    def row(self) -> dict:
        c = self.counts
        done = c["memory"] + c["released"] + c["forgotten"]
        waiting = c["new"] + c["waiting"] + c["queued"]
        return {
            "name": self.name, "done": done, "processing": c["processing"],
            "waiting": waiting, "erred": c["erred"], "memory": c["memory"],
            "released": c["released"], "forgotten": c["forgotten"],
            "cancelled": c["cancelled"],
            "total": done + waiting + c["processing"] + c["erred"],
            "duration_s": self.duration_s, "nbytes": self.nbytes,
            "nerred": max(self.nerred, c["erred"]),
        }


class StreamRing:
    """The last ``length`` finished tasks, in parallel arrays: about 60 bytes an entry (plus
    the key, while nothing else keeps it) where a tuple of boxed numbers costs about 230.

    Entries are numbered from 0 in the order they came; :attr:`seq` is the next number.
    Times that were not reported are stored as NaN and read back as None.
    """

    __slots__ = ("groups", "keys", "length", "ok", "seq", "sizes", "threads", "times",
                 "workers")

    def __init__(self, length: int):
        n = self.length = max(0, int(length))
        self.keys: list = [None] * n
        self.groups: list = [None] * n  # group names (shared strings)
        self.workers: list = [None] * n  # worker addresses (shared strings)
        self.times = array("d", bytes(16 * n))  # start, stop of entry i at 2i, 2i + 1
        self.threads = array("Q", bytes(8 * n))
        self.sizes = array("q", bytes(8 * n))
        self.ok = bytearray(n)
        self.seq = 0

    def __len__(self) -> int:
        return min(self.seq, self.length)

    def append(self, key, group: str, worker: str, thread, start, stop, ok: bool,
               nbytes: int) -> None:
        n = self.length
        if n:
            i = self.seq % n
            self.keys[i] = key
            self.groups[i] = group
            self.workers[i] = worker
            t = self.times
            t[2 * i] = start
            t[2 * i + 1] = stop
            self.threads[i] = thread
            self.sizes[i] = nbytes
            self.ok[i] = ok
        self.seq += 1

    def entries(self, since: int = 0) -> list[tuple]:
        """``(key, group, worker, thread, start, stop, status, nbytes)`` of the entries
        numbered ``since`` or later that are still kept, oldest first."""
        n = self.length
        out = []
        t = self.times
        for number in range(max(since, self.seq - len(self)), self.seq):
            i = number % n
            start, stop = t[2 * i], t[2 * i + 1]
            shown: tuple[float | None, float | None] = (start, stop)
            if start != start:  # NaN: not reported
                shown = (None, None)
            out.append((self.keys[i], self.groups[i], self.workers[i], self.threads[i],
                        *shown, "OK" if self.ok[i] else "error", self.sizes[i]))
        return out


class Observer:
    """Counters, rings and topics the scheduler state feeds (see the module docstring)."""

    def __init__(self, stream_length: int = 10_000):
        self.groups: dict[str, Group] = {}
        self.stream = StreamRing(stream_length)
        self.transfers: deque[tuple] = deque(maxlen=2000)
        self.transfer_bytes = 0
        self.series: deque[tuple] = deque(maxlen=SERIES_LENGTH)
        self.event_counts: dict[str, int] = {}
        self.topics: dict[str, deque] = {}
        #: Called with (topic, [wall time, msg]) for each event logged (subscriptions).
        self.on_event: Callable[[str, list], None] | None = None
        self.wall_offset = 0.0  # wall clock minus the scheduler's monotonic ``now``
        # counted by the shell: what crossed the scheduler's socket
        self.messages_in = self.messages_out = self.bytes_in = self.bytes_out = 0
        self._next_sample = 0.0
        self._last = (0.0, 0, 0)  # (now, tasks done, bytes moved) at the last sample
        self._heads: dict[str, str] = {}  # key without its last word -> group (group_of)
        self.snapshot_stream = SNAPSHOT_STREAM
        self.transfer_seq = 0  # transfers ever recorded
        self.series_seq = 0  # throughput samples ever taken
        self.dirty_workers: set = set()  # workers that finished something since the last delta
        self.fresh: list = []  # tasks new since the last sample (their edges, not yet counted)
        self.graph_version = 0  # bumped when a group or a group edge appears or goes
        self.history = History()
        self.worker_logs: dict[str, deque] = {}  # address -> its last log lines
        self.new_logs: list[tuple] = []  # (address, time, level, text) not yet in a delta
        self.profiles: dict[str, list] = {}  # group -> merged profile tree
        self.profile_grown: set[str] = set()
        self._profile_nodes = [0]
        self._workers: dict = {}  # the state's workers (for the history's memory)
        self._next_point = 0.0
        self._point_last: tuple = (0.0, 0, 0, {})  # now, done, moved, {group: (n, busy)}
        self._ngroups = 0
        self.buckets = list(DURATION_BUCKETS_S)
        self.feed = Feed(self)

    # ------------------------------------------------------------------ hot path

    def group_of(self, key) -> Group:
        # Keys of one map share everything but a last, token-like word: remember the group of
        # that head (a word with a digit or a symbol ends a group name, so the rest of the key
        # cannot change it). Alphabetic last words may belong to the name: computed each time.
        name = None
        if type(key) is str:
            head, sep, tail = key.rpartition("-")
            if sep and not tail.isalpha():
                cache = self._heads
                name = cache.get(head)
                if name is None:
                    name = key_group(key)
                    if len(cache) >= 10_000:
                        cache.clear()
                    cache[head] = name
        if name is None:
            name = key_group(key)
        g = self.groups.get(name)
        if g is None:
            g = self.groups[name] = Group(name)
            g.order = len(self.groups) + self.graph_version
            self.graph_version += 1
        return g

    def new_task(self, ts, workers: dict) -> None:
        """A task the state created: its group counts it; its edges are counted at the next
        sample (its dependencies are set after this)."""
        g = ts.group = self.group_of(ts.key)
        g.counts["new"] += 1
        self.fresh.append(ts)
        self._workers = workers

    def finished(self, ts, ws, status: str, start, stop, thread, now: float) -> None:
        """A task ended on ``ws``: one stream entry, and its group's time and size."""
        g = ts.group
        if type(start) is not float or type(stop) is not float:
            start = stop = _NAN  # an old worker, or a bad report: counted, not drawn
        elif g is not None:
            d = stop - start
            if d >= 0:
                g.duration_s += d
                g.ndone += 1
                g.hist[bisect.bisect_left(DURATION_BUCKETS_S, d)] += 1
        if g is not None:
            g.nbytes += ts.nbytes
            g.last_active = now
            if status != "OK":
                g.nerred += 1
        self.dirty_workers.add(ws)
        if type(thread) is not int or not 0 <= thread < 2**64:
            thread = 0
        self.stream.append(ts.key, g.name if g is not None else "Other", ws.address, thread,
                           start, stop, status == "OK", ts.nbytes)

    @property
    def stream_seq(self) -> int:
        """Task-stream entries ever recorded (the next one's number)."""
        return self.stream.seq

    def transferred(self, ws, items: list[tuple]) -> None:
        """Transfers a worker reported, checked by :func:`~zfabric.reports.clean_transfers`:
        ``[(peer address, start, stop, nbytes, nkeys), ...]``."""
        address = ws.address
        for peer, start, stop, nbytes, nkeys in items:
            self.transfers.append((address, peer, start, stop, nbytes, nkeys))
            self.transfer_bytes += nbytes
        self.transfer_seq += len(items)

    def logged(self, ws, lines: list, now: float) -> None:
        """Log lines a worker sent (checked by :func:`~zfabric.reports.clean_logs`)."""
        if not lines:
            return
        t = now + self.wall_offset
        address = ws.address
        q = self.worker_logs.get(address)
        if q is None:
            if len(self.worker_logs) >= MAX_LOGGED_WORKERS:
                del self.worker_logs[next(iter(self.worker_logs))]
            q = self.worker_logs[address] = deque(maxlen=WORKER_LOG_LINES)
        for level, text in lines:
            q.append((t, level, text))
            self.new_logs.append((address, t, level, text))
        if len(self.new_logs) > 2 * WORKER_LOG_LINES * 10:
            del self.new_logs[:-WORKER_LOG_LINES * 10]

    def profiled(self, report: dict, now: float) -> None:
        """A worker's profile report, checked by :func:`~zfabric.reports.clean_profile`."""
        if report:
            self.profile_grown |= merge_profile(self.profiles, report, self._profile_nodes)

    def event(self, kind: str) -> None:
        self.event_counts[kind] = self.event_counts.get(kind, 0) + 1

    # ------------------------------------------------------------------ time

    def sample(self, now: float, done: int) -> None:
        """A throughput sample every SAMPLE_INTERVAL_S (called on every tick)."""
        if now < self._next_sample:
            return
        self._next_sample = now + SAMPLE_INTERVAL_S
        moved = self.transfer_bytes + self.bytes_in + self.bytes_out
        t0, done0, moved0 = self._last
        self._last = (now, done, moved)
        if t0 and now > t0:
            dt = now - t0
            self.series.append((now + self.wall_offset, (done - done0) / dt,
                                (moved - moved0) / dt))
            self.series_seq += 1
        if self.fresh:
            self._count_edges()
        if now >= self._next_point:
            self._next_point = now + 1.0
            self._history_point(now, done, moved)

    def _count_edges(self) -> None:
        fresh, self.fresh = self.fresh, []
        new = 0
        for ts in fresh:
            g = ts.group
            if g is None:
                continue
            deps = g.deps
            for d in ts.deps:
                dg = d.group
                if dg is not None and dg is not g:
                    n = deps.get(dg.name)
                    if n is None:
                        new += 1
                        n = 0
                    deps[dg.name] = n + 1
        if new:
            self.graph_version += 1

    def _history_point(self, now: float, done: int, moved: int) -> None:
        t0, done0, moved0, last = self._point_last
        groups = {}
        per = {}
        for g in self.groups.values():
            cur = (g.ndone, g.duration_s)
            per[g.name] = cur
            old = last.get(g.name)
            if old is None:
                old = (0, 0.0)
            if cur[0] != old[0]:
                groups[g.name] = [cur[0] - old[0], round(cur[1] - old[1], 4)]
        self._point_last = (now, done, moved, per)
        if not t0:
            return
        dt = max(now - t0, 1e-9)
        memory = managed = spilled = processing = 0
        for ws in self._workers.values():
            m = ws.metrics or {}
            memory += int(m.get("memory") or 0)
            managed += max(0, ws.nbytes)
            spilled += int(m.get("spilled") or 0)
            processing += len(ws.processing)
        self.history.add([round(now + self.wall_offset, 3), round((done - done0) / dt, 2),
                          round((moved - moved0) / dt, 1), memory, managed, spilled,
                          processing, len(self._workers), groups])

    # ------------------------------------------------------------------ topics

    def log_event(self, topic: str, msg, now: float) -> None:
        q = self.topics.get(topic)
        if q is None:
            if len(self.topics) >= MAX_TOPICS:
                del self.topics[next(iter(self.topics))]
            q = self.topics[topic] = deque(maxlen=TOPIC_LENGTH)
        q.append((now + self.wall_offset, msg))
        if self.on_event is not None:
            self.on_event(topic, [now + self.wall_offset, msg])

    def get_events(self, topic: str | None) -> dict | list:
        if topic is None:
            return {t: [list(e) for e in q] for t, q in self.topics.items()}
        return [list(e) for e in self.topics.get(topic, ())]

    # ------------------------------------------------------------------ reading

    def stream_since(self, since: int | None = None, *, start: float | None = None,
                     stop: float | None = None, count: int | None = None) -> dict:
        """Task-stream records in dask.distributed's shape, oldest first: those numbered
        ``since`` or later, ending after ``start`` and starting before ``stop``, the newest
        ``count``. Returns ``{"records", "next", "dropped"}`` (``dropped``: records after
        ``since`` that the ring had already let go)."""
        ring = self.stream
        first = ring.seq - len(ring)  # number of the oldest entry kept
        dropped = first - since if since is not None and since < first else 0
        if count is not None and start is None and stop is None:
            # only the newest are wanted: read no more of the ring than that
            since = max(since or 0, ring.seq - count)
        entries = ring.entries(since or 0)
        if start is not None:
            entries = [e for e in entries if e[5] is None or e[5] >= start]
        if stop is not None:
            entries = [e for e in entries if e[4] is None or e[4] <= stop]
        if count is not None:
            entries = entries[-count:] if count > 0 else []
        records = []
        for key, group, worker, thread, t0, t1, status, nbytes in entries:
            records.append({
                "key": key, "group": group, "worker": worker, "thread": thread,
                "status": status, "nbytes": nbytes,
                "startstops": [] if t0 is None else
                [{"action": "compute", "start": t0, "stop": t1}],
            })
        return {"records": records, "next": self.stream_seq, "dropped": max(0, dropped)}

    def transfers_since(self, start: float | None) -> list:
        return [list(t) for t in self.transfers if start is None or t[3] >= start]

    def prune(self) -> None:
        """Forget the oldest groups with no live task beyond MAX_IDLE_GROUPS."""
        if len(self.groups) <= MAX_IDLE_GROUPS:
            return
        idle = [g for g in self.groups.values() if not g.live()]
        if len(idle) > MAX_IDLE_GROUPS:
            idle.sort(key=lambda g: g.last_active)
            for g in idle[: len(idle) - MAX_IDLE_GROUPS]:
                del self.groups[g.name]
                tree = self.profiles.pop(g.name, None)
                if tree is not None:
                    self._profile_nodes[0] -= tree[2]
            self.graph_version += 1

    def totals(self) -> dict:
        totals = dict.fromkeys(STATES, 0)
        for g in self.groups.values():
            for st, n in g.counts.items():
                totals[st] += n
        return totals

    def counters(self, state) -> dict:
        return {
            "finished": state.counts["finished"], "erred": state.counts["erred"],
            "messages_in": self.messages_in, "messages_out": self.messages_out,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "transfer_bytes": self.transfer_bytes, "clients": len(state.clients) - 2,
        }

    @staticmethod
    def duration_row(g: Group) -> dict:
        return {"buckets": list(g.hist), "sum": g.duration_s, "count": g.ndone}

    def group_graph(self) -> dict:
        """The groups and their edges: ``{"nodes": [[name, order]], "edges": [[from, to,
        task edges]]}``."""
        return {
            "nodes": [[g.name, g.order] for g in self.groups.values()],
            "edges": [[d, g.name, n] for g in self.groups.values() for d, n in g.deps.items()
                      if d in self.groups],
        }

    @staticmethod
    def task_graph(state) -> tuple:
        """A small graph task by task: ``((key, group, state, (dependency keys)), ...)``."""
        return tuple((str(ts.key), ts.group.name if ts.group is not None else "Other",
                      ts.state, tuple(str(d.key) for d in ts.deps))
                     for ts in list(state.tasks.values()))

    def profile(self, group: str | None = None, limit: int = 10_000) -> dict:
        """The merged profile of ``group`` (or of every group), as ``{group: [label, count,
        [children]]}``; a label is ``"function;file;first line"`` (see
        :mod:`zfabric.worker.profiler`). At most ``limit`` nodes a group, the largest."""
        names = [group] if group is not None else list(self.profiles)
        return {n: profile_wire(self.profiles[n], limit) for n in names if n in self.profiles}

    def delta(self, state, now: float) -> dict:
        """The dashboard's update: what changed since the last call (see
        :mod:`zfabric.scheduler.feed`)."""
        self.prune()
        return self.feed.delta(state, now)

    def snapshot(self, state, now: float) -> dict:
        """Everything the dashboard, ``/metrics`` and ``zfabric top`` show, as plain data."""
        self.prune()
        wall = now + self.wall_offset
        workers = []
        for ws in list(state.workers.values()):
            m = ws.metrics or {}
            workers.append({
                "name": str(ws.name), "address": ws.address, "host": ws.host,
                "nthreads": ws.nthreads, "memory": int(m.get("memory") or 0),
                "memory_limit": ws.memory_limit, "managed": max(0, ws.nbytes),
                "cpu": float(m.get("cpu") or 0.0), "processing": len(ws.processing),
                "executing": int(m.get("executing") or 0), "held": ws.nheld,
                "nbytes": max(0, ws.nbytes), "last_seen_s": max(0.0, now - ws.last_seen),
            })
        groups = [g.row() for g in self.groups.values()]
        totals = self.totals()
        stream = [list(e) for e in self.stream.entries(self.stream.seq - SNAPSHOT_STREAM)]
        transfers = [list(t) for t in list(self.transfers)[-SNAPSHOT_TRANSFERS:]]
        return {
            "time": wall,
            "address": state.address,
            "dashboard": getattr(state, "dashboard_link", None),
            "workers": workers,
            "groups": groups,
            "totals": totals,
            "stream": stream,
            "transfers": transfers,
            "series": [list(s) for s in self.series],
            "events": [[t + self.wall_offset, text] for t, text in state.events[-50:]],
            "event_counts": dict(self.event_counts),
            "counters": self.counters(state),
            "durations": {g.name: self.duration_row(g) for g in self.groups.values()
                          if g.ndone},
            "buckets": list(DURATION_BUCKETS_S),
            "graph": self.group_graph(),
            "history": self.history.points(),
            # the most sampled groups' profiles, their largest nodes (performance_report)
            "profiles": {g: profile_wire(t, SNAPSHOT_PROFILE_NODES) for g, t in sorted(
                self.profiles.items(), key=lambda kv: -kv[1][0])[:SNAPSHOT_PROFILES]},
        }
