"""``client.get_executor()``: the standard library's ``concurrent.futures.Executor`` on a cluster.

Code written for ``ThreadPoolExecutor`` / ``ProcessPoolExecutor`` runs unchanged: ``submit``
returns a real :class:`concurrent.futures.Future` (so :func:`concurrent.futures.wait` and
:func:`concurrent.futures.as_completed` accept it), ``map`` yields results in order with the
standard ``timeout=`` and ``chunksize=``, and ``shutdown(wait=, cancel_futures=)`` behaves as the
standard library's does. Each standard future mirrors one zfabric :class:`~zfabric.futures.Future`
(``.zfuture``); cancelling it cancels the task on the cluster.

Results reach the standard futures from the client's loop thread: a small result (carried
inline by the scheduler's notice) is set at once, a large one is fetched by one coroutine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import functools
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator

from . import serialize
from .errors import TaskCancelled

__all__ = ["ClientExecutor"]

#: ``client.submit`` options an executor may fix for all its tasks (as dask.distributed).
SUBMIT_OPTIONS = frozenset({"workers", "resources", "retries", "priority",
                            "allow_other_workers", "pure", "task_timeout", "fifo_timeout"})


class ExecutorFuture(cf.Future):
    """A standard future whose ``cancel()`` also cancels the task on the cluster."""

    def __init__(self, zfuture):
        super().__init__()
        self.zfuture = zfuture

    def cancel(self) -> bool:
        if not _cancel_here(self):
            return False
        self.zfuture.cancel()
        return True

    def add_done_callback(self, fn) -> None:
        """As the standard library's, except that a callback added before the future is done
        runs on the client's callback thread, never on its I/O loop (which sets results)."""
        if self.done():
            super().add_done_callback(fn)
            return
        client = self.zfuture.client
        super().add_done_callback(lambda fut: client.core.run_callback(fn, fut))


def _cancel_here(fut: cf.Future) -> bool:
    """Cancel the standard future only, and wake ``concurrent.futures.wait`` callers (they
    count a future done once it is *notified* cancelled, which an executor does when it would
    have run the call)."""
    if not cf.Future.cancel(fut):
        return False
    fut.set_running_or_notify_cancel()
    return True


class ClientExecutor(cf.Executor):
    """A ``concurrent.futures.Executor`` that runs calls on a zfabric cluster.

    ``submit_options`` (``workers=``, ``resources=``, ``retries=``, ``priority=``, ``pure=``,
    ...) apply to every task. Each ``submit`` is a new call (``pure=False`` unless given), as
    with the standard library's executors.
    """

    def __init__(self, client, **submit_options):
        unknown = set(submit_options) - SUBMIT_OPTIONS
        if unknown:
            raise TypeError(f"get_executor() got unsupported options {sorted(unknown)}; it"
                            f" accepts {sorted(SUBMIT_OPTIONS)}")
        if client.asynchronous:
            raise TypeError("get_executor() needs a blocking Client (asynchronous=False): a"
                            " concurrent.futures.Executor blocks its caller")
        self._client = client
        self._options = {"pure": False, **submit_options}
        self._lock = threading.Lock()
        self._futures: set[ExecutorFuture] = set()
        self._shutdown = False

    def __repr__(self) -> str:
        state = "shut down" if self._shutdown else f"{len(self._futures)} pending"
        return f"<ClientExecutor {self._client.scheduler_address} {state}>"

    def submit(self, fn: Callable, /, *args, **kwargs) -> cf.Future:
        """Schedule ``fn(*args, **kwargs)``; a standard future for its result."""
        # The lock is never held while calling the client: the client's loop thread holds the
        # client's lock when it settles futures, and settling takes this lock (_forget).
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
        call = functools.partial(fn, **kwargs) if kwargs else fn
        zf = self._client.submit(call, *args, **self._options)
        fut = ExecutorFuture(zf)
        with self._lock:
            self._futures.add(fut)
        cf.Future.add_done_callback(fut, self._forget)  # quick: may run on the I/O loop
        mirror(self._client, zf, fut)
        return fut

    def _forget(self, fut: cf.Future) -> None:
        with self._lock:
            self._futures.discard(fut)

    def map(self, fn: Callable, *iterables: Iterable, timeout: float | None = None,
            chunksize: int = 1) -> Iterator:
        """``fn`` over the zipped ``iterables``, in order; every call is submitted first.

        ``timeout`` (seconds from this call) raises ``TimeoutError`` from the iterator when a
        result is not ready in time; ``chunksize`` > 1 runs that many calls per task.
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        end = None if timeout is None else time.monotonic() + timeout
        if chunksize == 1:
            futures = [self.submit(fn, *args) for args in zip(*iterables, strict=False)]
        else:
            chunks = _chunks(zip(*iterables, strict=False), chunksize)
            futures = [self.submit(_run_chunk, fn, chunk) for chunk in chunks]
        return _results(futures, end, flatten=chunksize > 1)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new work; with ``cancel_futures`` cancel what has not finished; with
        ``wait`` block until every submitted call is done."""
        with self._lock:
            self._shutdown = True
            pending = list(self._futures)
        if cancel_futures:
            for fut in pending:
                fut.cancel()
        if wait and pending:
            cf.wait(pending)


def _results(futures: list[cf.Future], end: float | None, flatten: bool):
    """The map iterator: results in order; cancels what is left if it is abandoned."""
    futures.reverse()  # pop from the end, dropping references as results are handed out
    try:
        while futures:
            fut = futures.pop()
            left = None if end is None else end - time.monotonic()
            result = fut.result(left)
            if flatten:
                yield from result
            else:
                yield result
    finally:
        for fut in futures:
            fut.cancel()


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _run_chunk(fn: Callable, chunk: list) -> list:
    return [fn(*args) for args in chunk]


def mirror(client, zf, fut: ExecutorFuture) -> None:
    """Copy ``zf``'s outcome into ``fut`` once it is known (on the client's loop thread)."""
    st = zf._state

    def settle() -> None:
        if fut.done():
            return
        if st.status == "finished" and st.value is None:
            task = asyncio.ensure_future(_fetch(client, zf, fut))
            _fetches.add(task)
            task.add_done_callback(_fetches.discard)
            return
        if st.status == "finished":
            try:
                _set(fut, result=serialize.loads_value(st.value))
            except BaseException as exc:
                _set(fut, exc=exc)
        elif st.status == "cancelled":
            _cancel_here(fut)
        else:
            _set(fut, exc=st.exception())

    zf._on_done(settle)


_fetches: set[asyncio.Task] = set()  # fetches of large results in flight (kept referenced)


async def _fetch(client, zf, fut: ExecutorFuture) -> None:
    try:
        value = await client.values.result(zf)
    except BaseException as exc:
        _set(fut, exc=exc)
    else:
        _set(fut, result=value)


def _set(fut: cf.Future, result=None, exc: BaseException | None = None) -> None:
    if fut.done():  # cancelled meanwhile
        return
    try:
        if exc is not None:
            if isinstance(exc, TaskCancelled):
                _cancel_here(fut)
                return
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    except cf.InvalidStateError:
        pass
