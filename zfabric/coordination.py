"""Shared state between tasks and clients: Lock, Semaphore, Event, Variable and Queue.

Each is a handle on a record the scheduler keeps by name (:mod:`zfabric.scheduler.shared_state`);
two handles with the same name, in any clients or tasks, share one state. A handle pickles by
name: passed to ``submit`` (or inside an argument) it arrives in the task bound to the worker's
client. With a blocking client the methods block; with an asynchronous one they return
awaitables (``await lock.acquire()``, ``async with lock:``).

Values travel as small pickles through the scheduler when they are below the inline limit
(``INLINE_BYTES``), and are scattered to a worker first when larger: the scheduler then holds
only a key, and readers fetch the value from that worker. A Future set into a Variable or put
into a Queue arrives as a Future, and its result stays alive while the record holds it.

Waits are answered by the scheduler when the op that frees them arrives (no polling), or when
their timeout passes: ``Lock.acquire``, ``Semaphore.acquire`` and ``Event.wait`` then return
False, ``Variable.get`` and ``Queue.get``/``put`` raise ``TimeoutError``, as in
dask.distributed.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

from . import current, protocol, serialize
from .config import parse_timedelta
from .errors import ClosedError, LocalProtocolError, RemoteProtocolError, SchedulerLost
from .futures import Future, futures_of
from .keys import from_wire

__all__ = ["Event", "Lock", "Queue", "Semaphore", "Variable"]

#: Errors the scheduler may name in a refusal, as the exceptions users expect.
_ERRORS = {"TimeoutError": TimeoutError, "ValueError": ValueError, "KeyError": KeyError,
           "RuntimeError": RuntimeError}


# ---------------------------------------------------------------------------- plumbing


async def call(client, kind: str, name: str, abandon: dict | None = None, **fields):
    """One ``coord`` op and its reply, on the client's loop. ``abandon``: an op to send if
    the caller stops waiting (cancelled), so that the scheduler drops the wait."""
    core = client.core
    core.check_open()
    if core.epoch is None:
        raise SchedulerLost(f"not connected to the scheduler at {client.scheduler_address}")
    op = {"op": "coord", "id": 0, "kind": kind, "name": name, **fields}
    try:  # here, not at the scheduler's door, which would drop it without an answer
        protocol.check(op)
    except RemoteProtocolError as exc:
        raise LocalProtocolError(f"zfabric built a malformed {kind} op: {exc}") from None
    rid, fut = core.new_request()
    op["id"] = rid
    core.send(op)
    try:
        reply = await fut
    except asyncio.CancelledError:
        core.forget_request(rid)
        if abandon is not None and core.status == "running":
            core.send({"op": "coord", "id": 0, "name": name, **abandon})
        raise
    if "error" in reply:
        cls = _ERRORS.get(reply.get("type"))
        if cls is None:
            raise RemoteProtocolError(reply["error"])
        raise cls(reply["error"])
    return reply.get("result")


def _dumps_collecting(value, inline_bytes: int) -> tuple[bytes, list, list[str]]:
    """Pickle ``value``; the keys of the Futures anywhere inside it are returned too (they
    unpickle as Futures bound to the reader's client)."""
    keys: list[str] = []
    with serialize.collect_keys(keys):
        header, buffers = serialize.dumps_value(value, inline_bytes)
    return header, buffers, list(dict.fromkeys(keys))


async def encode(client, value) -> tuple[list, object]:
    """The wire item for ``value``, and what must stay referenced until the op is answered
    (a Future the item refers to)."""
    if isinstance(value, Future):
        return ["f", value._wkey], value
    limit = client.config.INLINE_BYTES
    header, buffers, keys = _dumps_collecting(value, limit)
    # and those a collection reports (dask collections: futures_of looks into their graphs)
    keys = list(dict.fromkeys([*keys, *(f._wkey for f in futures_of(value))]))
    if not buffers and len(header) < limit:
        return ["v", header, keys], None
    # on the data plane, not through the scheduler
    fut = await client.values.scatter_async(value, hash=False)
    return ["s", fut.key], fut


async def decode(client, item):
    """The value an item stands for, in ``client`` (Futures bind to it)."""
    kind = item[0]
    if kind == "f":
        return Future(from_wire(item[1]), client)
    if kind == "s":
        return await client.values.result(Future(from_wire(item[1]), client))
    with client.as_current():
        return serialize.loads_value(item[1])


def _timeout(timeout) -> float | None:
    t = parse_timedelta(timeout, name="timeout")
    if t is not None and t < 0:
        raise ValueError(f"timeout must be >= 0, got {timeout!r}")
    return t


def _rebuild(cls, name, params):
    obj = cls.__new__(cls)
    obj.name = name
    obj._client = None  # bound on first use: inside a task, to its worker's client
    obj._init(**params)
    return obj


class _Handle:
    """A named record in the scheduler, used through a client."""

    _prefix = "handle"

    def __init__(self, name: str | None = None, client=None):
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a string, got {type(name).__name__}")
        self.name = name or f"{self._prefix}-{uuid.uuid4().hex}"
        if client is None:
            client = current.client()
        self._client = client

    def _init(self) -> None:
        """Set the handle's parameters (also on a handle unpickled by name)."""

    def _params(self) -> dict:
        return {}

    @property
    def client(self):
        if self._client is None:
            self._client = current.client()
        return self._client

    def _sync(self, func, *args, **kwargs):
        return self.client.sync(func, *args, **kwargs)

    def __reduce__(self):
        return (_rebuild, (type(self), self.name, self._params()))

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.name}>"


