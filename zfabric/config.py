"""Every tunable default of zfabric, with its unit in its name, in one place.

Components take these as arguments; only the command line and the top-level constructors
read the environment, through :func:`from_env`. Each setting ``NAME`` can be overridden with
the environment variable ``ZFABRIC_NAME`` (for example ``ZFABRIC_HEARTBEAT_INTERVAL_S=1``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any

from . import dask_config

#: Version of the wire protocol; peers with another version are refused.
PROTOCOL_VERSION = 1


@dataclass(frozen=True)
class Config:
    #: Port the ``zfabric scheduler`` command binds by default (dask.distributed's).
    SCHEDULER_PORT: int = 8786
    #: The scheduler ``Client()`` without an address connects to (set by ``zfabric mpi`` and
    #: ``zfabric.deploy.mpi.initialize()`` for the job's script); empty: start a LocalCluster.
    SCHEDULER_ADDRESS: str = ""
    #: Values whose pickle is smaller than this ride inline with control messages.
    INLINE_BYTES: int = 64 * 1024
    #: How often workers, nannies and clients send a heartbeat.
    HEARTBEAT_INTERVAL_S: float = 0.5
    #: Seconds between the profiler's samples of a worker's task threads (0: no profiler).
    PROFILE_INTERVAL_S: float = 0.02
    #: At most this many heartbeats a second reach the scheduler from all its workers and
    #: nannies: the interval it tells them grows with their number (HEARTBEAT_INTERVAL_S
    #: at least).
    HEARTBEATS_PER_S_MAX: float = 200.0
    #: A worker silent this long is declared dead (at least: see WORKER_TTL_HEARTBEATS).
    WORKER_TTL_S: float = 5.0
    #: A worker or Nanny silent for this many of the heartbeat intervals it was told is
    #: declared dead, when that is longer than WORKER_TTL_S (large clusters beat slower).
    WORKER_TTL_HEARTBEATS: float = 3.0
    #: A client silent this long has its futures released.
    CLIENT_TTL_S: float = 30.0
    #: A task that was running on this many dead workers, plus one, fails with KilledWorker.
    ALLOWED_FAILURES: int = 3
    #: Largest frame a worker's data port takes (MAXMSGSIZE), and largest value a task may
    #: return inline; larger ones are refused.
    MAX_MESSAGE_BYTES: int = 2 * 1024**3
    #: Most frames one message may carry.
    MAX_FRAMES: int = 10_000
    #: Bounded wait for a connection to answer its hello.
    CONNECT_TIMEOUT_S: float = 10.0
    #: Pending futures fail with SchedulerLost after the scheduler is silent this long.
    SCHEDULER_LOST_TIMEOUT_S: float = 10.0
    #: A scheduler that comes back at the same address rebuilds its state from its peers
    #: (docs/faults.md, "The scheduler restarts"): workers keep what they hold while it is
    #: away and report it; clients send again what they still wait for. Off: workers drop
    #: what they held and a client's pending futures fail with SchedulerLost.
    SCHEDULER_RECOVERY: bool = True
    #: A restarted scheduler applies its clients' ops only this long after the first peer
    #: rejoined, so that the workers can report what they hold first (and nothing they hold
    #: runs again): longer than the peers' reconnection backoff (at most 2 s) takes.
    RESTART_SETTLE_S: float = 3.0
    #: Values workers reported to a restarted scheduler that no client claims within this
    #: long (by submitting or wanting their keys) are freed.
    RESTART_GRACE_S: float = 60.0
    #: Workers and nannies keep trying to reach a lost scheduler this long before giving up.
    RECONNECT_TIMEOUT_S: float = 300.0
    #: Cap on the backoff between reconnection attempts.
    RECONNECT_BACKOFF_MAX_S: float = 2.0
    #: Tasks a worker may hold queued beyond its threads, at most.
    PREFETCH_MAX: int = 256
    #: Queue this much expected work per worker beyond its busy threads.
    PREFETCH_TARGET_S: float = 0.02
    #: Fractions of a worker's memory_limit (0 turns one off; see docs/memory.md). Above the
    #: target, managed memory (the values it holds) spills to disk, least recently used first.
    MEMORY_TARGET_FRACTION: float = 0.6
    #: Above this the process's RSS makes values spill (until RSS is below the target).
    MEMORY_SPILL_FRACTION: float = 0.7
    #: Above this RSS the worker starts no new task until it is below again.
    MEMORY_PAUSE_FRACTION: float = 0.8
    #: Fraction of memory_limit at which a Nanny terminates its worker.
    MEMORY_TERMINATE_FRACTION: float = 0.95
    #: How often a worker compares its RSS with the spill and pause thresholds.
    MEMORY_MONITOR_INTERVAL_S: float = 0.1
    #: How often a Nanny checks its workers' memory.
    NANNY_CHECK_INTERVAL_S: float = 0.1
    #: ZeroMQ linger on close: unsent messages are dropped after this.
    LINGER_MS: int = 100
    #: Messages ZeroMQ queues per peer and direction (SNDHWM/RCVHWM) before a send is refused.
    HWM_MESSAGES: int = 100_000
    #: Messages ZeroMQ queues toward one peer of a ROUTER (the scheduler's port, a worker's
    #: data port). High-water marks count messages, not bytes: this one is kept small, and
    #: what it refuses waits in the owner's own backlog, counted in bytes
    #: (``PEER_BACKLOG_BYTES``).
    SEND_QUEUE_MESSAGES: int = 100
    #: The scheduler splits what it sends one peer into messages of about this size.
    SEND_MESSAGE_BYTES: int = 2**20
    #: Largest frame the scheduler's port takes (ZeroMQ's MAXMSGSIZE: a larger one closes the
    #: connection before it is read). Values that large belong on workers: ``scatter`` them.
    SCHEDULER_FRAME_BYTES: int = 256 * 2**20
    #: Bytes a connection to the scheduler's port or a worker's data port may send beyond its
    #: last complete message, unless it announced a larger one (zfabric/intake.py): libzmq
    #: keeps the frames of an unfinished message, so a peer past this is shut down.
    INCOMPLETE_MESSAGE_BYTES: int = 2**20
    #: Bytes the scheduler keeps for one peer whose queue is full (it does not read); past
    #: this the peer is dropped as gone, loudly, rather than letting the scheduler grow.
    PEER_BACKLOG_BYTES: int = 256 * 2**20
    #: Move values of 1 MiB or more between processes of one host through shared memory
    #: (memfd segments the receiver leases out; see zfabric/shm.py) instead of TCP. Same host
    #: is decided by network address; across hosts values always go over TCP.
    SAME_HOST_SHM: bool = True
    #: With security on, large buffers (streamed pieces) go sealed with AES-GCM over a plain
    #: connection of their own to the worker's bulk port, their keys inside CurveZMQ
    #: (docs/security.md): about 4 times faster than CurveZMQ's cipher. Needs the
    #: ``cryptography`` package (``pip install 'zfabric[security]'``); without it, or off,
    #: they go over CurveZMQ.
    BULK_CHANNEL: bool = True
    #: A value whose pieces on the bulk channel stop coming for this long fails, and is sent
    #: or asked for again over CurveZMQ.
    BULK_IDLE_S: float = 10.0
    #: A value placed on a worker (``put-data``) that the scheduler has not heard of this long
    #: after (no ``scatter`` registered it) is dropped, so that nobody can fill a worker's
    #: memory with keys nothing will ever free.
    PUT_DATA_CONFIRM_S: float = 30.0
    #: Refuse to start a scheduler, worker, nanny or client without CurveZMQ keys.
    REQUIRE_ENCRYPTION: bool = False
    #: Requests that, with security on, only an ``admin`` key may make, comma-separated
    #: (any of run, restart, restart-workers, retire-workers, replicate, shutdown,
    #: register-plugin, unregister-plugin); the rest are open to client keys.
    ADMIN_ONLY: str = ""
    #: Small results of tasks a client submits while few of its tasks run come straight
    #: from the worker to the client as well (the scheduler still hears of them and tells
    #: the client as always; zfabric/replies.py). Off by default: on a loaded 2-core machine
    #: it took 5-10 % off a LocalCluster's round trip but added about as much with the
    #: scheduler in a process of its own (docs/performance.md, The hot path).
    DIRECT_REPLIES: bool = False
    #: Keys sent per ``submit`` message by ``Client.map``.
    SUBMIT_BATCH: int = 1000
    #: Tasks of one client the scheduler holds unfinished, at most; a client holds the rest
    #: (pickled) and sends them, in priority order, as results come back (zfabric/window.py).
    SUBMIT_WINDOW_TASKS: int = 1_000_000
    #: Where the scheduler serves its dashboard (dask.distributed's port); a host-less
    #: ``:PORT`` binds the scheduler's own interface. Empty: no dashboard.
    DASHBOARD_ADDRESS: str = ":8787"
    #: How often the scheduler publishes a snapshot to its dashboard.
    DASHBOARD_INTERVAL_S: float = 0.25
    #: Finished tasks the scheduler remembers for the task stream (get_task_stream).
    TASK_STREAM_LENGTH: int = 10_000
    #: Task transitions the scheduler remembers for ``Client.story`` (the last ones; about
    #: 150 bytes each). Off (0) by default: the log costs the scheduler about 1-2 µs of CPU
    #: per task, 8-18 % of its work on tiny tasks (docs/performance.md, "What watching
    #: costs"). dask's ``distributed.admin.low-level-log-length`` sets it and the next.
    TRANSITION_LOG_LENGTH: int = 0
    #: Task transitions each worker remembers for ``Client.story``. Off (0) by default: a
    #: worker's log costs it about 4 µs of CPU per task.
    WORKER_TRANSITION_LOG_LENGTH: int = 0
    #: Events the scheduler keeps for one subscriber (``subscribe_topic``,
    #: ``TransitionListener``) that has not taken them yet; beyond this it drops the newest
    #: and tells the subscriber how many it missed.
    SUBSCRIPTION_QUEUE_EVENTS: int = 10_000
    #: A batch job (SLURMCluster, PBSCluster) pending this long is reported, once: a warning
    #: and an event on the scheduler (topic ``jobqueue``).
    PENDING_REPORT_S: float = 60.0
    #: How often a job-queue cluster asks the batch system (squeue, qstat) about its jobs.
    JOB_STATUS_INTERVAL_S: float = 5.0
    #: A batch job's workers retire (their data moved off) this long before its walltime.
    JOB_RETIRE_LEAD_S: float = 60.0
    #: Adaptive scaling submits a replacement this long before a job's workers retire.
    JOB_REPLACE_AHEAD_S: float = 120.0
    #: Longest a batch command (sbatch, scancel, squeue, qsub, ...) may take.
    JOB_COMMAND_TIMEOUT_S: float = 60.0


def from_env(environ: dict[str, str] | None = None, **overrides) -> Config:
    """Build a Config from dask's ``distributed.*`` settings where zfabric has an equivalent
    (:mod:`zfabric.dask_config`; only where dask is installed), then ``ZFABRIC_*``
    environment variables, then keyword overrides (each wins over the one before)."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = dask_config.settings(environ)
    for f in fields(Config):
        raw = env.get("ZFABRIC_" + f.name)
        if raw is None:
            continue
        kind: Any = type(f.default)
        try:
            if kind is bool:
                if raw.strip().lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(raw)
                values[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
                continue
            values[f.name] = kind(float(raw)) if kind is int else kind(raw)
        except ValueError:
            raise ValueError(
                f"environment variable ZFABRIC_{f.name}={raw!r} is not a valid {kind.__name__}"
            ) from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    return replace(Config(), **values)


DEFAULT = Config()


def config_environ(config: Config) -> dict[str, str]:
    """``ZFABRIC_*`` variables that give a process started with them ``config`` (the
    settings that differ from the defaults): a Nanny passes its own to its workers, so that
    what the client's process set (``dask.config.set`` included) reaches them."""
    env = {f"ZFABRIC_{f.name}": str(getattr(config, f.name)) for f in fields(Config)
           if getattr(config, f.name) != f.default}
    env[dask_config.WARNED_VARIABLE] = "1"
    return env


_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
}


