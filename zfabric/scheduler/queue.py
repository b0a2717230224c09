"""Queued tasks, most urgent first, cheaply in the common case."""

from __future__ import annotations

import heapq
from collections import deque


class ReadyQueue:
    """Tasks that are ready but have no worker slot yet, by ``TaskState.priority``.

    Most tasks arrive in priority order (default priority, submission order): those go to a
    FIFO, which costs O(1) each way. A task that arrives out of order (a user priority, a task
    put back after its worker died) goes to a heap. ``pop`` takes whichever head is smaller.
    Entries are not removed when a task leaves the queued state; the caller skips them. An
    entry may also be a :class:`~.runs.RootRun` (root tasks claimed in runs), by the priority
    of its first task.
    """

    __slots__ = ("fifo", "heap")

    def __init__(self):
        self.fifo: deque = deque()
        self.heap: list = []

    def __bool__(self) -> bool:
        return bool(self.fifo) or bool(self.heap)

    def __len__(self) -> int:
        return len(self.fifo) + len(self.heap)

    def push(self, ts) -> None:
        fifo = self.fifo
        if not fifo or fifo[-1].priority < ts.priority:
            fifo.append(ts)
        else:
            heapq.heappush(self.heap, (ts.priority, ts))

    def head_priority(self) -> int:
        """The priority of the entry :meth:`pop` would return (the queue is not empty)."""
        fifo, heap = self.fifo, self.heap
        if heap and (not fifo or heap[0][0] < fifo[0].priority):
            return heap[0][0]
        return fifo[0].priority

    def pop(self):
        fifo, heap = self.fifo, self.heap
        if heap and (not fifo or heap[0][0] < fifo[0].priority):
            return heapq.heappop(heap)[1]
        return fifo.popleft()


def restriction(ts) -> tuple:
    """What decides where a restricted task may run: its resources, its workers, and whether
    it may run elsewhere. Tasks with the same restriction can run on the same workers."""
    o = ts.options or {}
    res = o.get("resources")
    names = o.get("workers")
    return (tuple(sorted(res.items())) if res else (), tuple(names) if names else (),
            bool(o.get("allow_other_workers")))


class RestrictedQueue:
    """Queued tasks that only some workers may run, grouped by :func:`restriction`, each
    group a heap by priority.

    Filling asks the policy about each group's most urgent task only: when it cannot run
    anywhere now, neither can the rest of its group. So 300,000 tasks waiting for a resource
    no worker has cost one check per fill, not a sort of all of them. Removal is lazy (an
    entry is live while its token is the task's current one); a group's heap is rebuilt when
    most of it is dead.
    """

    __slots__ = ("_groups", "_live", "_member", "_tokens")

    def __init__(self):
        self._groups: dict[tuple, list] = {}  # restriction -> heap of (priority, token, task)
        self._live: dict[tuple, int] = {}  # restriction -> live entries in its heap
        self._member: dict = {}  # task -> (token, restriction)
        self._tokens = 0

    def __bool__(self) -> bool:
        return bool(self._member)

    def __len__(self) -> int:
        return len(self._member)

    def __contains__(self, ts) -> bool:
        return ts in self._member

    def add(self, ts) -> None:
        self.discard(ts)
        self._tokens += 1
        group = restriction(ts)
        self._member[ts] = (self._tokens, group)
        heap = self._groups.get(group)
        if heap is None:
            heap = self._groups[group] = []
            self._live[group] = 0
        heapq.heappush(heap, (ts.priority, self._tokens, ts))
        self._live[group] += 1

    def discard(self, ts) -> None:
        entry = self._member.pop(ts, None)
        if entry is None:
            return
        group = entry[1]
        self._live[group] -= 1
        if len(self._groups[group]) > 2 * self._live[group] + 64:
            heap = [e for e in self._groups[group] if self._is_live(e)]
            heapq.heapify(heap)
            self._groups[group] = heap

    def _is_live(self, entry) -> bool:
        m = self._member.get(entry[2])
        return m is not None and m[0] == entry[1]

    def fill(self, choose, dispatch) -> None:
        """Dispatch every task that ``choose(ts)`` finds a worker for (``dispatch(ts, ws)``),
        most urgent first within each group."""
        for group in list(self._groups):
            heap = self._groups[group]
            while heap:
                entry = heap[0]
                ts = entry[2]
                if not self._is_live(entry):
                    heapq.heappop(heap)
                    continue
                if ts.state != "queued":
                    heapq.heappop(heap)
                    self.discard(ts)
                    heap = self._groups[group]
                    continue
                ws = choose(ts)
                if ws is None:
                    break
                heapq.heappop(heap)
                self.discard(ts)
                heap = self._groups[group]
                dispatch(ts, ws)
            if not self._live[group]:
                del self._groups[group]
                del self._live[group]
