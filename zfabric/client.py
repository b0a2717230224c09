"""The Client: submit work, get Futures, gather results — dask.distributed's API on ZeroMQ.

``Client(address, asynchronous=True)`` lives in the caller's event loop and its methods return
awaitables; ``Client(address)`` runs its own loop in a background thread and its methods block.
Either way one DEALER talks to the scheduler (:mod:`zfabric.session`: what comes in, what goes
out, liveness); everything a tick produces goes out as one message (``map`` is split into
batches). Turning calls into tasks lives in :mod:`zfabric.submission`, moving values
(results, gather, scatter, large arguments) in :mod:`zfabric.values`; values come straight
from workers through :class:`~zfabric.transfer.DataPool`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import itertools
import json
import logging
import os
import sys
import threading
import time
import uuid
import weakref
from collections import deque

import zmq
import zmq.asyncio

from . import _zmq, dask_scheduler, handshake, protocol
from .admin import ClusterRequests
from .config import Config, from_env, parse_timedelta
from .control import ClusterControl
from .datasets import Datasets
from .diagnostics import Diagnostics
from .errors import (
    ClosedError,
    CommTimeoutError,
    RemoteProtocolError,
    SchedulerLost,
    TaskTooLarge,
)
from .futures import Future, FutureState, futures_of
from .lifecycle import LoopThread
from .link import Link
from .plugins import PluginRequests
from .security import SecurityError, as_security, use_for_process
from .session import Session
from .submission import Submission, funcname  # noqa: F401  (funcname: public there)
from .transfer import DataPool, dispatch
from .values import Values
from .window import SubmitWindow

logger = logging.getLogger(__name__)

__all__ = ["Client", "default_client"]

#: Clients created with ``set_as_default=True``, oldest first: the newest open one is the
#: default, and closing it hands over to the one before.
_defaults: list[weakref.ref] = []
_defaults_lock = threading.Lock()
#: The client of ``with client.as_current():`` blocks, per thread and task.
_current: contextvars.ContextVar = contextvars.ContextVar("zfabric_current_client",
                                                         default=None)


def _open(c) -> bool:
    return c is not None and c.status not in ("closing", "closed")


def default_client(c: Client | None = None) -> Client:
    """The client to use when none is given: ``c`` if given, else the newest open default
    client (falling back to the one before when it closes). Raises ``ValueError`` if none."""
    if c is not None:
        return c
    c = _current.get()
    if _open(c):
        return c
    with _defaults_lock:
        for ref in reversed(_defaults):
            client = ref()
            if _open(client):
                return client
    raise ValueError("No client is open; create one with Client(address)")


def _set_default(client: Client) -> None:
    with _defaults_lock:
        _defaults[:] = [r for r in _defaults if _open(r()) and r() is not client]
        _defaults.append(weakref.ref(client))


def _drop_default(client: Client) -> None:
    with _defaults_lock:
        _defaults[:] = [r for r in _defaults if r() is not client and _open(r())]



class Client(Submission, Values, ClusterRequests, ClusterControl, Session, Diagnostics, Datasets,
             PluginRequests):
    """Connects to a scheduler and turns calls into Futures.

    ``address`` may be a ``tcp://host:port`` string, a Scheduler, or a LocalCluster; with no
    address a LocalCluster sized to this machine starts and closes with the client.
    ``timeout`` bounds how long connecting may take.
    """

    def __init__(self, address=None, *, asynchronous: bool = False, timeout=None,
                 name: str | None = None, set_as_default: bool = True,
                 config: Config | None = None, scheduler_file=None, security=None,
                 direct_to_workers=None, heartbeat_interval=None, serializers=None,
                 deserializers=None, connection_limit=None, _for_worker: str | None = None,
                 **kwargs):
        self.status = "created"  # first: __del__ reads these even if the checks below raise
        self.asynchronous = asynchronous
        self._loop_thread: LoopThread | None = None
        self.security = as_security(security)  # True: fresh keys (for its own cluster)
        for kw, value in (("serializers", serializers), ("deserializers", deserializers)):
            if value is not None:
                raise ValueError(f"Client({kw}=...): zfabric always uses pickle protocol 5"
                                 " with cloudpickle for what cannot be imported; leave it out")
        if direct_to_workers is False:
            raise ValueError("Client(direct_to_workers=False): zfabric's scheduler never"
                             " carries values; data always moves directly to and from workers")
        if connection_limit is not None:
            raise ValueError("Client(connection_limit=...): zfabric keeps one connection per"
                             " worker and needs no limit; leave it out")
        self.config = config or from_env()
        if address is None and scheduler_file is None and not kwargs:
            address = self.config.SCHEDULER_ADDRESS or None  # zfabric mpi's job scheduler
        if heartbeat_interval is not None:
            self.config = dataclasses.replace(
                self.config, HEARTBEAT_INTERVAL_S=parse_timedelta(heartbeat_interval,
                                                                  name="heartbeat_interval"))
        if scheduler_file is not None:
            if address is not None:
                raise ValueError("give either an address or scheduler_file, not both")
            address = _read_scheduler_file(scheduler_file, parse_timedelta(timeout) or 10.0)
        self.asynchronous = asynchronous
        timeout = parse_timedelta(timeout)
        self.timeout = float(timeout if timeout is not None else self.config.CONNECT_TIMEOUT_S)
        self.cluster = None
        self._own_cluster = False
        if address is None:
            self._own_cluster = True
            self._cluster_kwargs = kwargs
            if security is not None:
                kwargs["security"] = security if security is not True else self.security
        elif kwargs:
            raise TypeError(f"Client got unexpected arguments: {', '.join(sorted(kwargs))} (they"
                            " are LocalCluster's, which a client starts only without an"
                            " address)")
        elif hasattr(address, "scheduler_address"):
            self.cluster = address
            address = address.scheduler_address
        elif hasattr(address, "address") and not isinstance(address, str):
            address = address.address
        if self.security is None and getattr(self.cluster or address, "security", None):
            # Client(cluster) and Client(scheduler) use the keys they were made with
            self.security = as_security(getattr(self.cluster or address, "security", None))
        if self.security is None and self.config.REQUIRE_ENCRYPTION and not self._own_cluster:
            raise SecurityError("REQUIRE_ENCRYPTION is set but this client has no keys: pass"
                                " security=Security(DIR) (`zfabric keygen DIR`)")
        self.scheduler_address = address
        self.id = name or f"client-{uuid.uuid4().hex[:12]}"
        # the client of a worker's tasks says whose: its leases go when that worker dies
        self._hello = {"worker": _for_worker} if _for_worker else {}
        self._id_prefix = uuid.uuid4().hex[:20]
        self.status = "created"
        self.epoch: str | None = None
        self._lock = threading.RLock()
        self._states: dict[str, FutureState] = {}
        self._refcount: dict[str, int] = {}
        self._renamed: dict[str, str] = {}  # wire key of an alias-named Future -> its data's
        self._outbox: deque = deque()
        self._release_keys: list[str] = []
        self._worker_list: list[str] = []
        self._workers_seen = 0.0
        self._next_worker = -1
        self._unique = itertools.count()
        self._flush_pending = False
        self._requests: dict[int, asyncio.Future] = {}
        self._request_seq = 0
        self._tasks: list[asyncio.Task] = []
        self._loop_thread: LoopThread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._last_heard = time.monotonic()
        self._lost_reported = False
        self._gone_holders: set[str] = set()  # data addresses whose values were lost
        self._window = SubmitWindow(self.config.SUBMIT_WINDOW_TASKS)
        self._callbacks = None  # the thread that runs add_done_callback's callbacks
        self._is_default = set_as_default
        if set_as_default:
            _set_default(self)
            dask_scheduler.install(self)
        if not asynchronous:
            self._loop_thread = LoopThread("zfabric-client-loop")
            self.loop = self._loop_thread.loop
            try:
                self.sync(self._start)
            except BaseException:
                self.close()
                raise

    def __repr__(self) -> str:
        return f"<Client: scheduler={self.scheduler_address!r} status={self.status}>"

    @classmethod
    def current(cls, allow_global: bool = True) -> Client:
        """The client of the innermost ``with client.as_current():`` block, else (with
        ``allow_global``) the default client. Raises ``ValueError`` when there is none."""
        c = _current.get()
        if _open(c):
            return c
        if allow_global:
            return default_client()
        raise ValueError("No client is current; use `with client.as_current():`")

    @contextlib.contextmanager
    def as_current(self):
        """Make this the client that Futures and ``get_client()`` use within the block."""
        token = _current.set(self)
        try:
            yield self
        finally:
            _current.reset(token)

    def _run_callback(self, fn, future) -> None:
        """Run a done callback on this client's callback thread (see add_done_callback)."""
        with self._lock:
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

    # ------------------------------------------------------------------ sync / async plumbing

    def sync(self, func, *args, **kwargs):
        """Run a coroutine function on the client's loop: awaitable if asynchronous, else
        blocking until it is done."""
        if self.asynchronous:
            return func(*args, **kwargs)
        if self.loop is None or self._loop_thread is None:
            raise ClosedError("this client is closed; create a new Client")
        if threading.current_thread() is self._loop_thread.thread:
            raise RuntimeError("a blocking Client cannot be used from its own loop thread")
        fut = asyncio.run_coroutine_threadsafe(func(*args, **kwargs), self.loop)
        try:
            return fut.result()
        except KeyboardInterrupt:
            fut.cancel()
            raise

    def _on_loop(self, fn) -> None:
        loop = self.loop
        if loop is None:
            return
        if self._in_loop():
            fn()
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(fn)

    def _in_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    def __await__(self):
        return self._start_async().__await__()

    async def _start_async(self):
        if self.status == "created":
            await self._start()
        return self

    async def __aenter__(self):
        return await self

    async def __aexit__(self, *exc):
        await self._close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ connect

    async def _start(self) -> None:
        self.status = "connecting"
        self.loop = asyncio.get_running_loop()
        if self._own_cluster:
            from .cluster import LocalCluster

            kw = self._cluster_kwargs
            self.cluster = await LocalCluster(asynchronous=True, **kw)
            self.scheduler_address = self.cluster.scheduler_address
            self.security = self.cluster.security
        if not self.scheduler_address:
            raise ValueError("Client needs a scheduler address such as tcp://127.0.0.1:8786")
        self._ctx = zmq.asyncio.Context.instance()
        self.identity = _zmq.new_identity("client")
        # The scheduler link is a plain socket on the loop's selector (see zfabric/link.py):
        # zmq.asyncio costs more than the round trip on this latency-bound path.
        use_for_process(self.security)  # actor handles of this process connect with it
        monitor = f"inproc://zfabric-monitor-{self.identity.decode()}"
        self._link = Link(
            self.loop, _zmq.dealer(zmq.Context.instance(), self.scheduler_address, self.identity,
                                   security=self.security, role="client", monitor=monitor,
                                   max_frame_bytes=2 * self.config.SCHEDULER_FRAME_BYTES),
            # _on_op is looked up per op, so that a test may wrap it on a live client
            lambda frames: dispatch(frames, lambda op: self._on_op(op), who="client",
                                    heard=self._heard, lock=self._lock))
        self.data = DataPool(self._ctx, use_shm=self.config.SAME_HOST_SHM,
                             max_frame_bytes=self.config.MAX_MESSAGE_BYTES,
                             security=self.security)
        self._welcome = self.loop.create_future()
        self._backlog: deque = deque()
        self._writer: asyncio.Future | None = None
        self._tasks = [asyncio.ensure_future(self._heartbeat())]
        self._send(protocol.hello("client", self.id, **self._hello))
        try:
            await handshake.wait(self._welcome, self._link.sock, monitor, self.timeout,
                                 self.scheduler_address, self.security)
        except TimeoutError:
            await self._close()
            raise CommTimeoutError(
                f"Timed out connecting to a zfabric scheduler at {self.scheduler_address} after"
                f" {self.timeout:g} s; is a scheduler running there? (start one with"
                " `zfabric scheduler`)"
            ) from None
        except BaseException:  # refused (e.g. protocol mismatch) or cancelled: leave nothing open
            await self._close()
            raise
        self.status = "running"
        from . import joblib_backend

        joblib_backend.register_on_import()  # without importing joblib (see there)

    # ------------------------------------------------------------------ reference counting

    def _get_state(self, key: str, want: bool = True) -> FutureState:
        with self._lock:
            st = self._states.get(key)
            if st is None:
                st = self._states[key] = FutureState(key)
                if want:
                    self._send({"op": "want", "keys": [key]})
            return st

    def _inc_ref(self, key: str) -> None:
        with self._lock:
            self._refcount[key] = self._refcount.get(key, 0) + 1

    def _dec_ref(self, key: str) -> None:
        with self._lock:
            n = self._refcount.get(key, 0) - 1
            if n > 0:
                self._refcount[key] = n
                return
            self._refcount.pop(key, None)
            st = self._states.pop(key, None)
            if st is not None:
                self._window.drop(st)
            if self.status in ("running", "connecting"):
                self._release_keys.append(key)
                self._send()

    def refcount(self, key: str) -> int:
        return self._refcount.get(key, 0)

    @property
    def futures(self) -> dict[str, FutureState]:
        return self._states

    # ------------------------------------------------------------------ submit and map

    def _check_open(self) -> None:
        if self.status in ("closing", "closed"):
            raise ClosedError("this client is closed; create a new Client")
        self._check_session()  # ended by the scheduler (a revoked key)

    # ------------------------------------------------------------------ dask collections

    def get(self, dsk, keys, **kwargs):
        """Run a dask graph on the cluster and return the values of ``keys`` (nested lists
        as given); dask calls this as its scheduler. See :mod:`zfabric.dask`."""
        self._check_open()
        from . import dask

        return dask.get(self, dsk, keys, **kwargs)

    def compute(self, collections, sync: bool = False, **kwargs):
        """Start computing dask collections: a Future per collection (values with
        ``sync=True``). Keywords as dask.distributed's (``workers``, ``retries``,
        ``priority``, ``resources``, ``allow_other_workers``, ``optimize_graph``, ...)."""
        self._check_open()
        from . import dask

        return dask.compute(self, collections, sync=sync, **kwargs)

    def persist(self, collections, **kwargs):
        """The same dask collections, now computed (or computing) and held on the cluster."""
        self._check_open()
        from . import dask

        return dask.persist(self, collections, **kwargs)

    # ------------------------------------------------------------------ cancel

    def cancel(self, futures, asynchronous=None, force: bool = False, reason: str | None = None,
               msg: str | None = None):
        """Stop these futures' tasks (and what depends on them); their results are gone.

        ``result()`` then raises a ``CancelledError`` naming the key and ``reason`` (or
        ``msg``). Without ``force`` a key another client also wants is only released for this
        one; with it, it is cancelled for every client.
        """
        flat = futures_of(futures) if not isinstance(futures, Future) else [futures]
        keys = [f._wkey for f in flat]
        why = reason or msg
        op = {"op": "cancel", "keys": keys}
        if why:
            op["reason"] = str(why)
        if force:
            op["force"] = True
        self._send(op)

        def mark():
            with self._lock:
                for f in flat:
                    self._window.drop(f._state)  # one still held never reaches the scheduler
                    f._state.cancel(str(why) if why else None)
                if self._window.ready():
                    self._pump()
                    self._send()

        self._on_loop(mark)
        if self.asynchronous:
            return _done_awaitable()
        return None

    # ------------------------------------------------------------------ requests

    async def _request(self, kind: str, **args):
        self._check_open()
        if self.epoch is None and self.status == "running":
            raise SchedulerLost(f"not connected to the scheduler at {self.scheduler_address}")
        payload = args.get("payload")
        if type(payload) is bytes and len(payload) > self.config.SCHEDULER_FRAME_BYTES - 2**16:
            # it would close our connection (MAXMSGSIZE) rather than reach the scheduler
            raise TaskTooLarge(
                f"the function of this {kind} request pickles to {len(payload):,} bytes; the"
                f" scheduler takes at most {self.config.SCHEDULER_FRAME_BYTES:,} bytes in a"
                " frame (SCHEDULER_FRAME_BYTES). Place large values on the workers with"
                " client.scatter(...) and pass the futures instead")
        self._request_seq += 1
        rid = self._request_seq
        fut = self.loop.create_future()
        self._requests[rid] = fut
        self._send({"op": "request", "id": rid, "kind": kind, "args": args})
        reply = await fut
        if "error" in reply:
            if reply.get("kind") == "ValueError":  # the caller's mistake (a bad argument)
                raise ValueError(reply["error"])
            raise RemoteProtocolError(reply["error"])
        return reply.get("result")

    # ------------------------------------------------------------------ close

    def close(self, timeout=None):
        """Release every future and disconnect; closes a LocalCluster the client started."""
        if self.asynchronous:
            return self._close()
        if self._loop_thread is None:
            return None
        if self.loop is not None and self.loop.is_running() and self.status != "closed":
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(30)
        self._loop_thread.stop()
        self._loop_thread = None
        pool = self._callbacks
        if pool is not None:  # wait for a running callback, unless this is it closing us
            pool.shutdown(wait=not threading.current_thread().name.startswith(
                "zfabric-callbacks"))
        return None

    async def _close(self) -> None:
        if self.status in ("closing", "closed"):
            return
        self.status = "closing"
        _drop_default(self)
        if self._callbacks is not None:
            self._callbacks.shutdown(wait=False)
        if getattr(self, "_link", None) is not None and self.epoch is not None:
            with contextlib.suppress(Exception):
                self._link.send(protocol.encode([{"op": "goodbye"}]))
        if self._writer is not None:
            self._tasks.append(self._writer)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        self._tasks = []
        with self._lock:
            for st in list(self._states.values()):
                if not st.done():
                    st.cancel()
        for fut in self._requests.values():
            if not fut.done():
                fut.set_exception(ClosedError("the client was closed"))
        if getattr(self, "data", None) is not None:
            self.data.close()
        actor = sys.modules.get("zfabric.actor")
        if actor is not None:  # the helper thread of asynchronous actor calls
            await asyncio.to_thread(actor.close_async_calls)
        if getattr(self, "_link", None) is not None:
            self._link.close(linger=self.config.LINGER_MS)
        if self._own_cluster and self.cluster is not None:
            await self.cluster.close()
        self.status = "closed"
        if self._is_default:
            dask_scheduler.closed()

    def __del__(self):
        if self.status == "running" and not self.asynchronous and self._loop_thread is not None:
            with contextlib.suppress(Exception):
                self.close()


async def _noop():
    return None


def _done_awaitable():
    return _noop()



def _read_scheduler_file(path, timeout_s: float) -> str:
    """The address in a scheduler file, waiting up to ``timeout_s`` for the file to appear."""
    path = os.fspath(path)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with open(path) as f:
                return json.load(f)["address"]
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise FileNotFoundError(f"no scheduler file at {path} after {timeout_s:g} s;"
                                        " start the scheduler with --scheduler-file") from None
            time.sleep(0.05)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path} is not a scheduler file (JSON with an 'address'):"
                             f" {exc}") from None