def parse_bytes(value: int | float | str) -> int:
    """``"2GiB"``, ``"300MB"``, ``"1e9"`` or a number -> bytes."""
    if isinstance(value, int | float):
        return int(value)
    text = str(value).strip().lower().replace(" ", "")
    i = len(text)
    while i and not (text[i - 1].isdigit() or text[i - 1] == "."):
        i -= 1
    number, unit = text[:i], text[i:]
    if unit not in _UNITS or not number:
        raise ValueError(
            f"cannot read {value!r} as a size; write it like 2GiB, 300MB or 1e9"
        )
    try:
        return int(float(number) * _UNITS[unit])
    except ValueError:
        raise ValueError(f"cannot read {value!r} as a size; write it like 2GiB or 300MB") from None


def memory_limit_bytes(value, nthreads: int = 1) -> int:
    """A worker's memory limit: bytes, a size string, ``"auto"`` (share of RAM), or 0/None."""
    import psutil

    if value is None or value == 0 or value == "0":
        return 0
    if value == "auto":
        cores = os.cpu_count() or 1
        total = psutil.virtual_memory().total
        return int(total * min(1.0, nthreads / cores))
    if isinstance(value, float) and 0 < value <= 1:
        return int(psutil.virtual_memory().total * value)
    return parse_bytes(value)


_SECONDS = {
    "": 1.0, "s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0,
    "ms": 1e-3, "millisecond": 1e-3, "milliseconds": 1e-3,
    "us": 1e-6, "microsecond": 1e-6, "microseconds": 1e-6,
    "m": 60.0, "min": 60.0, "mins": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
}


def parse_timedelta(value, *, name: str = "timeout") -> float | None:
    """Seconds from a number, a ``datetime.timedelta`` or a string such as ``"10s"``,
    ``"500ms"`` or ``"1 min"`` (dask's forms); None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number of seconds or a string like '10s'")
    if isinstance(value, int | float):
        return float(value)
    if hasattr(value, "total_seconds"):
        return float(value.total_seconds())
    text = str(value).strip().lower().replace(" ", "")
    i = len(text)
    while i and not (text[i - 1].isdigit() or text[i - 1] == "."):
        i -= 1
    number, unit = text[:i], text[i:]
    if unit not in _SECONDS or not number:
        raise ValueError(f"cannot read {value!r} as a {name}; write it like 10, '10s', '500ms'"
                         " or '1 min'")
    try:
        return float(number) * _SECONDS[unit]
    except ValueError:
        raise ValueError(f"cannot read {value!r} as a {name}; write it like '10s'") from None
