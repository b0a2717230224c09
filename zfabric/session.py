"""The Client's session with the scheduler: ops that come in, ops that go out, liveness.

A mixin of :class:`~zfabric.client.Client` (like :class:`~zfabric.values.Values`): the methods
here run on the client's event loop and share its records. What comes in is decoded at the
protocol's door (:func:`zfabric.transfer.dispatch`) and applied by :meth:`Session._on_op`.
What goes out is queued by :meth:`Session._send` and leaves once per loop turn
(:meth:`Session._flush`), in order, through the :class:`~zfabric.link.Link`; ops that must
wait for I/O first (large arguments shipped to a worker) hold everything behind them in a
backlog that one writer task sends. Heartbeats both ways tell each side the other is there;
a silent or refusing scheduler fails every pending future with :class:`SchedulerLost`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import warnings

from . import protocol, shm
from .errors import RemoteProtocolError, SchedulerLost
from .futures import FutureState
from .keys import from_wire, readable
from .security import KeyRevoked

logger = logging.getLogger("zfabric.client")


class Deferred:
    """An outbox entry whose ops are ready only after some I/O (shipping large arguments)."""

    __slots__ = ("state", "work")

    def __init__(self, work, state: FutureState):
        self.work = work
        self.state = state


class Session:
    """The Client's methods that talk to the scheduler (see the module docstring)."""

    #: Set when the scheduler ended this session for good (its key was revoked): every later
    #: call raises it (:meth:`_check_session`) instead of waiting for a scheduler that will
    #: never answer this client again.
    _ended: Exception | None = None

    def _heard(self) -> None:
        self._last_heard = time.monotonic()

    def _on_op(self, op: dict) -> None:
        states = self._states
        window = self._window
        match op["op"]:
            case "memory":
                for key, value, who_has, nbytes in op["items"]:
                    st = states.get(key)
                    if st is not None:
                        window.done(st)
                    # not an error: one failed with SchedulerLost stays failed even if the
                    # submit it came from, queued in the outage, reaches a new scheduler
                    if st is not None and st.status != "error":
                        st.finish(value, who_has, nbytes)
                    if who_has and self._gone_holders:
                        self._gone_holders.difference_update(who_has)
            case "erred":
                for item in op["items"]:
                    st = states.get(item[0])
                    if st is not None:
                        window.done(st)
                        self._drop_fetches(st)  # a value in memory was lost for good
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
                        self._drop_fetches(st)
                        st.reset()
            case "reply":
                fut = self._requests.pop(op["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(op)
            case "welcome":
                self.epoch = op["epoch"]
                if self.security is not None:  # the data ports' keys, as the scheduler knows
                    self.security.learn_worker_keys(op.get("worker_keys"))
                self._dashboard_link = op.get("dashboard")
                self._lost_reported = False
                for w in op.get("warnings") or ():
                    warnings.warn(f"zfabric version mismatch with the scheduler: {w}",
                                  RuntimeWarning, stacklevel=1)
                if not self._welcome.done():
                    self._welcome.set_result(op)
            case "worker-keys":
                if self.security is not None:
                    self.security.learn_worker_keys(op["keys"])
            case "reregister":
                self._scheduler_lost(f"the scheduler at {self.scheduler_address} went away"
                                     f" ({op['reason']})")
                self._send(protocol.hello("client", self.id, **self._hello))
            case "error":
                message = readable(op["message"])
                logger.error("scheduler: %s", message)
                for key in op.get("keys") or ():
                    st = states.get(key)
                    if st is not None:
                        window.done(st)
                    if st is not None and not st.done():
                        st.fail(None, RemoteProtocolError(
                            f"the scheduler refused {from_wire(key)!r}: {message}"))
                if op.get("fatal") and not self._welcome.done():
                    self._welcome.set_exception(RemoteProtocolError(op["message"]))
                elif op.get("fatal"):  # the session ended (its key was revoked): nothing waits
                    self._end_session(message)
            case "heartbeat":
                pass
            case other:
                logger.warning("ignoring op %r from the scheduler", other)
        if window.ready():
            self._pump()  # results made room: held tasks go, highest priority first
            self._send()

    def _drop_fetches(self, st: FutureState) -> None:
        """The holders of a value that was lost: a fetch in flight to them would wait out the
        data pool's timeout, so fail it now and let the waiter look at the new state."""
        if st.status == "finished" and st.who_has:
            for address in st.who_has:
                self._gone_holders.add(address)
                self.data.drop(address)

    def _scheduler_lost(self, why: str) -> None:
        """Fail every pending future: the scheduler that knew about them is gone.

        Called again for each refusal while reconnecting, so that work submitted during the
        outage (which no scheduler accepted) fails too instead of hanging.
        """
        if not self._lost_reported:
            logger.warning("%s", why)
        self._fail_pending(lambda: SchedulerLost(f"{why}; resubmit the work once it is back"),
                           lambda: SchedulerLost(why))

    def _fail_pending(self, for_futures, for_requests) -> None:
        """No scheduler answers this session now: every pending future and request fails
        with a fresh error of ``for_futures()`` / ``for_requests()``."""
        self.epoch = None
        self._lost_reported = True
        self._window.clear(self._states.values())  # held tasks fail below with the rest
        for st in list(self._states.values()):
            if not st.done():
                st.fail(None, for_futures())
        for fut in self._requests.values():
            if not fut.done():
                fut.set_exception(for_requests())
        self._requests.clear()

    def _end_session(self, message: str) -> None:
        """The scheduler ended this session for good (after a welcome, only a revoked key
        does): fail what is pending and every later call at once, saying what to do."""
        where = f"the scheduler at {self.scheduler_address} ended this client's session"
        if "revoked" in message:
            self._ended = KeyRevoked(
                f"{where}: {message}. This client can no longer submit, scatter, gather or"
                " make requests; ask the cluster's administrator to authorize a key for you,"
                " then make a new Client with security=Security(DIR) holding it (or other"
                " authorized keys)")
        else:
            self._ended = SchedulerLost(f"{where}: {message}; make a new Client")
        logger.error("%s", self._ended)
        self._fail_pending(self._session_error, self._session_error)

    def _session_error(self) -> Exception:
        err = self._ended
        return type(err)(*err.args)

    def _check_session(self) -> None:
        """Raise at once if the scheduler ended this session for good (see :attr:`_ended`)."""
        if self._ended is not None:
            raise self._session_error()

    def _flush(self) -> None:
        """Send what is queued, now, in one message per batch (on the loop thread)."""
        with self._lock:
            self._flush_pending = False
            if self._release_keys:
                self._outbox.append({"op": "release", "keys": self._release_keys})
                self._release_keys = []
            ops = list(self._outbox)
            self._outbox.clear()
        if not ops or self.status == "closed":
            return
        if self._writer is not None or any(type(op) is Deferred for op in ops):
            # Something must wait for I/O first: the writer sends everything in order.
            self._backlog.extend(ops)
            if self._writer is None:
                self._writer = asyncio.ensure_future(self._write_backlog())
            return
        most = self.config.SCHEDULER_FRAME_BYTES // 4
        for batch in _batches(ops, self.config.SUBMIT_BATCH, most):
            self._link.send(protocol.encode(batch))

    async def _write_backlog(self) -> None:
        send = self._link.send
        most = self.config.SCHEDULER_FRAME_BYTES // 4
        try:
            while self._backlog:
                ready: list[dict] = []
                while self._backlog:
                    item = self._backlog.popleft()
                    if type(item) is not Deferred:
                        ready.append(item)
                        continue
                    for batch in _batches(ready, self.config.SUBMIT_BATCH, most):
                        send(protocol.encode(batch))
                    ready = []
                    try:
                        ready.extend(await item.work)
                    except Exception as exc:
                        with self._lock:
                            self._window.done(item.state)
                            item.state.fail(None, exc)
                for batch in _batches(ready, self.config.SUBMIT_BATCH, most):
                    send(protocol.encode(batch))
        finally:
            self._writer = None

    async def _heartbeat(self) -> None:
        interval = max(self.config.HEARTBEAT_INTERVAL_S * 2, 0.2)
        while self._ended is None:  # an ended session has nobody to beat for
            await asyncio.sleep(interval)
            self._link.poke()
            if self.data.use_shm:  # idle shared-memory segments go back to the system
                shm.pool().expire(time.monotonic())
            self._send({"op": "heartbeat"})
            silent = time.monotonic() - self._last_heard
            if silent > self.config.SCHEDULER_LOST_TIMEOUT_S:
                first = not self._lost_reported
                # Again at every beat while it is gone, so that work submitted meanwhile
                # (which no scheduler took) fails too instead of hanging.
                with self._lock:
                    self._scheduler_lost(
                        f"the scheduler at {self.scheduler_address} has not answered for"
                        f" {silent:.0f} s"
                    )
                if first:  # queued until a scheduler listens at the address again
                    self._send(protocol.hello("client", self.id, **self._hello))

    def _send(self, *ops: dict) -> None:
        """Queue ops for the scheduler; they leave together on the next loop turn."""
        with self._lock:
            if self._release_keys and ops:
                self._outbox.append({"op": "release", "keys": self._release_keys})
                self._release_keys = []
            self._outbox.extend(ops)
            if self._flush_pending:
                return
            self._flush_pending = True
        if self.status in ("closed",):
            return
        loop = self.loop
        if loop is None:
            return
        try:
            if self._in_loop():
                loop.call_soon(self._flush)
            else:
                loop.call_soon_threadsafe(self._flush)
        except RuntimeError:
            pass  # the loop is closed


def _batches(ops: list, limit: int, max_bytes: int = 1 << 62):
    """Split ops into messages that carry at most ``limit`` tasks each and, past one op,
    about ``max_bytes`` of task pickles (a frame over the scheduler's limit would close the
    connection)."""
    batch, weight, size = [], 0, 0
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
