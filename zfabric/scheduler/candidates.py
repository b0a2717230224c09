"""Where a ready task may run, kept indexed as the workers change, so that choosing costs
O(log workers) and not a scan of them all.

:class:`Candidates` keeps

- the workers with a free slot in a heap by load (tasks per thread, then the order they
  joined in). A worker whose load or slots changed (a task given, ended, seceded...:
  :meth:`Candidates.update`, which :class:`~.records.WorkerState` calls itself) is marked,
  and gets a new entry when the heap is next read, however often it changed meanwhile; an
  entry is live while its ``version`` is the worker's. Dead entries are dropped when they
  reach the top, and the heap is rebuilt when most of it is dead;
- the workers by name, address and host (for ``workers=``) and by resource (for
  ``resources=``), so that a restricted task looks only at the workers it may run on.

The index also keeps the duration of a task, averaged over every worker's tasks: what a
worker may queue beyond its threads (its ``limit``, about ``PREFETCH_TARGET_S`` of work) follows
it, so that equal workers get equal windows. (Each worker's own average made them differ by
chance: one slow task on one worker shrank its window for the next graph, and 64 ready tasks
went 3 to it and 61 to the other, which then ran them while the first stood idle.)

A task with large dependencies looks at their holders first (the policy prefers, among the
holders with a free slot, the one that would start it first, counting the bytes it would
receive), and only where none has a slot at the least loaded worker: the holders and the top
of the heap are all a choice looks at, O(holders + 1). :meth:`Candidates.choose` makes the
same choice as
:func:`.policy.choose_worker` over every worker, the least loaded breaking ties in the order
the workers joined; :attr:`Candidates.examined` counts the workers it looked at.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable

from .policy import allowed, expected_duration, may_overflow, score
from .records import TaskState, WorkerState, _add, _discard, _members

#: (score, the worker, the bytes it holds): a worker as a choice for one task
_Entry = tuple[tuple[float, float, int], WorkerState, int]


def _first(entry: tuple) -> tuple:
    return entry[0]


def _load(ws: WorkerState) -> float:
    return ws.occupancy / ws.nthreads


def _local(large: list[TaskState], ws: WorkerState) -> int:
    """The bytes of ``large`` that ``ws`` holds."""
    local = 0
    for d in large:
        if d.held_by(ws):
            local += d.nbytes
    return local


class Candidates:
    """The workers a task may be given, by load, name and resource (see the module)."""

    __slots__ = ("_by_order", "_changed", "_heap", "_order", "avg_duration", "by_name",
                 "by_resource", "examined", "nthreads", "window_avg", "workers")

    def __init__(self) -> None:
        # (load, order, version): numbers only, so that the garbage collector need not
        # track the entries; the worker is found by its order
        self._heap: list[tuple[float, int, int]] = []
        self._by_order: dict[int, WorkerState] = {}
        self._changed: set[WorkerState] = set()  # their heap entries are out of date
        self._order = itertools.count()
        self.workers: set[WorkerState] = set()
        self.nthreads = 0  # the workers' threads, summed
        #: address, name and host -> the worker, or a set of two or more (most names are one
        #: worker's: no set object each)
        self.by_name: dict[str, WorkerState | set[WorkerState]] = {}
        self.by_resource: dict[str, set[WorkerState]] = {}  # resource -> workers having it
        self.examined = 0  # workers looked at while choosing (tests count the work)
        self.avg_duration: float | None = None  # of a task, over every worker's (seconds)
        self.window_avg = 0.0  # the average the workers' windows follow (see learn)

    # ------------------------------------------------------------------ the workers change

    def add(self, ws: WorkerState) -> None:
        ws.order = next(self._order)
        ws.index = self
        ws.version = 0
        self.workers.add(ws)
        self.nthreads += ws.nthreads
        self._by_order[ws.order] = ws
        by_name = self.by_name
        for name in {ws.address, ws.name, ws.host}:
            by_name[name] = _add(by_name.get(name), ws)
        for r in ws.resources:
            self.by_resource.setdefault(r, set()).add(ws)
        self.update(ws)

    def remove(self, ws: WorkerState) -> None:
        if ws.index is not self:
            return
        ws.index = None
        ws.version += 1
        self.workers.discard(ws)
        self.nthreads -= ws.nthreads
        self._changed.discard(ws)
        del self._by_order[ws.order]
        by_name = self.by_name
        for name in {ws.address, ws.name, ws.host}:
            left = _discard(by_name.get(name), ws)
            if left is None:
                by_name.pop(name, None)
            else:
                by_name[name] = left
        for r in ws.resources:
            members = self.by_resource.get(r)
            if members is not None:
                members.discard(ws)
                if not members:
                    del self.by_resource[r]

    def learn(self, duration: float) -> float:
        """A task ran ``duration`` seconds on some worker. Returns the duration the workers'
        windows follow: the moving average over all workers' tasks (as each worker's own)
        as it was when it last moved by more than a quarter. O(1)."""
        avg = self.avg_duration
        avg = self.avg_duration = duration if avg is None else avg * 0.9 + duration * 0.1
        window = self.window_avg
        if not window * 0.8 < avg < window * 1.25:
            window = self.window_avg = avg
        return window

    def update(self, ws: WorkerState) -> None:
        """``ws``'s load or slots may have changed (O(1); the heap learns it when read)."""
        self._changed.add(ws)

    def _refresh(self) -> None:
        """New heap entries for the workers that changed (O(log workers) each)."""
        heap = self._heap
        push = heapq.heappush
        for ws in self._changed:
            if ws.index is self:
                ws.version += 1
                if ws.has_slot():
                    push(heap, (ws.occupancy / ws.nthreads, ws.order, ws.version))
        self._changed.clear()
        if len(heap) > 2 * len(self.workers) + 64:
            self._rebuild()

    def _rebuild(self) -> None:
        self._heap = [(_load(ws), ws.order, ws.version) for ws in self.workers
                      if ws.has_slot()]
        heapq.heapify(self._heap)

    def validate(self, workers: Iterable[WorkerState]) -> None:
        """Invariants (tests): the index holds exactly ``workers``, and each of them with a
        free slot has a live heap entry at its current load."""
        self._refresh()
        workers = set(workers)
        assert self.workers == workers, (self.workers ^ workers)
        assert self.nthreads == sum(ws.nthreads for ws in workers), self.nthreads
        live = {self._by_order[e[1]]: e[0] for e in self._heap
                if e[1] in self._by_order and e[2] == self._by_order[e[1]].version}
        for ws in workers:
            assert ws.index is self, ws
            if ws.has_slot():
                assert live.get(ws) == _load(ws), (ws, live.get(ws), _load(ws))
        for name, members in self.by_name.items():
            assert all(name in (ws.address, ws.name, ws.host) for ws in _members(members)), name

    # ------------------------------------------------------------------ choosing

    def least_loaded(self) -> WorkerState | None:
        """The worker with a free slot and the least load (amortised O(log workers))."""
        if self._changed:
            self._refresh()
        heap = self._heap
        by_order = self._by_order
        while heap:
            entry = heap[0]
            ws = by_order.get(entry[1])
            self.examined += 1
            if ws is not None and entry[2] == ws.version and ws.has_slot():
                return ws
            heapq.heappop(heap)
        return None

    def choose(self, ts: TaskState) -> WorkerState | None:
        """The best worker with a free slot for ``ts``, or None to queue it (the choice of
        :func:`.policy.choose_worker` over all the workers)."""
        if ts.parents is None and ts.extra is None:  # the common case: any worker will do
            return self.least_loaded()
        large = [d for d in ts.deps if d.value is None and d.holders is not None] \
            if ts.parents is not None else []
        if not ts.restricted:
            return self._best(ts, large, None, True)
        opts = ts.options or {}
        pool = self._pool(opts, strict=True)
        ws = self._best(ts, large, pool, True)
        if ws is None and opts.get("allow_other_workers"):
            ws = self._best(ts, large, self._pool(opts, strict=False), False)
        return ws

    def _pool(self, opts: dict, strict: bool) -> set[WorkerState] | None:
        """The workers a restricted task may run on (a superset), or None for any."""
        names = opts.get("workers") if strict else None
        if names:
            pool: set[WorkerState] = set()
            for n in names:
                pool.update(_members(self.by_name.get(n)))
            return pool
        needs = [r for r, amount in (opts.get("resources") or {}).items() if amount > 0]
        if not needs:
            return None
        sets = [self.by_resource.get(r, set()) for r in needs]
        return min(sets, key=len)

    def _best(self, ts: TaskState, large: list[TaskState], pool: set[WorkerState] | None,
              strict: bool) -> WorkerState | None:
        total = 0
        for d in large:
            total += d.nbytes
        duration = expected_duration(ts, self.avg_duration)
        best: _Entry | None = None
        if large:
            holders: dict[WorkerState, None] = {}
            for d in large:
                holders.update(dict.fromkeys(d.who_has))
            best = self._scan(ts, large, pool, strict, holders, best, total, duration)
            if not ts.restricted:  # (any worker may run it: pool is None)
                other: WorkerState | None = None
                local = 0
                if best is not None and best[2] > 0:
                    other, local = best[1], best[2]
                else:
                    other = self._least_loaded_or(best, total, duration)
                full = self._overflow(ts, large, holders, other, local, total)
                if full is not None:
                    return full[1]  # holds most of the bytes: waits less than they move
                return other
            if best is not None and best[2] > 0:
                return best[1]  # holds some of the bytes: a holder with a free slot
        if pool is not None:
            best = self._scan(ts, large, pool, strict, pool, best, total, duration)
            return None if best is None else best[1]
        return self._least_loaded_or(best, total, duration)

    def _least_loaded_or(self, best: _Entry | None, total: int, duration: float | None,
                         ) -> WorkerState | None:
        """The least loaded worker with a free slot (which holds none of the bytes, or is
        ``best``, scanned already), or ``best`` where it scores better."""
        ws = self.least_loaded()
        if ws is not None and (best is None or (*score(ws, 0, total, duration), ws.order)
                               < best[0]):
            return ws
        return None if best is None else best[1]

    def _overflow(self, ts: TaskState, large: list[TaskState], holders: Iterable[WorkerState],
                  other: WorkerState | None, other_local: int, total: int) -> _Entry | None:
        """The first holder with no free slot, by (-bytes held, load, order), that holds more
        than half of the ``total`` bytes and more than ``other`` (``other_local``), and
        :func:`.policy.may_overflow` rather than ``other``; O(holders)."""
        full = []
        for ws in holders:
            if ws.index is not self or ws.has_slot():
                continue
            self.examined += 1
            local = _local(large, ws)
            if 2 * local > total and local > other_local:
                full.append(((-local, _load(ws), ws.order), ws, local))
        full.sort(key=_first)
        for entry in full:
            if may_overflow(ts, entry[1], entry[2] - other_local, self.avg_duration, other):
                return entry
        return None

    def _scan(self, ts: TaskState, large: list[TaskState], pool: set[WorkerState] | None,
              strict: bool, candidates: Iterable[WorkerState], best: _Entry | None,
              total: int, duration: float | None) -> _Entry | None:
        """The best of ``candidates`` and ``best`` by (:func:`.policy.score`, order)."""
        restricted = ts.restricted
        for ws in candidates:
            self.examined += 1
            if ws.index is not self or not ws.has_slot() \
                    or (pool is not None and ws not in pool) \
                    or (restricted and not allowed(ts, ws, strict=strict)):
                continue
            local = _local(large, ws)
            entry = ((*score(ws, local, total, duration), ws.order), ws, local)
            if best is None or entry[0] < best[0]:
                best = entry
        return best
