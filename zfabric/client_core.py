"""The Client's records, under one lock: what it knows of each key, what it still sends, what
it waits for.

Theory of operation
-------------------
Every part of a :class:`~zfabric.client.Client` (submitting, moving values, the session with
the scheduler, requests about the cluster, datasets, plugins, diagnostics) and every Future
works on one :class:`ClientCore`, through the methods below; none of them keeps records of
its own about keys or requests.

- **Keys.** ``states`` maps each wire key this client knows to its
  :class:`~zfabric.futures.FutureState` (shared by every Future of that key); ``refcount``
  counts the Futures alive per key. When the last one goes (:meth:`dec_ref`) the key is
  released: its name joins a batch of releases that leaves before any later op
  (:meth:`queue_releases`, so a release never undoes a later submit of the same key).
  :meth:`revive` gives a key that is submitted again a fresh state when its old one was
  cancelled or lost with its scheduler.
- **Ops out.** :meth:`send` queues ops in ``outbox`` and asks the session (``wake``, which it
  installs) to flush once per loop turn; the session takes them with :meth:`take_outbox`.
  The submit window (``window``, :mod:`zfabric.window`) holds tasks beyond what the scheduler
  should hold; :meth:`pump` queues those that fit now, in submit ops built by
  :meth:`queue_tasks`.
- **Requests.** :meth:`request` sends one ``request`` op under a fresh id and waits for its
  reply, which the session hands to :meth:`answer`; :meth:`new_request` is the same id
  bookkeeping for ops of other names (``coord``) and for requests sent outside the outbox.
- **Liveness.** ``status`` (created, connecting, running, closing, closed), ``epoch`` (the
  scheduler's id once welcomed, None while not connected) and ``ended`` (the error of a
  session the scheduler ended for good) say whether calls may go out (:meth:`check_open`);
  :meth:`fail_pending` fails everything that waits when no scheduler will answer.

Everything here runs under ``lock`` (an RLock: the loop thread and user threads share it);
nothing here touches a socket.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from .config import Config
from .errors import ClosedError, RemoteProtocolError, SchedulerLost, TaskTooLarge
from .futures import FutureState
from .window import SubmitWindow

logger = logging.getLogger("zfabric.client")

__all__ = ["ClientCore", "lost"]


def lost(st: FutureState) -> bool:
    """Whether a future failed because its scheduler went away (then it may be submitted
    again, like a cancelled one)."""
    return st.status == "error" and isinstance(st.exception(), SchedulerLost)


def _nothing() -> None:
    return None


class ClientCore:
    """One client's keys, outbox, submit window and requests (see the module docstring)."""

    def __init__(self, config: Config, address: str | None = None):
        self.config = config
        #: The scheduler's address, for messages.
        self.address = address
        self.status = "created"
        self.epoch: str | None = None
        #: Set when the scheduler ended this session for good (a revoked key): every later
        #: call raises a copy of it (:meth:`check_open`).
        self.ended: Exception | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.lock = threading.RLock()
        self.states: dict[str, FutureState] = {}
        self.refcount: dict[str, int] = {}
        #: wire key of a Future named after an alias (dask's persist) -> its data's wire key
        self.renamed: dict[str, str] = {}
        self.outbox: deque = deque()
        self.window = SubmitWindow(config.SUBMIT_WINDOW_TASKS)
        self.direct: Any = None  # zfabric.replies.DirectReplies, set by the session
        self.requests: dict[int, asyncio.Future] = {}
        #: Called (outside the lock) when ops wait to go out; the session installs it.
        self.wake: Callable[[], None] = _nothing
        self._release_keys: list[str] = []
        self._flush_pending = False
        self._request_seq = 0
        self._id_prefix = uuid.uuid4().hex[:20]
        self._unique = itertools.count()
        self._callbacks: concurrent.futures.ThreadPoolExecutor | None = None
        #: Sets that collect the wire keys of the tasks this client submits while they are
        #: here (``get_task_metadata`` blocks; :meth:`note_submitted`).
        self.key_collectors: list[set] = []
        #: Called once, with the first tasks submitted (the client starts listening for its
        #: tasks' printed output then); None once called.
        self.on_first_submit: Callable[[], None] | None = None
        #: wire key of a dask graph's output -> every wire key that graph submitted (one
        #: frozenset shared by its outputs), so that ``progress`` shows every task group.
        self.graph_keys: dict[str, frozenset] = {}
        #: Subscriptions to events the scheduler pushes (topics, transitions), by id: the
        #: handler of each batch, ``handler(items, missed)``, called on the loop, and the
        #: request that made it (sent again to a new scheduler incarnation).
        self.subscriptions: dict[int, tuple[Callable[[int, list, int], None], dict]] = {}
        self._subscription_seq = 0

    # ------------------------------------------------------------------ liveness

    def check_open(self) -> None:
        """Raise if no call may go out: the client is closed, or the scheduler ended this
        session for good."""
        if self.status in ("closing", "closed"):
            raise ClosedError("this client is closed; create a new Client")
        self.check_session()

    def check_session(self) -> None:
        """Raise at once if the scheduler ended this session for good (see ``ended``)."""
        if self.ended is not None:
            raise self.session_error()

    def session_error(self) -> Exception:
        """A fresh copy of the error that ended the session."""
        err = self.ended
        assert err is not None
        return type(err)(*err.args)

    def fail_pending(self, for_futures: Callable[[], BaseException],
                     for_requests: Callable[[], BaseException]) -> None:
        """No scheduler answers this session now: every pending future and request fails
        with a fresh error of ``for_futures()`` / ``for_requests()``."""
        self.epoch = None
        self.window.clear(self.states.values())  # held tasks fail below with the rest
        for st in list(self.states.values()):
            if not st.done():
                st.fail(None, for_futures())
        self.fail_requests(for_requests)

    # ------------------------------------------------------------------ the loop

    def in_loop(self) -> bool:
        """Whether the caller runs on the client's event loop."""
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    def on_loop(self, fn: Callable[[], Any]) -> None:
        """Run ``fn()`` on the client's loop: now if called there, else soon."""
        loop = self.loop
        if loop is None:
            return
        if self.in_loop():
            fn()
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(fn)

    def run_callback(self, fn: Callable[[Any], Any], future) -> None:
        """Run ``fn(future)`` on the client's callback thread (never its I/O loop), one at a
        time (see ``Future.add_done_callback``)."""
        with self.lock:
            if self._callbacks is None:
                if self.status == "closed":
                    return
                self._callbacks = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="zfabric-callbacks")
            pool = self._callbacks

        def call():
            try:
                fn(future)
            except Exception:
                logger.exception("error in a done callback of %s", future)

        with contextlib.suppress(RuntimeError):  # closed meanwhile
            pool.submit(call)

    def stop_callbacks(self, wait: bool) -> None:
        """Stop the callback thread (``wait``: for the callback it runs)."""
        pool = self._callbacks
        if pool is not None:
            pool.shutdown(wait=wait)

    # ------------------------------------------------------------------ keys

    def new_id(self) -> str:
        """A key suffix unique across clients: this client's random id and a counter."""
        return f"{self._id_prefix}{next(self._unique):x}"

    def get_state(self, key: str, want: bool = True) -> FutureState:
        """The state of ``key``, made (and, with ``want``, asked of the scheduler) if new."""
        with self.lock:
            st = self.states.get(key)
            if st is None:
                st = self.states[key] = FutureState(key)
                if want:
                    self.send({"op": "want", "keys": [key]})
            return st

    def revive(self, key: str) -> tuple[FutureState, bool]:
        """``(state, new)`` for ``key`` about to be submitted (lock held): its state, or a
        fresh one (``new``) when it has none or its old one was cancelled or lost with its
        scheduler (then the old one leaves the submit window)."""
        states = self.states
        st = states.get(key)
        if st is not None and st.status != "cancelled" and not lost(st):
            return st, False
        if st is not None:
            self.window.drop(st)
        st = states[key] = FutureState(key)
        return st, True

    def inc_ref(self, key: str) -> None:
        with self.lock:
            self.refcount[key] = self.refcount.get(key, 0) + 1

    def dec_ref(self, key: str) -> None:
        """One Future of ``key`` is gone; with the last one, the key is released."""
        with self.lock:
            n = self.refcount.get(key, 0) - 1
            if n > 0:
                self.refcount[key] = n
                return
            self.refcount.pop(key, None)
            self.graph_keys.pop(key, None)
            st = self.states.pop(key, None)
            if st is not None:
                self.window.drop(st)
            if self.status not in ("running", "connecting"):
                return
            self._release_keys.append(key)
            if self._flush_pending:  # what send() does, inline: this runs for every Future
                return
            self._flush_pending = True
        self.wake()

    def forget_renamed(self) -> dict[str, str]:
        """``renamed`` without the aliases whose Futures are all gone (lock not needed: the
        caller's thread submits the graph)."""
        renamed = self.renamed
        if renamed:
            held = self.refcount
            for alias in [a for a, w in renamed.items() if w not in held]:
                del renamed[alias]
        return renamed

    def cancel_states(self, states: Iterable[FutureState], why: str | None) -> None:
        """Cancelled by this client: out of the window (one still held never reaches the
        scheduler), then cancelled; held tasks that now fit go."""
        with self.lock:
            for st in states:
                self.window.drop(st)
                st.cancel(why)
            if self.window.ready():
                self.pump()
                self.send()

    def cancel_all(self, why: str) -> None:
        """Every future is cancelled, finished ones too (the cluster restarted)."""
        with self.lock:
            self.window.clear(self.states.values())
            for st in list(self.states.values()):
                st.cancel(why, force=True)

    # ------------------------------------------------------------------ ops out

    def queue_releases(self) -> None:
        """Queue the batched releases now (lock held): a release must reach the scheduler
        before a later submit or scatter of the same key, or it would undo it."""
        if self._release_keys:
            self.outbox.append({"op": "release", "keys": self._release_keys})
            self._release_keys = []

    def send(self, *ops: Any) -> None:
        """Queue ops for the scheduler; they leave together on the next loop turn."""
        with self.lock:
            if ops:
                self.queue_releases()
                self.outbox.extend(ops)
            if self._flush_pending:
                return
            self._flush_pending = True
        self.wake()

    def take_outbox(self) -> list:
        """Everything queued, releases included, to send now (the session's flush)."""
        with self.lock:
            self._flush_pending = False
            self.queue_releases()
            ops = list(self.outbox)
            self.outbox.clear()
        return ops

    def note_submitted(self, keys: Iterable[str]) -> None:
        """Tasks of these wire keys were submitted (lock held): collectors learn them."""
        hook, self.on_first_submit = self.on_first_submit, None
        if hook is not None:
            hook()
        for collector in self.key_collectors:
            collector.update(keys)

    def note_graph(self, outputs: Iterable[str], keys: Iterable[str]) -> None:
        """A dask graph of these wire ``keys`` was submitted for ``outputs`` (lock held)."""
        every = frozenset(keys)
        if every:
            for key in outputs:
                self.graph_keys[key] = every

    def pump(self) -> None:
        """Queue the held tasks that fit in the submit window now (lock held)."""
        tasks, functions = self.window.take(self.states)
        if tasks:
            self.queue_tasks(tasks, functions)

    def queue_tasks(self, tasks: list, functions: dict, batch: int | None = None) -> None:
        """Queue submit ops of at most ``batch`` (SUBMIT_BATCH) tasks, each carrying the
        pickles of the functions its tasks use (once per message, not once per task), and
        about a quarter of SCHEDULER_FRAME_BYTES of pickles (past one task). Empties
        ``tasks`` and ``functions``."""
        batch = batch or self.config.SUBMIT_BATCH
        most = self.config.SCHEDULER_FRAME_BYTES // 4  # a message stays well inside a frame
        start = 0
        while start < len(tasks):
            end, size, seen = start, 0, set()
            while end < len(tasks) and end - start < batch and (end == start or size < most):
                t = tasks[end]
                size += len(t[1])
                if t[4] not in seen:
                    seen.add(t[4])
                    size += len(functions[t[4]])
                end += 1
            chunk = tasks[start:end]
            start = end
            fids = {t[4] for t in chunk} if len(functions) > 1 else functions.keys()
            self.outbox.append({"op": "submit", "tasks": chunk,
                                "functions": {f: functions[f] for f in fids}})
        tasks.clear()
        functions.clear()

    # ------------------------------------------------------------------ requests

    def new_request(self) -> tuple[int, asyncio.Future]:
        """A fresh request id and the future its reply will complete (on the loop)."""
        assert self.loop is not None
        self._request_seq += 1
        rid = self._request_seq
        fut = self.loop.create_future()
        self.requests[rid] = fut
        return rid, fut

    def answer(self, rid: int, reply: dict) -> None:
        """The reply to request ``rid`` arrived."""
        fut = self.requests.pop(rid, None)
        if fut is not None and not fut.done():
            fut.set_result(reply)

    def forget_request(self, rid: int) -> None:
        """The caller stopped waiting for request ``rid``."""
        self.requests.pop(rid, None)

    def fail_requests(self, error: Callable[[], BaseException]) -> None:
        """Every request waiting for a reply fails with a fresh ``error()``."""
        for fut in self.requests.values():
            if not fut.done():
                fut.set_exception(error())
        self.requests.clear()

    # ------------------------------------------------------------------ subscriptions

    async def subscribe(self, handler: Callable[[int, list, int], None],
                        **args) -> tuple[int, Any]:
        """Ask the scheduler to push events (``what="topic"``, ``topic=...``, or
        ``what="transitions"``, ``keys``/``prefixes``); each batch goes to
        ``handler(id, items, missed)`` on the loop (it may come before this returns), which
        acknowledges it with :meth:`took`.
        Returns the subscription's id and the request's answer."""
        self._subscription_seq += 1
        sid = self._subscription_seq
        args["id"] = sid
        self.subscriptions[sid] = (handler, args)
        try:
            return sid, await self.request("subscribe", **args)
        except BaseException:
            self.subscriptions.pop(sid, None)
            raise

    async def unsubscribe(self, sid: int) -> None:
        """End subscription ``sid`` (nothing if the scheduler is gone)."""
        if self.subscriptions.pop(sid, None) is None:
            return
        with contextlib.suppress(Exception):
            await self.request("unsubscribe", id=sid)

    def on_events(self, op: dict) -> None:
        """An ``events`` op (on the loop): its subscription's handler takes the batch."""
        entry = self.subscriptions.get(op["id"])
        if entry is None:
            self.took(op["id"])
            return
        missed = op.get("missed")
        entry[0](op["id"], op["items"], missed if type(missed) is int else 0)

    def took(self, sid: int) -> None:
        """A batch of subscription ``sid`` was handled: the scheduler may send another."""
        if self.status == "running":
            self.send({"op": "events-ack", "id": sid})

    def subscribe_again(self) -> None:
        """A new scheduler incarnation: make every subscription again (answers unread)."""
        for _, args in self.subscriptions.values():
            rid, fut = self.new_request()
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
            self.send({"op": "request", "id": rid, "kind": "subscribe",
                       "args": {k: v for k, v in args.items() if k != "after"}})

    async def request(self, kind: str, **args):
        """Ask the scheduler (``info``, ``who-has``, ``run``, ...) and return its answer."""
        self.check_open()
        if self.epoch is None and self.status == "running":
            raise SchedulerLost(f"not connected to the scheduler at {self.address}")
        payload = args.get("payload")
        limit = self.config.SCHEDULER_FRAME_BYTES
        if type(payload) is bytes and len(payload) > limit - 2**16:
            # it would close our connection (MAXMSGSIZE) rather than reach the scheduler
            raise TaskTooLarge(
                f"the function of this {kind} request pickles to {len(payload):,} bytes; the"
                f" scheduler takes at most {limit:,} bytes in a frame (SCHEDULER_FRAME_BYTES)."
                " Place large values on the workers with client.scatter(...) and pass the"
                " futures instead")
        rid, fut = self.new_request()
        self.send({"op": "request", "id": rid, "kind": kind, "args": args})
        reply = await fut
        if "error" in reply:
            if reply.get("kind") == "ValueError":  # the caller's mistake (a bad argument)
                raise ValueError(reply["error"])
            raise RemoteProtocolError(reply["error"])
        return reply.get("result")
