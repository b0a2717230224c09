"""Futures and the functions that wait on many of them: ``wait``, ``as_completed``,
``fire_and_forget``.

A :class:`Future` is a handle on a key. Every Future for the same key in one client shares one
:class:`FutureState`, which the client's loop thread updates as the scheduler reports. The client
counts live Futures per key; when the last one goes (``release()`` or garbage collection), the
client tells the scheduler, which forgets the key once nothing else needs it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque, namedtuple
from collections.abc import Iterable

from . import current, errors, serialize
from .config import parse_timedelta
from .errors import TaskCancelled, ZFabricError
from .keys import from_wire, readable, to_wire
from .reprs import render_future

__all__ = ["DoneAndNotDoneFutures", "Future", "FutureState", "as_completed", "fire_and_forget",
           "futures_of", "wait"]

#: What :func:`wait` returns, as in ``concurrent.futures``: ``.done`` and ``.not_done`` sets.
DoneAndNotDoneFutures = namedtuple("DoneAndNotDoneFutures", ["done", "not_done"])


class FutureState:
    """What one client knows about one key. Changed only on the client's loop thread."""

    # Memory matters (a client may hold millions): every slot costs up to 16 bytes a state.
    __slots__ = ("_error", "callbacks", "error_item", "key", "nbytes", "status", "value",
                 "waiters", "who_has", "window")

    def __init__(self, key: str):
        self.key = key
        self.status = "pending"
        self.value: bytes | None = None  # inline pickle, when the result is small
        self.who_has: list[str] | None = None
        self.nbytes = 0
        self.error_item: list | None = None
        self._error: BaseException | None = None
        self.waiters: list[asyncio.Future] | None = None
        self.callbacks: list | None = None
        self.window = None  # the client's submit window: True in flight, or the held call

    def done(self) -> bool:
        return self.status in ("finished", "error", "cancelled")

    def finish(self, value: bytes | None, who_has: list | None, nbytes: int) -> None:
        self.status = "finished"
        self.value, self.who_has, self.nbytes = value, who_has, nbytes
        self._wake()

    def fail(self, item: list | None, error: BaseException | None = None) -> None:
        self.status = "error"
        self.error_item, self._error = item, error
        self._wake()

    def cancel(self, reason: str | None = None, force: bool = False) -> None:
        """Cancelled (``force``: even when it had finished, as after a restart)."""
        if self.status == "cancelled" or (not force and self.status in ("finished", "error")):
            return
        self.status = "cancelled"
        self.value = self.who_has = None
        # the reason rides in _error (no slot of its own: see __slots__)
        self._error = self._cancelled(reason) if reason else None
        self._wake()

    def cancelled_error(self) -> TaskCancelled:
        if isinstance(self._error, TaskCancelled):
            return self._error
        return self._cancelled(None)

    def _cancelled(self, reason: str | None) -> TaskCancelled:
        why = f": {reason}" if reason else ""
        return TaskCancelled(f"{from_wire(self.key)!r} was cancelled{why}")

    def retry(self) -> None:
        """The erred task runs again: pending."""
        if self.status == "error":
            self.status = "pending"
            self.error_item = self._error = None

    def reset(self) -> None:
        """The value was lost and will be recomputed: pending again."""
        if self.status == "finished":
            self.status = "pending"
            self.value = self.who_has = None

    def exception(self) -> BaseException:
        if self._error is None and self.error_item is not None:
            _, exc, tb, text, kind, extra = (self.error_item + [None] * 6)[:6]
            self._error = rebuild_error(exc, tb, text, kind, extra)
        if self._error is None:
            self._error = ZFabricError(f"{from_wire(self.key)!r} failed")
        return self._error

    def _wake(self) -> None:
        waiters, self.waiters = self.waiters, None
        for w in waiters or ():
            if not w.done():
                w.set_result(None)
        callbacks, self.callbacks = self.callbacks, None
        for cb in callbacks or ():
            cb()

    async def wait(self) -> None:
        if self.done():
            return
        w = asyncio.get_running_loop().create_future()
        if self.waiters is None:
            self.waiters = [w]
        else:
            self.waiters.append(w)
        await w


