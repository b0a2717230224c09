"""The worker's loop thread: scheduler link, data server, dependency fetches, task hand-off.

One thread owns every socket of the worker and runs a ``zmq.Poller`` loop:

- the DEALER to the scheduler (``compute``, ``free``, ``run`` in; ``finished``, ``erred``,
  ``started``, ``heartbeat`` out, all of one tick in one message);
- the ROUTER that serves stored values to peers and clients (``get-data``, ``put-data``,
  ``lease``) and one DEALER per peer worker that dependencies are fetched from — the data
  plane, in :mod:`zfabric.worker.data`;
- an eventfd that executor threads poke when a task is done.

Ready tasks go straight to the executor's queue (the scheduler bounds how many it sends);
the executor's threads report each start, which the loop forwards as ``started``.
"""

from __future__ import annotations

import logging
import os
import socket as _socket
import threading
import time
from collections import deque

import psutil
import zmq

from .. import _zmq, logs, protocol, serialize, shm
from ..config import Config
from ..errors import RemoteProtocolError, TaskTimeout
from ..intake import Intake
from ..transfer import cancel_leases
from .actors import Actors
from .data import DataPlane, waiting
from .execute import Executor
from .memory import MemoryManager
from .plugins import WorkerPlugins
from .profiler import Profiler, io_metrics
from .replicas import Replicas
from .spill import SpillStore, worker_directory
from .tasks import TaskFlow

logger = logging.getLogger(__name__)

#: A dependency fetch with no answer for this long is given up and reported missing.
FETCH_TIMEOUT_S = 15.0

#: Exit code of a worker process whose loop crashed (EX_SOFTWARE): its Nanny counts a death.
EXIT_CRASHED = 70


