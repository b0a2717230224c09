"""Running tasks: a pool of threads that take calls and leave finished outcomes.

The worker's loop thread puts every ready task on one queue; the threads take the next call
as soon as they are free, so a stream of tiny tasks never waits for the loop between tasks.
A thread notes each start in ``started``, runs the function, pickles a small result (a large
one is kept as it is, pickled only if it must travel), appends the outcome to ``done`` and,
when ``done`` was empty, pokes the loop through an eventfd that the loop polls beside its
sockets (one system call; no ZeroMQ socket per thread); the loop drains everything at once.

Concurrency is bounded by ``nthreads`` slots, not by the number of threads: a task that calls
``secede()`` gives its slot back and a spare thread starts, so a task that waits for tasks it
submitted never holds up the queue; ``rejoin()`` waits for a free slot again. Threads beyond
what the slots and the seceded tasks need leave when their task ends.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import queue
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass

from .. import serialize
from ..current import current_task  # noqa: F401  (its home now; was defined here)
from ..current import thread_task as _task  # the task this thread runs (zfabric.current)
from ..errors import ResultTooLarge
from .spill import sizeof, travel_error

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
    #: Set when the value could not be pickled: why it cannot leave this worker. With no
    #: ``header`` and no ``travel_error``, a successful outcome's value is kept unpickled
    #: (``nbytes`` is then an estimate: :func:`~zfabric.worker.spill.sizeof`).
    travel_error: str | None = None


class Executor:
    """``nthreads`` slots running ``(key, payload, values, options)`` calls."""

    def __init__(self, wake_fd: int, nthreads: int, *,
                 inline_bytes: int, max_bytes: int, name: str = "worker", context=None,
                 lazy: bool = True):
        self.wake_fd = wake_fd
        self.lazy = lazy  # keep large results unpickled (see _execute)
        self._wake_lock = threading.Lock()  # no poke once close_wake() closed the descriptor
        self.inline_bytes = inline_bytes
        self.max_bytes = max_bytes
        self.context = context  # what get_worker() gives a running task
        # Calls wait in a heap, by user priority then arrival; each has a token in ``calls``,
        # on which idle threads block (None tells one to stop).
        self.calls: queue.SimpleQueue = queue.SimpleQueue()
        self._heap: list = []
        self._arrivals = itertools.count()
        self.done: deque[Outcome] = deque()
        self.started: deque[str] = deque()
        # (key, True): the task gave its slot back; (key, False): it took one again
        self.seceded: deque[tuple] = deque()
        self.cancelled: set[str] = set()
        self.running: dict[int, tuple[str, float]] = {}  # thread id -> (key, start time)
        self.threads: list[threading.Thread] = []
        # Cleared while the worker is paused (memory): a thread holds the call it took and
        # starts it only once the gate opens again (the scheduler may free it meanwhile).
        self.gate = threading.Event()
        self.gate.set()
        self.tight = False
        self.name = name
        self.nthreads = nthreads
        # Free slots, counted under ``_lock`` (one lock per step of a task, no semaphore: a
        # stream of tiny tasks takes and gives back a slot for each); a thread that finds none
        # waits on ``_slot_freed``.
        self._lock = threading.Lock()
        self._free = nthreads
        self._slot_freed = threading.Condition(self._lock)
        self._slot_waiters = 0
        self._holding: set[int] = set()  # threads that hold a slot
        self._nseceded = 0  # tasks running without a slot
        self._stopping = False
        self._serial = 0
        for _ in range(nthreads):
            self._spawn()

    def _spawn(self) -> None:
        with self._lock:
            self._serial += 1
            t = threading.Thread(target=self._run, daemon=True,
                                 name=f"zfabric-{self.name}-task-{self._serial}")
            self.threads.append(t)
        t.start()

    def replace_thread(self, ident: int) -> None:
        """A thread is stuck in a task that timed out: abandon it (its slot goes to a fresh
        thread)."""
        self.running.pop(ident, None)
        with self._lock:
            for t in self.threads:
                if t.ident == ident:
                    self.threads.remove(t)
                    break
            holding = ident in self._holding
            self._holding.discard(ident)
            if not holding:
                self._nseceded -= 1  # it had seceded: it needs no thread in its place
            else:
                self._give_slot()
        self._spawn()

    def submit(self, key: str, func, args: bytes, values: dict, priority: int = 0) -> None:
        """Run ``func`` on the pickled ``args`` (dependencies resolved from ``values``), after
        the queued calls of higher ``priority``. ``func`` may be the exception that explains
        why the function could not be loaded."""
        with self._lock:
            heapq.heappush(self._heap, (-priority, next(self._arrivals),
                                        (key, func, args, values)))
        self.calls.put(True)

    def stop(self) -> None:
        self._stopping = True
        self.gate.set()
        for _ in range(len(self.threads) + self._nseceded):
            self.calls.put(None)

    # ---------------------------------------------------------------- secede / rejoin

    def secede(self, key) -> bool:
        """The calling task gives its slot back (it will wait on other tasks); a spare thread
        takes the queue meanwhile. False if this thread held no slot."""
        me = threading.get_ident()
        with self._lock:
            if me not in self._holding:
                return False
            self._holding.discard(me)
            self._nseceded += 1
            self._give_slot()
        self.seceded.append((key, True))
        self._poke()
        self._spawn()
        return True

    def rejoin(self, key) -> None:
        """The calling task takes a slot again, waiting until one is free."""
        me = threading.get_ident()
        with self._lock:
            if me in self._holding:
                return
            self._take_slot()
            self._holding.add(me)
            self._nseceded -= 1
        self.seceded.append((key, False))
        self._poke()

    def _take_slot(self) -> None:
        """Take a free slot, waiting for one (``_lock`` held)."""
        while self._free <= 0:
            self._slot_waiters += 1
            try:
                self._slot_freed.wait()
            finally:
                self._slot_waiters -= 1
        self._free -= 1

    def _give_slot(self) -> None:
        """A slot is free again (``_lock`` held)."""
        self._free += 1
        if self._slot_waiters:
            self._slot_freed.notify()

    # ---------------------------------------------------------------- threads

    def _run(self) -> None:
        me = threading.get_ident()
        while True:
            if self.calls.get() is None or self._stopping:
                return
            if not self.gate.is_set():  # paused, or the loop spills: wait for it
                self.gate.wait()
                if self._stopping:
                    return
            if self.tight:  # memory is tight: the loop opens the gate again for the next
                self.gate.clear()
            with self._lock:
                if self._free > 0:
                    self._free -= 1
                else:
                    self._take_slot()
                self._holding.add(me)
                call = heapq.heappop(self._heap)[2]  # the most urgent now that a slot is free
            # In a call of its own, so that nothing of the task (its arguments, a borrowed
            # dependency, the result) stays referenced while this thread waits for the next.
            if not self._one(call, me):
                return
            call = None
            with self._lock:
                if me in self._holding:
                    self._holding.discard(me)
                    self._free += 1
                    if self._slot_waiters:
                        self._slot_freed.notify()
                else:
                    self._nseceded -= 1
                spare = len(self.threads) > self.nthreads + self._nseceded
                if spare:
                    self.threads = [t for t in self.threads if t.ident != me]
            if spare:
                return  # a seceded task ended: the thread started in its place carries on

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
            _task.key, _task.executor = key, self
            try:
                outcome = self._execute(key, func, payload, values)
            finally:
                _task.key = _task.executor = None
            outcome.thread = me
            outcome.start = wall
            outcome.stop = time.time()
            if self.running.pop(me, None) is None:
                return False  # abandoned after a timeout: nobody wants this outcome
        done = self.done
        done.append(outcome)
        if len(done) == 1:
            self._poke()
        return True

    def _poke(self) -> None:
        with self._wake_lock:
            if self.wake_fd >= 0:
                os.eventfd_write(self.wake_fd, 1)

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
                func, args, kwargs = serialize.loads_task(payload, values, key)
            elif isinstance(func, BaseException):
                raise func
            else:
                args, kwargs = serialize.loads_args(payload, values, key)
            result = func(*args, **kwargs)
        except BaseException as exc:  # the task's failure is data, not ours
            data, tb, text = serialize.exception_payload(_strip(exc))
            return Outcome(key, False, error=(data, tb, text, None),
                           duration=time.perf_counter() - start)
        duration = time.perf_counter() - start
        if self.lazy and type(result) not in serialize.PLAIN_TYPES:
            # A large result is kept as it is and pickled only if a peer or a client asks for
            # it (SpillStore.pickled): in a shuffle, half the pieces are used here. Small
            # ones are pickled now, to ride with the ``finished`` message.
            try:
                size = sizeof(result)
            except Exception:  # (a collection subclass whose len() fails): pickle it now
                size = 0
            if self.inline_bytes <= size <= self.max_bytes // 2:
                return Outcome(key, True, result, None, None, size, duration)
        try:
            header, buffers = serialize.dumps_value(result, self.inline_bytes)
        except Exception as exc:
            # As dask.distributed: a value that cannot be pickled (a generator, say) stays
            # here for the tasks of this worker; it fails only where it must travel.
            why = travel_error(key, exc, getattr(self.context, "address", self.name))
            return Outcome(key, True, result, None, None, sys.getsizeof(result), duration,
                           travel_error=why)
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
