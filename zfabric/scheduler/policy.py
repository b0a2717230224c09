"""Pure scheduling decisions: where a ready task runs (restrictions, data locality, load)
and which tasks a dead worker was probably running."""

from __future__ import annotations

from collections.abc import Iterable

from .records import TaskState, WorkerState


def allowed(ts: TaskState, ws: WorkerState, *, strict: bool = True) -> bool:
    """Whether ``ws`` may run ``ts`` (resources always; worker names unless loosened)."""
    opts = ts.options
    if not opts:
        return True
    needs = opts.get("resources")
    if needs:
        for name, amount in needs.items():
            if ws.available.get(name, 0) < amount:
                return False
    names = opts.get("workers")
    if names and strict:
        return ws.address in names or ws.name in names or ws.host in names
    return True


def choose_worker(ts: TaskState, workers: Iterable[WorkerState]) -> WorkerState | None:
    """The best worker with a free slot for ``ts``, or None to queue it.

    Prefers the worker that already holds the most bytes of the task's large dependencies
    (small ones travel inline anyway), then the least loaded one.
    """
    large = [d for d in ts.deps if d.value is None and d.holders is not None] if ts.deps else ()
    loose = bool(ts.options and ts.options.get("allow_other_workers"))
    best = None
    best_score = None
    for strict in (True, False) if loose else (True,):
        for ws in workers:
            if not ws.has_slot() or (ts.restricted and not allowed(ts, ws, strict=strict)):
                continue
            local = 0
            for d in large:
                if d.held_by(ws):
                    local += d.nbytes
            score = (-local, ws.occupancy / ws.nthreads)
            if best_score is None or score < best_score:
                best, best_score = ws, score
        if best is not None:
            return best
    return None


def probably_running(ws: WorkerState, processing: list[TaskState]) -> set[TaskState]:
    """The tasks a worker that died was probably running: those it said it started and, while
    that leaves some of its threads unaccounted for, the oldest others it had been given.

    A worker starts what it gets at once while it has a free thread, but says so only on its
    next message: a task that kills its process at once would otherwise never be blamed, and
    would go on killing one worker after another.
    """
    running = {ts for ts in processing if ts.started}
    for ts in processing:  # in the order they were given
        if len(running) >= ws.nthreads:
            break
        running.add(ts)
    return running
