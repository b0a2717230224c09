"""Job-queue clusters: zfabric workers in the batch jobs of SLURM, PBS and the like.

The provider is the batch system (submit, cancel, status commands and a directive prefix,
class attributes of a back-end's subclass); the launcher is
:mod:`zfabric.deploy.job_launcher`, which each job script runs. A job is one
:class:`JobQueueJob` of the :class:`~zfabric.deploy.spec.SpecCluster` base: it is "running"
once submitted, and the cluster follows it from there.

What the cluster adds to dask-jobqueue's behaviour:

- A refused submission (a bad partition, a site's filter) raises :class:`JobSubmissionError`
  with the command's stderr in the caller's thread: at ``scale()`` at once, and for jobs
  ``adapt`` submitted in the background at the next ``wait_for_workers()``. A job that ended
  before any of its workers arrived (its launcher could not reach the scheduler, Python or
  zfabric missing on the node) raises :class:`JobFailedError` with the tail of its log there.
- One status task asks the batch system about every job every ``JOB_STATUS_INTERVAL_S``
  (one command for all jobs, as sites ask): ``cluster.jobs`` shows each job's state
  (PENDING, RUNNING, ...), a job pending for ``PENDING_REPORT_S`` is reported once (a warning
  and an event under topic ``jobqueue``), and a job that ended leaves the cluster.
- The scheduler's address is one the nodes reach: that of ``interface=``, or of this host's
  interface on the route to the compute nodes (their addresses come from the batch system),
  never 127.0.0.1.
- The job's walltime is written into the job script and given to the launcher, which retires
  the job's workers ``lifetime`` seconds after it starts (the walltime less
  ``JOB_RETIRE_LEAD_S`` less a random share of ``lifetime_stagger``). ``JOB_REPLACE_AHEAD_S``
  before that, adaptive scaling stops counting the job, so it submits a replacement that can
  take the retiring workers' data.
- ``close()`` cancels every job with one cancel command; a job whose workers all left ends by
  itself, and workers whose scheduler is gone for ``death_timeout`` exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import re
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import psutil

from .._zmq import local_address_for
from ..cluster import nprocesses_nthreads
from ..config import Config, from_env, parse_bytes, parse_timedelta
from ..errors import ZFabricError
from .spec import DEATH_TIMEOUT_S, InProcessScheduler, ProcessInterface, SpecCluster, _JobsView

logger = logging.getLogger("zfabric.cluster")

__all__ = ["JobFailedError", "JobQueueCluster", "JobQueueJob", "JobSubmissionError",
           "format_walltime", "parse_walltime"]

#: The event topic of job reports (pending jobs, failed jobs).
EVENT_TOPIC = "jobqueue"
#: Lines of a failed job's log quoted in its error.
LOG_TAIL_LINES = 20


class JobSubmissionError(ZFabricError):
    """Raised when the batch system refused to queue a job; carries its stderr."""


class JobFailedError(ZFabricError):
    """Raised when a job ended before any of its workers reached the scheduler."""


def parse_walltime(text: str | int | float) -> float:
    """Seconds from a batch walltime: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``
    or ``D-HH:MM:SS`` (SLURM's forms; PBS's ``HH:MM:SS`` is one of them), or a number of
    seconds."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return float(text)
    s = str(text).strip()
    days = 0
    if "-" in s:
        d, s = s.split("-", 1)
        days = int(d)
        parts = [int(p) for p in s.split(":")]
        parts += [0] * (3 - len(parts))
        h, m, sec = parts
    else:
        parts = [int(p) for p in s.split(":")]
        if len(parts) == 1:
            h, m, sec = 0, parts[0], 0
        elif len(parts) == 2:
            h, m, sec = 0, parts[0], parts[1]
        elif len(parts) == 3:
            h, m, sec = parts
        else:
            raise ValueError(f"cannot read walltime {text!r}; write it like 01:30:00")
    return float(((days * 24 + h) * 60 + m) * 60 + sec)