# ---------------------------------------------------------------------------- semaphores


class Semaphore(_Handle):
    """At most ``max_leases`` holders at a time, across clients and tasks.

    A lease whose holder's client leaves, or whose worker dies, is released at once; one whose
    holder stays silent (no heartbeat) for ``lease_timeout`` (default 30 s; None: never) is
    released too (it must be at least three client heartbeats: 3 s by default).
    ``acquire(timeout=)`` returns False when the time runs out.
    """

    _prefix = "semaphore"

    def __init__(self, max_leases: int = 1, name: str | None = None, *, client=None,
                 lease_timeout="30s"):
        if not isinstance(max_leases, int) or isinstance(max_leases, bool) or max_leases < 1:
            raise ValueError(f"max_leases must be a positive integer, got {max_leases!r}")
        super().__init__(name, client)
        self._init(max_leases=max_leases, lease_timeout=lease_timeout)
        beat = max(self.client.config.HEARTBEAT_INTERVAL_S * 2, 0.2)  # the client's heartbeat
        if self.lease_timeout is not None and self.lease_timeout < 3 * beat:
            raise ValueError(f"lease_timeout must be at least {3 * beat:g} s (three heartbeats"
                             " of the holder's client, which keep its leases), or None")

    def _init(self, max_leases: int = 1, lease_timeout="30s") -> None:
        self.max_leases = max_leases
        self.lease_timeout = _timeout(lease_timeout)
        self._leases: list[str] = []

    def _params(self) -> dict:
        return {"max_leases": self.max_leases, "lease_timeout": self.lease_timeout}

    def acquire(self, timeout=None):
        """Take a lease, waiting up to ``timeout`` (None: for ever); True if taken."""
        return self._sync(self._acquire, _timeout(timeout))

    async def _acquire(self, timeout):
        lease = uuid.uuid4().hex
        got = await call(self.client, "sem-acquire", self.name, max_leases=self.max_leases,
                         lease=lease, timeout=timeout, lease_timeout=self.lease_timeout,
                         abandon={"kind": "abandon", "lease": lease})
        if got:
            self._leases.append(lease)
        return got

    def release(self):
        """Give back the oldest lease this handle holds; False if it had lapsed meanwhile
        (lease timeout). RuntimeError when this handle holds none."""
        if not self._leases:
            raise RuntimeError(f"{type(self).__name__} {self.name!r} released too often: this"
                               " handle holds no lease")
        lease = self._leases.pop(0)
        return self._sync(call, self.client, "sem-release", self.name, lease=lease)

    def get_value(self):
        """How many leases are held now (by anyone)."""
        return self._sync(call, self.client, "sem-value", self.name)

    def close(self):
        """Forget the semaphore in the scheduler; waiters get RuntimeError."""
        return self._sync(call, self.client, "sem-close", self.name)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    async def __aenter__(self):
        await self.acquire()
        return self

    async def __aexit__(self, *exc):
        await self.release()


class Lock(Semaphore):
    """A mutual exclusion lock shared by name (a Semaphore of one lease).

    ``acquire(blocking=True, timeout=None)`` returns True once held, False when
    ``blocking=False`` and it is taken, or when the timeout passes.
    """

    _prefix = "lock"

    def __init__(self, name: str | None = None, *, client=None, lease_timeout="30s"):
        super().__init__(1, name, client=client, lease_timeout=lease_timeout)

    def _params(self) -> dict:
        return {"lease_timeout": self.lease_timeout}

    def _init(self, max_leases: int = 1, lease_timeout="30s") -> None:
        super()._init(1, lease_timeout)

    def acquire(self, blocking: bool = True, timeout=None):  # type: ignore[override]
        # dask.distributed's Lock.acquire(blocking, timeout): not a Semaphore's signature
        if not blocking:
            if timeout is not None:
                raise ValueError("can't specify a timeout for a non-blocking call")
            timeout = 0
        return super().acquire(timeout=timeout)

    def release(self):
        if not self._leases:
            raise RuntimeError(f"Lock {self.name!r} is not acquired by this handle")
        return super().release()

    def locked(self):
        """Whether anyone holds the lock."""
        return self._sync(self._locked)

    async def _locked(self):
        return bool(await call(self.client, "sem-value", self.name))


