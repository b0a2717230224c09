"""Running tasks: a pool of threads that take calls and leave finished outcomes.

The worker's loop thread puts every ready task on one queue; the threads take the next call
as soon as they are free, so a stream of tiny tasks never waits for the loop between tasks.
A thread notes each start in ``started``, runs the function, pickles the result, appends the
outcome to ``done`` and, when ``done`` was empty, pokes the loop through an eventfd that the
loop polls beside its sockets (one system call; no ZeroMQ socket per thread); the loop drains
everything at once.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass

from .. import serialize
from ..errors import ResultTooLarge

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Outcome:
    """What became of one task."""

    key: str
    ok: bool
    value: object = None
    header: bytes | None = None
    buffers: list | None = None
    nbytes: int = 0
    duration: float = 0.0
    error: tuple | None = None  # (exception bytes, traceback bytes, text, kind)
    thread: int = 0
    start: float = 0.0  # wall clock (time.time()) when it started, for the task stream
    stop: float = 0.0  # wall clock when its result was ready (pickled) or it failed


class Executor:
    """``nthreads`` threads running ``(key, payload, values, options)`` calls."""

    def __init__(self, wake_fd: int, nthreads: int, *,
                 inline_bytes: int, max_bytes: int, name: str = "worker"):
        self.wake_fd = wake_fd
        self._wake_lock = threading.Lock()  # no poke once close_wake() closed the descriptor
        self.inline_bytes = inline_bytes
        self.max_bytes = max_bytes
        self.calls: queue.SimpleQueue = queue.SimpleQueue()
        self.done: deque[Outcome] = deque()
        self.started: deque[str] = deque()
        self.cancelled: set[str] = set()
        self.running: dict[int, tuple[str, float]] = {}  # thread id -> (key, start time)
        self.threads: list[threading.Thread] = []
        self.name = name
        self._stopping = False
        for i in range(nthreads):
            self._spawn(i)

    def _spawn(self, i: int) -> None:
        t = threading.Thread(target=self._run, name=f"zfabric-{self.name}-task-{i}", daemon=True)
        t.start()
        self.threads.append(t)

    @property
    def nthreads(self) -> int:
        return len(self.threads)

    def replace_thread(self, ident: int) -> None:
        """A thread is stuck in a task that timed out: abandon it and start a fresh one."""
        self.running.pop(ident, None)
        for t in self.threads:
            if t.ident == ident:
                self.threads.remove(t)
                break
        self._spawn(len(self.threads) + 1000)

    def submit(self, key: str, func, args: bytes, values: dict) -> None:
        """Run ``func`` on the pickled ``args`` (dependencies resolved from ``values``).
        ``func`` may be the exception that explains why the function could not be loaded."""
        self.calls.put((key, func, args, values))

    def stop(self) -> None:
        self._stopping = True
        for _ in self.threads:
            self.calls.put(None)

    def _run(self) -> None:
        me = threading.get_ident()
        while True:
            call = self.calls.get()
            if call is None or self._stopping:
                return
            # In a call of its own, so that nothing of the task (its arguments, a borrowed
            # dependency, the result) stays referenced while this thread waits for the next.
            if not self._one(call, me):
                return
            call = None

    def _one(self, call: tuple, me: int) -> bool:
        """Run one call and leave its outcome; False when this thread was abandoned."""
        key, func, payload, values = call
        if key in self.cancelled:
            self.cancelled.discard(key)
            outcome = Outcome(key, False, error=None)
        else:
            self.running[me] = (key, time.monotonic())
            self.started.append(key)
            wall = time.time()
            outcome = self._execute(key, func, payload, values)
            outcome.thread = me
            outcome.start = wall
            outcome.stop = time.time()
            if self.running.pop(me, None) is None:
                return False  # abandoned after a timeout: nobody wants this outcome
        done = self.done
        done.append(outcome)
        if len(done) == 1:
            with self._wake_lock:
                if self.wake_fd >= 0:
                    os.eventfd_write(self.wake_fd, 1)
        return True

    def close_wake(self) -> None:
        """Close the wake-up descriptor (threads abandoned after a timeout may still end)."""
        with self._wake_lock:
            if self.wake_fd >= 0:
                os.close(self.wake_fd)
                self.wake_fd = -1

    def _execute(self, key: str, func, payload: bytes, values: dict) -> Outcome:
        start = time.perf_counter()
        try:
            if func is None:  # a whole-call payload
                func, args, kwargs = serialize.loads_task(payload, values)
            elif isinstance(func, BaseException):
                raise func
            else:
                args, kwargs = serialize.loads_args(payload, values)
            result = func(*args, **kwargs)
        except BaseException as exc:  # the task's failure is data, not ours
            data, tb, text = serialize.exception_payload(_strip(exc))
            return Outcome(key, False, error=(data, tb, text, None),
                           duration=time.perf_counter() - start)
        duration = time.perf_counter() - start
        try:
            header, buffers = serialize.dumps_value(result, self.inline_bytes)
        except Exception as exc:
            data, tb, text = serialize.exception_payload(exc)
            return Outcome(key, False, error=(data, tb, text, None), duration=duration)
        size = serialize.nbytes(header, buffers)
        if size > self.max_bytes:
            err = ResultTooLarge(
                f"the result of {key!r} is {size:,} bytes, larger than the message limit of"
                f" {self.max_bytes:,} bytes (MAX_MESSAGE_BYTES); return a smaller value or"
                " raise the limit"
            )
            data, tb, text = serialize.exception_payload(err)
            return Outcome(key, False, error=(data, tb, text, None), duration=duration)
        return Outcome(key, True, result, header, buffers, size, duration)


def _strip(exc: BaseException) -> BaseException:
    """Drop the worker's own frames (the call into the task) from the traceback."""
    tb = exc.__traceback__
    if tb is not None and tb.tb_next is not None:
        exc.__traceback__ = tb.tb_next
    return exc
