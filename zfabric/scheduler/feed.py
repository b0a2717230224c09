"""What the dashboard is sent: deltas that cost what changed, a history, merged profiles.

Theory of operation
-------------------
The scheduler's loop asks :meth:`Feed.delta` for the dashboard's update a few times a second.
A delta carries only what changed since the last one: the rows of the workers that changed
(those that finished or moved something since, plus a bounded round-robin look at
:data:`SCAN_WORKERS` others for heartbeat changes: never all of them; at most
:data:`MAX_ROWS` rows a delta, the rest follow in the next), the rows of the groups
whose counters moved, the task-stream entries, transfers, samples and events that are new, the
history points that are new, the group graph when it changed, and the names of the groups
whose profile grew. So at 1,000 idle workers and 100,000 tasks a delta costs the same as at
10 workers and 10 tasks when nothing moves; :attr:`Feed.work` counts what one delta touched
(tests/test_dashboard_scale.py holds it to that).

:class:`History` keeps the dashboard's series for the last hour, downsampled: one point a
second for :data:`FINE_POINTS` seconds, one per :data:`COARSE_EVERY` seconds for an hour. A
point is ``[wall time, tasks/s, bytes moved/s, memory, managed, spilled, processing, workers,
{group: [tasks finished, busy seconds]}]``: the task stream, throughput, memory and per-group
progress, at the resolution a past computation needs.

Profiles (:func:`merge_profile`, :func:`profile_wire`): the trees the workers' profilers send
(see :mod:`zfabric.worker.profiler`), merged per group into ``[count, {label: node}]``,
bounded in nodes.

Pure: the caller gives ``now`` and the scheduler state; nothing here reads a clock.
"""

from __future__ import annotations

from collections import deque
from itertools import islice

#: Workers looked at each delta beyond those known to have changed (heartbeat metrics).
SCAN_WORKERS = 128
#: Worker rows one delta rebuilds at most (more changed: the rest come in the next ones).
MAX_ROWS = 100
#: Task-stream entries one delta carries at most (the newest; at thousands of tasks a second
#: the page's stream is a sample, the counters stay exact).
DELTA_STREAM = 500
#: Task keys a worker row names (of those it processes).
ROW_KEYS = 20
#: History: one-second points kept, seconds per coarse point, coarse points kept (an hour).
FINE_POINTS = 300
COARSE_EVERY = 10
COARSE_POINTS = 360
#: A task graph this small is sent task by task (the graph page's task-level view).
SMALL_GRAPH = 300
#: Seconds between deltas that carry changed profiles and the task-level graph.
SLOW_EVERY_S = 1.0
#: Nodes the merged profile of one group keeps, and of all groups together.
PROFILE_GROUP_NODES = 20_000
PROFILE_NODES = 200_000
#: Nodes of one profile sent to the page (the smallest go first).
PROFILE_SENT = 3000


def worker_row(ws, now: float) -> dict:
    m = ws.metrics or {}
    return {
        "name": str(ws.name), "address": ws.address, "host": ws.host,
        "nthreads": ws.nthreads, "memory": int(m.get("memory") or 0),
        "memory_limit": ws.memory_limit, "managed": max(0, ws.nbytes),
        "spilled": int(m.get("spilled") or 0),
        "cpu": float(m.get("cpu") or 0.0), "processing": len(ws.processing),
        "executing": int(m.get("executing") or 0), "held": ws.nheld,
        "nbytes": max(0, ws.nbytes), "last_seen_s": max(0.0, now - ws.last_seen),
        "io": [int(m.get(k) or 0) for k in ("disk_read", "disk_write", "net_recv", "net_sent")],
        "keys": [str(k) for k in islice(ws.processing, ROW_KEYS)],
    }


class History:
    """The dashboard's series over the last hour (see the module docstring)."""

    def __init__(self) -> None:
        self.fine: deque[list] = deque(maxlen=FINE_POINTS)
        self.coarse: deque[list] = deque(maxlen=COARSE_POINTS)
        self.seq = 0  # fine points ever added
        self.coarse_seq = 0
        self._acc: list = []

    def add(self, point: list) -> None:
        self.fine.append(point)
        self.seq += 1
        acc = self._acc
        acc.append(point)
        if len(acc) >= COARSE_EVERY:
            self.coarse.append(_merge_points(acc))
            self.coarse_seq += 1
            self._acc = []

    def points(self) -> dict:
        return {"fine": list(self.fine), "coarse": list(self.coarse)}


