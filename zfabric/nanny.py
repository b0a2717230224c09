"""Process supervision: the Nanny starts worker processes, watches them and starts them again.

Theory of operation
-------------------
A :class:`Nanny` owns ``nworkers`` *slots*. Each slot runs one worker process at a time, a fresh
interpreter started by :func:`zfabric.spawn.start_worker` (``python -m zfabric worker
ADDRESS ...``; keys in memory go through a pipe, never the environment), never a fork of this
process: no ZeroMQ context or event loop crosses into it, and a user's script without
``if __name__ == "__main__":`` is not run again.

The Nanny picks each process's routing id (``--identity``), so it can name the worker when it
tells the scheduler that the process died (``worker-died``), without asking anyone. A pipe links
each process to its Nanny (``--ready-fd``): the worker writes ``ready ADDRESS`` once registered
and ``closing REASON`` before it closes on purpose (or ``restarting REASON`` when it leaves to be
started afresh, with exit code 75); end-of-file on the pipe means the process is gone, which the
Nanny notices at once (psutil polling every ``NANNY_CHECK_INTERVAL_S`` is the backstop, and
measures memory).

A slot moves through these phases; :func:`assess` (pure) says what to do at each check::

    starting ──ready──▶ running ──exit──▶ waiting ──backoff──▶ starting
        │                  │  memory/restart/close
        └──────────────────┴──────▶ stopping ──exit──▶ starting | closed
                                   (SIGTERM; SIGKILL at the deadline)

A process that dies while ``start()`` is still waiting leaves its slot *failed*, and ``start()``
raises instead of trying again and again; after that, a process that dies before it registers is
started again with :class:`RestartPolicy`'s backoff, one that dies later at once.

A worker must not outlive its Nanny, even a Nanny killed with SIGKILL. The worker sets
``PR_SET_PDEATHSIG`` on itself (Linux; done in the child after ``exec`` rather than in a
``preexec_fn``, which is unsafe in a process with threads) and also checks its parent's pid
every heartbeat (portable, and covers the moment before ``prctl`` ran); the worker's side lives
in :mod:`zfabric.process`. On ``close()`` the Nanny terminates and reaps every process. Workers
run in a session of their own so that a Ctrl-C in the terminal reaches the Nanny (which stops
them in order) rather than every worker at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import shutil
import signal
import time
from typing import Any

import zmq.asyncio

from . import _zmq, protocol, serialize
from .config import Config, config_environ, from_env, memory_limit_bytes
from .errors import CommTimeoutError, RemoteProtocolError, ZFabricError
from .lifecycle import LifeCycle
from .reprs import format_bytes
from .security import SecurityError, as_security
from .spawn import start_worker
from .supervision import RestartPolicy, Slot, WorkerProcess, after_exit, assess
from .transfer import read_ops
from .worker.memory import memory_fractions
from .worker.spill import worker_directory
from .worker.state import heartbeat_seconds

logger = logging.getLogger(__name__)

__all__ = ["Nanny", "RestartPolicy", "assess"]

#: How long a worker may take to close after SIGTERM on ``close()`` before it gets SIGKILL.
CLOSE_GRACE_S = 3.0
#: The same for ``client.restart()``: its work is being thrown away anyway.
RESTART_GRACE_S = 1.0
#: How long a restart may take before the Nanny answers the scheduler with an error.
RESTART_TIMEOUT_S = 30.0


class Nanny(LifeCycle):
    """Starts ``nworkers`` worker processes for the scheduler at ``scheduler_address`` and keeps
    them alive: ``async with Nanny(s.address, nworkers=2) as n``.

    ``nthreads`` is per worker (default: the cores shared among the workers); ``memory_limit``
    is per worker process, in bytes, a size such as ``"2GiB"``, or ``"auto"`` (the worker's
    share of this machine's memory); a worker above ``memory_terminate_fraction`` (0.95) of it
    is terminated and started again. The other memory thresholds and ``local_directory`` go
    to the workers (see :class:`~zfabric.worker.Worker` and docs/memory.md); the Nanny removes
    the local directory of a worker process it killed or lost.
    """

    def __init__(
        self,
        scheduler_ip: str | None = None,
        *,
        scheduler_address: str | None = None,
        scheduler_file: str | None = None,
        nworkers: int = 1,
        nthreads: int | None = None,
        memory_limit: int | str | None = "auto",
        resources: dict | None = None,
        name: str | None = None,
        listen_address: str | None = None,
        contact_address: str | None = None,
        death_timeout: float | None = None,
        env: dict | None = None,
        worker_log_level: str = "warning",
        restart_policy: RestartPolicy | None = None,
        config: Config | None = None,
        memory_target_fraction: float | None = None,
        memory_spill_fraction: float | None = None,
        memory_pause_fraction: float | None = None,
        memory_terminate_fraction: float | None = None,
        local_directory: str | None = None,
        preload: str | list[str] | None = None,
        security=None,
        **kwargs,
    ):
        if kwargs:
            raise TypeError(f"Nanny got unexpected arguments: {', '.join(sorted(kwargs))}")
        address: Any = scheduler_address or scheduler_ip
        if hasattr(address, "address") and not isinstance(address, str):
            address = address.address
        if not address and scheduler_file:
            with open(scheduler_file) as f:
                address = json.load(f)["address"]
        if not address:
            raise ValueError("Nanny needs the scheduler's address, e.g. Nanny('tcp://host:8786')")
        self.scheduler_address = _zmq.normalize_address(address)
        self.config = config or from_env()
        self.security = as_security(security)
        if self.security is None and self.config.REQUIRE_ENCRYPTION:
            raise SecurityError("REQUIRE_ENCRYPTION is set but this nanny has no keys: pass"
                                " security=Security(DIR) (`zfabric keygen DIR`)")
        self.nworkers = int(nworkers)
        if self.nworkers < 0:
            raise ValueError(f"nworkers must be 0 or more, got {nworkers}")
        cores = os.cpu_count() or 1
        self.nthreads = int(nthreads or max(1, cores // max(1, self.nworkers)))
        if self.nthreads < 1:
            raise ValueError(f"nthreads must be at least 1, got {nthreads}")
        self.memory_limit = memory_limit_bytes(memory_limit, self.nthreads)
        self.memory_fractions = memory_fractions(
            self.config, target=memory_target_fraction, spill=memory_spill_fraction,
            pause=memory_pause_fraction, terminate=memory_terminate_fraction)
        if local_directory is not None and not os.path.isdir(local_directory):
            raise ValueError(f"local_directory {local_directory!r} is not a directory; create"
                             " it first or leave it out (the system's temporary directory)")
        self.local_directory = local_directory
        self.resources = dict(resources or {})
        self.name = None if name is None else str(name)
        if contact_address and self.nworkers > 1:
            raise ValueError("contact_address names one worker; use it with nworkers=1")
        self.listen_address = listen_address
        self.contact_address = contact_address
        self.death_timeout = float(
            death_timeout if death_timeout is not None else self.config.RECONNECT_TIMEOUT_S
        )
        self.env = {**config_environ(self.config), **dict(env or {})}
        # dask's --preload, run by each worker process it starts (files made absolute)
        specs = [preload] if isinstance(preload, str) else list(preload or ())
        self.preload = [os.path.abspath(p) if p.endswith(".py") or os.sep in p else p
                        for p in specs]
        self.worker_log_level = worker_log_level
        self.policy = restart_policy or RestartPolicy()
        self.identity = _zmq.new_identity("nanny").decode()
        self.slots: list[Slot] = []
        for i in range(self.nworkers):
            if self.name is None:
                slot_name = None
            else:
                slot_name = self.name if self.nworkers == 1 else f"{self.name}-{i}"
            self.slots.append(Slot(i, slot_name))
        self.epoch: str | None = None
        self._initial_plugins: list | None = []  # set up before the first workers start
        self._sock: Any = None
        self._tasks: list[asyncio.Task] = []
        self._welcome: asyncio.Future | None = None
        self._last_heard = time.monotonic()
        # how often to heartbeat: the setting until the scheduler says (welcome, and later
        # ``heartbeat-interval`` as the cluster grows)
        self.heartbeat_s = self.config.HEARTBEAT_INTERVAL_S
        self._next_beat = 0.0
        self._loop: Any = None  # the running loop, from start()
        self._closer: asyncio.Future | None = None

    def __repr__(self) -> str:
        alive = sum(s.phase == "running" for s in self.slots)
        return f"<Nanny {self.name or self.identity} workers={alive}/{self.nworkers}>"

    # ------------------------------------------------------------------ views

    @property
    def id(self) -> str:
        return self.identity

    @property
    def processes(self) -> list[WorkerProcess]:
        """The current worker processes (one per slot that has one)."""
        return [s.process for s in self.slots if s.process is not None]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.proc.poll() is None]

    @property
    def worker_addresses(self) -> list[str]:
        return [s.process.address for s in self.slots if s.phase == "running" and s.process]

    @property
    def worker_address(self) -> str:
        """The address of the first worker (the only one with ``nworkers=1``)."""
        addresses = self.worker_addresses
        return addresses[0] if addresses else ""

    @property
    def worker_identities(self) -> list[str]:
        return [p.identity for p in self.processes]

    # ------------------------------------------------------------------ start and close

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._welcome = self._loop.create_future()
        ctx = zmq.asyncio.Context.instance()
        self._sock = _zmq.dealer(ctx, self.scheduler_address, self.identity.encode(),
                                 linger_ms=self.config.LINGER_MS, security=self.security,
                                 role="nanny",
                                 max_frame_bytes=2 * self.config.SCHEDULER_FRAME_BYTES)
        self._tasks.append(asyncio.ensure_future(
            read_ops(self._sock, self._on_op, who="nanny", heard=self._heard)))
        self._send(protocol.hello("nanny", self.identity, pid=os.getpid()))
        try:
            await asyncio.wait_for(asyncio.shield(self._welcome), self.death_timeout)
        except TimeoutError:
            raise CommTimeoutError(
                f"Nanny could not reach a scheduler at {self.scheduler_address} within"
                f" {self.death_timeout:g} s; is the scheduler running there?"
            ) from None
        # Workers start after the welcome and the Nanny plugins that came with it (a plugin
        # sets up what the worker processes need: environment variables, files); one local
        # round trip more than starting them at once.
        initial, self._initial_plugins = self._initial_plugins, None
        for task in initial or ():
            await task
        now = time.monotonic()
        marks = [(s, s.generation) for s in self.slots]
        for slot in self.slots:
            self._spawn(slot, now)
        self._tasks.append(asyncio.ensure_future(self._watch()))
        await self._wait_started(marks, self.death_timeout, fail_on_exit=True)
        logger.info("nanny %s started %d worker(s) for %s", self.identity, self.nworkers,
                    self.scheduler_address)

    async def _close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks = []
        now = time.monotonic()
        for slot in self.slots:
            wp = slot.process
            rc = wp.proc.poll() if wp is not None else None
            if wp is not None and rc is None:
                self._stop(slot, now, then="close", grace_s=CLOSE_GRACE_S)
            elif wp is not None and rc is not None and slot.phase in (
                    "starting", "running", "stopping"):
                self._exited(slot, wp, rc, now)  # died just now: tell the scheduler
            else:
                self._retire(slot)
                slot.phase = "closed"
        give_up = now + CLOSE_GRACE_S + 5.0  # SIGKILL comes at CLOSE_GRACE_S
        while any(s.phase == "stopping" for s in self.slots):
            now = time.monotonic()
            for slot in self.slots:
                if slot.phase == "stopping":
                    self._check(slot, now)
            if now > give_up:
                stuck = [s.process.pid for s in self.slots
                         if s.phase == "stopping" and s.process is not None]
                logger.error("nanny %s: worker processes %s do not die, even with SIGKILL",
                             self.identity, stuck)
                break
            await asyncio.sleep(0.01)
        if self._sock is not None:
            if self.epoch is not None:
                self._send({"op": "goodbye"})
            self._sock.close(linger=self.config.LINGER_MS)
            self._sock = None

    # ------------------------------------------------------------------ scheduler link

    def _send(self, *ops: dict) -> None:
        if self._sock is None:
            return
        frames = protocol.encode(list(ops))
        notice = protocol.announcement(frames)
        if notice is not None:  # a large reply is announced (zfabric/intake.py)
            self._sock.send_multipart(notice)
        fut = self._sock.send_multipart(frames)
        if isinstance(fut, asyncio.Future):
            fut.add_done_callback(_log_send_error)

    def _heard(self) -> None:
        self._last_heard = time.monotonic()

    def _on_op(self, op: dict) -> None:
        match op["op"]:
            case "welcome":
                self.epoch = op["epoch"]
                self._set_heartbeat(op.get("heartbeat_s"))
                for w in op.get("warnings") or ():
                    logger.warning("version mismatch with the scheduler: %s", w)
                if self._welcome is not None and not self._welcome.done():
                    self._welcome.set_result(op)
            case "reregister":
                logger.info("nanny %s registers again: %s", self.identity, op["reason"])
                self.epoch = None
                self._send(protocol.hello("nanny", self.identity, pid=os.getpid()))
            case "restart":
                self._own(self._restart(op["id"], op.get("workers")))
            case "plugin-add" | "plugin-remove":
                if self._initial_plugins is not None:  # before the workers start
                    self._initial_plugins.append(asyncio.ensure_future(
                        self._plugin(op, restart=False)))
                else:  # a restart only when a client registers it now, not on a reconnect
                    self._own(self._plugin(op, restart=op["id"] != 0))
            case "heartbeat":
                pass
            case "heartbeat-interval":
                self._set_heartbeat(op.get("heartbeat_s"))
            case "close":
                self._close_soon()
            case "error":
                logger.error("scheduler says: %s", op["message"])
                if op.get("fatal") and self._welcome is not None and not self._welcome.done():
                    self._welcome.set_exception(RemoteProtocolError(op["message"]))
            case other:
                logger.warning("nanny ignores %r from the scheduler", other)

    def _set_heartbeat(self, value) -> None:
        """The scheduler's heartbeat interval (checked: a bad value is logged and ignored)."""
        seconds = heartbeat_seconds(value)
        if seconds is not None:
            self.heartbeat_s = seconds
            self._next_beat = min(self._next_beat, time.monotonic() + seconds)

    def _close_soon(self) -> None:
        """Close from inside one of our own tasks (which the close cancels)."""
        self._closer = asyncio.ensure_future(self.close())

    def _own(self, coro) -> None:
        """Run ``coro`` as a task this Nanny owns (cancelled on close)."""
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(asyncio.ensure_future(coro))

    def _report(self, wp: WorkerProcess, reason: str) -> None:
        """Tell the scheduler a worker process is gone (or about to be), once."""
        if wp.reported:
            return
        wp.reported = True
        self._send({"op": "worker-died", "worker": wp.identity, "reason": reason})

    # ------------------------------------------------------------------ processes

    def _spawn(self, slot: Slot, now: float) -> None:
        wp = start_worker(
            self.scheduler_address, now=now, security=self.security, env=self.env,
            nthreads=self.nthreads, memory_limit=self.memory_limit, nanny=self.identity,
            name=slot.name, resources=self.resources, listen_address=self.listen_address,
            contact_address=self.contact_address, death_timeout_s=self.death_timeout,
            log_level=self.worker_log_level, memory_fractions=self.memory_fractions,
            local_directory=self.local_directory, preload=self.preload,
        )
        slot.process = wp
        slot.generation += 1
        slot.phase = "starting"
        self._loop.add_reader(wp.fd, self._on_pipe, slot, wp)
        logger.debug("nanny %s started worker process %d (%s)", self.identity, wp.pid,
                     wp.identity)

    def _on_pipe(self, slot: Slot, wp: WorkerProcess) -> None:
        if wp.fd is None:
            return  # its pipe is closed already
        try:
            data = os.read(wp.fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # end of file: the process has exited (or is exiting)
            self._close_pipe(wp)
            self._own(self._reap_soon(slot, wp))
            return
        wp.feed(data)
        if wp.ready and slot.process is wp and slot.phase == "starting":
            slot.phase = "running"

    def _close_pipe(self, wp: WorkerProcess) -> None:
        if wp.fd is None:
            return
        with contextlib.suppress(Exception):
            self._loop.remove_reader(wp.fd)
        with contextlib.suppress(OSError):
            os.close(wp.fd)
        wp.fd = None

    async def _reap_soon(self, slot: Slot, wp: WorkerProcess) -> None:
        """The pipe closed: the process is exiting. Reap it as soon as the kernel lets us."""
        for _ in range(200):
            if wp.proc.poll() is not None:
                break
            await asyncio.sleep(0.005)
        if slot.process is wp:
            self._check(slot, time.monotonic())

    def _retire(self, slot: Slot) -> None:
        if slot.process is not None:
            self._close_pipe(slot.process)

    def _stop(self, slot: Slot, now: float, *, then: str, grace_s: float) -> None:
        """SIGTERM the slot's process; SIGKILL it if it is still there after ``grace_s``."""
        wp = slot.process
        slot.then = then
        if wp is None or wp.proc.poll() is not None:
            slot.phase = "stopping"  # the next check sees it gone
            slot.kill_at = now
            return
        slot.phase = "stopping"
        slot.kill_at = now + grace_s
        wp.signal(signal.SIGTERM)

    async def _watch(self) -> None:
        """Check every process each ``NANNY_CHECK_INTERVAL_S``; heartbeat the scheduler."""
        interval = self.config.NANNY_CHECK_INTERVAL_S
        while True:
            now = time.monotonic()
            for slot in self.slots:
                try:
                    self._check(slot, now)
                except Exception:  # e.g. no more processes or file descriptors: try again
                    logger.exception("nanny %s: checking worker slot %d failed",
                                     self.identity, slot.index)
            if now >= self._next_beat:
                self._next_beat = now + self.heartbeat_s
                alive = [s.process.identity for s in self.slots
                         if s.phase in ("starting", "running") and s.process is not None]
                self._send({"op": "heartbeat", "workers": alive})
                if now - self._last_heard > self.death_timeout:
                    logger.error("nanny: no scheduler at %s for %.0f s; closing",
                                 self.scheduler_address, now - self._last_heard)
                    self._close_soon()
                    return
            if self.slots and all(s.phase == "closed" for s in self.slots):
                logger.info("nanny %s: every worker closed on purpose; closing", self.identity)
                self._close_soon()
                return
            await asyncio.sleep(interval)

    def _check(self, slot: Slot, now: float) -> None:
        """Apply :func:`assess` to one slot, and start a process where one is due."""
        if slot.phase == "waiting":
            if now >= slot.restart_at and self.status in ("starting", "running"):
                self._spawn(slot, now)
            return
        wp = slot.process
        if wp is None or slot.phase == "closed":
            return
        rc = wp.proc.poll()
        alive = rc is None
        check_memory = alive and self.memory_limit and slot.phase in ("starting", "running")
        action = assess(
            phase=slot.phase, alive=alive, rss_bytes=wp.rss() if check_memory else 0,
            memory_limit_bytes=self.memory_limit,
            terminate_fraction=self.memory_fractions["terminate"],
            now=now, kill_at=slot.kill_at,
        )
        match action:
            case "exited" if rc is not None:
                self._exited(slot, wp, rc, now)
            case "terminate-memory":
                rss = wp.rss()
                text = (f"worker process {wp.pid} used {format_bytes(rss)} of memory, more than"
                        f" {self.memory_fractions['terminate']:.0%} of its memory limit"
                        f" {format_bytes(self.memory_limit)}; the nanny terminated it")
                logger.warning("nanny %s: %s", self.identity, text)
                self._report(wp, text)
                slot.last_exit = text
                # SIGKILL at the next check if SIGTERM did not do it (memory is running out).
                self._stop(slot, now, then="restart", grace_s=self.config.NANNY_CHECK_INTERVAL_S)
            case "kill":
                logger.warning("nanny %s: worker process %d ignored SIGTERM; killing it",
                               self.identity, wp.pid)
                wp.signal(signal.SIGKILL)
                slot.kill_at = now + 3600.0  # once is enough

    def _exited(self, slot: Slot, wp: WorkerProcess, rc: int, now: float) -> None:
        """The slot's process is gone (and reaped): tell the scheduler, then restart or not."""
        self._close_pipe(wp)
        # A worker removes its local directory when it exits; not one killed or crashed.
        shutil.rmtree(worker_directory(self.local_directory, wp.identity), ignore_errors=True)
        ex = after_exit(phase=slot.phase, then=slot.then, pid=wp.pid, rc=rc, ready=wp.ready,
                        closing_reason=wp.closing_reason, restart_reason=wp.restart_reason)
        if ex.log_level >= logging.WARNING:
            logger.log(ex.log_level, "nanny %s: %s", self.identity, ex.log)
            slot.last_exit = ex.log
        else:
            logger.log(ex.log_level, "%s", ex.log)
        if ex.report is not None:
            self._report(wp, ex.report)
        if ex.counted:  # died before it registered: count it, to back off
            slot.deaths.append(now)
            del slot.deaths[:-20]
        then, expected = ex.then, ex.expected
        if then == "close" or self.status not in ("starting", "running"):
            slot.phase = "closed"
            return
        if self.status == "starting" and not expected:
            slot.phase = "failed"  # start() reports it; no point trying again and again
            return
        delay = 0.0 if expected else self.policy.delay(slot.deaths, now)
        slot.phase = "waiting"
        slot.restart_at = now + delay
        if delay:
            logger.warning("nanny %s: worker slot %d died %d times lately before it registered;"
                           " next start in %.1f s", self.identity, slot.index, len(slot.deaths),
                           delay)
        else:
            self._spawn(slot, now)

    async def _wait_started(self, marks: list[tuple[Slot, int]], timeout: float, *,
                            fail_on_exit: bool) -> None:
        """Wait until each slot runs a process newer than its mark that has registered."""
        deadline = time.monotonic() + timeout
        while True:
            pending = [s for s, gen in marks if not (s.generation > gen and s.phase == "running")
                       and s.phase != "closed"]
            if not pending:
                return
            if fail_on_exit:
                for s in pending:
                    if s.phase == "failed":
                        raise ZFabricError(
                            f"worker process for {self.scheduler_address} failed to start:"
                            f" {s.last_exit or 'it exited before registering'}"
                            " (see its output above)"
                        )
            if time.monotonic() > deadline:
                raise CommTimeoutError(
                    f"{len(pending)} worker process(es) did not register with the scheduler at"
                    f" {self.scheduler_address} within {timeout:g} s"
                )
            await asyncio.sleep(0.005)

    async def restart_workers(self, workers: list | None = None) -> None:
        """Replace every worker process (or those whose identities ``workers`` lists);
        returns once all are back (CommTimeoutError if not within RESTART_TIMEOUT_S)."""
        now = time.monotonic()
        marks = []
        for slot in self.slots:
            if slot.phase == "closed":
                continue
            if workers is not None and (slot.process is None
                                        or slot.process.identity not in workers):
                continue
            marks.append((slot, slot.generation))
            if slot.phase in ("starting", "running") and slot.process is not None:
                # No worker-died up front: on SIGTERM the worker says goodbye itself, so the
                # scheduler blames none of its tasks (it is reported only if it must be killed).
                self._stop(slot, now, then="restart", grace_s=RESTART_GRACE_S)
            elif slot.phase == "waiting":
                slot.restart_at = now
        await self._wait_started(marks, RESTART_TIMEOUT_S, fail_on_exit=False)

    async def _restart(self, rid: int, workers: list | None = None) -> None:
        """``client.restart()``: replace every worker process (or those whose identities
        ``workers`` lists: ``client.restart_workers``), answer once all are back."""
        reply = {"op": "reply", "id": rid}
        try:
            await self.restart_workers(workers)
            reply["value"] = True
        except ZFabricError as exc:
            reply["error"] = str(exc)
        self._send(reply)

    async def _plugin(self, op: dict, restart: bool = True) -> None:
        """``plugin-add``/``plugin-remove``: set up (restarting the workers when the plugin
        asks) or tear down; the reply goes to whoever registered it."""
        plugins = self.__dict__.setdefault("plugins", {})
        reply: dict = {"op": "reply", "id": op["id"]}
        try:
            old = plugins.pop(op["name"], None)
            if old is not None and hasattr(old, "teardown"):
                out = old.teardown(self)
                if inspect.isawaitable(out):
                    await out
            if op["op"] == "plugin-add":
                plugin = serialize.loads_value(op["payload"])
                out = plugin.setup(self) if hasattr(plugin, "setup") else None
                if inspect.isawaitable(out):
                    await out
                plugins[op["name"]] = plugin
                if restart and getattr(plugin, "restart", False):
                    await self.restart_workers()
            reply["value"] = True
        except Exception as exc:
            logger.exception("nanny plugin %r failed", op["name"])
            reply["error"] = list(serialize.exception_payload(exc))
        self._send(reply)


def _log_send_error(fut: asyncio.Future) -> None:
    if fut.cancelled():
        return
    exc = fut.exception()
    if exc is not None:
        logger.info("nanny could not send to the scheduler: %s", exc)