def format_walltime(seconds: float) -> str:
    """``HH:MM:SS`` (hours may exceed 24), as both SLURM and PBS read it."""
    s = math.ceil(seconds)
    return f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


async def run_command(argv: Sequence[str], *, stdin: str | None = None,
                      timeout: float) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of a batch command; 127 and a message when it is
    missing, a timeout raises :class:`JobSubmissionError` naming the command."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else
            asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
    except FileNotFoundError:
        return 127, "", f"{argv[0]}: command not found (is this a login node of the cluster?)"
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(stdin.encode() if stdin is not None else None), timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


class JobQueueJob(ProcessInterface):
    """One batch job: submitted on ``start()``, cancelled on ``close()`` (unless it ended)."""

    def __init__(self, scheduler: str, name: str | None = None, *,
                 cluster: JobQueueCluster):
        super().__init__(scheduler, name)
        self.cluster = cluster
        self.job_id: str | None = None
        #: The batch system's state of the job (PENDING, RUNNING, ...), as last seen.
        self.job_state = "SUBMITTING"
        self.reason = ""
        self.submitted_at: float | None = None
        self.running_since: float | None = None
        #: Seconds after its start at which the job's workers retire (None: never).
        self.lifetime_s = cluster._lifetime_for_new_job()
        self.pending_reported = False
        self.seen_worker = False
        #: Whether the batch system no longer runs it (ended, cancelled or never queued).
        self.gone = False

    def worker_names(self) -> list[str]:
        n = self.cluster._processes_per_job
        return [str(self.name)] if n == 1 else [f"{self.name}-{i}" for i in range(n)]

    def status_text(self) -> str:
        return self.job_state

    @property
    def expiring(self) -> bool:
        """Whether adaptive scaling should count it gone: its retirement is near."""
        if self.running_since is None or self.lifetime_s is None:
            return False
        ahead = self.cluster._replace_ahead_s()
        return time.monotonic() >= self.running_since + self.lifetime_s - ahead

    @property
    def log_path(self) -> Path | None:
        if self.job_id is None:
            return None
        return self.cluster._log_path(str(self.name), self.job_id)

    async def start(self) -> None:
        cluster = self.cluster
        script = cluster.job_script(name=str(self.name), lifetime_s=self.lifetime_s)
        argv = list(cluster.submit_command)
        self.submitted_at = time.monotonic()
        rc, out, err = await run_command(argv, stdin=script,
                                         timeout=cluster.config.JOB_COMMAND_TIMEOUT_S)
        job_id = cluster._parse_job_id(out) if rc == 0 else None
        if job_id is None:
            self.job_state = "REFUSED"
            self.gone = True
            error = JobSubmissionError(
                f"{' '.join(argv)} refused job {self.name} (exit code {rc}): "
                f"{(err or out).strip() or 'no message'}. Check queue=, account=, walltime=,"
                " memory= and job_extra_directives=; cluster.job_script() shows the script.")
            cluster._failed(error)
            raise error
        self.job_id = job_id
        self.job_state = "PENDING"
        self._log(f"submitted as job {job_id}")
        logger.info("%s: job %s submitted as %s", cluster.name, self.name, job_id)

    async def _close(self) -> None:
        if self.job_id is not None and not self.gone:
            await self.cluster._cancel([self])

    def logs(self) -> str:
        path = self.log_path
        text = super().logs()
        if path is not None:
            with contextlib.suppress(OSError):
                text += "\n" + path.read_text(errors="replace")[-100_000:]
        return text


class _LiveJobsView(_JobsView):
    """What adaptive scaling counts: the jobs whose retirement is not near."""

    @property
    def workers(self) -> dict:
        return {n: j for n, j in self._cluster.workers.items()
                if not getattr(j, "expiring", False)}


