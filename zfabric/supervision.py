"""The Nanny's bookkeeping: what to do with a worker process at each check (pure), when to
start a crashed one again, and the records of its processes and slots."""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

import psutil

# ---------------------------------------------------------------------- pure policy


def assess(*, phase: str, alive: bool, rss_bytes: int, memory_limit_bytes: int,
           terminate_fraction: float, now: float, kill_at: float) -> str:
    """What the Nanny should do with one slot's process now (no I/O, no clock).

    Returns ``"ok"``, ``"exited"`` (the process is gone), ``"terminate-memory"`` (it is above
    ``terminate_fraction`` of its limit) or ``"kill"`` (it ignored SIGTERM past ``kill_at``).
    """
    if phase in ("starting", "running"):
        if not alive:
            return "exited"
        if (memory_limit_bytes and terminate_fraction
                and rss_bytes > terminate_fraction * memory_limit_bytes):
            return "terminate-memory"
        return "ok"
    if phase == "stopping":
        if not alive:
            return "exited"
        if now >= kill_at:
            return "kill"
    return "ok"


#: The exit code of a worker process that leaves to be started afresh at once (EX_TEMPFAIL).
EXIT_RESTART = 75


@dataclass(frozen=True)
class Exit:
    """What follows a worker process's exit (see :func:`after_exit`)."""

    then: str  # "restart" | "close"
    expected: bool  # stopped on purpose or asked for a fresh start: restart at once
    report: str | None  # tell the scheduler this (``worker-died``), or nothing
    log_level: int
    log: str
    counted: bool  # a death before it registered: counts towards the restart backoff


def signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def after_exit(*, phase: str, then: str, pid: int, rc: int, ready: bool,
               closing_reason: str | None, restart_reason: str | None) -> Exit:
    """What to do once a slot's process is gone (no I/O): whether to start it again, what to
    tell the scheduler and what to log. ``phase`` and ``then`` are the slot's; ``rc`` the
    exit code (negative: the signal that killed it); ``ready``: it had registered; the reasons
    are what the process said on its pipe."""
    how = f"was killed by {signal_name(-rc)}" if rc < 0 else f"exited with code {rc}"
    if phase == "stopping":
        report = (None if closing_reason is not None
                  else f"worker process {pid} {how} while its nanny stopped it")
        return Exit(then, True, report, logging.DEBUG, f"worker process {pid} stopped", False)
    if restart_reason is not None or rc == EXIT_RESTART:
        # Not a death: nothing to back off from. A worker that said so on the pipe has said
        # goodbye to the scheduler too, and nothing it ran is to blame.
        report = None if restart_reason is not None else f"worker process {pid} {how}"
        return Exit("restart", True, report, logging.INFO,
                    f"worker process {pid} asked for a fresh start:"
                    f" {restart_reason or f'exit code {rc}'}", False)
    if closing_reason is not None:
        return Exit("close", True, f"worker closed: {closing_reason}", logging.INFO,
                    f"worker process {pid} closed: {closing_reason}", False)
    text = f"worker process {pid} {how}"
    return Exit("restart", False, text, logging.WARNING, text, not ready)


class RestartPolicy:
    """How long to wait before starting again a worker process that died before it registered.

    Only such deaths count: a worker that cannot start (a broken environment, a scheduler that
    refuses it) must not spin, while one killed after it served restarts at once, however often
    it happens (a task that keeps killing workers is the scheduler's to stop, with KilledWorker).
    The first counted death in ``window_s`` restarts at once; each further one waits twice as
    long as the last, from ``base_s`` up to ``max_s``.
    """

    def __init__(self, *, window_s: float = 30.0, base_s: float = 0.25, max_s: float = 10.0):
        self.window_s = window_s
        self.base_s = base_s
        self.max_s = max_s

    def delay(self, deaths: Sequence[float], now: float) -> float:
        recent = sum(1 for t in deaths if now - t < self.window_s)
        if recent <= 1:
            return 0.0
        return min(self.max_s, self.base_s * 2 ** (recent - 2))


# ---------------------------------------------------------------------- nanny side


class WorkerProcess:
    """One incarnation of a worker process, as its Nanny sees it."""

    def __init__(self, proc: subprocess.Popen, identity: str, fd: int, started: float):
        self.proc = proc
        self.pid = proc.pid
        self.identity = identity
        self.fd: int | None = fd
        self.started = started
        self.address = ""
        self.ready = False
        self.closing_reason: str | None = None  # it said it closes on purpose
        self.restart_reason: str | None = None  # it said it leaves to be started afresh
        self.reported = False  # the scheduler was told it died
        self.buffer = b""
        try:
            self.ps: psutil.Process | None = psutil.Process(proc.pid)
        except psutil.Error:  # pragma: no cover - gone already
            self.ps = None

    def __repr__(self) -> str:
        return f"<WorkerProcess pid={self.pid} {self.address or self.identity}>"

    def feed(self, data: bytes) -> None:
        """Take what the process wrote on its pipe: lines ``ready ADDRESS`` (it registered),
        ``closing REASON`` (it closes on purpose), ``restarting REASON`` (it leaves to be
        started afresh)."""
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for raw in lines:
            word, _, rest = raw.decode(errors="replace").partition(" ")
            if word == "ready":
                self.address, self.ready = rest, True
            elif word == "closing":
                self.closing_reason = rest or "closed"
            elif word == "restarting":
                self.restart_reason = rest or "restarting"

    def rss(self) -> int:
        try:
            return self.ps.memory_info().rss if self.ps is not None else 0
        except psutil.Error:
            return 0

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            self.proc.send_signal(sig)


class Slot:
    """One place for a worker process; the process in it changes with each restart."""

    def __init__(self, index: int, name: str | None):
        self.index = index
        self.name = name
        self.phase = "waiting"  # starting | running | stopping | waiting | failed | closed
        self.process: WorkerProcess | None = None
        self.generation = 0
        self.then = "restart"  # after "stopping": restart | close
        self.kill_at = 0.0
        self.restart_at = 0.0
        self.deaths: list[float] = []
        self.last_exit = ""
