"""The Client's session with the scheduler: ops that come in, ops that go out, liveness.

:class:`Session` is the client's I/O shell around its records (:class:`~zfabric.client_core.
ClientCore`): it runs on the client's event loop. What comes in is decoded at the protocol's
door (:func:`zfabric.transfer.dispatch`) and applied by :meth:`Session.on_op`. What goes out is
queued in the core (``ClientCore.send``) and leaves once per loop turn (:meth:`Session.flush`),
in order, through the :class:`~zfabric.link.Link`; ops that must wait for I/O first (large
arguments shipped to a worker) hold everything behind them in a backlog that one writer task
sends. Heartbeats both ways tell each side the other is there; a scheduler silent for
``SCHEDULER_LOST_TIMEOUT_S`` fails every pending future with :class:`SchedulerLost`. A new
scheduler incarnation at the address before that (it answers ``reregister``) is *rejoined*
(:meth:`Session.rejoin`): the client says hello again, holds its outbox until the welcome,
then sends what the :class:`~zfabric.replay.Replay` recorded (the work it still waits for)
ahead of it; requests that waited on the old one fail with SchedulerLost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import warnings
from collections import deque
from collections.abc import Awaitable, Iterator

import zmq

from . import _zmq, handshake, protocol, shm
from .client_core import ClientCore
from .config import Config
from .errors import CommTimeoutError, RemoteProtocolError, SchedulerLost
from .futures import FutureState
from .keys import from_wire, readable
from .link import Link
from .replay import Replay
from .replies import DirectReplies
from .security import KeyRevoked, Security
from .transfer import DataPool, dispatch

logger = logging.getLogger("zfabric.client")


class Deferred:
    """An outbox entry whose ops are ready only after some I/O (shipping large arguments)."""

    __slots__ = ("state", "work")

    def __init__(self, work: Awaitable[list[dict]], state: FutureState):
        self.work = work
        self.state = state


class Session:
    """One client's connection to its scheduler (see the module docstring).

    ``name`` is the client's id, ``hello`` the extra fields of its hello.
    """

    def __init__(self, core: ClientCore, *, name: str, hello: dict):
        self.core = core
        self.config: Config = core.config
        self.name = name
        self.hello = hello
        #: The client's connections to the workers' data ports (those to a lost holder are
        #: dropped) and its keys: given on connecting.
        self.data: DataPool = None  # type: ignore[assignment]
        self.security: Security | None = None
        self.link: Link | None = None
        self.dashboard_link: str | None = None
        self.backlog: deque = deque()
        self.writer: asyncio.Future | None = None
        self.tasks: list[asyncio.Future] = []
        self.last_heard = time.monotonic()
        self.lost_reported = False
        self.gone_holders: set[str] = set()  # data addresses whose values were lost
        self.welcome: asyncio.Future | None = None
        #: What a new scheduler incarnation must hear again (None: SCHEDULER_RECOVERY off).
        self.replay: Replay | None = Replay() if self.config.SCHEDULER_RECOVERY else None
        self.rejoining = False  # said hello to a new incarnation; the outbox waits
        #: key -> the holders the old incarnation named, of finished large values that wait
        #: for the new one to say where they are (or to compute them again)
        self.rechecked: dict[str, list] = {}
        self.rejoined_at = 0.0
        core.wake = self.wake

    # ------------------------------------------------------------------ open and close

    async def connect(self, data: DataPool, security: Security | None,
                      timeout: float) -> None:
        """Connect with ``security``'s keys, say hello and wait for the scheduler's welcome
        (``timeout`` seconds); ``data`` is the client's pool of data connections."""
        self.data = data
        self.security = security
        core = self.core
        loop = core.loop
        assert loop is not None and core.address is not None
        identity = _zmq.new_identity("client")
        # The scheduler link is a plain socket on the loop's selector (see zfabric/link.py):
        # zmq.asyncio costs more than the round trip on this latency-bound path.
        monitor = f"inproc://zfabric-monitor-{identity.decode()}"
        self.link = Link(
            loop, _zmq.dealer(zmq.Context.instance(), core.address, identity,
                              security=self.security, role="client", monitor=monitor,
                              max_frame_bytes=2 * self.config.SCHEDULER_FRAME_BYTES),
            # on_op is looked up per op, so that a test may wrap it on a live client
            lambda frames: dispatch(frames, lambda op: self.on_op(op), who="client",
                                    heard=self.heard, lock=core.lock))
        if self.config.DIRECT_REPLIES:
            core.direct = DirectReplies(core, security, self.config.MAX_MESSAGE_BYTES)
        self.welcome = loop.create_future()
        self.tasks = [asyncio.ensure_future(self._heartbeat())]
        core.send(protocol.hello("client", self.name, **self.hello))
        try:
            await handshake.wait(self.welcome, self.link.sock, monitor, timeout, core.address,
                                 self.security)
        except TimeoutError:
            raise CommTimeoutError(
                f"Timed out connecting to a zfabric scheduler at {core.address} after"
                f" {timeout:g} s; is a scheduler running there? (start one with"
                " `zfabric scheduler`)"
            ) from None

    async def close(self) -> None:
        """Say goodbye and stop the heartbeat and the writer (the link stays open until
        :meth:`close_link`)."""
        if self.link is not None and self.core.epoch is not None:
            with contextlib.suppress(Exception):
                self.link.send(protocol.encode([{"op": "goodbye"}]))
        if self.writer is not None:
            self.tasks.append(self.writer)
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(BaseException):
                await t
        self.tasks = []

    def close_link(self) -> None:
        if self.core.direct is not None:
            self.core.direct.close()
        if self.link is not None:
            self.link.close(linger=self.config.LINGER_MS)

    # ------------------------------------------------------------------ ops in

    def heard(self) -> None:
        self.last_heard = time.monotonic()

    def on_op(self, op: dict) -> None:
        core = self.core
        states = core.states
        window = core.window
        match op["op"]:
            case "memory":
                direct = core.direct
                if direct is not None and direct.pending:  # a reply link to open?
                    direct.heard(op["items"])
                for key, value, who_has, nbytes in op["items"]:
                    st = states.get(key)
                    if st is not None:
                        window.done(st)
                    if self.rechecked:
                        self.holders_rechecked(key, who_has)
                    # not an error: one failed with SchedulerLost stays failed even if the
                    # submit it came from, queued in the outage, reaches a new scheduler
                    if st is not None and st.status != "error":
                        st.finish(value, who_has, nbytes)
                    if who_has and self.gone_holders:
                        self.gone_holders.difference_update(who_has)
            case "erred":
                for item in op["items"]:
                    st = states.get(item[0])
                    if st is not None:
                        window.done(st)
                        self.drop_fetches(st)  # a value in memory was lost for good
                        st.fail(item)
            case "cancelled":
                reason = op.get("reason")
                reason = str(reason)[:1000] if reason is not None else None
                for key in op["keys"]:
                    st = states.get(key)
                    if st is not None:
                        window.done(st)
                        st.cancel(reason, force=op.get("restart") is True)
            case "retried":
                for key in op["keys"]:
                    st = states.get(key)
                    if st is not None:
                        st.retry()
            case "lost":
                for key in op["keys"]:
                    st = states.get(key)
                    if st is not None:
                        self.drop_fetches(st)
                        st.reset()
            case "reply":
                core.answer(op["id"], op)
            case "welcome":
                if self.rejoining:
                    self.rejoined(op)
                core.epoch = op["epoch"]
                if self.security is not None:  # the data ports' keys, as the scheduler knows
                    self.security.learn_worker_keys(op.get("worker_keys"))
                self.dashboard_link = op.get("dashboard")
                self.lost_reported = False
                for w in op.get("warnings") or ():
                    warnings.warn(f"zfabric version mismatch with the scheduler: {w}",
                                  RuntimeWarning, stacklevel=1)
                if self.welcome is not None and not self.welcome.done():
                    self.welcome.set_result(op)
            case "worker-keys":
                if self.security is not None:
                    self.security.learn_worker_keys(op["keys"])
            case "reregister":
                if self.rejoining and time.monotonic() - self.rejoined_at < 1.0:
                    pass  # one answer per message queued in the outage: hello sent already
                elif self.replay is not None and op.get("closed") is not True and (
                        core.epoch is not None or self.rejoining):
                    self.rejoin(f"the scheduler at {core.address} was replaced"
                                f" ({op['reason']})")
                else:
                    self.scheduler_lost(f"the scheduler at {core.address} went away"
                                        f" ({op['reason']})")
                    core.send(protocol.hello("client", self.name, **self.hello))
            case "error":
                message = readable(op["message"])
                logger.error("scheduler: %s", message)
                if type(op.get("request")) is int:  # a request it refused: it fails
                    core.answer(op["request"], {"error": op["message"]})
                for key in op.get("keys") or ():
                    st = states.get(key)
                    if st is not None:
                        window.done(st)
                    if st is not None and not st.done():
                        st.fail(None, RemoteProtocolError(
                            f"the scheduler refused {from_wire(key)!r}: {message}"))
                welcome = self.welcome
                if op.get("fatal") and welcome is not None and not welcome.done():
                    welcome.set_exception(RemoteProtocolError(op["message"]))
                elif op.get("fatal"):  # the session ended (its key was revoked): nothing waits
                    self.end_session(message)
            case "heartbeat":
                pass
            case "events":  # a subscription's events (zfabric/topics.py, transitions.py)
                core.on_events(op)
            case other:
                logger.warning("ignoring op %r from the scheduler", other)
        if window.ready():
            core.pump()  # results made room: held tasks go, highest priority first
            core.send()

    def rejoin(self, why: str) -> None:
        """A new scheduler incarnation answers at the address: say hello again (with the
        epoch of the old one) and hold the outbox until its welcome (:meth:`rejoined`).
        Requests that waited for the old one's answer fail: it is lost with it."""
        core = self.core
        logger.warning("%s; registering again and sending it the work still pending", why)
        old = core.epoch
        core.epoch = None
        self.rejoining = True
        self.rejoined_at = time.monotonic()
        core.fail_requests(lambda: SchedulerLost(
            f"{why} while this request waited for its answer; make it again"))
        self.send_now([protocol.hello("client", self.name, **self.hello, rejoin=True,
                                      epoch=old)])

    def rejoined(self, welcome: dict) -> None:
        """The new incarnation welcomed us: send what it must know again, then the outbox."""
        core = self.core
        assert self.replay is not None
        self.rejoining = False
        with core.lock:
            queued: set[str] = set()
            for op in core.outbox:
                if type(op) is dict and op["op"] in ("submit", "scatter"):
                    queued.update(t[0] for t in op.get("tasks") or op.get("items") or ())
            ops = self.replay.ops(core.states, queued, self.config.SUBMIT_BATCH,
                                  self.config.SCHEDULER_FRAME_BYTES // 4)
            # Large values held on workers: pending until the new one says where they are
            # (a holder may have died with the old one; the value is computed again then).
            for key, st in core.states.items():
                if st.status == "finished" and st.value is None and st.who_has:
                    self.rechecked[key] = st.who_has
                    st.reset()
        ntasks = sum(len(op["tasks"]) for op in ops if op["op"] == "submit")
        logger.warning("the new scheduler at %s (epoch %s) welcomed us: sending %d pending"
                       " tasks again", core.address, protocol.short(welcome["epoch"], 40),
                       ntasks)
        if self.link is not None:
            send = self.link.send
            for batch in _batches(ops, self.config.SUBMIT_BATCH,
                                  self.config.SCHEDULER_FRAME_BYTES // 4):
                send(protocol.encode(batch))
        core.subscribe_again()  # subscriptions are the scheduler's, lost with the old one
        core.send()  # what waited in the outbox

    def holders_rechecked(self, key: str, who_has: list | None) -> None:
        """The new incarnation named the holders of a value the old one had: fetches in
        flight to holders it no longer names fail now (they may be gone)."""
        old = self.rechecked.pop(key, None)
        for address in old or ():
            if address not in (who_has or ()):
                self.gone_holders.add(address)
                self.data.drop(address)

    def drop_fetches(self, st: FutureState) -> None:
        """The holders of a value that was lost: a fetch in flight to them would wait out the
        data pool's timeout, so fail it now and let the waiter look at the new state."""
        if st.status == "finished" and st.who_has:
            for address in st.who_has:
                self.gone_holders.add(address)
                self.data.drop(address)

    def scheduler_lost(self, why: str) -> None:
        """Fail every pending future: the scheduler that knew about them is gone.

        Called again for each refusal while reconnecting, so that work submitted during the
        outage (which no scheduler accepted) fails too instead of hanging.
        """
        if not self.lost_reported:
            logger.warning("%s", why)
        self.lost_reported = True
        self.rejoining = False
        self.rechecked.clear()
        if self.replay is not None:
            self.replay.clear()
        self.core.fail_pending(
            lambda: SchedulerLost(f"{why}; resubmit the work once it is back"),
            lambda: SchedulerLost(why))

    def end_session(self, message: str) -> None:
        """The scheduler ended this session for good (after a welcome, only a revoked key
        does): fail what is pending and every later call at once, saying what to do."""
        core = self.core
        where = f"the scheduler at {core.address} ended this client's session"
        if "revoked" in message:
            core.ended = KeyRevoked(
                f"{where}: {message}. This client can no longer submit, scatter, gather or"
                " make requests; ask the cluster's administrator to authorize a key for you,"
                " then make a new Client with security=Security(DIR) holding it (or other"
                " authorized keys)")
        else:
            core.ended = SchedulerLost(f"{where}: {message}; make a new Client")
        logger.error("%s", core.ended)
        self.lost_reported = True
        if self.replay is not None:
            self.replay.clear()
        core.fail_pending(core.session_error, core.session_error)

    # ------------------------------------------------------------------ ops out

    def wake(self) -> None:
        """Flush on the next loop turn (the core queued ops)."""
        core = self.core
        if core.status == "closed":
            return
        loop = core.loop
        if loop is None:
            return
        try:
            if core.in_loop():
                loop.call_soon(self.flush)
            else:
                loop.call_soon_threadsafe(self.flush)
        except RuntimeError:
            pass  # the loop is closed

    def flush(self) -> None:
        """Send what is queued, now, in one message per batch (on the loop thread)."""
        if self.rejoining:  # until the new incarnation's welcome (see rejoin)
            with self.core.lock:
                self.core._flush_pending = False
            return
        ops = self.core.take_outbox()
        if not ops or self.core.status == "closed" or self.link is None:
            return
        if self.writer is not None or any(type(op) is Deferred for op in ops):
            # Something must wait for I/O first: the writer sends everything in order.
            self.backlog.extend(ops)
            if self.writer is None:
                self.writer = asyncio.ensure_future(self._write_backlog())
            return
        if self.replay is not None:
            self.replay.sent(ops, self.core.states)
        most = self.config.SCHEDULER_FRAME_BYTES // 4
        send = self.link.send
        for batch in _batches(ops, self.config.SUBMIT_BATCH, most):
            send(protocol.encode(batch))

    def send_now(self, ops: list[dict]) -> None:
        """Send ``ops`` at once, ahead of the outbox (from inside the writer, which would
        not see the outbox)."""
        assert self.link is not None
        self.link.send(protocol.encode(ops))

    async def _write_backlog(self) -> None:
        assert self.link is not None
        send = self.link.send
        most = self.config.SCHEDULER_FRAME_BYTES // 4
        core = self.core
        try:
            while self.backlog:
                ready: list[dict] = []
                while self.backlog:
                    item = self.backlog.popleft()
                    if type(item) is not Deferred:
                        ready.append(item)
                        continue
                    self._record(ready)
                    for batch in _batches(ready, self.config.SUBMIT_BATCH, most):
                        send(protocol.encode(batch))
                    ready = []
                    try:
                        ready.extend(await item.work)
                    except Exception as exc:
                        with core.lock:
                            core.window.done(item.state)
                            item.state.fail(None, exc)
                self._record(ready)
                for batch in _batches(ready, self.config.SUBMIT_BATCH, most):
                    send(protocol.encode(batch))
        finally:
            self.writer = None

    def _record(self, batch: list[dict]) -> None:
        if self.replay is not None:
            with self.core.lock:
                self.replay.sent(batch, self.core.states)

    async def _heartbeat(self) -> None:
        core = self.core
        interval = max(self.config.HEARTBEAT_INTERVAL_S * 2, 0.2)
        while core.ended is None:  # an ended session has nobody to beat for
            await asyncio.sleep(interval)
            if self.link is not None:
                self.link.poke()
            if self.data.use_shm:  # idle shared-memory segments go back to the system
                shm.pool().expire(time.monotonic())
            core.send({"op": "heartbeat"})
            silent = time.monotonic() - self.last_heard
            if silent > self.config.SCHEDULER_LOST_TIMEOUT_S:
                first = not self.lost_reported
                # Again at every beat while it is gone, so that work submitted meanwhile
                # (which no scheduler took) fails too instead of hanging.
                with core.lock:
                    self.scheduler_lost(
                        f"the scheduler at {core.address} has not answered for"
                        f" {silent:.0f} s"
                    )
                if first:  # queued until a scheduler listens at the address again
                    core.send(protocol.hello("client", self.name, **self.hello))


def _batches(ops: list, limit: int, max_bytes: int = 1 << 62) -> Iterator[list]:
    """Split ops into messages that carry at most ``limit`` tasks each and, past one op,
    about ``max_bytes`` of task pickles (a frame over the scheduler's limit would close the
    connection)."""
    batch: list = []
    weight = size = 0
    for op in ops:
        if op["op"] == "submit":
            w = len(op["tasks"])
            b = sum(len(t[1]) for t in op["tasks"]) + sum(
                len(f) for f in (op.get("functions") or {}).values())
        else:
            w, b = 1, 0
        if batch and (weight + w > limit or size + b > max_bytes):
            yield batch
            batch, weight, size = [], 0, 0
        batch.append(op)
        weight += w
        size += b
    if batch:
        yield batch
