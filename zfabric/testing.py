"""Helpers for testing zfabric and code built on it: an in-process cluster, a raw protocol
peer, and leak checks.

- :func:`cluster` starts a Scheduler and ``nworkers`` Workers in the running event loop and
  yields ``(scheduler, workers)``; on exit it closes them and checks that nothing leaked.
- :func:`gen_cluster` turns ``async def test(c, s, a, b)`` into a test that runs in a fresh
  event loop with a cluster and a client, as dask.distributed's ``gen_cluster`` does.
- :class:`FakePeer` is a raw ZeroMQ DEALER that speaks the wire protocol over a real socket:
  it says hello, sends arbitrary ops or raw frames (malformed on purpose, if you like) and
  receives ops with a timeout. It is how tests play a misbehaving client or worker.
- :class:`check_leaks` fails when zfabric threads or ZeroMQ sockets outlive the block.

>>> async with cluster(nworkers=2) as (s, workers):                    # doctest: +SKIP
...     async with Client(s.address, asynchronous=True) as c:
...         assert await c.submit(lambda x: x + 1, 10) == 11
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence

import zmq
import zmq.asyncio

from . import protocol
from .client import Client
from .config import Config
from .errors import CommTimeoutError
from .scheduler import Scheduler
from .worker import Worker

__all__ = ["FakePeer", "LeakError", "check_leaks", "cluster", "gen_cluster", "open_sockets"]

#: How long threads and sockets may take to go away after the objects closed.
LEAK_GRACE_S = 3.0
#: Prefix of every thread zfabric starts.
THREAD_PREFIX = "zfabric-"


class LeakError(AssertionError):
    """Raised when threads or sockets started inside a :class:`check_leaks` block outlive it."""


# ---------------------------------------------------------------------------- leak checks


def _zfabric_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX) and t.is_alive()}


def open_sockets() -> set:
    """Every ZeroMQ socket still open in this process's shared contexts (sync and asyncio)."""
    out = set()
    for cls in (zmq.Context, zmq.asyncio.Context):
        ctx = cls.__dict__.get("_instance")
        if ctx is None or ctx.closed:
            continue
        for sock in list(getattr(ctx, "_sockets", ()) or ()):
            if not sock.closed:
                out.add(sock)
    return out


class check_leaks:
    """Fail if ``zfabric-*`` threads or ZeroMQ sockets opened inside the block are still alive
    ``grace_s`` seconds after it ends. Usable with ``with`` and ``async with``.
    """

    def __init__(self, grace_s: float = LEAK_GRACE_S):
        self.grace_s = grace_s

    def _snapshot(self) -> None:
        self._threads = _zfabric_threads()
        self._sockets = {id(s) for s in open_sockets()}

    def _leaks(self) -> tuple[list, list]:
        threads = sorted(t.name for t in _zfabric_threads() - self._threads)
        sockets = [s for s in open_sockets() if id(s) not in self._sockets]
        return threads, sockets

    def _report(self, threads, sockets) -> None:
        parts = []
        if threads:
            parts.append(f"threads still running: {threads}")
        if sockets:
            kinds = sorted(zmq.SocketType(s.type).name for s in sockets)
            parts.append(f"{len(sockets)} ZeroMQ sockets still open: {kinds}")
        raise LeakError("; ".join(parts) + f" ({self.grace_s:g} s after close)")

    def __enter__(self):
        self._snapshot()
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:
            return
        deadline = time.monotonic() + self.grace_s
        while not self._clean(deadline):
            time.sleep(0.02)

    async def __aenter__(self):
        return self.__enter__()

    def _clean(self, deadline: float) -> bool:
        """True when nothing leaked; raises once ``deadline`` has passed with leaks left."""
        threads, sockets = self._leaks()
        if not threads and not sockets:
            return True
        if time.monotonic() > deadline:
            self._report(threads, sockets)
        return False

    async def __aexit__(self, exc_type, *exc):
        if exc_type is not None:
            return
        deadline = time.monotonic() + self.grace_s
        while not self._clean(deadline):
            await asyncio.sleep(0.02)


# ---------------------------------------------------------------------------- cluster


@contextlib.asynccontextmanager
async def cluster(
    nworkers: int = 2,
    nthreads: int = 1,
    *,
    scheduler_kwargs: dict | None = None,
    config: Config | None = None,
    leak_check: bool = True,
    **worker_kwargs,
) -> AsyncIterator[tuple]:
    """An in-process Scheduler and ``nworkers`` Workers: ``async with cluster() as (s, ws)``.

    ``worker_kwargs`` go to every Worker (``resources=``, ``memory_limit=``, ...); give
    ``names=[...]`` to name them one by one. On exit every object is closed and, unless
    ``leak_check=False``, no zfabric thread or ZeroMQ socket may outlive them.
    """
    names = worker_kwargs.pop("names", None)
    worker_kwargs.setdefault("memory_limit", 0)
    leaks = check_leaks() if leak_check else contextlib.nullcontext()
    async with leaks:
        s = Scheduler(config=config, **(scheduler_kwargs or {}))
        workers: list = []
        try:
            await s
            workers = [
                Worker(s.address, nthreads=nthreads, config=config,
                       name=names[i] if names else None, **worker_kwargs)
                for i in range(nworkers)
            ]
            await asyncio.gather(*workers)
            yield s, workers
        finally:
            await asyncio.gather(*(w.close() for w in workers), return_exceptions=True)
            await s.close()


