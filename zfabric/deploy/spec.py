"""SpecCluster: a scheduler and groups of workers started from a spec, as in dask.distributed.

A back-end (SSH, SLURM, MPI, ...) is a provider plus a launcher in Parsl's sense: it says where
a block of resources comes from and how workers start in it. Here both live in one
:class:`ProcessInterface` subclass, and the back-end's cluster is a :class:`SpecCluster`
subclass that fills in the spec. The interface, for back-end writers:

``ProcessInterface`` (a :class:`~zfabric.lifecycle.LifeCycle`: ``await obj`` starts it once,
``await obj.close()`` stops it, safe to call again):

- ``async start()``: start it; return once it runs (a scheduler: once ``address`` is known; a
  job: once submitted, or its workers started). Raise an error that says what to do (naming
  the host and the remote stderr) when it cannot start.
- ``async _close()``: stop everything it started (remote processes ended, jobs cancelled).
- ``address``: the scheduler's address (scheduler interfaces only); ``dashboard_link``.
- ``name``; ``worker_names()``: the names its workers register with (a job of several worker
  processes: ``name-0, name-1, ...``, as ``zfabric nanny --name`` gives them).
- ``error``: set (not raised) when it failed after ``start()`` returned (a job refused later);
  :meth:`SpecCluster.wait_for_workers` raises it in the user's thread. ``_ended(reason)``
  records why it ended by itself and closes it: the cluster then drops it from ``workers``.
- ``logs()``: what it printed, for :meth:`SpecCluster.get_logs`.
- ``status_text()``: a short state for repr and ``cluster.jobs`` (e.g. SLURM's PENDING).

``SpecCluster(workers=None, scheduler=None, worker=None, asynchronous=False, loop=None,
security=None, silence_logs=False, name=None, shutdown_on_close=True,
scheduler_sync_interval=1, *, death_timeout=60)``: ``scheduler`` is ``{"cls": C, "options":
{...}}`` (started as ``C(**options)``), ``worker`` the template of one job, started as
``C(scheduler_address, name=NAME, **options)``; ``workers`` the jobs to start with
(``{name: spec}``). Subclasses set ``_processes_per_job``, ``_threads_per_process`` (and
``_memory_per_process`` in bytes, for ``scale(memory=)``) and may override
``_new_worker_name(i)``. ``death_timeout`` (seconds) is what workers are told: with their
scheduler gone that long, they exit; back-ends pass ``self.death_timeout`` to them.

The cluster: ``scale(n)`` (worker processes), ``scale(jobs=)``, ``scale(cores=)``,
``scale(memory=)``; ``adapt(minimum=, maximum=, minimum_jobs=, maximum_jobs=, ...)`` (the policy
of :mod:`zfabric.adaptive`, counted in jobs); ``wait_for_workers(n, timeout)``;
``get_logs()``; ``dashboard_link``; ``scheduler_address`` and ``security`` (what
``Client(cluster)`` reads); ``close()``; sync or ``asynchronous=True``; ``with`` and
``async with``. Its own asynchronous client (``await cluster._client()``) asks the scheduler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import Any

from .. import logs
from ..client import Client
from ..cluster_manager import ClusterManager
from ..config import parse_bytes, parse_timedelta
from ..errors import CommTimeoutError
from ..lifecycle import LifeCycle
from ..nanny import Nanny
from ..reprs import render_cluster_of
from ..scheduler import Scheduler
from ..security import as_security

logger = logging.getLogger("zfabric.cluster")

__all__ = ["DEATH_TIMEOUT_S", "InProcessScheduler", "NannyJob", "ProcessInterface", "SpecCluster"]

#: How long workers whose scheduler is gone keep trying before they exit (dask's default).
DEATH_TIMEOUT_S = 60.0
#: Longest a blocking cluster waits to start or close.
START_TIMEOUT_S = 60.0


class ProcessInterface(LifeCycle):
    """The scheduler or one job of a :class:`SpecCluster` (see the module docstring)."""

    def __init__(self, scheduler: str | None = None, name: str | None = None):
        self.scheduler = scheduler  # the scheduler's address (jobs only)
        self.name = name
        self.address: str | None = None
        self.dashboard_link: str | None = None
        self.error: BaseException | None = None
        self.ended_reason: str | None = None
        self._log_lines: list[str] = []
        self._tasks: set[asyncio.Task] = set()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name or self.address!r}: {self.status_text()}>"

    def worker_names(self) -> list[str]:
        return [str(self.name)]

    def status_text(self) -> str:
        return self.status

    def logs(self) -> str:
        return "\n".join(self._log_lines[-1000:])

    def _log(self, line: str) -> None:
        self._log_lines.append(line)
        del self._log_lines[:-5000]

    def _own(self, coro) -> asyncio.Task:
        """Run ``coro`` as a task this object holds until it ends."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _ended(self, reason: str, error: BaseException | None = None) -> None:
        """It ended by itself (a process exited, a job finished): record why and close."""
        if self.ended_reason is None:
            self.ended_reason = reason
        if error is not None and self.error is None:
            self.error = error
        if self.status in ("starting", "running"):
            self._own(self.close())