# ---------------------------------------------------------------------------- events


class Event(_Handle):
    """A flag shared by name: ``set()``, ``clear()``, ``is_set()``, ``wait(timeout)``.

    The scheduler keeps it only while it is set or waited on.
    """

    _prefix = "event"

    def __init__(self, name: str | None = None, client=None):
        super().__init__(name, client)

    def set(self):
        return self._sync(call, self.client, "event-set", self.name)

    def clear(self):
        return self._sync(call, self.client, "event-clear", self.name)

    def is_set(self):
        return self._sync(call, self.client, "event-is-set", self.name)

    def wait(self, timeout=None):
        """Wait until set; True then, False when ``timeout`` passes first."""
        return self._sync(call, self.client, "event-wait", self.name, timeout=_timeout(timeout))


# ---------------------------------------------------------------------------- variables


class Variable(_Handle):
    """A value shared by name; ``get`` waits until one is set.

    A Future set into it is returned as a Future, and its result stays alive until the value
    is replaced or deleted. Lives until ``delete()``.
    """

    _prefix = "variable"

    def __init__(self, name: str | None = None, client=None):
        super().__init__(name, client)

    def set(self, value, timeout=None):
        """Replace the value (``timeout`` bounds the call, a scatter of a large value
        included)."""
        return self._sync(self._set, value, _timeout(timeout))

    async def _set(self, value, timeout=None):
        async with asyncio.timeout(timeout):
            item, keep = await encode(self.client, value)
            await call(self.client, "var-set", self.name, item=item)
        del keep

    def get(self, timeout=None):
        """The value; TimeoutError when none is set within ``timeout``."""
        return self._sync(self._get, _timeout(timeout))

    async def _get(self, timeout):
        item = await call(self.client, "var-get", self.name, timeout=timeout)
        return await decode(self.client, item)

    def delete(self):
        """Drop the value (and what it holds alive)."""
        return self._sync(call, self.client, "var-delete", self.name)


# ---------------------------------------------------------------------------- queues


class Queue(_Handle):
    """A FIFO queue shared by name across clients and tasks; ``maxsize=0`` is unbounded.

    ``get(batch=True)`` takes every item there is now (maybe none) without waiting;
    ``get(batch=n)`` waits for ``n`` items and returns them as a list. The scheduler keeps the
    queue until every client that used it has called ``close()`` or left. A Queue.get that is
    interrupted after the scheduler answered loses the items it was given.
    """

    _prefix = "queue"

    def __init__(self, name: str | None = None, client=None, maxsize: int = 0):
        if not isinstance(maxsize, int) or isinstance(maxsize, bool) or maxsize < 0:
            raise ValueError(f"maxsize must be an integer >= 0, got {maxsize!r}")
        super().__init__(name, client)
        self.maxsize = maxsize

    def _init(self, maxsize: int = 0) -> None:
        self.maxsize = maxsize

    def _params(self) -> dict:
        return {"maxsize": self.maxsize}

    def put(self, value, timeout=None):
        """Append ``value``; TimeoutError when the queue stays full for ``timeout``."""
        return self._sync(self._put, value, _timeout(timeout))

    async def _put(self, value, timeout):
        item, keep = await encode(self.client, value)
        await call(self.client, "queue-put", self.name, maxsize=self.maxsize, item=item,
                   timeout=timeout)
        del keep

    def get(self, timeout=None, batch=False):
        """The oldest item; TimeoutError when there is none within ``timeout``."""
        if not (isinstance(batch, bool) or (isinstance(batch, int) and batch > 0)):
            raise ValueError(f"batch must be True, False or a positive integer, got {batch!r}")
        return self._sync(self._get, _timeout(timeout), batch)

    async def _get(self, timeout, batch):
        out = await call(self.client, "queue-get", self.name, maxsize=self.maxsize,
                         timeout=timeout, batch=batch)
        if batch is False:
            return await decode(self.client, out)
        return [await decode(self.client, item) for item in out]

    def qsize(self):
        return self._sync(call, self.client, "queue-qsize", self.name, maxsize=self.maxsize)

    def close(self):
        """This client stops using the queue (it is forgotten once no client uses it)."""
        with contextlib.suppress(ClosedError):
            return self._sync(call, self.client, "queue-close", self.name)