def _merge_points(points: list[list]) -> list:
    n = len(points)
    out: list = [points[-1][0]]
    for i in range(1, 8):
        out.append(sum(p[i] for p in points) / n if i < 3 else points[-1][i])
    groups: dict[str, list] = {}
    for p in points:
        for name, (count, busy) in p[8].items():
            g = groups.get(name)
            if g is None:
                groups[name] = [count, busy]
            else:
                g[0] += count
                g[1] += busy
    out.append(groups)
    return out


def merge_profile(trees: dict, delta: dict, counts: list) -> set:
    """Add a worker's report (``{group: [label, count, children]}``, checked at the protocol
    door) into ``trees`` (``{group: [count, {label: node}]}``). ``counts``: ``[nodes of all
    trees]``, kept up to date; a node beyond the bounds is counted at its parent. Returns the
    groups that grew."""
    grown = set()
    for group, wire in delta.items():
        tree = trees.get(group)
        if tree is None:
            if counts[0] >= PROFILE_NODES:
                continue
            tree = trees[group] = [0, {}, 1]  # count, children, nodes of this tree
            counts[0] += 1
        tree[0] += wire[1]
        stack = [(tree, wire[2])]
        while stack:
            node, children = stack.pop()
            for label, count, sub in children:
                child = node[1].get(label)
                if child is None:
                    if tree[2] >= PROFILE_GROUP_NODES or counts[0] >= PROFILE_NODES:
                        continue
                    child = node[1][label] = [0, {}]
                    tree[2] += 1
                    counts[0] += 1
                child[0] += count
                if sub:
                    stack.append((child, sub))
        grown.add(group)
    return grown


def profile_wire(tree: list, limit: int = PROFILE_SENT) -> list:
    """A merged tree as ``[label, count, [children]]`` for the page: the largest nodes, at
    most ``limit`` of them (a node is kept when its count is at least the ``limit``-th
    largest)."""
    counts = []
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in node[1].values():
            counts.append(child[0])
            stack.append(child)
    floor = 0
    if len(counts) > limit:
        counts.sort(reverse=True)
        floor = counts[limit - 1]

    def wire(label: str, node: list) -> list:
        return [label, node[0], [wire(t, c) for t, c in node[1].items() if c[0] >= floor and
                                 c[0] > 0]]

    return wire("", tree)