class JobQueueCluster(SpecCluster):
    """Workers in batch jobs; a back-end sets the class attributes below (see SLURMCluster)."""

    #: The command that queues a job script read on stdin and prints the job's id.
    submit_command: ClassVar[tuple[str, ...]] = ()
    #: The command that cancels jobs, followed by their ids.
    cancel_command: ClassVar[tuple[str, ...]] = ()
    #: Each directive line of the job script starts with this (``#SBATCH``).
    directive_prefix: ClassVar[str] = ""
    #: The job id in the submit command's output: the first match of this.
    job_id_regexp: ClassVar[str] = r"(\d+)"
    #: The batch system's job states that mean waiting, and running; all others have ended.
    pending_states: ClassVar[frozenset[str]] = frozenset()
    running_states: ClassVar[frozenset[str]] = frozenset()
    #: The batch system's placeholder for the job id in the output file's name.
    job_id_placeholder: ClassVar[str] = ""
    #: The job's name (its first part; the cluster's job name is appended).
    job_name_prefix = "zfabric"
    job_cls: ClassVar[type[JobQueueJob]] = JobQueueJob

    def __init__(self, n_workers: int = 0, *, cores: int | None = None,
                 processes: int | None = None, memory: str | int | None = None,
                 walltime: str | int | None = None, queue: str | None = None,
                 account: str | None = None, job_extra_directives: Sequence[str] = (),
                 job_directives_skip: Sequence[str] = (),
                 job_script_prologue: Sequence[str] = (), interface: str | None = None,
                 local_directory: str | None = None, log_directory: str | None = None,
                 python: str | None = None, worker_extra_args: Sequence[str] = (),
                 death_timeout: float | str = DEATH_TIMEOUT_S, lifetime: float | str | None = None,
                 lifetime_stagger: float | str = 0.0, lifetime_lead: float | str | None = None,
                 scheduler_options: dict | None = None, shebang: str = "#!/usr/bin/env bash",
                 config: Config | None = None, asynchronous: bool = False, security=None,
                 name: str | None = None, **kwargs: Any):
        if kwargs:
            raise TypeError(f"{type(self).__name__} got unexpected arguments:"
                            f" {', '.join(sorted(kwargs))} (see docs/deploy.md for the mapping"
                            " of dask-jobqueue's parameters)")
        if security is not None:
            raise ValueError(f"{type(self).__name__}(security=...) is not supported yet: the"
                             " job script would have to carry the keys")
        self.config = config or from_env()
        self.cores = int(cores or 1)
        if processes is None:
            processes, threads = nprocesses_nthreads(self.cores)
        else:
            threads = max(1, self.cores // max(1, processes))
        self.processes = int(processes)
        self.memory = parse_bytes(memory) if memory is not None else None
        self.walltime_s = parse_walltime(walltime) if walltime is not None else None
        self.queue = queue
        self.account = account
        self.job_extra_directives = list(job_extra_directives)
        self.job_directives_skip = list(job_directives_skip)
        self.job_script_prologue = list(job_script_prologue)
        self.local_directory = local_directory
        self.log_directory = os.path.abspath(log_directory or os.getcwd())
        self.python = python or sys.executable
        self.worker_extra_args = list(worker_extra_args)
        self.shebang = shebang
        self.lifetime_stagger_s = _seconds(lifetime_stagger) or 0.0
        self.lifetime_lead_s = _seconds(lifetime_lead)
        self._lifetime_s = _seconds(lifetime)
        self._processes_per_job = self.processes
        self._threads_per_process = threads
        self._memory_per_process = (self.memory // self.processes) if self.memory else None
        self._job_failures: list[BaseException] = []
        self._n_workers = n_workers
        self._status_task: asyncio.Task | None = None
        sched = dict(scheduler_options or {})
        if "host" not in sched and interface is not None:
            sched["host"] = self._scheduler_host(interface)
        sched.setdefault("port", 0)
        Path(self.log_directory).mkdir(parents=True, exist_ok=True)
        super().__init__(
            workers=None, scheduler={"cls": InProcessScheduler, "options": sched},
            worker={"cls": self.job_cls, "options": {"cluster": self}},
            asynchronous=asynchronous, name=name, death_timeout=death_timeout)
        if n_workers and not asynchronous:
            self.scale(n_workers)

    # ------------------------------------------------------------------ the script

    def _lifetime_for_new_job(self) -> float | None:
        if self._lifetime_s is not None:
            base = self._lifetime_s
        elif self.walltime_s is None:
            return None
        else:
            lead = (self.lifetime_lead_s if self.lifetime_lead_s is not None
                    else self.config.JOB_RETIRE_LEAD_S)
            # A lead longer than half the walltime would leave the job little time to work.
            base = self.walltime_s - min(lead, self.walltime_s / 2)
        return max(1.0, base - random.uniform(0, self.lifetime_stagger_s))

    def _replace_ahead_s(self) -> float:
        return self.config.JOB_REPLACE_AHEAD_S

    def _directives(self, name: str) -> list[str]:
        """The back-end's directive lines, without the prefix (subclasses define it)."""
        raise NotImplementedError

    def _log_path(self, name: str, job_id: str) -> Path:
        return Path(self.log_directory) / f"{self.job_name_prefix}-{name}-{job_id}.out"

    def _log_pattern(self, name: str) -> str:
        return str(Path(self.log_directory) /
                   f"{self.job_name_prefix}-{name}-{self.job_id_placeholder}.out")

    def job_script(self, name: str | None = None, lifetime_s: float | None = None) -> str:
        """The script the next job (or job ``name``) is submitted with."""
        if name is None:
            name = self._new_worker_name(self._i)
            lifetime_s = self._lifetime_s if self._lifetime_s is not None else (
                self._lifetime_for_new_job())
        skip = self.job_directives_skip
        lines = [self.shebang, ""]
        for d in [*self._directives(name), *self.job_extra_directives]:
            if not any(s in d for s in skip):
                lines.append(f"{self.directive_prefix} {d}")
        lines += ["", *self.job_script_prologue]
        argv = [self.python, "-m", "zfabric.deploy.job_launcher", self.scheduler_address,
                "--name", name, "--nworkers", str(self.processes),
                "--nthreads", str(self._threads_per_process),
                "--memory-limit", str(self._memory_per_process or 0),
                "--death-timeout", f"{self.death_timeout:g}"]
        if self.walltime_s is not None:
            argv += ["--walltime", f"{self.walltime_s:g}"]
        if lifetime_s is not None:
            argv += ["--lifetime", f"{lifetime_s:.1f}"]
        if self.local_directory:
            argv += ["--local-directory", self.local_directory]
        if self.worker_extra_args:
            argv += ["--", *self.worker_extra_args]
        lines.append("exec " + shlex.join(argv))
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ where the scheduler is

    def _node_addresses(self) -> list[str]:
        """Addresses of the compute nodes (back-ends that can ask the batch system say)."""
        return []

    def _scheduler_host(self, interface: str | None) -> str:
        """The address the workers are given: ``interface``'s, or this host's on the route
        to the compute nodes; never a loopback address."""
        if interface is not None:
            addrs = psutil.net_if_addrs().get(interface)
            if not addrs:
                raise ValueError(f"interface={interface!r}: this host has no such network"
                                 f" interface (it has {', '.join(sorted(psutil.net_if_addrs()))})")
            for snic in addrs:
                if snic.family.name == "AF_INET":
                    return snic.address
            raise ValueError(f"interface={interface!r} has no IPv4 address")
        for node in self._node_addresses():
            with contextlib.suppress(OSError, ValueError):
                ip = local_address_for(f"tcp://{node}:1")
                if not ip.startswith("127."):
                    return ip
        for nic in psutil.net_if_addrs().values():
            for snic in nic:
                if snic.family.name == "AF_INET" and not snic.address.startswith("127."):
                    return snic.address
        raise ValueError(f"{type(self).__name__} found no address of this host that the compute"
                         " nodes could reach (only loopback): pass interface= naming the"
                         " network they share")

    # ------------------------------------------------------------------ following the jobs

    def _parse_job_id(self, out: str) -> str | None:
        m = re.search(self.job_id_regexp, out)
        return m.group(1) if m else None

    def _status_command(self, job_ids: list[str]) -> list[str]:
        """The command that lists these jobs' states (subclasses define it)."""
        raise NotImplementedError

    def _parse_status(self, out: str) -> dict[str, tuple[str, str]]:
        """``{job id: (state, reason)}`` from the status command's output."""
        raise NotImplementedError

    async def start(self) -> None:
        options = self.scheduler_spec["options"]
        if "host" not in options:  # asks the batch system (sinfo): off the event loop
            options["host"] = await asyncio.to_thread(self._scheduler_host, None)
        await super().start()
        self._status_task = asyncio.ensure_future(self._follow_jobs())
        if self._n_workers and self.asynchronous:
            await self._scale(self._jobs_for(self._n_workers))

    def adapt(self, *args: Any, **kwargs: Any):
        adaptive = super().adapt(*args, **kwargs)
        adaptive.cluster = _LiveJobsView(self)
        return adaptive

    async def _follow_jobs(self) -> None:
        while True:
            try:
                await self._check_jobs()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("%s: checking the jobs failed; trying again", self.name)
            await asyncio.sleep(self.config.JOB_STATUS_INTERVAL_S)

    async def _check_jobs(self) -> None:
        """One look at every job: its state, pending reports, jobs that ended."""
        jobs = [j for j in self.workers.values()
                if isinstance(j, JobQueueJob) and j.job_id is not None]
        if not jobs:
            return
        rc, out, err = await run_command(self._status_command([j.job_id for j in jobs
                                                               if j.job_id]),
                                         timeout=self.config.JOB_COMMAND_TIMEOUT_S)
        if rc != 0 and not self._status_means_gone(err):
            logger.warning("%s: %s failed: %s", self.name, self._status_command([])[0],
                           err.strip())
            return
        states = self._parse_status(out) if rc == 0 else {}
        names: set[str] = set()
        with contextlib.suppress(Exception):
            client = await self._client()
            info = await client.scheduler_info(n_workers=-1)
            names = {str(w.get("name")) for w in info["workers"].values()}
        now = time.monotonic()
        for job in jobs:
            if set(job.worker_names()) & names:
                job.seen_worker = True
            state, reason = states.get(str(job.job_id), ("", ""))
            if state in self.pending_states:
                job.job_state, job.reason = state, reason
                await self._maybe_report_pending(job, now)
            elif state in self.running_states:
                job.job_state, job.reason = state, reason
                if job.running_since is None:
                    job.running_since = now
            else:
                await self._job_ended(job, state or "ENDED")

    async def _maybe_report_pending(self, job: JobQueueJob, now: float) -> None:
        waited = now - (job.submitted_at or now)
        if job.pending_reported or waited < self.config.PENDING_REPORT_S:
            return
        job.pending_reported = True
        text = (f"job {job.name} (batch job {job.job_id}) has been {job.job_state} for"
                f" {waited:.0f} s (reason: {job.reason or 'unknown'}); the batch system has not"
                " started it. cluster.jobs shows every job's state.")
        logger.warning("%s: %s", self.name, text)
        await self._event({"action": "pending", "job": job.name, "job_id": job.job_id,
                           "state": job.job_state, "reason": job.reason,
                           "waited_s": round(waited, 1)})

    async def _job_ended(self, job: JobQueueJob, state: str) -> None:
        job.job_state, job.gone = state, True
        if not job.seen_worker and job.status == "running":
            tail = "\n".join(job.logs().splitlines()[-LOG_TAIL_LINES:])
            error = JobFailedError(
                f"job {job.name} (batch job {job.job_id}) ended ({state}) before any of its"
                f" workers reached the scheduler at {self.scheduler_address}. Its log"
                f" ({job.log_path}) ends with:\n{tail}")
            self._failed(error)
            await self._event({"action": "failed", "job": job.name, "job_id": job.job_id,
                               "state": state})
        job._ended(f"batch job {job.job_id} ended: {state}")

    async def _event(self, msg: dict) -> None:
        with contextlib.suppress(Exception):
            client = await self._client()
            await client.log_event(EVENT_TOPIC, msg)

    def _status_means_gone(self, stderr: str) -> bool:
        """Whether a failed status command says the jobs are unknown (so they ended)."""
        return False

    def _failed(self, error: BaseException) -> None:
        self._job_failures.append(error)

    def _raise_failed(self) -> None:
        super()._raise_failed()
        if self._job_failures:
            error = self._job_failures.pop(0)
            self._job_failures.clear()
            raise error

    # ------------------------------------------------------------------ size and end

    async def _scale(self, jobs: int) -> None:
        try:
            await super()._scale(jobs)
        except JobSubmissionError as exc:
            # Raised here, in the caller's code: not a second time at wait_for_workers().
            with contextlib.suppress(ValueError):
                self._job_failures.remove(exc)
            raise

    async def _retire(self, *, count: int) -> list[str]:
        """Retire ``count`` jobs: those about to retire by themselves first, then the newest.
        A job is cancelled only once its workers retired (their data moved off); a job whose
        worker the scheduler kept (no other worker to take its data yet) stays."""
        names = list(self.workers)
        names.reverse()  # newest first
        names.sort(key=lambda n: not getattr(self.workers[n], "expiring", False))
        names = names[:count]
        if not names:
            return []
        owner = {w: n for n in names for w in self.workers[n].worker_names()}
        client = await self._client()
        info = await client.scheduler_info(n_workers=-1)
        addresses = {a: owner[str(w.get("name"))] for a, w in info["workers"].items()
                     if str(w.get("name")) in owner}
        retired = await client.retire_workers(list(addresses)) if addresses else {}
        kept = {addresses[a] for a in addresses if a not in retired}
        gone = [n for n in names if n not in kept and n in self.workers]
        jobs = [self.workers.pop(n) for n in gone]
        for n in gone:
            self.worker_spec.pop(n, None)
        await asyncio.gather(*(j.close() for j in jobs), return_exceptions=True)
        return gone

    async def _cancel(self, jobs: list[JobQueueJob]) -> None:
        ids = [j.job_id for j in jobs if j.job_id is not None]
        if not ids:
            return
        rc, _, err = await run_command([*self.cancel_command, *ids],
                                       timeout=self.config.JOB_COMMAND_TIMEOUT_S)
        for j in jobs:
            j.job_state, j.gone = "CANCELLED", True
        if rc != 0:
            logger.warning("%s: %s %s failed: %s", self.name, " ".join(self.cancel_command),
                           " ".join(ids), err.strip())

    async def _close(self) -> None:
        if self._status_task is not None:
            self._status_task.cancel()
            with contextlib.suppress(BaseException):
                await self._status_task
        # One cancel command for every job, then the base class closes what is left.
        live = [j for j in self.workers.values() if isinstance(j, JobQueueJob)
                and j.job_id is not None and not j.gone]
        with contextlib.suppress(Exception):
            await self._cancel(live)
        await super()._close()

    @property
    def job_ids(self) -> dict[str, str | None]:
        """``{job name: the batch system's job id}``."""
        return {n: getattr(j, "job_id", None) for n, j in self.workers.items()}


def _seconds(value: float | str | None) -> float | None:
    return parse_timedelta(value, name="lifetime")
