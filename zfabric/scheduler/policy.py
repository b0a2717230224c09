"""Pure scheduling decisions: where a ready task runs (restrictions, data locality, load)
and which tasks a dead worker was probably running."""

from __future__ import annotations

from collections.abc import Iterable

from ..config import DEFAULT
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


#: What moving a dependency is reckoned to cost, in bytes per second (dask.distributed's
#: default estimate of bandwidth): a worker with no free slot that holds most of a task's
#: inputs takes it anyway while the work queued beyond its slots, at the task's expected
#: duration, would take less time than moving those inputs (see :func:`may_overflow`).
TRANSFER_BYTES_PER_S = 100e6


def expected_duration(ts: TaskState, avg: float | None) -> float | None:
    """What ``ts`` is expected to take: its group's mean so far, else ``avg`` (every task's)."""
    g = ts.group
    if g is not None and g.ndone:
        return g.duration_s / g.ndone
    return avg


def start_estimate(ws: WorkerState, missing: int, duration: float | None) -> float:
    """When ``ws`` would start a task that needs ``missing`` bytes it does not hold: the work
    queued at it (its tasks per thread, each ``duration`` long) plus moving those bytes at
    ``TRANSFER_BYTES_PER_S`` (dask.distributed's ``worker_objective``). ``duration`` None (no
    task has finished yet): the bytes alone, so that the most bytes held win, as before any
    duration is known."""
    moving = missing / TRANSFER_BYTES_PER_S
    if duration is None:
        return moving
    return ws.occupancy * duration / ws.nthreads + moving


def score(ws: WorkerState, local: int, total: int, duration: float | None,
          ) -> tuple[float, float]:
    """How good ``ws`` is for a task whose large inputs are ``total`` bytes, ``local`` of them
    held by ``ws``: lower is better. By :func:`start_estimate`, then load: two workers holding
    nearly the same bytes compare by the work queued at them, and a worker holding many more
    bytes still wins over one slightly less loaded."""
    return (start_estimate(ws, total - local, duration), ws.occupancy / ws.nthreads)


def may_overflow(ts: TaskState, ws: WorkerState, saved: int, avg: float | None,
                 other: WorkerState | None) -> bool:
    """Whether ``ws``, though it has no free slot, may take ``ts`` rather than ``other`` (the
    best worker with a free slot; None: the task would wait in the scheduler's queue, about
    one window, ``PREFETCH_TARGET_S``), ``saved``: the bytes of its inputs that ``ws`` holds
    beyond those ``other`` holds: the tasks queued at ``ws`` beyond its slots, each as long as
    ``ts`` is expected to be, end before ``other`` would have run its queue and received those
    bytes (a split of a shuffle group runs where the group is rather than move the whole
    group for 0.1 ms of work); and it still holds fewer than ``PREFETCH_MAX`` tasks beyond
    its threads."""
    if ws.status != "running" or ws.retiring or ts.restricted:
        return False
    if ws.occupancy - ws.nthreads >= DEFAULT.PREFETCH_MAX:
        return False  # as many queued beyond its threads as any worker may hold
    beyond = ws.occupancy - ws.limit + 1
    duration = expected_duration(ts, avg)
    if duration is None:
        return False
    wait = (DEFAULT.PREFETCH_TARGET_S if other is None
            else other.occupancy * duration / other.nthreads)
    return beyond * duration / ws.nthreads < wait + saved / TRANSFER_BYTES_PER_S


def large_deps(ts: TaskState) -> list[TaskState]:
    """The dependencies of ``ts`` that travel between workers (small ones go inline)."""
    return [d for d in ts.deps if d.value is None and d.holders is not None] if ts.deps else []


def choose_worker(ts: TaskState, workers: Iterable[WorkerState],
                  avg: float | None = None) -> WorkerState | None:
    """The best worker with a free slot for ``ts``, or None to queue it (the reference:
    :class:`.candidates.Candidates` makes the same choice without a scan of the workers).

    Among the workers that hold some of the bytes of the task's large dependencies (small ones
    travel inline), or where none of them has a slot among all, the best by :func:`score`:
    the earliest estimated start, counting the work queued at it and the bytes it would have
    to receive, then the least loaded one. (Only holders, as dask.distributed's
    ``decide_worker``: the bandwidth alone undercounts a fetch, a round trip each, and a
    task pulled off a busy holder to an idle worker made an array's reductions fetch their
    chunks one by one.) A worker with no free slot that holds more than half of those bytes,
    and more than the chosen worker, takes the task while :func:`may_overflow` (``avg``:
    every task's mean duration).
    """
    large = large_deps(ts)
    loose = bool(ts.options and ts.options.get("allow_other_workers"))
    total = sum(d.nbytes for d in large)
    duration = expected_duration(ts, avg)
    best = None
    best_score = None
    best_local = 0
    full: list = []  # workers with no free slot holding more than half of the bytes
    for strict in (True, False) if loose else (True,):
        for ws in workers:
            if ts.restricted and not allowed(ts, ws, strict=strict):
                continue
            local = 0
            for d in large:
                if d.held_by(ws):
                    local += d.nbytes
            if not ws.has_slot():
                if 2 * local > total and not ts.restricted:
                    full.append(((-local, ws.occupancy / ws.nthreads), local, ws))
                continue
            s = (local == 0, *score(ws, local, total, duration))  # holders first
            if best_score is None or s < best_score:
                best, best_score, best_local = ws, s, local
        if best is not None:
            break
    for _, local, ws in sorted(full, key=lambda f: f[0]):
        if (best is None or local > best_local) \
                and may_overflow(ts, ws, local - best_local, avg, best):
            return ws
    return best


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
