"""The worker's shell: one thread that owns every socket and carries out what the state decides.

One thread runs a ``zmq.Poller`` loop over

- the DEALER to the scheduler (``compute``, ``free``, ``run`` in; ``finished``, ``erred``,
  ``started``, ``heartbeat`` out, all of one tick in one message);
- the ROUTER that serves stored values to peers and clients (``get-data``, ``put-data``,
  ``lease``) and one DEALER per peer worker that dependencies are fetched from — the data
  plane, :class:`~zfabric.worker.data.DataPort`;
- an eventfd that executor threads poke when a task is done.

What to do with each op and each completion is decided by the worker's state,
:class:`~zfabric.worker.state.WorkerCore` (sans-IO): the loop feeds it, then carries out the
actions it returns (run a task on a thread, store or drop a value, send a fetch, stop, ...).
Values live in a :class:`~zfabric.worker.spill.SpillStore`; memory thresholds are applied by
:class:`~zfabric.worker.memory.MemoryManager`, whose verdict (paused, tight) goes to the state.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import socket as _socket
import threading
import time
from collections import ChainMap, deque
from typing import Any, cast

import psutil
import zmq

from .. import _zmq, logs, protocol, serialize, shm, zap
from ..config import Config
from ..errors import RemoteProtocolError, SerializationError
from . import actions as A
from .actors import Actors
from .data import DataPort, waiting
from .execute import Executor
from .memory import MemoryManager
from .plugins import WorkerPlugins
from .profiler import LogTail, Profiler, heartbeat_extras, io_metrics
from .spill import SpillStore, worker_directory
from .state import FETCH_TIMEOUT_S, WorkerCore

logger = logging.getLogger(__name__)

__all__ = ["EXIT_CRASHED", "FETCH_TIMEOUT_S", "WorkerLoop"]

#: Exit code of a worker process whose loop crashed (EX_SOFTWARE): its Nanny counts a death.
EXIT_CRASHED = 70


class WorkerLoop:
    """Everything a worker does, in one thread (see module docstring)."""

    def __init__(self, *, scheduler_address: str, nthreads: int, name: str | None,
                 resources: dict, memory_limit: int, nanny: str | None, listen: str,
                 contact: str | None, config: Config, death_timeout_s: float,
                 on_ready, on_closed, identity: bytes | None = None,
                 memory_fractions: dict | None = None, local_directory: str | None = None,
                 security=None):
        self.scheduler_address = _zmq.normalize_address(scheduler_address)
        self.security = security  # a Security with keys (CURVE on every socket) or None
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
        self.stop_requested = False
        self.close_reason = ""
        self.exit_code: int | None = None  # set when the process should exit (Nanny restarts it)
        self.crashed: str | None = None  # why the loop died of an unexpected exception
        self.owner: Any = None  # the Worker this loop works for: what get_worker() gives a task
        self.thread = threading.Thread(target=self._main, name="zfabric-worker", daemon=True)
        now = time.monotonic()
        self.state = WorkerCore(
            name=str(name or ""), nanny=bool(nanny), inline_bytes=config.INLINE_BYTES,
            heartbeat_s=config.HEARTBEAT_INTERVAL_S, death_timeout_s=death_timeout_s,
            put_data_confirm_s=config.PUT_DATA_CONFIRM_S, now=now,
            keep_on_rejoin=config.SCHEDULER_RECOVERY)
        # values: by key in the store (least recently used ones spill to this process's local
        # directory), their pickles where kept, and those kept pickled (task arguments)
        self.serialized: dict[str, tuple[bytes, list, int]] = {}
        self.raw_keys: set[str] = set()
        # direct replies (zfabric/replies.py): task -> its client's token, while it runs; and
        # the results of this turn to send, by the client's data connection
        self.reply_to: dict[str, str] = {}
        self._ring_changes = 0  # changes of the authorized keys acted on (_beat)
        self.direct: dict[bytes, list] = {}
        self.local_directory = worker_directory(local_directory, self.identity.decode())
        self.store = SpillStore(self.local_directory, serialized=self.serialized,
                                inline_bytes=config.INLINE_BYTES)
        self.memory = MemoryManager(
            self.store, memory_limit=memory_limit, name=str(name or self.identity.decode()),
            fractions=memory_fractions or {"target": 0, "spill": 0, "pause": 0},
            release_idle=shm.pool().release_idle if shm.available() else None,
            before_evict=self._hold_tasks)
        self._next_memory_check = 0.0
        self.functions: dict[str, object] = {}  # function id -> function (or why it failed)
        self.backlog: deque[list] = deque()  # encoded messages the scheduler link refused
        self._process = psutil.Process()
        self.use_shm = config.SAME_HOST_SHM and shm.available()
        self.port = DataPort(config=config, values=self.store, serialized=self.serialized,
                             raw_keys=self.raw_keys, security=security, use_shm=self.use_shm,
                             on_placed=self._placed, on_fetched=self._fetched,
                             on_refused=self._refused)
        self.executor: Any = None
        self.actors: Any = None
        self.plugins = WorkerPlugins(self)  # true only when one hears transitions
        logs.install()  # keep this process's recent log records for client.get_worker_logs()

    # what tests and tools read (the state's bookkeeping, the data port's)
    @property
    def borrowed(self) -> dict[str, int]:
        return self.state.borrowed

    @property
    def borrows(self) -> dict[str, list[str]]:
        return self.state.borrows

    @property
    def fetch_stats(self) -> dict[str, int]:
        return self.state.fetch_stats

    @property
    def data_backlog_bytes(self) -> dict[bytes, int]:
        return self.port.data_backlog_bytes

    @property
    def epoch(self) -> str | None:
        return self.state.epoch

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        self.thread.start()

    def stop(self, reason: str = "closed") -> None:
        self.close_reason = reason
        self.stop_requested = True

    def _main(self) -> None:
        ctx: zmq.Context = zmq.Context.instance()
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
        bound = self.port.bind(ctx, host, self.name)
        self.address = self.store.where = self.contact or bound
        if self.name is None:
            self.name = self.address
        self.state.name, self.state.address = str(self.name), self.address
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
        self.log_tail = LogTail()
        self.port.actors = self.actors
        self.poller = self.port.poller = zmq.Poller()
        for s in (self.sched, self.port.data, self.wake):
            self.poller.register(s, zmq.POLLIN)
        self.state.hello_op = protocol.hello(
            "worker", self.identity.decode(), address=self.address, name=self.name,
            nthreads=self.nthreads, memory_limit=self.memory_limit, resources=self.resources,
            nanny=self.nanny, pid=os.getpid(), host=_socket.gethostname(),
            local_directory=self.local_directory,
        )
        self.state.wall_offset = time.time() - time.monotonic()
        self.state.hello()
        self._flush()

    def _teardown(self) -> None:
        try:
            if self.state.epoch is not None:
                bye: dict[str, Any] = {"op": "goodbye", "reason": self.close_reason}
                if self.crashed:
                    bye["crashed"] = True
                self.sched.send_multipart(protocol.encode([bye]), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        self.plugins.teardown_all()
        self.actors.stop()
        self.executor.stop()
        self.profiler.close()
        self.port.close()
        self.sched.close(linger=self.config.LINGER_MS)
        if self.security is not None:
            zap.release(zmq.Context.instance(), self.security)
        self.executor.close_wake()
        self.store.close()

    # ------------------------------------------------------------------ loop

    def _loop(self) -> None:
        state = self.state
        port = self.port
        poll = self.poller.poll
        more = False  # spilling still to do: do not sleep in poll
        while not self.stop_requested:
            wait_ms = min(100, max(1, int(state.heartbeat_s * 1000)))
            # (a backlog of answers to data peers is retried every few ms, not at the next beat)
            events = dict(poll(0 if more else 2 if port.data_backlog else wait_ms))
            if self.sched in events:
                self._drain_scheduler()
            if self.wake in events or self.executor.done:
                self._drain_done()
                if self.actors.replies:
                    port.send_actor_replies()
            if port.data in events:
                port.drain()
            if port.bulk_socks:  # the bulk channel (zfabric/bulk.py)
                port.drain_bulk(events)
            if port.data_backlog:
                port.retry_replies()
            if port.intake is not None:
                port.check_intake(time.monotonic())
            if port.peers:
                expected = state.fetches.inflight
                for addr, sock in list(port.peers.items()):
                    if sock in events:
                        port.drain_peer(addr, sock, expected)
            now = time.monotonic()
            more = self._manage_memory(now)
            self._do(state.pump(now))
            if now >= state.next_beat:
                self._beat(now)
            self._flush()

    def _flush(self) -> None:
        started = self.executor.started if self.executor is not None else ()
        if started:
            keys = []
            while started:
                keys.append(started.popleft())
            self.state.started(keys)
        seceded = self.executor.seceded if self.executor is not None else ()
        if seceded:
            items = []
            while seceded:
                key, flag = seceded.popleft()
                items.append([key, flag])
            self.state.seceded(items)
        ops = self.state.flush()
        if ops:
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
        self.memory.freeze_long_lived()
        try:
            mem = self._process.memory_info().rss
            cpu = self._process.cpu_percent()  # since the last beat
        except psutil.Error:
            mem, cpu = 0, 0.0
        store = self.store
        metrics = {
            "memory": mem, "cpu": cpu, "in_memory": len(store),
            "managed": store.managed, "spilled": store.spilled,
            "spilled_count": len(store.slow),
            "spilled_total": store.counters["spilled"],
            "unspilled_total": store.counters["unspilled"],
            **io_metrics(self._process),
        }
        running = [(ident, key, start)
                   for ident, (key, start) in list(self.executor.running.items())]
        self.state.wall_offset = time.time() - now
        self._do(self.state.tick(now, metrics, running,
                                heartbeat_extras(self.profiler, self.log_tail)))
        port = self.port
        ring = port.keyring
        if ring is not None:
            ring.refresh()
            if ring.changes != self._ring_changes:  # (whoever in this process reloaded it)
                self._ring_changes = ring.changes
                port.revoke_peers(now)  # revoked keys lose the data port within a heartbeat
        if self.use_shm:
            shm.pool().expire(now)

    # ------------------------------------------------------------------ scheduler ops

    def _drain_scheduler(self) -> None:
        for frames in waiting(self.sched):
            now = time.monotonic()
            errors: list = []
            try:
                ops, _ = protocol.decode(frames, self.config.MAX_FRAMES, errors)
            except RemoteProtocolError as exc:
                self.state.last_heard = now
                logger.warning("bad message from the scheduler: %s", exc)
                continue
            for error in errors:  # each bad op alone is skipped, never its neighbours
                logger.warning("bad op from the scheduler: %s", error)
            self._do(self.state.handle(ops, now))

    # ------------------------------------------------------------------ actions

    def _do(self, acts: list[tuple]) -> None:
        """Carry out the state's actions, in order."""
        for act in acts:
            kind = act[0]
            if kind == A.EXECUTE:
                self._execute(act[1], act[2], act[3], act[4], act[5])
            elif kind == A.KEEP:
                out = act[1]
                self.store.put(out.key, out.value, out.nbytes)
                if out.header is not None:
                    self.serialized[out.key] = (out.header, out.buffers, out.nbytes)
                elif out.travel_error is not None:  # an error that names the key leaves
                    self.store.cannot_travel(out.key, out.travel_error)
                # (else a large value kept unpickled: SpillStore.pickled, when asked for)
                if self.reply_to:
                    self._reply(out)
            elif kind == A.DROP:
                key = act[1]
                self.store.pop(key, None)
                self.serialized.pop(key, None)
                self.raw_keys.discard(key)
                if self.actors is not None and key in self.actors.objects:
                    self.actors.forget(key)
            elif kind == A.STORE_INLINE:
                key, v = act[1], act[2]
                value = serialize.loads_or_mark(key, v)
                self.store.put(key, value, len(v))
                if type(value) is serialize.Undecodable:
                    logger.warning("worker %s: %s", self.name, value.reason)
                    self.serialized[key] = (v, [], len(v))
            elif kind == A.STORE:
                self._put(act[1], act[2], act[3], act[4])
            elif kind == A.FETCH:
                self.port.fetch(act[1], act[2], act[3], act[4],
                                act[5] if len(act) > 5 else None)
            elif kind == A.END_FETCH:
                self.port.end_fetch(act[1])
            elif kind == A.CANCEL:
                self.executor.cancelled.add(act[1])
            elif kind == A.UNCANCEL:
                self.executor.cancelled.discard(act[1])
            elif kind == A.TRANSITION:
                self.plugins.transition(act[1], act[2], act[3])
            else:
                self._do_rare(act)

    def _do_rare(self, act: tuple) -> None:
        kind = act[0]
        state = self.state
        if kind == A.LOAD_FUNCTIONS:
            for fid, data in act[1]:
                try:
                    self.functions[fid] = serialize.loads_function(data)
                except Exception as exc:  # every task using it will fail with this
                    self.functions[fid] = exc
        elif kind == A.FORGET_FUNCTIONS:
            for fid in act[1]:
                self.functions.pop(fid, None)
        elif kind == A.ACQUIRE_VALUES:
            loaded, failed = [], act[3]
            for key, value in act[1]:
                try:
                    self.store[key] = serialize.loads_value(value)
                except Exception as exc:
                    logger.warning("could not load acquired %r: %s", key, exc)
                    failed.append(key)
                    continue
                self.serialized.pop(key, None)
                loaded.append(key)
            state.acquire_loaded(loaded, act[2], failed)
        elif kind == A.WORKER_KEYS:
            if self.security is not None:
                self.security.learn_worker_keys(act[1])
        elif kind == A.RUN:
            self._run_function(act[1], act[2])
        elif kind == A.PLUGIN:
            self._plugin_op(act[1])
        elif kind == A.WELCOMED:
            if self.owner is not None:  # what preloads and plugins may read
                self.owner.address, self.owner.name = self.address, self.name
            try:
                self.plugins.start_preloads()
            except Exception as exc:
                logger.exception("worker %s: a preload failed", self.name)
                self.on_ready(None, exc)
                self.stop("a preload failed")
                return
            finally:
                state.hear_transitions = bool(self.plugins)
            self.on_ready(self.address, None)
        elif kind == A.REFUSED:
            self.on_ready(None, RemoteProtocolError(act[1]))
            self.stop("refused by the scheduler")
        elif kind == A.FORGET:
            # what was meant for the old scheduler must not reach the new one
            self.backlog.clear()
            self.store.clear()
            self.serialized.clear()
            self.raw_keys.clear()
        elif kind == A.REJOIN:
            # what was meant for the old scheduler must not reach the new one; what it needs
            # to know is in the report, after the hello
            self.backlog.clear()
            self.state.send({"op": "holding", "items": self._sizes(act[1]),
                             "running": act[2], "epoch": act[3]})
        elif kind == A.REPLACE_THREAD:
            self.executor.replace_thread(act[1])
        elif kind == A.STOP:
            self.stop(act[1])
            if act[2] is not None:
                self.exit_code = act[2]
        else:
            raise AssertionError(f"unknown worker action {kind!r}")

    def _sizes(self, keys: list[str]) -> list[list]:
        """``[key, size in bytes]`` of each stored key (in memory or spilled)."""
        store = self.store
        out = []
        for key in keys:
            size = store.weights.get(key)
            if size is None:
                where = store.slow.get(key)
                if where is None:
                    continue
                size = where.nbytes
            out.append([key, int(size)])
        return out

    def _execute(self, key: str, payload: bytes, options: dict | None, fid: str | None,
                 borrowed: list[str] | None) -> None:
        if options is not None and "reply" in options:  # its client waits: see _keep
            self.reply_to[key] = options["reply"]
        func = self.functions.get(fid) if fid is not None else None
        if func is None and fid is not None:
            func = SerializationError(f"function {fid!r} of task {key!r} never arrived")
        values: Any = self.store
        if borrowed:  # the run keeps its own references: a copy may go before it starts
            store = self.store
            values = ChainMap({d: store[d] for d in borrowed if d in store}, store)
        self.executor.submit(key, func, payload, values,
                             options.get("priority", 0) if options else 0)

    def _drain_done(self) -> None:
        try:
            os.eventfd_read(self.wake)
        except BlockingIOError:
            pass
        ex = self.executor
        started = ex.started
        if started:
            keys = []
            while started:
                keys.append(started.popleft())
            self.state.started(keys)
        done = ex.done
        if done:
            outs = []
            while done:
                outs.append(done.popleft())
            self._do(self.state.done(outs))
            if self.reply_to:  # those that failed or were cancelled: their scheduler tells
                for out in outs:
                    self.reply_to.pop(out.key, None)
            if self.direct:  # before ``finished`` leaves for the scheduler (end of the turn)
                for peer, items in self.direct.items():
                    self.port.send_results(peer, items)
                self.direct.clear()

    def _reply(self, out) -> None:
        """A task whose client asked for a direct reply (zfabric/replies.py) ended: its small
        result goes to that client too, if its token was heard on the data port."""
        token = self.reply_to.pop(out.key, None)
        if token is None or out.header is None or out.buffers or \
                out.nbytes >= self.config.INLINE_BYTES:  # header None: it cannot travel
            return
        peer = self.port.reply_peers.get(token)
        if peer is not None:
            self.direct.setdefault(peer, []).append([out.key, out.header, out.nbytes])

    def _put(self, key: str, header: bytes, bufs: list, raw: bool) -> None:
        """Store a value that arrived pickled. Task arguments (``raw``) stay pickled until
        their task runs, so that the dependencies inside them resolve then."""
        size = serialize.nbytes(header, bufs)
        if raw:
            self.store.put(key, serialize.RawArgs(header, bufs), size)
            self.serialized[key] = (header, bufs, size)
            self.raw_keys.add(key)
        else:
            value = serialize.loads_or_mark(key, header, bufs)
            self.store.put(key, value, size)
            if type(value) is serialize.Undecodable:  # served on as it came; its tasks fail
                logger.warning("worker %s: %s", self.name, value.reason)
                self.serialized[key] = (header, bufs, size)
            else:
                self.serialized.pop(key, None)
            self.raw_keys.discard(key)

    # data port callbacks
    def _placed(self, items: list) -> None:
        self._do(self.state.placed(items, time.monotonic()))

    def _fetched(self, fid: int, items: list | None) -> None:
        self._do(self.state.fetched(fid, items, time.monotonic()))

    def _refused(self, addr: str) -> None:
        self._do(self.state.fetch_refused(addr))

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
            mem.check(self._rss(), now, self._rss)
        over = mem.over_target()
        tight = mem.near or over
        state = self.state
        if mem.paused != state.paused or tight != state.tight:
            state.memory(mem.paused, mem.reason, tight)
        # Task threads start nothing while paused, nor while spilling lags behind the values
        # they make (else results would pile up unaccounted in the executor's outbox); near
        # the thresholds they start one task per turn of this loop, which weighs each result
        # before the next one is made.
        gate = self.executor.gate
        self.executor.tight = tight
        if mem.paused or more or over:
            if gate.is_set():
                gate.clear()
        elif not gate.is_set():
            gate.set()
        return more

    def _hold_tasks(self) -> None:
        # While this thread writes values to disk, each task thread may start one more task
        # (overlapping the write with its work) and then waits: it closes the gate behind it.
        ex = self.executor
        if ex is not None:
            ex.tight = True

    def _rss(self) -> int:
        try:
            return self._process.memory_info().rss
        except psutil.Error:
            return 0

    # ------------------------------------------------------------------ calls

    def _plugin_op(self, op: dict) -> None:
        """Set up or tear down a plugin; the answer goes to whoever registered it."""
        try:
            if op["op"] == "plugin-add":
                self.plugins.add(op["name"], op["payload"])
            else:
                self.plugins.remove(op["name"])
            self.state.send({"op": "run-result", "id": op["id"], "value": None})
        except Exception as exc:
            logger.exception("worker %s: plugin %r failed", self.name, op["name"])
            data, tb, text = serialize.exception_payload(exc)
            self.state.send({"op": "run-result", "id": op["id"], "error": [data, tb, text]})
        finally:
            self.state.hear_transitions = bool(self.plugins)

    def _run_function(self, rid: int, payload: bytes) -> None:
        try:
            func, args, kwargs = serialize.loads_task(payload, cast(dict, self.store))
            if _takes(func, "dask_worker"):  # dask.distributed's convention
                kwargs["dask_worker"] = self.owner or self
            value = func(*args, **kwargs)
            if inspect.iscoroutine(value):
                value = asyncio.run(value)
            header, _ = serialize.dumps_value(value, inline_bytes=1 << 62)
            self.state.send({"op": "run-result", "id": rid, "value": header})
        except Exception as exc:
            data, tb, text = serialize.exception_payload(exc)
            self.state.send({"op": "run-result", "id": rid, "error": [data, tb, text]})


def _takes(func, name: str) -> bool:
    try:
        return name in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