def gen_cluster(
    client: bool = True,
    nworkers: int = 2,
    nthreads: int = 1,
    *,
    timeout: float = 30.0,
    config: Config | None = None,
    leak_check: bool = True,
    **worker_kwargs,
):
    """Decorate ``async def test(c, s, a, b, ...)`` to run in a fresh loop with a cluster.

    The test gets the asynchronous Client (when ``client``), the Scheduler and each Worker as
    its first positional arguments; parameters after those are left to pytest (fixtures).
    The whole test is bounded by ``timeout`` seconds.
    """

    def decorate(func):
        if not inspect.iscoroutinefunction(func):
            raise TypeError("gen_cluster decorates async functions")
        sig = inspect.signature(func)
        params = list(sig.parameters.values())
        ours = (1 if client else 0) + 1 + nworkers
        if len(params) < ours:
            raise TypeError(
                f"{func.__name__} must accept {ours} leading arguments"
                f" ({'c, ' if client else ''}s and {nworkers} workers)"
            )

        async def run(**fixtures):
            async with cluster(nworkers, nthreads, config=config, leak_check=leak_check,
                               **worker_kwargs) as (s, workers):
                if not client:
                    return await func(s, *workers, **fixtures)
                async with Client(s.address, asynchronous=True, config=config,
                                  set_as_default=False) as c:
                    return await func(c, s, *workers, **fixtures)

        def test(**fixtures):
            async def bounded():
                limit = asyncio.timeout(timeout)
                try:
                    async with limit:
                        return await run(**fixtures)
                except TimeoutError:
                    if limit.expired():
                        raise TimeoutError(
                            f"{func.__name__} did not finish in {timeout:g} s") from None
                    raise

            return asyncio.run(bounded())

        functools.update_wrapper(test, func)
        del test.__wrapped__  # pytest must see the remaining parameters, not the cluster ones
        test.__signature__ = sig.replace(parameters=params[ours:])
        return test

    return decorate


# ---------------------------------------------------------------------------- raw peer


class FakePeer:
    """A raw DEALER that speaks zfabric's wire protocol over a real socket.

    ``async with FakePeer(s.address) as p: welcome = await p.hello()`` then ``await p.send(op)``,
    ``await p.send_frames([b"garbage"])`` and ``await p.recv()`` / ``await p.expect("error")``.
    Receiving polls before it reads, so a timeout never loses a message.
    """

    def __init__(self, address: str, *, identity: bytes | None = None, role: str = "client"):
        self.address = address
        self.role = role
        self.identity = identity or f"fake-{role}-{uuid.uuid4().hex[:12]}".encode()
        self.received: list[dict] = []  # ops skipped over by expect()
        self._pending: deque[dict] = deque()  # ops of a message read only in part
        self.sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, self.identity)
        self.sock.connect(address)

    async def __aenter__(self) -> FakePeer:
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if not self.sock.closed:
            self.sock.close(linger=0)

    async def send(self, *ops: dict, buffers: Sequence = ()) -> None:
        """Send ops (encoded as the protocol says, but not validated) in one message."""
        await self.sock.send_multipart(protocol.encode(list(ops), buffers))

    async def send_frames(self, frames: Sequence[bytes]) -> None:
        """Send raw frames as they are: the way to send garbage."""
        await self.sock.send_multipart(list(frames))

    async def recv_frames(self, timeout: float = 2.0) -> list[bytes]:
        if not await self.sock.poll(int(timeout * 1000)):  # POLLIN is the default
            raise CommTimeoutError(f"nothing arrived from {self.address} in {timeout:g} s")
        return await self.sock.recv_multipart(zmq.NOBLOCK)

    async def recv(self, timeout: float = 2.0) -> list[dict]:
        """The ops of the next message (checked by the protocol's decoder); ops left over
        from a message that :meth:`expect` or :meth:`hello` read part of come first."""
        if self._pending:
            ops, self._pending = list(self._pending), deque()
            return ops
        ops, _ = protocol.decode(await self.recv_frames(timeout))
        return ops

    async def next_op(self, timeout: float = 2.0) -> dict:
        """The next op, whichever message it came in."""
        while not self._pending:
            self._pending.extend(await self.recv(timeout))
        return self._pending.popleft()

    async def expect(self, name: str, timeout: float = 2.0,
                     skip: Sequence[str] | str = ("heartbeat",)) -> dict:
        """The next op called ``name``. Ops in ``skip`` (``"*"``: all) are dropped on the way;
        any other op is kept in :attr:`received`. Raises CommTimeoutError when ``name`` does
        not come within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise CommTimeoutError("")
                op = await self.next_op(left)
            except CommTimeoutError:
                raise CommTimeoutError(
                    f"no {name!r} op from {self.address} in {timeout:g} s; other ops:"
                    f" {[o.get('op') for o in self.received]}"
                ) from None
            if op["op"] == name:
                return op
            if skip != "*" and op["op"] not in skip:
                self.received.append(op)

    async def hello(self, *, protocol_version: int | None = None, **extra) -> dict:
        """Say hello as :attr:`role` and return the scheduler's answer (``welcome`` or
        ``error``); ops that came with it stay to be received."""
        op = protocol.hello(self.role, self.identity.decode(), **extra)
        if protocol_version is not None:
            op["protocol"] = protocol_version
        await self.send(op)
        while True:
            answer = await self.next_op()
            if answer["op"] in ("welcome", "error"):
                return answer
            self.received.append(answer)


# ---------------------------------------------------------------------------- processes


def process_gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie waiting to be reaped counts as gone)."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids, timeout: float = 5.0) -> list[int]:
    """The pids still alive after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if not process_gone(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.02)


async def until(predicate, timeout: float = 10.0, what: str = "condition",
                interval: float = 0.01) -> float:
    """Wait until ``predicate()`` is true; returns the seconds it took.

    Raises AssertionError naming ``what`` when ``timeout`` seconds pass first.
    """
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what} not met within {timeout} s")
        await asyncio.sleep(interval)
    return time.monotonic() - start