class InProcessScheduler(ProcessInterface):
    """A :class:`~zfabric.scheduler.Scheduler` in the cluster's own event loop (for back-ends
    whose workers run elsewhere but whose scheduler runs where the client does)."""

    def __init__(self, **options: Any):
        super().__init__(name="scheduler")
        self.options = options
        self.server: Any = None

    async def start(self) -> None:
        logs.install()
        server = self.server = Scheduler(**self.options)
        await server
        self.address = server.address
        self.dashboard_link = server.dashboard_link

    async def _close(self) -> None:
        if self.server is not None:
            await self.server.close()

    def logs(self) -> str:
        events: list[str] = []
        if self.server is not None:
            events = [f"{t:.3f} event {text}" for t, text in list(self.server.state.events)]
        return "\n".join([*events, *(m for _, m in logs.recent(prefix="zfabric.scheduler"))])


class NannyJob(ProcessInterface):
    """A :class:`~zfabric.nanny.Nanny` in the cluster's own process: a job of
    ``nworkers`` worker processes on this host (the simplest back-end, and a template)."""

    def __init__(self, scheduler: str, name: str | None = None, **options: Any):
        super().__init__(scheduler, name)
        self.options = options
        self.nanny: Any = None

    def worker_names(self) -> list[str]:
        n = int(self.options.get("nworkers", 1))
        return [str(self.name)] if n == 1 else [f"{self.name}-{i}" for i in range(n)]

    async def start(self) -> None:
        self.nanny = Nanny(self.scheduler, name=self.name, **self.options)
        await self.nanny
        self._own(self._watch(self.nanny))

    async def _watch(self, nanny) -> None:
        await nanny.finished()
        self._ended("its Nanny closed")

    async def _close(self) -> None:
        if self.nanny is not None:
            await self.nanny.close()