class Feed:
    """Builds the dashboard's deltas from the observer and the state (module docstring)."""

    def __init__(self, observer) -> None:
        self.obs = observer
        self.rows: dict[bytes, tuple] = {}  # worker ident -> (ws, metrics seen, signature)
        self._order: list = []  # workers to look at in turn
        self._turn = 0
        self._membership = (-1, -1)
        self.groups: dict[str, tuple] = {}  # name -> signature sent
        self.stream_seq = 0
        self.transfer_seq = 0
        self.series_seq = 0
        self.event_time = float("-inf")
        self.history_seq = 0
        self.coarse_seq = 0
        self.graph_version = -1
        self.next_slow = 0.0
        self.tasks_sent: tuple = ()
        self.work: dict[str, int] = {}

    def delta(self, state, now: float) -> dict:
        obs = self.obs
        work = self.work = {"workers": 0, "worker_rows": 0, "groups": 0, "group_rows": 0,
                            "stream": 0, "tasks": 0}
        wall = now + obs.wall_offset
        out: dict = {"kind": "delta", "time": wall, "address": state.address,
                     "dashboard": getattr(state, "dashboard_link", None)}
        out["workers"], out["workers_gone"] = self._workers(state, now, work)
        out["groups"], out["groups_gone"] = self._groups(work)
        out["totals"] = obs.totals()
        ring = obs.stream
        since = max(self.stream_seq, ring.seq - DELTA_STREAM)
        out["stream"] = [[k, g, w, th, t0 if t0 is None else round(t0, 4),
                          t1 if t1 is None else round(t1, 4), st, nb]
                         for k, g, w, th, t0, t1, st, nb in ring.entries(since)]
        work["stream"] = len(out["stream"])
        self.stream_seq = ring.seq
        new = min(obs.transfer_seq - self.transfer_seq, len(obs.transfers))
        out["transfers"] = [list(t) for t in islice(obs.transfers, len(obs.transfers) - new,
                                                    None)] if new > 0 else []
        self.transfer_seq = obs.transfer_seq
        new = min(obs.series_seq - self.series_seq, len(obs.series))
        out["series"] = [list(s) for s in islice(obs.series, len(obs.series) - new, None)] \
            if new > 0 else []
        self.series_seq = obs.series_seq
        events: list[list] = []
        for t, text in reversed(state.events):
            if t <= self.event_time or len(events) >= 50:
                break
            events.append([t + obs.wall_offset, text])
        if events:
            self.event_time = events[0][0] - obs.wall_offset
        out["events"] = events[::-1]
        h = obs.history
        new = min(h.seq - self.history_seq, len(h.fine))
        out["history"] = list(islice(h.fine, len(h.fine) - new, None)) if new > 0 else []
        new = min(h.coarse_seq - self.coarse_seq, len(h.coarse))
        out["history_coarse"] = list(islice(h.coarse, len(h.coarse) - new, None)) \
            if new > 0 else []
        self.history_seq, self.coarse_seq = h.seq, h.coarse_seq
        out["counters"] = obs.counters(state)
        out["event_counts"] = dict(obs.event_counts)
        if obs.new_logs:
            out["logs"], obs.new_logs = [list(x) for x in obs.new_logs], []
        out["durations"] = {r["name"]: obs.duration_row(obs.groups[r["name"]])
                            for r in out["groups"] if obs.groups[r["name"]].ndone}
        out["buckets"] = obs.buckets
        if obs.graph_version != self.graph_version:
            self.graph_version = obs.graph_version
            out["graph"] = obs.group_graph()
        if now >= self.next_slow:
            self.next_slow = now + SLOW_EVERY_S
            if obs.profile_grown:
                grown, obs.profile_grown = obs.profile_grown, set()
                out["profiles"] = {g: profile_wire(obs.profiles[g]) for g in grown
                                   if g in obs.profiles}
            if len(state.tasks) <= SMALL_GRAPH:
                tasks = obs.task_graph(state)
                work["tasks"] = len(tasks)
                if tasks != self.tasks_sent:
                    self.tasks_sent = out["tasks"] = tasks
            elif self.tasks_sent != ():
                self.tasks_sent = ()
                out["tasks"] = None  # too large now: the page shows groups only
        return out

    def _workers(self, state, now: float, work: dict) -> tuple[list, list]:
        rows = self.rows
        workers = state.workers
        gone = []
        membership = (len(workers), sum(self.obs.event_counts.values()))
        look = []
        if membership != self._membership:
            self._membership = membership
            for ident in [i for i in rows if i not in workers]:
                gone.append(rows.pop(ident)[0].address)
            look = [ws for ident, ws in workers.items() if ident not in rows]
            self._order = list(workers.values())
            work["workers"] += len(workers)
        dirty = self.obs.dirty_workers
        if dirty:
            take = list(islice(dirty, MAX_ROWS)) if len(dirty) > MAX_ROWS else list(dirty)
            dirty.difference_update(take)  # the rest: in the next delta
            look.extend(take)
        order = self._order
        if order:
            n = min(SCAN_WORKERS, len(order))
            start = self._turn % len(order)
            look.extend(order[start:start + n])
            if start + n > len(order):
                look.extend(order[:start + n - len(order)])
            self._turn = start + n
        out: list[dict] = []
        seen = set()
        for ws in look:
            if len(out) >= MAX_ROWS:
                break  # bounded: the others are seen again (dirty, or on the next round)
            work["workers"] += 1
            ident = ws.ident
            if ident in seen or workers.get(ident) is not ws:
                continue
            seen.add(ident)
            sig = (len(ws.processing), ws.nbytes, ws.nheld)
            old = rows.get(ident)
            if old is not None and old[2] == sig and (old[1] is ws.metrics
                                                      or old[1] == ws.metrics):
                continue
            rows[ident] = (ws, ws.metrics, sig)
            out.append(worker_row(ws, now))
            work["worker_rows"] += 1
        return out, gone

    def _groups(self, work: dict) -> tuple[list, list]:
        groups = self.obs.groups
        sent = self.groups
        gone = [name for name in sent if name not in groups]
        for name in gone:
            del sent[name]
        out: list[dict] = []
        for name, g in groups.items():
            work["groups"] += 1
            sig = (*g.counts.values(), g.ndone, g.nbytes, g.nerred)
            if sent.get(name) != sig:
                sent[name] = sig
                out.append(g.row())
                work["group_rows"] += 1
        return out, gone
