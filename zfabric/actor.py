"""Actors: an object that lives on one worker, whose methods callers run there.

``client.submit(Counter, actor=True)`` runs a task that builds the object on a worker and
keeps it there (:mod:`zfabric.worker.actors`); its Future's result is an :class:`Actor`, a proxy.
Calling a method returns an :class:`ActorFuture` at once; reading an attribute returns its value.
Calls go straight from the caller to the worker's data port on a socket of the calling thread
(no scheduler, no event loop on the way), and the worker runs the calls to its actors one at a
time, in the order they arrive. An actor whose worker died raises :class:`ActorLost` on the
next call. With an asynchronous client (a running event loop in the calling thread) method
calls and attribute reads are awaitables, sent in order by one helper thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import threading
import time
from typing import Any, cast

import zmq

from . import _zmq, current, protocol, serialize
from .config import DEFAULT
from .errors import ActorLost, RemoteProtocolError
from .futures import Future
from .keys import from_wire

__all__ = ["Actor", "ActorFuture", "BaseActorFuture"]

#: How long a caller waits for a connection to an actor's worker before giving up.
CONNECT_TIMEOUT_S = 10.0
#: How often a waiting caller checks that the worker is still connected.
LIVENESS_CHECK_MS = 200

_POLLOUT = int(zmq.POLLOUT)
_EVENTS = int(zmq.EVENTS)


def create(cls, *args, **kwargs):
    """The task behind ``submit(cls, actor=True)``: build the object, keep it on this worker."""
    key, executor = current.current_task()
    worker = executor.context if executor is not None else None
    loop = getattr(worker, "_core", None) or worker
    if loop is None or not hasattr(loop, "actors"):
        raise RuntimeError("actors are created by client.submit(cls, actor=True) on a worker")
    obj = cls(*args, **kwargs)
    loop.actors.register(key, obj)
    return Actor(cls, loop.address, key, worker=loop.identity.decode())


# ---------------------------------------------------------------------------- the link


class _Link:
    """One DEALER from this thread to one worker's data port, and the answers that came."""

    def __init__(self, address: str, security=None):
        self.address = address
        sock: zmq.Socket = zmq.Context.instance().socket(zmq.DEALER)
        self.sock = sock
        _zmq._common(sock, 0, DEFAULT.HWM_MESSAGES)
        if security is not None:  # a worker's data port: CURVE, as a client
            security.client_socket(sock, "client", "worker", _zmq.normalize_address(address))
        # before connect: POLLOUT then means "the worker is connected", and nothing is
        # queued for a worker that is gone
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.connect(_zmq.normalize_address(address))
        self.ids = itertools.count(1)
        self.answers: dict[int, tuple[dict, list]] = {}
        self.connected = False

    def send(self, op: dict, frames=()) -> int:
        rid = op["id"] = next(self.ids)
        if not self.connected:
            if not self.sock.poll(int(CONNECT_TIMEOUT_S * 1000), zmq.POLLOUT):
                raise ActorLost(f"cannot reach the actor's worker at {self.address} (it died or"
                                " left); create the actor again")
            self.connected = True
        message = protocol.encode([op], frames)
        notice = protocol.announcement(message)
        try:
            if notice is not None:  # a large message is announced (zfabric/intake.py)
                self.sock.send_multipart(notice, zmq.NOBLOCK)
            self.sock.send_multipart(message, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            raise ActorLost(f"the actor's worker at {self.address} is gone; create the actor"
                            " again") from None
        return rid

    def wait(self, rid: int, timeout: float | None, key: str = "",
             worker: str = "") -> tuple[dict, list]:
        """The answer to call ``rid``. While it is slow to come, the worker is asked (from
        its loop thread, not the busy actor thread) whether it still holds actor ``key``: a
        worker that died, or a new process at its address, raises ActorLost."""
        deadline = None if timeout is None else time.monotonic() + timeout
        sock = self.sock
        pings: set[int] = set()  # a ping sent just before a reconnection is lost: send more
        while rid not in self.answers:
            left = LIVENESS_CHECK_MS if deadline is None else min(
                LIVENESS_CHECK_MS, max(0, int((deadline - time.monotonic()) * 1000)))
            if sock.poll(left, zmq.POLLIN):
                while cast(int, sock.getsockopt(_EVENTS)) & zmq.POLLIN:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    ops, bufs = protocol.decode([frames[0].bytes, *frames[1:]])
                    for op in ops:
                        if op["op"] == "error":
                            raise RemoteProtocolError(f"actor call refused by {self.address}:"
                                                      f" {op.get('message')}")
                        self.answers[op["id"]] = (op, bufs)
                for answered in [p for p in pings if p in self.answers]:
                    pings.discard(answered)
                    op, _ = self.answers.pop(answered)
                    if not op.get("alive"):
                        raise ActorLost(f"actor {key!r} is no longer at {self.address} (its"
                                        " worker restarted or released it); its state is"
                                        " lost: create the actor again")
                continue
            if not cast(int, sock.getsockopt(_EVENTS)) & _POLLOUT:
                self.connected = False
                raise ActorLost(f"the actor's worker at {self.address} died before answering;"
                                " its state is lost: create the actor again")
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"no answer from the actor at {self.address} within"
                                   f" {timeout:g} s")
            if key and len(pings) < 50:
                pings.add(self.send({"op": "actor-ping", "key": key, "worker": worker}))
        return self.answers.pop(rid)


_local = threading.local()


