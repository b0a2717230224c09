"""LocalCluster: a Scheduler and its workers on this machine, started and closed as one.

With ``processes=True`` (the default) each worker is a separate process kept by a
:class:`~zfabric.nanny.Nanny`; with ``processes=False`` the workers run in this process, in the
same event loop as the scheduler. ``LocalCluster()`` blocks and runs that loop in a background
thread of its own; ``LocalCluster(asynchronous=True)`` lives in the caller's loop and is awaited
(``await LocalCluster(asynchronous=True)`` or ``async with``).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import math
import os
import weakref

from .config import Config, from_env
from .errors import ClosedError
from .lifecycle import LifeCycle, LoopThread
from .nanny import Nanny, format_bytes
from .scheduler import Scheduler
from .security import as_security
from .worker import Worker

logger = logging.getLogger(__name__)

__all__ = ["LocalCluster", "nprocesses_nthreads"]

#: Longest a blocking LocalCluster waits to start or close.
START_TIMEOUT_S = 60.0


def nprocesses_nthreads(cores: int | None = None) -> tuple[int, int]:
    """How to split ``cores`` into worker processes and threads, as dask.distributed does.

    Up to 4 cores: one single-threaded process per core. Beyond: the smallest factor of the
    core count that is at least its square root, so processes and threads are balanced.
    """
    n = cores or os.cpu_count() or 1
    if n <= 4:
        return n, 1
    processes = min(f for f in range(1, n + 1) if n % f == 0 and f >= math.sqrt(n))
    return processes, n // processes


def _sizing(n_workers: int | None, threads_per_worker: int | None,
            processes: bool) -> tuple[int, int]:
    cores = os.cpu_count() or 1
    if n_workers is None and threads_per_worker is None:
        if processes:
            return nprocesses_nthreads(cores)
        return 1, cores
    if n_workers is None:
        return (max(1, cores // threads_per_worker) if processes else 1), threads_per_worker
    if threads_per_worker is None:
        return n_workers, max(1, math.ceil(cores / max(1, n_workers)))
    return n_workers, threads_per_worker


_blocking_clusters: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_forgotten_clusters() -> None:
    # A script that never closes its cluster still stops its worker processes in order.
    for cluster in list(_blocking_clusters):
        try:
            cluster.close(timeout=10)
        except Exception:  # pragma: no cover - best effort at exit
            pass


class LocalCluster(LifeCycle):
    """A scheduler and ``n_workers`` workers on this machine; pass it to ``Client``.

    >>> with LocalCluster(n_workers=2, threads_per_worker=1) as cluster:   # doctest: +SKIP
    ...     with Client(cluster) as client:
    ...         assert client.submit(sum, [1, 2]).result() == 3

    Default sizing follows dask.distributed: about one thread per core in all, one process per
    core up to 4 cores. ``memory_limit`` is per worker (``"auto"``: its share of the RAM).
    """

    def __init__(
        self,
        n_workers: int | None = None,
        threads_per_worker: int | None = None,
        processes: bool = True,
        memory_limit: int | str | None = "auto",
        host: str = "127.0.0.1",
        port: int = 0,
        asynchronous: bool = False,
        *,
        resources: dict | None = None,
        death_timeout: float | None = None,
        worker_log_level: str = "warning",
        config: Config | None = None,
        scheduler_port: int | None = None,
        security=None,
        **kwargs,
    ):
        for ignored in ("dashboard_address", "silence_logs", "diagnostics_port"):
            kwargs.pop(ignored, None)
        if kwargs:
            raise TypeError(f"LocalCluster got unexpected arguments: {', '.join(sorted(kwargs))}")
        self.n_workers, self.threads_per_worker = _sizing(n_workers, threads_per_worker,
                                                          processes)
        if self.n_workers < 0 or self.threads_per_worker < 1:
            raise ValueError(f"cannot run {self.n_workers} workers of"
                             f" {self.threads_per_worker} threads")
        self.processes = processes
        self.memory_limit = memory_limit
        self.host = host
        self.port = port if scheduler_port is None else scheduler_port
        self.asynchronous = asynchronous
        self.resources = resources
        self.death_timeout = death_timeout
        self.worker_log_level = worker_log_level
        self.config = config or from_env()
        #: The cluster's keys (``security=True``: fresh ones in memory); Client(cluster) uses them.
        self.security = as_security(security)
        self.scheduler: Scheduler | None = None
        self.workers: dict[int, Nanny | Worker] = {}
        self._loop_thread: LoopThread | None = None
        if not asynchronous:
            self._loop_thread = LoopThread("zfabric-cluster-loop")
            self.loop = self._loop_thread.loop
            try:
                self._loop_thread.run(self._start_once(), START_TIMEOUT_S)
            except BaseException:
                self._stop_loop_thread()
                raise
            _blocking_clusters.add(self)

    # ------------------------------------------------------------------ views

    @property
    def scheduler_address(self) -> str:
        return self.scheduler.address if self.scheduler is not None else ""

    @property
    def name(self) -> str:
        return f"LocalCluster({self.scheduler_address or 'not started'})"

    def __repr__(self) -> str:
        threads = self.n_workers * self.threads_per_worker
        if self.processes and self.workers:
            limit = next(iter(self.workers.values())).memory_limit * len(self.workers)
            memory = f", memory={format_bytes(limit)}" if limit else ""
        else:
            memory = ""
        return (f"LocalCluster({self.scheduler_address!r}, workers={len(self.workers)},"
                f" threads={threads}{memory}, status={self.status})")

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        self.scheduler = Scheduler(host=self.host, port=self.port, config=self.config,
                                   security=self.security)
        await self.scheduler
        address = self.scheduler.address
        for i in range(self.n_workers):
            if self.processes:
                self.workers[i] = Nanny(
                    address, nworkers=1, nthreads=self.threads_per_worker,
                    memory_limit=self.memory_limit, resources=self.resources, name=str(i),
                    death_timeout=self.death_timeout, worker_log_level=self.worker_log_level,
                    config=self.config, security=self.security,
                )
            else:
                self.workers[i] = Worker(
                    address, nthreads=self.threads_per_worker, memory_limit=self.memory_limit,
                    resources=self.resources, name=str(i), death_timeout=self.death_timeout,
                    config=self.config, security=self.security,
                )
        # Every worker process starts at the same time: this is most of the start-up time.
        # All of them settle before an error is raised, so that closing finds none half-started.
        results = await asyncio.gather(*(w._start_once() for w in self.workers.values()),
                                       return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def _close(self) -> None:
        results = await asyncio.gather(*(w.close() for w in self.workers.values()),
                                       return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                logger.warning("closing a worker of %s failed: %r", self.name, r)
        if self.scheduler is not None:
            await self.scheduler.close()

    def close(self, timeout: float | None = None):
        """Close the workers, then the scheduler. Awaitable when ``asynchronous=True``."""
        if self.asynchronous:
            return LifeCycle.close(self)
        _blocking_clusters.discard(self)
        if self._loop_thread is None:
            return None
        try:
            self._loop_thread.run(LifeCycle.close(self), timeout or START_TIMEOUT_S)
        finally:
            self._stop_loop_thread()
        return None

    def _stop_loop_thread(self) -> None:
        if self._loop_thread is not None:
            self._loop_thread.stop()
            self._loop_thread = None

    def __await__(self):
        if not self.asynchronous:
            raise TypeError("await needs LocalCluster(asynchronous=True)")
        return self._start_once().__await__()

    def __enter__(self):
        if self.asynchronous:
            raise TypeError("use `async with` for LocalCluster(asynchronous=True)")
        if self.status == "closed":
            raise ClosedError("this LocalCluster is closed; create a new one")
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "_loop_thread", None) is not None and self.status == "running":
            try:
                self.close(timeout=10)
            except Exception:
                pass
