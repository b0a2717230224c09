"""The life cycle every zfabric server and client shares, as in dask.distributed.

``obj = await Thing()`` starts it; ``async with Thing() as obj`` starts and closes it;
``await obj.finished()`` returns once it has closed (by ``close()`` or a remote request);
``close()`` may be called any number of times.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import enum
import threading
import weakref

from .errors import ClosedError


class Status(enum.StrEnum):
    """dask.distributed's status names. zfabric's objects keep their ``status`` as plain
    strings; each member equals its string (``cluster.status == Status.running``)."""

    undefined = "undefined"
    created = "created"
    init = "init"
    starting = "starting"
    running = "running"
    paused = "paused"
    stopping = "stopping"
    stopped = "stopped"
    closing = "closing"
    closing_gracefully = "closing_gracefully"
    closed = "closed"
    failed = "failed"
    dont_reply = "dont_reply"


class LifeCycle:
    """Start once, close once, and let anyone wait for the end."""

    _start_task: asyncio.Future | None = None
    _close_task: asyncio.Future | None = None
    _finished_event: asyncio.Event | None = None
    status = "created"

    async def start(self):  # pragma: no cover - each subclass defines it
        raise NotImplementedError

    async def _close(self) -> None:  # pragma: no cover
        raise NotImplementedError

    def __await__(self):
        return self._start_once().__await__()

    async def _start_once(self):
        if self._finished_event is None:
            self._finished_event = asyncio.Event()
        if self._start_task is None:
            self._start_task = asyncio.ensure_future(self._start_and_mark())
        await asyncio.shield(self._start_task)
        return self

    async def _start_and_mark(self) -> None:
        self.status = "starting"
        try:
            await self.start()
        except BaseException:
            self.status = "failed"
            await self._close()
            if self._finished_event is not None:
                self._finished_event.set()
            raise
        if self.status == "starting":
            self.status = "running"

    async def __aenter__(self):
        return await self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop and release everything; safe to call again."""
        if self._close_task is None:
            self._close_task = asyncio.ensure_future(self._close_and_mark())
        await asyncio.shield(self._close_task)

    async def _close_and_mark(self) -> None:
        self.status = "closing"
        try:
            await self._close()
        finally:
            self.status = "closed"
            if self._finished_event is None:
                self._finished_event = asyncio.Event()
            self._finished_event.set()

    async def finished(self) -> None:
        """Return once this object has closed."""
        if self._finished_event is None:
            self._finished_event = asyncio.Event()
        await self._finished_event.wait()


def call_from_thread(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    """Run ``fn(*args)`` on ``loop`` from another thread; quietly skip a closed loop."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass


class LoopThread:
    """An event loop in a daemon thread, for the blocking forms of Client and LocalCluster."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), name=name,
                                       daemon=True)
        self.thread.start()
        started.wait()

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(started.set)
        self.loop.run_forever()

    def run(self, coro, timeout: float | None = None):
        """Run ``coro`` on the loop and wait for its result (from another thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.loop.is_running():
            self.loop.close()


#: Blocking objects (``asynchronous=False``) running a loop thread of their own: closed in order
#: at exit when a script never closed them.
_blocking: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_forgotten() -> None:
    for obj in list(_blocking):
        with contextlib.suppress(Exception):
            obj.close(timeout=obj.exit_timeout_s)


class BlockingLifeCycle(LifeCycle):
    """A :class:`LifeCycle` used either with ``await``/``async with`` (``asynchronous=True``)
    or blocking, on a :class:`LoopThread` of its own: the cluster managers' shared surface.
    A subclass sets ``asynchronous`` and, when blocking, starts with :meth:`_start_blocking`."""

    asynchronous: bool = False
    _loop_thread: LoopThread | None = None
    #: How long a blocking close waits, and one at the interpreter's exit.
    close_timeout_s: float = 60.0
    exit_timeout_s: float = 10.0

    def _start_blocking(self, timeout: float | None, name: str = "zfabric-cluster-loop") -> None:
        """Start on a loop thread of its own and wait (blocking use)."""
        self._loop_thread = LoopThread(name)
        self.loop = self._loop_thread.loop
        try:
            self._loop_thread.run(self._start_once(), timeout)
        except BaseException:
            self._stop_loop_thread()
            raise
        _blocking.add(self)

    def close(self, timeout: float | None = None):
        """Stop everything it started. Awaitable when ``asynchronous=True``."""
        if self.asynchronous:
            return LifeCycle.close(self)
        _blocking.discard(self)
        if self._loop_thread is None:
            return None
        try:
            self._loop_thread.run(LifeCycle.close(self), timeout or self.close_timeout_s)
        finally:
            self._stop_loop_thread()
        return None

    def _stop_loop_thread(self) -> None:
        if self._loop_thread is not None:
            self._loop_thread.stop()
            self._loop_thread = None

    def __await__(self):
        if not self.asynchronous:
            raise TypeError(f"await needs {type(self).__name__}(asynchronous=True)")
        return self._start_once().__await__()

    def __enter__(self):
        if self.asynchronous:
            raise TypeError(f"use `async with` for {type(self).__name__}(asynchronous=True)")
        if self.status == "closed":
            raise ClosedError(f"this {type(self).__name__} is closed; create a new one")
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "_loop_thread", None) is not None and self.status == "running":
            with contextlib.suppress(Exception):
                self.close(timeout=10)
