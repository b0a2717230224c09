"""Root tasks placed in runs (co-assignment): neighbouring leaves of a graph on one worker.

A task with no dependencies (a root: an array's chunk made from nothing, a tree's leaf) can
run anywhere, so placing each alone sends it to the least loaded worker, and workers of equal
load take turns: leaf 0 here, leaf 1 there. The reduction above a pair of leaves then has to
fetch one of them, for every pair. dask.distributed avoids this by giving a worker a run of
root tasks that are neighbours in priority order (which is ``dask.order``'s order for a
graph), about ``roots / threads`` per thread; so does zfabric, for the root tasks of one
submit op that number at least twice the threads of the cluster (:data:`MIN_PER_THREAD`).
A few independent submits never come to this: each goes where the load says.

The root tasks of such a batch wait in the scheduler's ready queue as one :class:`RootRun`
(queued, in priority order). A worker with a free slot that takes it from the queue claims
its next ``per_thread * nthreads`` tasks: they become the worker's *reserve*, from which it
is filled as its slots free, in turn with more urgent queued work (see
``SchedulerState.fill``). A worker whose reserve and the queue are empty takes half of another
worker's reserve (its tail: the split breaks one pair, not every other), so the last runs
end together. A worker that leaves, pauses or retires gives its reserve back to the queue.

Every step is O(1) per task (amortised): a claim moves the tasks it claims, a theft looks at
the first worker holding a reserve, never at all the workers (:attr:`Reserves.examined`
counts the reserves looked at; tests compare it at 10 and 1,000 workers).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable

from .records import TaskState, WorkerState

#: A batch gets runs when it has at least this many root tasks per thread of the cluster
#: (dask.distributed: a group larger than twice the threads is "root-ish").
MIN_PER_THREAD = 2


class RootRun:
    """Root tasks of one submit op, queued in priority order, that workers claim in runs.

    It sits in the ready queue like a task (by the priority of its first task); popped, a
    worker claims a run from its front and the rest is queued again."""

    __slots__ = ("per_thread", "priority", "tasks")

    def __init__(self, tasks: Iterable[TaskState], per_thread: int = 0):
        self.tasks: deque[TaskState] = deque(tasks)
        self.priority = self.tasks[0].priority if self.tasks else 0
        #: tasks a run gives each thread of the claiming worker; 0: set at the first claim
        #: (roots / threads of the cluster then)
        self.per_thread = per_thread

    def __len__(self) -> int:
        return len(self.tasks)

    def __lt__(self, other) -> bool:  # heap tie-break (priorities are unique)
        return self.priority < other.priority

    def __repr__(self) -> str:
        return f"<RootRun of {len(self.tasks)} tasks>"


def wants_runs(nroots: int, nthreads: int) -> bool:
    """Whether ``nroots`` root tasks of one batch, on a cluster of ``nthreads`` threads, are
    placed in runs (with no worker yet, the first claim decides their length)."""
    return nroots >= 2 and nroots >= MIN_PER_THREAD * nthreads


class Reserves:
    """The runs workers claimed and have not been given yet (see the module)."""

    __slots__ = ("_by_worker", "examined")

    def __init__(self) -> None:
        #: worker -> its reserve, oldest claim first (an OrderedDict: its first entry is
        #: found in O(1) however many were removed before it)
        self._by_worker: OrderedDict[WorkerState, deque[TaskState]] = OrderedDict()
        self.examined = 0  # reserves looked at to find work (tests count the work)

    def claim(self, run: RootRun, ws: WorkerState, cluster_threads: int) -> list[TaskState]:
        """``ws`` takes a run from the front of ``run``: the tasks, in order (amortised O(1)
        per task). The caller gives it those it has slots for and :meth:`keep` s the rest."""
        if not run.per_thread:
            run.per_thread = max(1, len(run.tasks) // max(1, cluster_threads))
        tasks = run.tasks
        n = min(len(tasks), run.per_thread * ws.nthreads)
        taken = [tasks.popleft() for _ in range(n)]
        if tasks:
            run.priority = tasks[0].priority
        return taken

    def keep(self, ws: WorkerState, tasks: list[TaskState]) -> None:
        """Add ``tasks`` (queued, in priority order) to ``ws``'s reserve: before what it holds
        when they are more urgent (a worker claims a run while it holds one only for a more
        urgent batch: a user priority), else after it."""
        if not tasks:
            return
        mine = self._by_worker.get(ws)
        if mine is None:
            self._by_worker[ws] = deque(tasks)
        elif mine and tasks[0].priority < mine[0].priority:
            mine.extendleft(reversed(tasks))
        else:
            mine.extend(tasks)

    def head(self, ws: WorkerState) -> TaskState | None:
        """The next queued task of ``ws``'s reserve (stale entries are dropped), or None."""
        mine = self._by_worker.get(ws)
        if mine is None:
            return None
        while mine:
            ts = mine[0]
            if ts.state == "queued":
                return ts
            mine.popleft()
        del self._by_worker[ws]
        return None

    def pop(self, ws: WorkerState) -> TaskState:
        """Take the task :meth:`head` returned."""
        mine = self._by_worker[ws]
        ts = mine.popleft()
        if not mine:
            del self._by_worker[ws]
        return ts

    def steal(self, ws: WorkerState) -> bool:
        """``ws`` ran out of work: it takes the tail half of the oldest reserve of another
        worker. False when no other worker holds one."""
        by_worker = self._by_worker
        for victim, theirs in by_worker.items():
            self.examined += 1
            if victim is ws:
                continue
            n = (len(theirs) + 1) // 2
            if not n:
                continue
            taken: deque[TaskState] = deque()
            for _ in range(n):
                taken.appendleft(theirs.pop())
            mine = by_worker.get(ws)
            if mine is None:
                by_worker[ws] = taken
            else:
                mine.extend(taken)
            if not theirs:
                del by_worker[victim]
            return True
        return False

    def give_back(self, ws: WorkerState) -> RootRun | None:
        """``ws`` leaves, pauses or retires: its reserve, to queue again, or None."""
        mine = self._by_worker.pop(ws, None)
        if not mine:
            return None
        live = [ts for ts in mine if ts.state == "queued"]
        return RootRun(live) if live else None

    def reserved(self) -> dict[WorkerState, list[TaskState]]:
        """Each worker's live reserve (tests, diagnostics; O(reserved))."""
        return {ws: [ts for ts in r if ts.state == "queued"]
                for ws, r in self._by_worker.items()}
