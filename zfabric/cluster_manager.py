"""What every cluster manager (LocalCluster, SpecCluster and its back-ends) shares.

A cluster manager starts a scheduler and groups of workers and changes their number while it
runs. :class:`ClusterManager` holds the parts that do not depend on how workers start:

- running a call blocking on the cluster's loop thread, or returning it to be awaited
  (``asynchronous=True``), or running it on the loop of the blocking client that started an
  asynchronous cluster (``Client()`` does: :meth:`serve_blocking_calls`);
- the cluster's own asynchronous client, made on first need (retiring workers, logs, adapt);
- one scale at a time (:meth:`_scale`), counted in the unit the subclass starts workers in;
- starting units together and dropping those that close by themselves (:meth:`_start_all`);
- closing: the client, adaptive scaling, the units, then the scheduler.

A subclass sets ``self.workers`` (its units by name), ``_add_workers(n)``, ``_retire(count=)``,
``_wait_for_workers(n, timeout)``, ``_get_logs(cluster, scheduler, workers)`` and
``_client_options()``, and calls :meth:`_init_manager` in its constructor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from .adaptive import Adaptive
from .client import Client
from .config import parse_timedelta
from .errors import ClosedError
from .lifecycle import BlockingLifeCycle, LoopThread

logger = logging.getLogger(__name__)

#: Longest a blocking cluster call waits (start, scale, logs).
CALL_TIMEOUT_S = 60.0


class ClusterManager(BlockingLifeCycle):
    """The shared surface of cluster managers (see the module)."""

    #: What a closed cluster's error tells the user to create instead.
    _create_hint = "cluster"
    #: The loop of the blocking Client that started this (asynchronous) cluster, as
    #: ``Client()`` does: calls from other threads run there and block, as on a blocking
    #: cluster (:meth:`serve_blocking_calls`).
    _caller_loop: asyncio.AbstractEventLoop | None = None
    #: What the subclass starts and counts workers in (for messages).
    _unit = "worker"
    workers: dict
    scheduler: Any

    def _init_manager(self) -> None:
        self._control: Client | None = None  # the cluster's own asynchronous Client
        self._scale_lock: asyncio.Lock | None = None
        self._adaptive: Any = None
        self._watchers: list[asyncio.Task] = []  # drop workers that close by themselves
        self._loop_thread: LoopThread | None = None

    @property
    def name(self) -> str:  # pragma: no cover - each subclass names itself
        raise NotImplementedError

    @property
    def scheduler_address(self) -> str:  # pragma: no cover
        raise NotImplementedError

    # ------------------------------------------------------------------ where calls run

    def serve_blocking_calls(self, loop: asyncio.AbstractEventLoop) -> None:
        """This asynchronous cluster runs on ``loop``, the loop thread of a blocking client:
        ``scale``, ``adapt``, ``wait_for_workers``, ``get_logs`` called from any other
        thread run there and return their results (``client.cluster.scale(3)``)."""
        self._caller_loop = loop

    def _marshal_to(self) -> asyncio.AbstractEventLoop | None:
        """The loop a call from this thread must run on, or None (the caller is on it)."""
        loop = self._caller_loop
        if loop is None:
            return None
        try:
            return None if asyncio.get_running_loop() is loop else loop
        except RuntimeError:
            return loop

    def _run(self, coro, timeout: float | None = CALL_TIMEOUT_S):
        """Awaitable ``coro`` when asynchronous; else run it on the cluster's loop and wait."""
        if self.asynchronous:
            loop = self._marshal_to()
            if loop is None:
                return coro
            if self.status != "running":
                coro.close()
                raise ClosedError(f"{self.name} is {self.status}; create a new client")
            return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)
        if self._loop_thread is None or self.status != "running":
            coro.close()
            raise ClosedError(f"{self.name} is {self.status}; create a new {self._create_hint}")
        return self._loop_thread.run(coro, timeout)

    # ------------------------------------------------------------------ its own client

    def _client_options(self) -> dict:
        """Keywords of the cluster's own client besides the address."""
        return {}

    async def _client(self) -> Client:
        """The cluster's own asynchronous client (for retiring workers, logs, adapt)."""
        if self._control is None:
            self._control = Client(self.scheduler_address, asynchronous=True,
                                   set_as_default=False, **self._client_options())
            await self._control
        return self._control

    async def _close_control(self) -> None:
        """The first closing steps: stop watching workers, stop adapting, close the client."""
        for t in self._watchers:
            t.cancel()
        if self._adaptive is not None:
            await self._adaptive.stop_async()
        if self._control is not None:
            with contextlib.suppress(Exception):
                await self._control.close()

    async def _close(self) -> None:
        await self._close_control()
        results = await asyncio.gather(*(w.close() for w in self.workers.values()),
                                       return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                logger.warning("closing a %s of %s failed: %r", self._unit, self.name, r)
        if self.scheduler is not None:
            await self.scheduler.close()

    # ------------------------------------------------------------------ its workers

    async def _start_all(self, new: list) -> None:
        """Start these new units together and watch each; every one settles before the
        first error is raised, so that close() finds none half-started."""
        results = await asyncio.gather(*(w._start_once() for w in new), return_exceptions=True)
        self._watchers = [t for t in self._watchers if not t.done()]
        for w in new:
            self._watchers.append(asyncio.ensure_future(self._forget_when_closed(w)))
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def _forget_when_closed(self, unit) -> None:
        """A unit that closes by itself (retired through any client, told to close, a job
        that ended) leaves :attr:`workers`, as in dask.distributed's clusters."""
        await unit.finished()
        if self.status == "running":
            for name, other in list(self.workers.items()):
                if other is unit:
                    del self.workers[name]
                    self._forgotten(name, unit)

    def _forgotten(self, name, unit) -> None:
        """Called when a unit that closed by itself has left :attr:`workers`."""

    # ------------------------------------------------------------------ size

    def _lock(self) -> asyncio.Lock:
        if self._scale_lock is None:
            self._scale_lock = asyncio.Lock()
        return self._scale_lock

    def _scale_to(self, target: int):
        """Stop adaptive scaling and run ``target`` units (what ``scale`` returns)."""
        if self._adaptive is not None:
            self._adaptive.stop()
            self._adaptive = None
        return self._run(self._scale(target))

    async def _scale(self, n: int) -> None:
        async with self._lock():
            have = len(self.workers)
            if n > have:
                await self._add_workers(n - have)
            elif n < have:
                await self._retire(count=have - n)

    async def _add_workers(self, n: int) -> None:  # pragma: no cover - each subclass
        raise NotImplementedError

    async def _retire(self, *, count: int) -> Any:  # pragma: no cover - each subclass
        raise NotImplementedError

    def _start_adaptive(self, view, minimum, maximum, interval, wait_count: int,
                        target_duration) -> Adaptive:
        """Replace any adaptive scaling with a new one of ``view`` (the cluster as adaptive
        counts it), started on the cluster's loop; what ``adapt`` returns."""
        interval_s = parse_timedelta(interval, name="interval")
        target_s = parse_timedelta(target_duration, name="target_duration")
        if interval_s is None or target_s is None:
            raise ValueError("adapt(interval=, target_duration=) take durations, not None")
        if self._adaptive is not None:
            self._adaptive.stop()
        adaptive = self._adaptive = Adaptive(view, minimum=minimum, maximum=maximum,
                                             interval=interval_s, wait_count=wait_count,
                                             target_duration=target_s)
        loop = self._marshal_to() if self.asynchronous else self.loop
        if loop is None:
            adaptive.start()
        else:
            loop.call_soon_threadsafe(adaptive.start)
        return adaptive

    def wait_for_workers(self, n_workers: int = 0, timeout=None):
        """Return once ``n_workers`` workers are connected to the scheduler (awaitable when
        ``asynchronous=True``)."""
        return self._run(self._wait_for_workers(n_workers, parse_timedelta(timeout)), None)

    async def _wait_for_workers(self, n: int, timeout: float | None) -> None:  # pragma: no cover
        raise NotImplementedError

    def get_logs(self, cluster: bool = True, scheduler: bool = True, workers=True):
        """Recent log lines: ``{"Cluster": ..., "Scheduler": ..., worker address: ...}``, each
        one string of lines. ``workers`` may be a list of worker addresses."""
        return self._run(self._get_logs(cluster, scheduler, workers))

    async def _get_logs(self, cluster, scheduler, workers) -> dict[str, str]:  # pragma: no cover
        raise NotImplementedError