class SpecCluster(ClusterManager):
    """A scheduler and jobs of workers, each a :class:`ProcessInterface` (module docstring)."""

    exit_timeout_s = 20.0  # jobs to cancel at the interpreter's exit take longer
    #: Worker processes one job runs, threads of each, bytes of each (subclasses set them).
    _processes_per_job = 1
    _threads_per_process = 1
    _memory_per_process: int | None = None

    def __init__(self, workers: dict | None = None, scheduler: dict | None = None,
                 worker: dict | None = None, asynchronous: bool = False, loop=None,
                 security=None, silence_logs=False, name: str | None = None,
                 shutdown_on_close: bool = True, scheduler_sync_interval=1, *,
                 death_timeout=DEATH_TIMEOUT_S):
        if loop is not None:
            raise ValueError("SpecCluster(loop=...): zfabric runs a blocking cluster in a loop"
                             " thread of its own; use asynchronous=True inside a running loop")
        if not shutdown_on_close:
            raise ValueError("SpecCluster(shutdown_on_close=False) is not supported: close()"
                             " always stops what the cluster started")
        self.scheduler_spec = scheduler or {"cls": InProcessScheduler, "options": {}}
        self.new_spec = worker
        self.worker_spec: dict[str, dict] = dict(workers or {})
        self.workers: dict[str, ProcessInterface] = {}
        self.scheduler: ProcessInterface | None = None
        self.asynchronous = asynchronous
        self.security = as_security(security)
        self.death_timeout = float(parse_timedelta(death_timeout) or DEATH_TIMEOUT_S)
        self.silence_logs = silence_logs
        self._name = name
        self._i = 0
        self._init_manager()
        if not asynchronous:
            self._start_blocking(self._start_timeout(), f"zfabric-{type(self).__name__}-loop")

    def _start_timeout(self) -> float | None:
        return START_TIMEOUT_S * 2

    # ------------------------------------------------------------------ views

    @property
    def scheduler_address(self) -> str:
        return (self.scheduler.address or "") if self.scheduler is not None else ""

    @property
    def dashboard_link(self) -> str | None:
        return self.scheduler.dashboard_link if self.scheduler is not None else None

    @property
    def name(self) -> str:
        return self._name or f"{type(self).__name__}({self.scheduler_address or 'not started'})"

    @property
    def threads_per_worker(self) -> int:
        return self._threads_per_process

    @property
    def jobs(self) -> dict[str, str]:
        """``{job name: its state}`` for every job the cluster runs (or waits for)."""
        return {n: j.status_text() for n, j in self.workers.items()}

    def _repr_html_(self) -> str:
        return render_cluster_of(self)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.scheduler_address!r}, jobs={len(self.workers)},"
                f" workers={len(self.workers) * self._processes_per_job},"
                f" status={self.status})")

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        logs.install()
        spec = self.scheduler_spec
        self.scheduler = spec["cls"](**spec.get("options", {}))
        await self.scheduler
        await self._start_jobs(dict(self.worker_spec))

    def _new_worker_name(self, i: int) -> str:
        return str(i)

    def new_worker_spec(self) -> dict[str, dict]:
        """``{name: spec}`` of one more job, from the ``worker`` template."""
        if self.new_spec is None:
            raise ValueError(f"{type(self).__name__} has no worker template to scale with")
        while True:
            name = self._new_worker_name(self._i)
            self._i += 1
            if name not in self.worker_spec:
                return {name: self.new_spec}

    async def _start_jobs(self, specs: dict[str, dict]) -> None:
        new = []
        for name, spec in specs.items():
            self.worker_spec[name] = spec
            job = spec["cls"](self.scheduler_address, name=name, **spec.get("options", {}))
            self.workers[name] = job
            new.append(job)
        await self._start_all(new)

    async def _add_workers(self, n: int) -> None:
        """Start ``n`` more jobs (the unit :mod:`zfabric.adaptive` counts in)."""
        specs: dict[str, dict] = {}
        for _ in range(n):
            specs.update(self.new_worker_spec())
        await self._start_jobs(specs)

    _unit = "job"

    def _forgotten(self, name, unit) -> None:
        self.worker_spec.pop(name, None)
        if unit.ended_reason:
            logger.warning("%s: job %s ended: %s", self.name, name, unit.ended_reason)

    def _client_options(self) -> dict:
        return {"security": self.security}

    # ------------------------------------------------------------------ size

    def _jobs_for(self, n=None, jobs=None, memory=None, cores=None) -> int:
        given = [x for x in (n, jobs, memory, cores) if x is not None]
        if len(given) > 1:
            raise ValueError("scale takes one of n, jobs=, cores= or memory=")
        if jobs is not None:
            if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 0:
                raise ValueError(f"scale needs jobs >= 0, got {jobs!r}")
            return jobs
        if cores is not None:
            n = math.ceil(int(cores) / self._threads_per_process)
        elif memory is not None:
            if not self._memory_per_process:
                raise ValueError("scale(memory=) needs workers with a memory limit")
            n = math.ceil(parse_bytes(memory) / self._memory_per_process)
        n = 0 if n is None else n
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"scale needs a number of workers >= 0, got {n!r}")
        return math.ceil(n / self._processes_per_job)

    def scale(self, n: int | None = None, jobs: int | None = None, memory=None,
              cores: int | None = None):
        """Run ``n`` worker processes (or ``jobs`` jobs, or enough for ``cores`` threads or
        ``memory`` in all), rounded up to whole jobs. New jobs start at once; extra ones retire
        (their data moves to the workers that stay). Stops adaptive scaling."""
        return self._scale_to(self._jobs_for(n, jobs, memory, cores))

    async def _retire(self, *, count: int) -> list[str]:
        """Retire ``count`` jobs: the newest ones, their workers' data moved off first."""
        names = list(self.workers)[-count:] if count else []
        if not names:
            return []
        client = await self._client()
        info = await client.scheduler_info(n_workers=-1)
        owner = {a: _job_of(str(w.get("name")), names) for a, w in info["workers"].items()}
        addresses = {a: job for a, job in owner.items() if job is not None}
        retired = await client.retire_workers(list(addresses)) if addresses else {}
        # A job whose worker the scheduler kept (no other worker could take its data yet)
        # stays: closing it would lose that data.
        kept = {addresses[a] for a in addresses if a not in retired}
        done = [n for n in names if n not in kept and n in self.workers]
        gone = [self.workers.pop(n) for n in done]
        for n in done:
            self.worker_spec.pop(n, None)
        await asyncio.gather(*(j.close() for j in gone), return_exceptions=True)
        return done

    def adapt(self, minimum: int = 0, maximum: float = math.inf, *, minimum_jobs=None,
              maximum_jobs=None, minimum_cores=None, maximum_cores=None, minimum_memory=None,
              maximum_memory=None, interval="1s", wait_count: int = 3,
              target_duration="5s"):
        """Scale by itself between ``minimum`` and ``maximum`` worker processes (or
        ``minimum_jobs``/``maximum_jobs``, cores, memory), counted in whole jobs: add jobs
        while tasks queue, retire idle ones after ``wait_count`` checks ``interval`` apart.
        Returns the :class:`~zfabric.adaptive.Adaptive` (``.stop()`` ends it)."""
        lo = self._jobs_for(minimum)
        hi = math.inf if maximum == math.inf else self._jobs_for(int(maximum))
        for value, low in ((minimum_jobs, True), (maximum_jobs, False)):
            if value is not None:
                lo, hi = (max(lo, value), hi) if low else (lo, min(hi, value))
        for kw, value, low in (("cores", minimum_cores, True), ("cores", maximum_cores, False),
                               ("memory", minimum_memory, True),
                               ("memory", maximum_memory, False)):
            if value is not None:
                j = self._jobs_for(**{kw: value})
                lo, hi = (max(lo, j), hi) if low else (lo, min(hi, j))
        return self._start_adaptive(_JobsView(self), lo, hi, interval, wait_count,
                                    target_duration)

    async def _wait_for_workers(self, n: int, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        client = await self._client()
        while True:
            self._raise_failed()
            info = await client.scheduler_info(n_workers=-1)
            have = len(info["workers"])
            if have >= n:
                return
            if deadline is not None and time.monotonic() > deadline:
                raise CommTimeoutError(
                    f"only {have} of {n} workers arrived within {timeout:g} s; jobs:"
                    f" {self.jobs or 'none'}. See cluster.get_logs() and docs/deploy.md")
            await asyncio.sleep(0.1)

    def _raise_failed(self) -> None:
        """Raise the error of a job (or the scheduler) that failed after it started."""
        for job in [self.scheduler, *self.workers.values()]:
            if job is not None and job.error is not None:
                error, job.error = job.error, None
                raise error

    # ------------------------------------------------------------------ logs and clients

    async def _get_logs(self, cluster, scheduler, workers) -> dict[str, str]:
        out = {}
        if cluster:
            out["Cluster"] = "\n".join(m for _, m in logs.recent(prefix="zfabric.cluster"))
        if scheduler and self.scheduler is not None:
            out["Scheduler"] = self.scheduler.logs()
        if workers:
            for name, job in self.workers.items():
                out[name] = job.logs()
            client = await self._client()
            which = None if workers is True else list(workers)
            with contextlib.suppress(Exception):
                got = await client.run(logs.recent, workers=which)
                for address, records in got.items():
                    out[address] = "\n".join(m for _, m in records)
        return out

    def get_client(self):
        """A Client of this cluster."""
        return Client(self, asynchronous=self.asynchronous)


def _job_of(worker_name: str, jobs: list[str]) -> str | None:
    """The job (of ``jobs``) a worker named ``worker_name`` belongs to: ``job`` or
    ``job-<i>``."""
    for job in jobs:
        if worker_name == job:
            return job
        head, _, tail = worker_name.rpartition("-")
        if head == job and tail.isdigit():
            return job
    return None


class _JobsView:
    """A SpecCluster as :class:`~zfabric.adaptive.Adaptive` sees it: its unit is the job."""

    def __init__(self, cluster: SpecCluster):
        self._cluster = cluster

    @property
    def name(self) -> str:
        return self._cluster.name

    @property
    def workers(self) -> dict:
        return self._cluster.workers

    @property
    def threads_per_worker(self) -> int:
        c = self._cluster
        return c._threads_per_process * c._processes_per_job

    def _client(self):
        return self._cluster._client()

    def _lock(self) -> asyncio.Lock:
        return self._cluster._lock()

    async def _add_workers(self, n: int) -> None:
        await self._cluster._add_workers(n)

    async def _retire(self, *, count: int) -> None:
        await self._cluster._retire(count=count)