class WorkerLoop(TaskFlow, DataPlane, Replicas):
    """Everything a worker does, in one thread (see module docstring)."""

    def __init__(self, *, scheduler_address: str, nthreads: int, name: str | None,
                 resources: dict, memory_limit: int, nanny: str | None, listen: str,
                 contact: str | None, config: Config, death_timeout_s: float,
                 on_ready, on_closed, identity: bytes | None = None,
                 memory_fractions: dict | None = None, local_directory: str | None = None,
                 security=None):
        self.scheduler_address = _zmq.normalize_address(scheduler_address)
        self.security = security  # a Security with keys (CURVE on every socket) or None
        self.keyring = None
        self.intake = None  # the data port's guard against unfinished messages
        self.next_intake = 0.0
        self.data_keys: dict[bytes, bytes] = {}  # data peer -> the key it connected with
        self.nthreads = nthreads
        self.name = name
        self.resources = resources
        self.memory_limit = memory_limit
        self.nanny = nanny
        self.listen = listen
        self.contact = contact
        self.config = config
        self.death_timeout_s = death_timeout_s
        self.on_ready = on_ready  # called from this thread with (address, None | error)
        self.on_closed = on_closed
        # A Nanny picks the id of the processes it starts, so that it can report their death.
        self.identity = identity or _zmq.new_identity("worker")
        self.address = ""
        self.epoch: str | None = None
        self.stop_requested = False
        self.close_reason = ""
        self.exit_code: int | None = None  # set when the process should exit (Nanny restarts it)
        self.crashed: str | None = None  # why the loop died of an unexpected exception
        self.owner = None  # the Worker this loop works for: what get_worker() gives a task
        self.thread = threading.Thread(target=self._main, name="zfabric-worker", daemon=True)
        # state
        self.serialized: dict[str, tuple[bytes, list, int]] = {}
        # Values by key; least recently used ones spill to this process's local directory.
        self.local_directory = worker_directory(local_directory, self.identity.decode())
        self.store = SpillStore(self.local_directory, serialized=self.serialized,
                                inline_bytes=config.INLINE_BYTES)
        self.memory = MemoryManager(
            self.store, memory_limit=memory_limit, name=str(name or self.identity.decode()),
            fractions=memory_fractions or {"target": 0, "spill": 0, "pause": 0},
            release_idle=shm.pool().release_idle if shm.available() else None,
            before_evict=self._hold_tasks)
        self.status_op: dict | None = None  # a pause or resume still to tell the scheduler
        self._next_memory_check = 0.0
        self.functions: dict[str, object] = {}  # function id -> function (or why it failed)
        self.raw_keys: set[str] = set()  # stored still pickled: task arguments (RawArgs)
        # Dependencies fetched from a peer for this worker's tasks: how many tasks need each,
        # and which each task borrowed. The scheduler does not count these copies (it does
        # count inline ones), so they go when the last task using them is done.
        self.borrowed: dict[str, int] = {}
        self.borrows: dict[str, list[str]] = {}
        self.waiting: dict[str, list] = {}  # key -> [payload, missing dep keys set, options]
        self.fetching: dict[str, list[str]] = {}  # dep key -> task keys waiting for it
        self.acquiring: set[str] = set()  # keys fetched to keep (see .replicas)
        # fetch id -> (address, keys, time sent, shared-memory leases by key)
        self.inflight_fetch: dict[int, tuple[str, list[str], float, dict]] = {}
        self.fetch_queue: dict[str, deque[str]] = {}  # peer address -> dep keys to ask it for
        self.fetch_inflight: dict[str, int] = {}  # peer address -> requests awaiting an answer
        self.fetch_stats = {"requests": 0, "most_in_flight": 0}
        # [peer, start, stop, nbytes, nkeys] of finished fetches, sent with the next heartbeat
        self.transfer_log: list[list] = []
        self.ready: deque = deque()  # (key, payload, options)
        self.executing: dict[str, float] = {}  # key -> deadline or 0
        self.cancelled: set[str] = set()
        self.outbox: list[dict] = []
        self.backlog: deque[list] = deque()  # encoded messages the scheduler link refused
        self.finished_items: list = []
        self.started_keys: list = []
        self.peers: dict[str, zmq.Socket] = {}
        # answers a data peer's full queue refused, by peer, and their bytes (see data.py)
        self.data_backlog: dict[bytes, deque[tuple[list, int]]] = {}
        self.data_backlog_bytes: dict[bytes, int] = {}
        # values peers placed here (put-data), by when, until the scheduler lists them
        self.unconfirmed: dict[str, float] = {}
        self.confirming: tuple[int, list] | None = None  # who-has request in flight
        self._fetch_seq = 0
        self._process = psutil.Process()
        self.last_heard = time.monotonic()
        self.hello_at = 0.0  # when to say hello again after a refusal that said to retry
        self.use_shm = config.SAME_HOST_SHM and shm.available()
        self.plugins = WorkerPlugins(self)  # true only when one hears transitions
        logs.install()  # keep this process's recent log records for client.get_worker_logs()

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        self.thread.start()

    def stop(self, reason: str = "closed") -> None:
        self.close_reason = reason
        self.stop_requested = True

    def _main(self) -> None:
        ctx = zmq.Context.instance()
        err = None
        try:
            self._setup(ctx)
        except Exception as exc:
            err = exc
            self.on_ready(None, err)
            self.on_closed()
            return
        try:
            self._loop()
        except Exception as exc:
            # Not a goodbye: the scheduler and the Nanny must see a crash (suspicion for what
            # ran here, a restart), never a deliberate close.
            logger.exception("worker %s: its loop crashed", self.name)
            self.crashed = f"its loop crashed: {type(exc).__name__}: {exc}"
            self.close_reason = self.crashed
            self.exit_code = EXIT_CRASHED
        finally:
            self._teardown()
            self.on_closed()

    def _setup(self, ctx: zmq.Context) -> None:
        self.store.open()
        if self.memory_limit and self.use_shm:
            shm.pool().cap_idle(self.memory_limit // 10)
        host = self.listen or _zmq.local_address_for(self.scheduler_address)
        self.data, bound = _zmq.router(
            ctx, host, 0, linger_ms=self.config.LINGER_MS, hwm=self.config.HWM_MESSAGES,
            sndhwm=min(self.config.HWM_MESSAGES, self.config.SEND_QUEUE_MESSAGES),
            max_frame_bytes=self.config.MAX_MESSAGE_BYTES, security=self.security,
            role="worker")
        if self.security is not None:
            from .. import zap

            self.keyring = zap.keyring(self.security)
        if self.config.INCOMPLETE_MESSAGE_BYTES > 0:
            self.intake = Intake(self.data, curve=self.security is not None,
                                 slack=self.config.INCOMPLETE_MESSAGE_BYTES,
                                 frame_limit=self.config.MAX_MESSAGE_BYTES,
                                 max_frames=self.config.MAX_FRAMES,
                                 name=f"worker {self.name or bound}")
        self.address = self.contact or bound
        if self.name is None:
            self.name = self.address
        # frames from the scheduler: what it takes in a frame, and what it adds to a task
        self.sched = _zmq.dealer(ctx, self.scheduler_address, self.identity,
                                 security=self.security, role="worker",
                                 max_frame_bytes=2 * self.config.SCHEDULER_FRAME_BYTES)
        self.wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # task threads poke it
        self.executor = Executor(self.wake, self.nthreads,
                                 inline_bytes=self.config.INLINE_BYTES,
                                 max_bytes=self.config.MAX_MESSAGE_BYTES, name=str(self.name),
                                 context=self.owner or self)
        self.actors = Actors(self.executor._poke, self.config.INLINE_BYTES,
                             self.identity.decode())
        self.profiler = Profiler(self.executor.running, self.config.PROFILE_INTERVAL_S,
                                 str(self.name))
        self.profiler.start()
        self.poller = zmq.Poller()
        for s in (self.sched, self.data, self.wake):
            self.poller.register(s, zmq.POLLIN)
        self._hello()

    def _hello(self) -> None:
        self.outbox.append(protocol.hello(
            "worker", self.identity.decode(), address=self.address, name=self.name,
            nthreads=self.nthreads, memory_limit=self.memory_limit, resources=self.resources,
            nanny=self.nanny, pid=os.getpid(), host=_socket.gethostname(),
            local_directory=self.local_directory,
        ))
        if self.memory.paused:
            self.status_op = self._status()
        self._flush()

    def _teardown(self) -> None:
        try:
            if self.epoch is not None:
                bye = {"op": "goodbye", "reason": self.close_reason}
                if self.crashed:
                    bye["crashed"] = True
                self.sched.send_multipart(protocol.encode([bye]), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        self.plugins.teardown_all()
        self.actors.stop()
        self.executor.stop()
        self.profiler.close()
        if self.intake is not None:
            self.intake.close()
        for s in (self.sched, self.data, *self.peers.values()):
            s.close(linger=self.config.LINGER_MS)
        if self.security is not None:
            from .. import zap

            zap.release(zmq.Context.instance(), self.security)
        self.executor.close_wake()
        self.store.close()

    # ------------------------------------------------------------------ loop

    def _loop(self) -> None:
        hb = self.config.HEARTBEAT_INTERVAL_S
        next_beat = time.monotonic() + hb
        poll = self.poller.poll
        more = False  # spilling still to do: do not sleep in poll
        while not self.stop_requested:
            events = dict(poll(0 if more else min(100, int(hb * 1000))))
            if self.sched in events:
                self._drain_scheduler()
            if self.wake in events or self.executor.done:
                self._drain_done()
                if self.actors.replies:
                    self._send_actor_replies()
            if self.data in events:
                self._drain_data()
            if self.data_backlog:
                self._retry_replies()
            if self.intake is not None:
                self._check_intake(time.monotonic())
            for addr, sock in list(self.peers.items()):
                if sock in events:
                    self._drain_peer(addr, sock)
            if self.fetch_queue:
                self._start_fetches()
            now = time.monotonic()
            more = self._manage_memory(now)
            self._run_ready()
            if now >= next_beat:
                next_beat = now + hb
                self._beat(now)
            self._flush()

    def _flush(self) -> None:
        started = self.executor.started
        while started:
            self.started_keys.append(started.popleft())
        if self.started_keys:
            self.outbox.append({"op": "started", "keys": self.started_keys})
            self.started_keys = []
        seceded = self.executor.seceded
        if seceded:
            items = []
            while seceded:
                key, flag = seceded.popleft()
                items.append([key, flag])
            self.outbox.append({"op": "long-running", "items": items})
        if self.finished_items:
            op = {"op": "finished", "tasks": self.finished_items}
            if self.transfer_log:  # the fetches its tasks waited for: seen with them
                op["transfers"], self.transfer_log = self.transfer_log, []
            self.outbox.append(op)
            self.finished_items = []
        if self.status_op is not None:  # after ``started``: it tells what already runs
            self.outbox.append(self.status_op)
            self.status_op = None
        if self.outbox:
            ops, self.outbox = self.outbox, []
            frames = protocol.encode(ops)
            notice = protocol.announcement(frames)
            if notice is not None:  # a large message is announced (zfabric/intake.py)
                self.backlog.append(notice)
            self.backlog.append(frames)
        # A full link (the scheduler not reading) keeps messages here, in order, to retry on
        # the next turn; nothing is dropped.
        while self.backlog:
            try:
                self.sched.send_multipart(self.backlog[0], zmq.NOBLOCK)
            except zmq.Again:
                if len(self.backlog) % 1000 == 1:
                    logger.warning("scheduler link is full; %d messages wait", len(self.backlog))
                return
            self.backlog.popleft()

    def _beat(self, now: float) -> None:
        try:
            mem = self._process.memory_info().rss
            cpu = self._process.cpu_percent()  # since the last beat
        except psutil.Error:
            mem, cpu = 0, 0.0
        beat = {"op": "heartbeat", "metrics": {
            "memory": mem, "cpu": cpu, "executing": len(self.executing),
            "ready": len(self.ready), "in_memory": len(self.store),
            "fetching": len(self.fetching),
            "managed": self.store.managed, "spilled": self.store.spilled,
            "spilled_count": len(self.store.slow),
            "spilled_total": self.store.counters["spilled"],
            "unspilled_total": self.store.counters["unspilled"],
            **io_metrics(self._process),
        }}
        profile = self.profiler.take()
        if profile:
            beat["profile"] = profile
        if self.transfer_log:
            beat["transfers"], self.transfer_log = self.transfer_log, []
        self.outbox.append(beat)
        self._check_timeouts(now)
        if self.unconfirmed:
            self._confirm_placed(now)
        if self.keyring is not None and self.keyring.refresh():
            self._revoke_data_peers(now)  # revoked keys lose the data port within a heartbeat
        if self.hello_at and now >= self.hello_at and self.epoch is None:
            self.hello_at = 0.0
            self._hello()
        if self.use_shm:
            shm.pool().expire(now)
        if now - self.last_heard > self.death_timeout_s:
            logger.error("worker %s: no scheduler at %s for %.0f s; closing", self.name,
                         self.scheduler_address, now - self.last_heard)
            self.stop("scheduler unreachable")

    # ------------------------------------------------------------------ scheduler ops

    def _drain_scheduler(self) -> None:
        for frames in waiting(self.sched):
            self.last_heard = time.monotonic()
            errors: list = []
            try:
                ops, _ = protocol.decode(frames, self.config.MAX_FRAMES, errors)
            except RemoteProtocolError as exc:
                logger.warning("bad message from the scheduler: %s", exc)
                continue
            for exc in errors:  # each bad op alone is skipped, never its neighbours
                logger.warning("bad op from the scheduler: %s", exc)
            for op in ops:
                try:
                    self._on_scheduler_op(op)
                except Exception:  # one bad op must not stop the loop nor the ops beside it
                    logger.exception("worker %s: could not handle %r from the scheduler",
                                     self.name, str(op.get("op"))[:64])

    def _on_scheduler_op(self, op: dict) -> None:
        match op["op"]:
            case "compute":
                for item in op["tasks"]:
                    try:
                        self._compute(*item)
                    except Exception as exc:  # one bad item, not the op
                        logger.warning("bad compute item from the scheduler: %s",
                                       protocol.short(exc, 300))
            case "free":
                for key in op["keys"]:
                    self._free(key)
            case "acquire":
                self._acquire(op["items"])
            case "functions":
                for fid, data in op["items"]:
                    try:
                        self.functions[fid] = serialize.loads_function(data)
                    except Exception as exc:  # every task using it will fail with this
                        self.functions[fid] = exc
            case "forget-functions":
                for fid in op["keys"]:
                    self.functions.pop(fid, None)
            case "heartbeat":
                pass
            case "reply":
                self._on_confirmed(op)
            case "welcome":
                first = self.epoch is None
                self.epoch = op["epoch"]
                if self.security is not None:
                    self.security.learn_worker_keys(op.get("worker_keys"))
                for w in op.get("warnings") or ():
                    logger.warning("version mismatch with the scheduler: %s", w)
                if first:
                    if self.owner is not None:  # what preloads and plugins may read
                        self.owner.address, self.owner.name = self.address, self.name
                    try:
                        self.plugins.start_preloads()
                    except Exception as exc:
                        logger.exception("worker %s: a preload failed", self.name)
                        self.on_ready(None, exc)
                        self.stop("a preload failed")
                        return
                    self.on_ready(self.address, None)
            case "worker-keys":
                if self.security is not None:
                    self.security.learn_worker_keys(op["keys"])
            case "reregister":
                logger.info("worker %s registers again: %s", self.name, op["reason"])
                self._forget_everything()
                self._hello()
            case "run":
                self._run_function(op["id"], op["payload"])
            case "plugin-add" | "plugin-remove":
                self._plugin_op(op)
            case "close":
                why = op.get("reason")
                why = f"closed by the scheduler: {why:.500}" if type(why) is str else \
                    "closed by the scheduler"
                logger.info("worker %s: %s", self.name, why)
                self.stop(why)
            case "error":
                logger.error("scheduler says: %s", op["message"])
                retry = op.get("retry_s")
                if self.epoch is None and type(retry) in (int, float) and 0 < retry < 60:
                    self.hello_at = time.monotonic() + retry  # refused for now: ask again
                    return
                if op.get("fatal") and self.epoch is None:
                    self.on_ready(None, RemoteProtocolError(op["message"]))
                    self.stop("refused by the scheduler")
            case other:
                logger.warning("ignoring %r from the scheduler", other)

    def _forget_everything(self) -> None:
        self.epoch = None
        self.backlog.clear()  # what was meant for the old scheduler must not reach the new one
        self.store.clear()
        self.serialized.clear()
        self.unconfirmed.clear()
        self.confirming = None
        self.borrowed.clear()
        self.borrows.clear()
        self.waiting.clear()
        self.fetching.clear()
        self.acquiring.clear()
        self.fetch_queue.clear()
        self.ready.clear()
        self.cancelled.update(self.executing)
        self.executor.cancelled.update(self.executing)  # those still queued need not run
        self.finished_items = []
        self.started_keys = []

    # ------------------------------------------------------------------ memory

    def _manage_memory(self, now: float) -> bool:
        """Spill above the target; every MEMORY_MONITOR_INTERVAL_S compare RSS with the spill
        and pause thresholds. True when spilling has more to do at once."""
        mem = self.memory
        busy = mem.over_target()
        more = mem.spill_to_target(now) if busy else False
        # Near the thresholds RSS is read every turn (a task thread can make values faster
        # than a timer would notice); otherwise every MEMORY_MONITOR_INTERVAL_S.
        if (busy or mem.near or now >= self._next_memory_check) and (
                mem.spill_bytes or mem.pause_bytes or mem.disk_error):
            self._next_memory_check = now + self.config.MEMORY_MONITOR_INTERVAL_S
            if mem.check(self._rss(), now, self._rss):
                self.status_op = self._status()
        # Task threads start nothing while paused, nor while spilling lags behind the values
        # they make (else results would pile up unaccounted in the executor's outbox); near
        # the thresholds they start one task per turn of this loop, which weighs each result
        # before the next one is made.
        gate = self.executor.gate
        self.executor.tight = mem.near or mem.over_target()
        if mem.paused or more or mem.over_target():
            if gate.is_set():
                gate.clear()
        elif not gate.is_set():
            gate.set()
        return more

    def _hold_tasks(self) -> None:
        # While this thread writes values to disk, each task thread may start one more task
        # (overlapping the write with its work) and then waits: it closes the gate behind it.
        ex = getattr(self, "executor", None)
        if ex is not None:
            ex.tight = True

    def _rss(self) -> int:
        try:
            return self._process.memory_info().rss
        except psutil.Error:
            return 0

    def _status(self) -> dict:
        mem = self.memory
        return {"op": "worker-status", "status": "paused" if mem.paused else "running",
                "reason": mem.reason}

    def _check_timeouts(self, now: float) -> None:
        """Abandon threads stuck past their task's deadline (a thread cannot be killed)."""
        for ident, (key, start) in list(self.executor.running.items()):
            timeout = self.executing.get(key)
            if timeout and now - start > timeout:
                self.executing.pop(key, None)
                if key in self.cancelled:  # released while it ran: its slot is free now
                    self.cancelled.discard(key)
                    self.outbox.append({"op": "thread-free", "keys": [key]})
                what = "the worker restarts" if self.nanny else "its thread was abandoned"
                err = TaskTimeout(f"task {key!r} ran longer than its task_timeout of"
                                  f" {timeout:g} s; {what}")
                data, tb, text = serialize.exception_payload(err)
                self.outbox.append({"op": "erred", "items": [[key, data, tb, text, "TaskTimeout"]]})
                if self.nanny:
                    # A thread cannot be killed: leave cleanly (no suspicion on our other
                    # tasks) and let the Nanny start a fresh process.
                    self.stop(f"task {key!r} passed its task_timeout; restarting")
                    self.exit_code = 75
                    return
                self.executor.replace_thread(ident)
        stale = [i for i, req in self.inflight_fetch.items() if now - req[2] > FETCH_TIMEOUT_S]
        for i in stale:
            addr, keys, _, into = self.inflight_fetch.pop(i)
            self._fetch_ended(addr)
            cancel_leases(into)
            for k in keys:
                self._fetch_failed(k, addr)

    def _plugin_op(self, op: dict) -> None:
        """Set up or tear down a plugin; the answer goes to whoever registered it."""
        try:
            if op["op"] == "plugin-add":
                self.plugins.add(op["name"], op["payload"])
            else:
                self.plugins.remove(op["name"])
            self.outbox.append({"op": "run-result", "id": op["id"], "value": None})
        except Exception as exc:
            logger.exception("worker %s: plugin %r failed", self.name, op["name"])
            data, tb, text = serialize.exception_payload(exc)
            self.outbox.append({"op": "run-result", "id": op["id"], "error": [data, tb, text]})
