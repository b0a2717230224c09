"""LocalCluster: a Scheduler and its workers on this machine, started and closed as one.

With ``processes=True`` (the default) each worker is a separate process kept by a
:class:`~zfabric.nanny.Nanny`; with ``processes=False`` the workers run in this process, in the
same event loop as the scheduler. ``LocalCluster()`` blocks and runs that loop in a background
thread of its own; ``LocalCluster(asynchronous=True)`` lives in the caller's loop and is awaited
(``await LocalCluster(asynchronous=True)`` or ``async with``).

Its size may change while it runs: ``scale(n)`` starts workers or retires some (their data
moves to the workers that stay first), ``adapt(minimum=, maximum=)`` does so by itself
following the work queued (:mod:`zfabric.adaptive`). Both ask the scheduler through an
internal asynchronous client of the cluster's own.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import os
import time

from . import logs
from .client import Client, default_client
from .cluster_manager import ClusterManager
from .config import Config, from_env, memory_limit_bytes, parse_bytes
from .errors import CommTimeoutError
from .nanny import Nanny
from .reprs import format_bytes, render_cluster_of
from .scheduler import Scheduler
from .security import as_security
from .worker import Worker
from .worker.memory import memory_fractions

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
        assert threads_per_worker is not None
        return (max(1, cores // threads_per_worker) if processes else 1), threads_per_worker
    if threads_per_worker is None:
        return n_workers, max(1, math.ceil(cores / max(1, n_workers)))
    return n_workers, threads_per_worker


class LocalCluster(ClusterManager):
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
        dashboard_address: str | int | None = "default",
        name: str | None = None,
        ip: str | None = None,
        interface: str | None = None,
        scheduler_kwargs: dict | None = None,
        worker_kwargs: dict | None = None,
        security=None,
        memory_target_fraction: float | None = None,
        memory_spill_fraction: float | None = None,
        memory_pause_fraction: float | None = None,
        memory_terminate_fraction: float | None = None,
        local_directory: str | None = None,
        **kwargs,
    ):
        # dask's names for two things zfabric has under its own
        silence_logs = kwargs.pop("silence_logs", None)
        if silence_logs:  # a logging level for the workers (False/None: leave as it is)
            import logging

            level = logging.getLevelName(silence_logs) if isinstance(silence_logs, int) \
                else str(silence_logs)
            worker_log_level = str(level).lower()
        protocol = kwargs.pop("protocol", None)
        if protocol not in (None, "tcp", "tcp://"):
            raise ValueError(f"LocalCluster(protocol={protocol!r}): zfabric speaks ZeroMQ over"
                             " TCP only; use protocol='tcp://' or leave it out")
        worker_dashboard = kwargs.pop("worker_dashboard_address", None)
        if worker_dashboard is not None:
            raise ValueError("LocalCluster(worker_dashboard_address=...): zfabric's workers"
                             " serve no dashboard of their own; every worker's page is on the"
                             " scheduler's dashboard (dashboard_address=)")
        diagnostics_port = kwargs.pop("diagnostics_port", None)
        if diagnostics_port is not None:  # dask's old name for the dashboard's port
            dashboard_address = f":{int(diagnostics_port)}"
        if kwargs:
            raise TypeError(f"LocalCluster got unexpected arguments: {', '.join(sorted(kwargs))}")
        host = _host(host, ip, interface)
        self._scheduler_kwargs = _checked_kwargs(Scheduler, scheduler_kwargs, "scheduler_kwargs",
                                                 also=("dashboard_address", "dashboard"))
        host = self._scheduler_kwargs.pop("host", host)
        port = self._scheduler_kwargs.pop("port", port)
        self._worker_cls = Nanny if processes else Worker
        self._worker_kwargs = _checked_kwargs(self._worker_cls, worker_kwargs, "worker_kwargs",
                                              refuse=("name", "scheduler_ip",
                                                      "scheduler_address", "nworkers"))
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
        if memory_terminate_fraction and not processes:
            raise ValueError("memory_terminate_fraction needs processes=True: a Nanny"
                             " terminates worker processes; in-process workers cannot be")
        self.memory = dict(memory_target_fraction=memory_target_fraction,
                           memory_spill_fraction=memory_spill_fraction,
                           memory_pause_fraction=memory_pause_fraction,
                           local_directory=local_directory)
        if processes:
            self.memory["memory_terminate_fraction"] = memory_terminate_fraction
        # Checked here, before anything starts, rather than in each worker.
        memory_fractions(self.config, target=memory_target_fraction,
                         spill=memory_spill_fraction, pause=memory_pause_fraction,
                         terminate=memory_terminate_fraction)
        #: The cluster's keys (``security=True``: fresh ones in memory); Client(cluster) uses them.
        self.security = as_security(security)
        self.dashboard_address = dashboard_address
        #: Set by start(): the scheduler this cluster runs in its own loop.
        self.scheduler: Scheduler = None
        self.workers: dict[int, Nanny | Worker] = {}
        self._name = name
        self._next_index = 0
        self._init_manager()
        if not asynchronous:
            self._start_blocking(START_TIMEOUT_S)

    # ------------------------------------------------------------------ views

    @property
    def scheduler_address(self) -> str:
        return self.scheduler.address if self.scheduler is not None else ""

    @property
    def dashboard_link(self) -> str | None:
        """The dashboard's URL, or None when it is off."""
        return self.scheduler.dashboard_link if self.scheduler is not None else None

    @property
    def name(self) -> str:
        return self._name or f"LocalCluster({self.scheduler_address or 'not started'})"

    def _repr_html_(self) -> str:
        return render_cluster_of(self)

    def __repr__(self) -> str:
        threads = len(self.workers) * self.threads_per_worker
        if self.processes and self.workers:
            limit = next(iter(self.workers.values())).memory_limit * len(self.workers)
            memory = f", memory={format_bytes(limit)}" if limit else ""
        else:
            memory = ""
        return (f"LocalCluster({self.scheduler_address!r}, workers={len(self.workers)},"
                f" threads={threads}{memory}, status={self.status})")

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        logs.install()  # for get_logs
        kw = {"config": self.config, "dashboard_address": self.dashboard_address,
              "security": self.security, **self._scheduler_kwargs}
        self.scheduler = Scheduler(host=self.host, port=self.port, **kw)
        await self.scheduler
        await self._add_workers(self.n_workers)

    def _new_worker(self) -> Nanny | Worker:
        i = self._next_index
        self._next_index += 1
        address = self.scheduler.address
        if self.processes:
            kw = dict(nworkers=1, nthreads=self.threads_per_worker,
                      memory_limit=self.memory_limit, resources=self.resources,
                      death_timeout=self.death_timeout, worker_log_level=self.worker_log_level,
                      config=self.config, security=self.security, **self.memory)
        else:
            kw = dict(nthreads=self.threads_per_worker, memory_limit=self.memory_limit,
                      resources=self.resources, death_timeout=self.death_timeout,
                      config=self.config, security=self.security, **self.memory)
        w = self._worker_cls(address, name=str(i), **{**kw, **self._worker_kwargs})
        self.workers[i] = w
        return w

    async def _add_workers(self, n: int) -> None:
        new = [self._new_worker() for _ in range(n)]
        # Every worker process starts at the same time: this is most of the start-up time.
        await self._start_all(new)

    # ------------------------------------------------------------------ size

    _create_hint = "LocalCluster"

    def _client_options(self) -> dict:
        return {"config": self.config}

    def scale(self, n: int = 0, *, memory: int | str | None = None, cores: int | None = None):
        """Run ``n`` workers (or enough for ``cores`` threads or ``memory`` bytes in all).

        New workers start at once; extra ones retire (their data moves to the workers that
        stay, the tasks they run finish first). Stops adaptive scaling. Returns once done
        (awaitable when ``asynchronous=True``).
        """
        return self._scale_to(self._target(n, memory, cores))

    def _target(self, n, memory, cores) -> int:
        if memory is not None and cores is not None:
            raise ValueError("scale takes n, memory= or cores=, not several")
        if cores is not None:
            return math.ceil(int(cores) / self.threads_per_worker)
        if memory is not None:
            per = memory_limit_bytes(self.memory_limit, self.threads_per_worker)
            if not per:
                raise ValueError("scale(memory=) needs workers with a memory_limit")
            return math.ceil(parse_bytes(memory) / per)
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"scale needs a number of workers >= 0, got {n!r}")
        return n

    async def _retire(self, *, count: int | None = None, addresses=None) -> dict:
        """Retire ``count`` workers of the scheduler's choosing (or these ``addresses``) and
        drop them from :attr:`workers` once closed."""
        where: dict[str, Nanny | Worker] = {}
        for w in self.workers.values():
            if isinstance(w, Nanny):
                for wp in w.processes:
                    where[wp.address] = w
            else:
                where[w.address] = w
        client = await self._client()
        retired = await client.retire_workers(addresses, n=None if addresses else count)
        gone = [where[a] for a in retired if a in where]
        # They close by themselves (told by the scheduler); this waits for it.
        await asyncio.gather(*(w.close() for w in gone), return_exceptions=True)
        for i, w in list(self.workers.items()):
            if any(w is g for g in gone):
                del self.workers[i]
        return retired

    def adapt(self, minimum: int = 0, maximum: float = math.inf, *, interval="1s",
              wait_count: int = 3, target_duration="5s", minimum_cores=None,
              maximum_cores=None,
              minimum_memory=None, maximum_memory=None):
        """Scale by itself between ``minimum`` and ``maximum`` workers: add workers while
        tasks queue, retire idle ones once ``wait_count`` checks ``interval`` apart found too
        many (their data moves first). ``target_duration``: how long the runnable work may
        take on the workers wanted. Returns the :class:`~zfabric.adaptive.Adaptive`
        (``.stop()`` ends it; so do ``scale`` and ``close``)."""
        if minimum_cores is not None:
            minimum = max(minimum, self._target(0, None, minimum_cores))
        if maximum_cores is not None:
            maximum = min(maximum, self._target(0, None, maximum_cores))
        if minimum_memory is not None:
            minimum = max(minimum, self._target(0, minimum_memory, None))
        if maximum_memory is not None:
            maximum = min(maximum, self._target(0, maximum_memory, None))
        return self._start_adaptive(self, minimum, maximum, interval, wait_count,
                                    target_duration)

    async def _wait_for_workers(self, n: int, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(self.scheduler.state.workers) < n:
            if deadline is not None and time.monotonic() > deadline:
                raise CommTimeoutError(f"only {len(self.scheduler.state.workers)} of {n}"
                                       f" workers arrived within {timeout:g} s")
            await asyncio.sleep(0.02)

    # ------------------------------------------------------------------ logs and clients

    async def _get_logs(self, cluster, scheduler, workers) -> dict[str, str]:
        out = {}
        if cluster:
            out["Cluster"] = "\n".join(m for _, m in logs.recent(prefix="zfabric.cluster"))
        if scheduler:
            events = [f"{t:.3f} event {text}" for t, text in list(self.scheduler.state.events)]
            lines = [m for _, m in logs.recent(prefix="zfabric.scheduler")]
            out["Scheduler"] = "\n".join([*events, *lines])
        if workers:
            client = await self._client()
            which = None if workers is True else list(workers)
            got = await client.run(logs.recent, workers=which)
            for address, records in got.items():
                out[address] = "\n".join(m for _, m in records)
        return out

    def get_client(self):
        """The default client if it talks to this cluster, else a new Client of it."""
        try:
            c = default_client()
        except ValueError:
            c = None
        if c is not None and c.scheduler_address == self.scheduler_address:
            return c
        return Client(self, asynchronous=self.asynchronous)


def _host(host: str, ip: str | None, interface: str | None) -> str:
    """The scheduler's host from ``host``, dask's ``ip=`` or a network ``interface`` name."""
    if ip is not None:
        if host not in ("127.0.0.1", ip):
            raise ValueError(f"LocalCluster got host={host!r} and ip={ip!r}; give one")
        host = ip
    if interface is not None:
        import socket

        import psutil

        addrs = psutil.net_if_addrs()
        if interface not in addrs:
            raise ValueError(f"no network interface {interface!r}; this host has"
                             f" {sorted(addrs)}")
        v4 = [a.address for a in addrs[interface] if a.family == socket.AF_INET]
        if not v4:
            raise ValueError(f"network interface {interface!r} has no IPv4 address")
        if ip is not None and ip != v4[0]:
            raise ValueError(f"ip={ip!r} is not the address of interface {interface!r}"
                             f" ({v4[0]})")
        host = v4[0]
    return host


def _checked_kwargs(cls, kwargs: dict | None, what: str, refuse: tuple = (),
                    also: tuple = ()) -> dict:
    """``kwargs`` for ``cls``, refusing names it does not take (rather than dropping them)."""
    if not kwargs:
        return {}
    params = inspect.signature(cls.__init__).parameters
    known = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    known.discard("self")
    known.update(also)
    bad = sorted(k for k in kwargs if k not in known or k in refuse)
    if bad:
        raise TypeError(f"{what} has options {cls.__name__} does not take here: {bad};"
                        f" it takes {sorted(known - set(refuse))}")
    return dict(kwargs)