def _off_loop(client) -> bool:
    """Whether the calling thread is not the blocking client's loop thread."""
    lt = getattr(client, "_loop_thread", None)
    return lt is not None and threading.current_thread() is not lt.thread


def rebuild_error(exc, tb, text, kind, extra) -> BaseException:
    """A task's error as the caller sees it: the task's own exception, or one of ours."""
    if text:
        text = readable(text)
    if exc is None and kind:
        cls = getattr(errors, kind, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            if cls is errors.KilledWorker and extra:
                return cls(text, extra.get("task", ""), extra.get("last_worker", ""),
                           extra.get("count", 0))
            return cls(text)
    return serialize.rebuild_exception(exc, tb, text)


class Future(serialize.KeyHandle):
    """A remote computation's result, as in dask.distributed and concurrent.futures.

    In an asynchronous client, ``await future`` gives the result, and ``result()``,
    ``exception()`` and ``traceback()`` return awaitables; in a blocking client they block.
    """

    # ``key`` is the user's key (a str, int or tuple, as given); ``_wkey`` its wire form
    # (zfabric.keys), which the scheduler, the workers and the client's records use.
    __slots__ = ("__weakref__", "_released", "_state", "_type", "_wkey", "client", "key")

    #: dask treats objects with this flag as references to remote data (``delayed(f)(future)``
    #: and persisted collections' graphs), without zfabric importing dask.
    __dask_future__ = True

    def __init__(self, key, client=None, state: FutureState | None = None, inform=True):
        if client is None:
            client = current.default_client()
        self.key = key
        wkey = state.key if state is not None else to_wire(key)
        self._wkey = wkey
        self.client = client
        self._released = False
        self._type: type | None = None
        self._state = state if state is not None else client.core.get_state(wkey, want=inform)
        client.core.inc_ref(wkey)

    def __repr__(self) -> str:
        return f"<Future: {self.status}, key: {self.key}>"

    # Futures compare (and hash) by identity, as dask.distributed's: two Futures of one key
    # are two handles (each counts for the key) and both stay in a set.

    def _repr_html_(self) -> str:
        return render_future(self)

    @property
    def executor(self):
        """The client this future belongs to (dask's name for it)."""
        return self.client

    @property
    def type(self) -> type | None:
        """The type of the result once finished; None before (and in an asynchronous
        client, which cannot ask here without blocking). Asked of the worker holding it,
        once: the value itself does not travel."""
        if self._type is None and self._state.status == "finished" and \
                not self.client.asynchronous:
            self._type = self.client.submit(type, self, pure=True,
                                            key=f"type-of-{self._wkey}").result()
        return self._type

    def bind_client(self, client) -> None:
        """Make this future a handle of ``client`` (for a Future that arrived unpickled
        where another client is the one to use). The old client's hold on the key goes."""
        if client is self.client:
            return
        old, wkey = self.client, self._wkey
        self._state = client.core.get_state(wkey, want=True)
        client.core.inc_ref(wkey)
        self.client = client
        if not self._released:
            try:
                old.core.dec_ref(wkey)
            except Exception:
                pass
        self._released = False

    @property
    def status(self) -> str:
        return self._state.status if self._state.status != "lost" else "pending"

    def done(self) -> bool:
        return self._state.done()

    def cancelled(self) -> bool:
        return self._state.status == "cancelled"

    def __await__(self):
        return self.client.values.result(self).__await__()

    def result(self, timeout: float | None = None):
        client = self.client
        if timeout is None and not client.asynchronous and _off_loop(client):
            # A blocking caller waits on the state itself, and a small value is unpickled on
            # its own thread: no coroutine on the client's loop and no hop back (a round trip
            # is a few hundred microseconds; those hops were a good part of it).
            st = self._state
            if not st.done():
                done = threading.Event()
                with client.core.lock:  # (the loop changes states under it)
                    if st.callbacks is None:
                        st.callbacks = [done.set]
                    else:
                        st.callbacks.append(done.set)
                # (finished before the callback was in: the status says so already)
                while not st.done() and not done.wait(1.0):
                    if client.status in ("closing", "closed"):
                        break
            if st.status == "finished" and st.value is not None:
                with client.as_current():
                    return serialize.loads_value(st.value)
        return client.sync(client.values.result, self, timeout=timeout)

    def exception(self, timeout: float | None = None):
        return self.client.sync(self.client.values.exception, self, timeout=timeout)

    def traceback(self, timeout: float | None = None):
        return self.client.sync(self.client.values.traceback, self, timeout=timeout)

    def cancel(self, **kwargs):
        return self.client.cancel([self], **kwargs)

    def add_done_callback(self, fn) -> None:
        """Call ``fn(future)`` once the future is done.

        Callbacks run one at a time on a thread of the client's own (never its I/O loop), so
        ``fn`` may call ``future.result()``, and a slow one holds up no other future.
        """
        client = self.client

        def call():
            client.core.run_callback(fn, self)

        self._on_done(call)

    def _on_done(self, fn) -> None:
        """Call ``fn()`` on the client's loop thread once done (for zfabric's own waiters)."""
        st = self._state

        def register():
            if st.done():
                fn()
            elif st.callbacks is None:
                st.callbacks = [fn]
            else:
                st.callbacks.append(fn)

        self.client.core.on_loop(register)

    def retry(self, **kwargs):
        """Run this erred future's task again (and its erred dependencies)."""
        return self.client.retry([self], **kwargs)

    def release(self) -> None:
        """Drop this handle; the scheduler forgets the key once no handle needs it."""
        if not self._released:
            self._released = True
            try:
                self.client.core.dec_ref(self._wkey)
            except Exception:
                pass

    def __del__(self):
        self.release()

    def __dask_tokenize__(self):
        # dask names collections by hashing their graphs: a persisted dataframe's graph holds
        # Futures, whose token is their key (as dask.distributed's are)
        return ("zfabric.Future", self._wkey)

    def __reduce__(self):
        collected = serialize.collecting()
        if collected is not None:
            if not serialize.is_direct(self):
                return (_rebuild, (self.key,))
            collected.append(self._wkey)
        return (_unpickle, (self._wkey,))


def _unpickle(wkey: str):
    """A pickled Future arriving: among a task's arguments its dependency's value, elsewhere
    a Future of this process's client (inside a task, its worker's)."""
    values = serialize.task_values()
    if values is not None:
        return serialize.resolve(values, wkey)
    return Future(from_wire(wkey), current.client())


def _rebuild(key):
    """A Future that sat inside another object of a task's arguments: a Future there too,
    bound to this process's client (inside a task, its worker's)."""
    return Future(from_wire(key), current.client())


def _flatten(obj, out: list) -> None:
    if isinstance(obj, Future):
        out.append(obj)
    elif isinstance(obj, list | tuple | set | frozenset):
        for x in obj:
            _flatten(x, out)
    elif isinstance(obj, dict):
        for x in obj.values():
            _flatten(x, out)
    elif hasattr(obj, "__dask_graph__") and not isinstance(obj, type):
        # a dask collection (a persisted one's graph holds Futures)
        graph = obj.__dask_graph__()
        for x in (graph.values() if graph is not None else ()):
            if isinstance(x, Future):
                out.append(x)
            else:  # a task-spec node: a DataNode holding a Future
                value = getattr(x, "value", None)
                if isinstance(value, Future):
                    out.append(value)


def futures_of(obj) -> list[Future]:
    """Every Future inside nested lists, tuples, sets and dicts, and in the graphs of dask
    collections (those that :meth:`Client.persist` returned), each once."""
    out: list[Future] = []
    _flatten(obj, out)
    if len(out) > 1:  # one per key (Futures compare by identity)
        out = list({f._wkey: f for f in reversed(out)}.values())[::-1]
    return out


def _as_futures(obj) -> list[Future]:
    """The Futures of a Future, a (nested) collection of them, or any iterable of them."""
    if isinstance(obj, Future):
        return [obj]
    if hasattr(obj, "__dask_graph__") and not isinstance(obj, type):
        return futures_of(obj)  # a persisted dask collection
    if not isinstance(obj, list | tuple | set | frozenset | dict):
        obj = list(obj)  # a generator, say
    return futures_of(obj)


def _client_of(futures: list[Future]):
    if not futures:
        return current.default_client()
    return futures[0].client


def wait(fs, timeout=None, return_when: str = "ALL_COMPLETED"):
    """Wait until all (or the first of) the futures are done: ``(done, not_done)`` sets, as a
    :data:`DoneAndNotDoneFutures` named tuple. ``timeout``: seconds or a string like "10s".

    Raises ``TimeoutError`` when ``timeout`` seconds pass first. Returns an awaitable when the
    futures belong to an asynchronous client.
    """
    futures = _as_futures(fs)
    if return_when not in ("ALL_COMPLETED", "FIRST_COMPLETED"):
        raise ValueError(
            f"return_when must be ALL_COMPLETED or FIRST_COMPLETED, not {return_when!r}"
        )
    client = _client_of(futures)
    return client.sync(_wait, futures, timeout=parse_timedelta(timeout),
                       return_when=return_when)


async def _wait(futures: list[Future], timeout=None, return_when="ALL_COMPLETED"):
    pending = [f._state for f in futures if not f.done()]
    if pending:
        need = len(pending) if return_when == "ALL_COMPLETED" else 1
        try:
            await asyncio.wait_for(until_done(pending, need), timeout)
        except TimeoutError:
            raise TimeoutError(
                f"{sum(not f.done() for f in futures)} of {len(futures)} futures were not"
                f" done after {timeout} s"
            ) from None
    done = {f for f in futures if f.done()}
    return DoneAndNotDoneFutures(done, {f for f in futures if not f.done()})


async def until_done(states: list[FutureState], need: int | None = None) -> None:
    """Wait until ``need`` of ``states`` (default: all) are done.

    One future and a counter, whatever the number of keys: no task or waiter per key.
    """
    done = asyncio.get_running_loop().create_future()
    left = len(states) if need is None else need

    def one() -> None:
        nonlocal left
        left -= 1
        if left <= 0 and not done.done():
            done.set_result(None)

    for st in states:
        if st.done():
            one()
        elif st.callbacks is None:
            st.callbacks = [one]
        else:
            st.callbacks.append(one)
    if left <= 0 and not done.done():
        done.set_result(None)
    await done


class as_completed:
    """Iterate over futures as they finish: ``for f in as_completed(fs)`` in a blocking
    client, ``async for f in as_completed(fs)`` in an asynchronous one.

    With ``with_results=True`` it yields ``(future, result)`` pairs. A failed future raises,
    unless ``raise_errors=False``: then, as in dask.distributed, its result is the
    ``(type, exception, traceback)`` triple. A cancelled future's result is a
    ``CancelledError`` (it does not raise).
    """

    def __init__(self, futures: Iterable[Future] = (), with_results: bool = False,
                 raise_errors: bool = True, timeout=None):
        self.with_results = with_results
        self.raise_errors = raise_errors
        timeout = parse_timedelta(timeout)
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._timeout = timeout
        self._ready: deque[Future] = deque()
        self._pending = 0
        self._cleared = 0  # bumped by clear(): futures added before it are ignored
        self._cond = threading.Condition()
        self._events: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        for f in _as_futures(futures):
            self.add(f)

    def add(self, future: Future) -> None:
        with self._cond:
            self._pending += 1
            generation = self._cleared
        future._on_done(lambda: self._done(future, generation))

    def has_ready(self) -> bool:
        """Is a finished future waiting to be taken?"""
        with self._cond:
            return bool(self._ready)

    def clear(self) -> None:
        """Forget every future added so far, finished or not."""
        with self._cond:
            self._ready.clear()
            self._pending = 0
            self._cleared += 1
            self._cond.notify_all()

    def next_batch(self, block: bool = True) -> list:
        """Every finished future now (at least one, waiting for it, when ``block``)."""
        if block and not self.has_ready():
            try:
                first = [next(self)]
            except StopIteration:
                return []
        else:
            first = []
        with self._cond:
            batch: list = list(self._ready)
            self._ready = deque()
        if self.with_results:
            batch = [(f, self._value_sync(f)) for f in batch]
        return first + batch

    def batches(self):
        """Iterate over lists of futures as they finish (for many tiny tasks)."""
        while True:
            batch = self.next_batch(block=True)
            if not batch:
                return
            yield batch

    def _time_left(self) -> float | None:
        if self._deadline is None:
            return None
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"as_completed: {self._pending} futures were not done after"
                               f" {self._timeout:g} s")
        return left

    def update(self, futures: Iterable[Future]) -> None:
        for f in futures:
            self.add(f)

    def count(self) -> int:
        with self._cond:
            return self._pending + len(self._ready)

    def is_empty(self) -> bool:
        return self.count() == 0

    def _done(self, future: Future, generation: int = 0) -> None:
        with self._cond:
            if generation != self._cleared:
                return
            self._pending -= 1
            self._ready.append(future)
            self._cond.notify_all()
            events = list(self._events)
        for loop, ev in events:
            loop.call_soon_threadsafe(ev.set)

    def __iter__(self):
        return self

    def __next__(self):
        with self._cond:
            while not self._ready:
                if self._pending == 0:
                    raise StopIteration
                left = self._time_left()
                self._cond.wait(0.1 if left is None else min(0.1, left))
            f = self._ready.popleft()
        if self.with_results:
            return f, self._value_sync(f)
        return f

    def _value_sync(self, f: Future):
        try:
            return f.result()
        except BaseException as exc:
            return self._failed(f, exc)

    def _failed(self, f: Future, exc: BaseException):
        """What a failed future yields with its result (or raise): see the class docstring."""
        if f.cancelled():
            return exc
        if self.raise_errors or not isinstance(exc, Exception):
            raise exc
        return type(exc), exc, exc.__traceback__

    def __aiter__(self):
        return self

    async def __anext__(self):
        loop = asyncio.get_running_loop()
        ev = asyncio.Event()
        with self._cond:
            self._events.append((loop, ev))
        try:
            while True:
                with self._cond:
                    if self._ready:
                        f = self._ready.popleft()
                        break
                    if self._pending == 0:
                        raise StopAsyncIteration
                    ev.clear()
                left = self._time_left()
                try:
                    await asyncio.wait_for(ev.wait(), left)
                except TimeoutError:
                    self._time_left()  # raises with the message
        finally:
            with self._cond:
                self._events.remove((loop, ev))
        if self.with_results:
            try:
                return f, await f.client.values.result(f)
            except Exception as exc:
                return f, self._failed(f, exc)
        return f


def fire_and_forget(obj) -> None:
    """Run these futures' tasks to the end even when no handle for them remains."""
    futures = futures_of(obj) if not isinstance(obj, Future) else [obj]
    by_client: dict = {}
    for f in futures:
        by_client.setdefault(id(f.client), (f.client, []))[1].append(f._wkey)
    for client, keys in by_client.values():
        client.core.send({"op": "want", "keys": keys, "fire_and_forget": True})