def _link(address: str, security) -> _Link:
    """This thread's link to ``address`` with ``security``'s keys (None: no CURVE)."""
    links = getattr(_local, "links", None)
    if links is None:
        links = _local.links = {}
    # by the keys themselves: a Security object may go and another take its id
    which = (address, None if security is None else
             (security.pair("client")[0], security.publics.get("worker")))
    link = links.get(which)
    if link is None:
        link = links[which] = _Link(address, security)
    return link


def _value(answer: tuple[dict, list]):
    op, bufs = answer
    if "error" in op:
        data, tb, text = op["error"]
        raise serialize.rebuild_exception(data, tb, text)
    return serialize.loads_value(op["value"], [b.buffer if hasattr(b, "buffer") else b
                                               for b in bufs])


#: One thread sends and waits for the calls of asynchronous callers, so they stay in order.
_async_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    global _async_pool
    with _pool_lock:
        if _async_pool is None:
            _async_pool = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="zfabric-actor-calls")
        return _async_pool


def close_async_calls() -> None:
    """Stop the helper thread of asynchronous callers and close its sockets (a client
    closing; the next asynchronous call starts them again)."""
    global _async_pool
    with _pool_lock:
        pool, _async_pool = _async_pool, None
    if pool is not None:  # not waiting: a call still running on a live actor may be long
        pool.submit(close_links)
        pool.shutdown(wait=False)


def close_links() -> None:
    """Close the calling thread's sockets to actors' workers."""
    for link in (getattr(_local, "links", None) or {}).values():
        link.sock.close(linger=0)
    _local.links = {}


# ---------------------------------------------------------------------------- proxies


class BaseActorFuture:
    """The result of an actor method call (dask.distributed's name)."""


class ActorFuture(BaseActorFuture):
    """A call sent to an actor: ``result(timeout=None)`` waits for its value (or raises the
    method's exception); ``await`` works too."""

    __slots__ = ("_done", "_key", "_link", "_rid", "_value", "_worker")

    def __init__(self, link: _Link, rid: int, key: str = "", worker: str = ""):
        self._link, self._rid, self._key, self._worker = link, rid, key, worker
        self._done = False
        self._value = None

    def result(self, timeout=None):
        if not self._done:
            answer = self._link.wait(self._rid, timeout, self._key, self._worker)
            self._done = True
            try:
                self._value = ("ok", _value(answer))
            except BaseException as exc:
                self._value = ("err", exc)
        kind, value = self._value
        if kind == "err":
            raise value
        return value

    def done(self) -> bool:
        return self._done or self._rid in self._link.answers

    def __await__(self):
        return asyncio.get_running_loop().run_in_executor(_pool(), self.result).__await__()

    def __repr__(self) -> str:
        return f"<ActorFuture {'done' if self.done() else 'pending'}>"


class _AsyncActorFuture(BaseActorFuture):
    """An actor call of an asynchronous caller: await it."""

    def __init__(self, fut: asyncio.Future):
        self._fut = fut

    def __await__(self):
        return self._fut.__await__()

    async def result(self, timeout=None):
        return await asyncio.wait_for(asyncio.shield(self._fut), timeout)

    def done(self) -> bool:
        return self._fut.done()


def _rebuild(cls, address: str, key: str, worker: str = "") -> Actor:
    """An Actor arriving in a process: it holds a Future of its key, through this process's
    client (inside a task, its worker's), so that the actor lives while the proxy does."""
    try:
        future = Future(from_wire(key), current.client())
    except ValueError:  # no client here: the proxy works, but does not keep the actor
        future = None
    return Actor(cls, address, key, future, worker)


def _in_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


class Actor:
    """A proxy for an object on a worker (see the module docstring)."""

    def __init__(self, cls, address: str, key: str, future=None, worker: str = ""):
        self._cls = cls
        self._address = address
        self._key = key
        self._worker = worker  # the worker process's id: a new process at the address is not it
        self._future = future  # keeps the actor alive (its key) while this proxy lives

    def __reduce__(self):
        return (_rebuild, (self._cls, self._address, self._key, self._worker))

    def __repr__(self) -> str:
        return f"<Actor: {self._cls.__name__}, key={self._key}>"

    @property
    def key(self) -> str:
        return self._key

    def __dir__(self):
        return sorted(set(dir(type(self))) | {n for n in dir(self._cls) if not n.startswith("_")})

    def _send(self, name: str, args: tuple | None, kwargs: dict | None, attr: bool):
        op: dict[str, Any] = {"op": "actor-call", "key": self._key, "name": name,
                              "worker": self._worker}
        if attr:
            op["attr"] = True
        elif args or kwargs:
            header, _ = serialize.dumps_value((args, kwargs), inline_bytes=1 << 62)
            op["args"] = header
        link = _link(self._address, self._security())
        return ActorFuture(link, link.send(op), self._key, self._worker)

    def _security(self):
        """The keys to call with: those of the client the handle came from, else those of
        this process's worker or client (a handle that travelled into a task)."""
        client = getattr(self._future, "client", None)
        if client is not None:
            return client.security
        return current.process_keys()

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        member = getattr(self._cls, name, None)
        if callable(member) and not isinstance(member, type):
            def call(*args, **kwargs):
                if _in_loop():
                    return self._async(name, args, kwargs, attr=False)
                return self._send(name, args, kwargs, attr=False)

            call.__name__ = name
            return call
        if _in_loop():
            return self._async(name, None, None, attr=True)
        return self._send(name, None, None, attr=True).result()

    def _async(self, name, args, kwargs, attr):
        def run():
            return self._send(name, args, kwargs, attr).result()

        return _AsyncActorFuture(asyncio.get_running_loop().run_in_executor(_pool(), run))
