"""Adaptive scaling of a LocalCluster: more workers while work queues, fewer once idle.

:func:`decide` is the policy, pure: from the runnable tasks (queued or processing), their
expected duration and the current size, it gives the size to run and how many checks in a row
have found the cluster too large. As in dask.distributed, the cluster grows at once (up to
enough workers to finish the runnable work within ``target_duration``, never more workers
than there are tasks for) and shrinks only after ``wait_count`` checks in a row wanted fewer,
so a short lull does not throw workers away. :class:`Adaptive` is the shell: a task on the
cluster's loop that asks the scheduler every ``interval`` and scales through the cluster,
whose retirement moves data off a worker before it goes (no result is lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

logger = logging.getLogger("zfabric.cluster")

#: Expected duration of a task whose kind has not run yet (dask.distributed's default).
UNKNOWN_TASK_DURATION_S = 0.5


def decide(*, runnable: int, task_duration_s: float, workers: int, threads_per_worker: int,
           minimum: int, maximum: float, target_duration_s: float, low_count: int,
           wait_count: int) -> tuple[int, int]:
    """``(workers to run, checks in a row that found too many)`` (see the module docstring)."""
    want = math.ceil(runnable * task_duration_s / max(target_duration_s, 1e-9))
    want = min(want, math.ceil(runnable / max(1, threads_per_worker)))
    if runnable and not want:
        want = 1
    want = int(max(minimum, min(maximum, want)))
    if want > workers:
        return want, 0
    if want < workers:
        low_count += 1
        if low_count >= wait_count:
            return want, 0
        return workers, low_count
    return workers, 0


class Adaptive:
    """Scales ``cluster`` between ``minimum`` and ``maximum`` workers; ``stop()`` ends it.

    ``log`` lists ``(time, "up"|"down", from, to)`` for every change it made.
    """

    def __init__(self, cluster, *, minimum: int = 0, maximum: float = math.inf,
                 interval: float = 1.0, wait_count: int = 3, target_duration: float = 5.0):
        if minimum < 0 or maximum < minimum:
            raise ValueError(f"adapt needs 0 <= minimum <= maximum, got {minimum}, {maximum}")
        if interval <= 0 or wait_count < 1:
            raise ValueError("adapt needs interval > 0 and wait_count >= 1")
        self.cluster = cluster
        self.minimum = minimum
        self.maximum = maximum
        self.interval = interval
        self.wait_count = wait_count
        self.target_duration = target_duration
        self.log: list[tuple[float, str, int, int]] = []
        self._low = 0
        self._task: asyncio.Task | None = None
        self._stopped = False

    def __repr__(self) -> str:
        return f"<Adaptive minimum={self.minimum} maximum={self.maximum}>"

    def start(self) -> None:
        """Start checking (on the cluster's loop)."""
        if self._task is None and not self._stopped:
            self._task = asyncio.ensure_future(self._run())

    def stop(self) -> None:
        """Stop scaling (from any thread); the cluster keeps the workers it has."""
        self._stopped = True
        task = self._task
        if task is None:
            return
        loop = task.get_loop()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            task.cancel()
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(task.cancel)

    async def stop_async(self) -> None:
        self.stop()
        if self._task is not None:
            with contextlib.suppress(BaseException):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                await self.adapt()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("adaptive scaling of %s failed; trying again",
                                 self.cluster.name)
            await asyncio.sleep(self.interval)

    async def adapt(self) -> None:
        """One check: ask the scheduler, decide, scale."""
        cluster = self.cluster
        client = await cluster._client()
        info = await client.scheduler_info(n_workers=-1)
        counts = info["tasks"]
        runnable = counts.get("queued", 0) + counts.get("processing", 0)
        durations = [w["avg_duration"] for w in info["workers"].values()
                     if w.get("avg_duration")]
        duration = sum(durations) / len(durations) if durations else UNKNOWN_TASK_DURATION_S
        have = len(cluster.workers)
        target, self._low = decide(
            runnable=runnable, task_duration_s=duration, workers=have,
            threads_per_worker=cluster.threads_per_worker, minimum=self.minimum,
            maximum=self.maximum, target_duration_s=self.target_duration,
            low_count=self._low, wait_count=self.wait_count)
        if target == have:
            return
        async with cluster._lock():
            have = len(cluster.workers)
            if target > have:
                logger.info("adaptive: %d runnable tasks; %d -> %d workers", runnable, have,
                            target)
                self.log.append((time.time(), "up", have, target))
                await cluster._add_workers(target - have)
            elif target < have:
                logger.info("adaptive: %d runnable tasks; retiring %d of %d workers", runnable,
                            have - target, have)
                self.log.append((time.time(), "down", have, target))
                await cluster._retire(count=have - target)
