"""Turning calls into tasks: ``submit`` and ``map`` pickle each call (the function once per
function, the arguments once per call), name it, and queue ``submit`` ops of at most
``SUBMIT_BATCH`` tasks; large arguments go straight to a worker, and the submit window
(:mod:`zfabric.window`) keeps the rest in the client when the scheduler holds enough.

:class:`Submission` is the part of a :class:`~zfabric.client.Client` that does this, on the
client's records (:class:`~zfabric.client_core.ClientCore`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from . import serialize
from .actor import create
from .client_core import ClientCore
from .config import parse_timedelta
from .errors import TaskTooLarge
from .futures import Future
from .keys import to_wire
from .replies import FEW_TASKS
from .session import Deferred

#: ``ship_args(key, fid, fbytes, abytes, deps, buffers, opts)``: the ops of a task whose large
#: arguments were put on a worker first (:meth:`zfabric.values.Values.ship_args`).
ShipArgs = Callable[..., Awaitable[list[dict]]]


def funcname(func) -> str:
    while hasattr(func, "func"):  # functools.partial
        func = func.func
    name = getattr(func, "__name__", None) or type(func).__name__
    return "lambda" if name == "<lambda>" else name


class Submission:
    """The Client's submit and map (see the module docstring): ``client`` is the Client whose
    Futures these are, ``ship_args`` puts a task's large arguments on a worker."""

    def __init__(self, client: Any, core: ClientCore, ship_args: ShipArgs):
        self.client = client
        self.core = core
        self.config = core.config
        self.ship_args = ship_args

    def submit(self, func, *args, key: str | None = None, workers=None, resources=None,
               retries: int | None = None, priority: int = 0, allow_other_workers: bool = False,
               pure: bool = True, fifo_timeout=None, actor: bool = False, actors: bool = False,
               task_timeout: float | None = None, **kwargs) -> Future:
        """Run ``func(*args, **kwargs)`` on a worker; returns a Future at once.

        ``fifo_timeout`` is accepted for dask's sake: zfabric keeps strict submission order
        among tasks of equal priority, whatever the time between them."""
        parse_timedelta(fifo_timeout, name="fifo_timeout")
        self.core.check_open()
        if not callable(func):
            raise TypeError("First input to submit must be a callable function")
        opts = options(workers, resources, retries, priority, allow_other_workers, task_timeout)
        wkey = to_wire(key) if key is not None else None
        prefix = funcname(func)
        if actor or actors:  # the object stays on the worker; the result is its proxy
            func, args, pure = _actor_task(func, args)
        item = self.task(func, args, kwargs, wkey, prefix, pure)
        return self.submit_many([item], opts, user_keys=None if key is None else [key])[0]

    def task(self, func, args, kwargs, key, prefix, pure) -> tuple:
        """``(key, function id, function pickle, args pickle, deps, buffers)`` for one call;
        large buffers stay out of the pickle and go straight to a worker (``ship_args``)."""
        fid, fbytes, abytes, deps, buffers = serialize.dumps_call(
            func, args, kwargs, self.config.INLINE_BYTES)
        if key is None:
            if pure:
                key = f"{prefix}-{serialize.task_hash(fid.encode() + abytes, buffers)}"
            else:
                key = f"{prefix}-{self.core.new_id()}"
        return key, fid, fbytes, abytes, deps, buffers

    def submit_many(self, items: list, opts: dict | None, batch: int | None = None,
                    user_keys: list | None = None) -> list[Future]:
        """Futures for ``items`` (from :meth:`task`, keyed by wire keys); ``user_keys``, when
        given, are the keys as the user gave them, in the same order."""
        out: list[Future] = []
        tasks: list = []
        functions: dict = {}
        core = self.core
        client = self.client
        window = core.window
        revive = core.revive
        outbox = core.outbox
        limit = self.config.SCHEDULER_FRAME_BYTES
        with core.lock:
            core.queue_releases()
            # few tasks in flight: a caller that waits for each; small results come straight
            # from the worker (zfabric/replies.py)
            direct = core.direct if (len(items) <= FEW_TASKS
                                     and window.inflight < FEW_TASKS) else None
            for i, (key, fid, fbytes, abytes, deps, buffers) in enumerate(items):
                st, new = revive(key)
                if new:
                    size = len(fbytes) + len(abytes)
                    if size > limit - 2**16:
                        # It would close our connection (MAXMSGSIZE): fail it here instead.
                        st.fail(None, TaskTooLarge(
                            f"task {key!r} pickles to {size:,} bytes (function and arguments"
                            " besides out-of-band buffers); the scheduler takes at most"
                            f" {limit:,} bytes in a frame"
                            " (SCHEDULER_FRAME_BYTES). Place large values on the workers"
                            " with client.scatter(...) and pass the futures instead"))
                    elif buffers:
                        core.queue_tasks(tasks, functions, batch)
                        outbox.append(Deferred(
                            self.ship_args(key, fid, fbytes, abytes, deps, buffers, opts), st))
                        window.sent(st)
                    elif window.full():  # the scheduler holds enough of ours: wait here
                        window.hold(st, abytes, deps, opts, fid, fbytes)
                    else:
                        functions[fid] = fbytes
                        tasks.append([key, abytes, deps,
                                      opts if direct is None else direct.options(opts, key), fid])
                        window.sent(st)
                out.append(Future(user_keys[i] if user_keys is not None else key, client, st))
            core.queue_tasks(tasks, functions, batch)
            if window.ready():
                core.pump()
            core.note_submitted(item[0] for item in items)
        core.send()
        return out

    def map(self, func, *iterables, key=None, workers=None, retries=None, resources=None,
            priority: int = 0, allow_other_workers: bool = False, pure: bool = True,
            batch_size=None, task_timeout=None, actor: bool = False, actors: bool = False,
            **kwargs) -> list[Future]:
        """``submit(func, *items)`` for items zipped from ``iterables``; a list of Futures.

        ``batch_size``: tasks per message to the scheduler (default ``SUBMIT_BATCH``)."""
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.core.check_open()
        if not callable(func):
            raise TypeError("First input to map must be a callable function")
        if not iterables:
            return []
        if isinstance(iterables[0], dict) or any(isinstance(it, str) for it in iterables):
            raise TypeError("map needs iterables such as lists, not dicts or strings")
        opts = options(workers, resources, retries, priority, allow_other_workers, task_timeout)
        argss = list(zip(*iterables, strict=False))
        keys: list | None = None
        wkeys: list | None = None
        if isinstance(key, list | tuple):
            if len(key) != len(argss):
                raise ValueError(f"{len(key)} keys given for {len(argss)} items")
            keys = list(key)
            wkeys = [to_wire(k) for k in keys]
        elif key is not None and not isinstance(key, str):
            raise TypeError("map's key must be a prefix string or a list of keys, one per item")
        prefix = key if isinstance(key, str) else funcname(func)
        if actor or actors:
            cls = func
            func, _, pure = _actor_task(cls, ())
            argss = [(cls, *args) for args in argss]
        # In chunks: the pickled calls of a chunk are queued (or held by the submit window)
        # before the next chunk is pickled, so a map of millions never holds every call twice.
        out: list[Future] = []
        step = _MAP_CHUNK
        for lo in range(0, len(argss), step):
            items = [self.task(func, argss[i], kwargs, wkeys[i] if wkeys else None, prefix,
                               pure) for i in range(lo, min(lo + step, len(argss)))]
            out.extend(self.submit_many(items, opts, batch_size,
                                        keys[lo:lo + step] if keys else None))
        return out


#: Items pickled at a time by ``Client.map`` (see there).
_MAP_CHUNK = 10_000


def options(workers, resources, retries, priority, allow_other_workers, task_timeout):
    opts = {}
    if workers is not None:
        opts["workers"] = [workers] if isinstance(workers, str) else list(workers)
    if resources:
        opts["resources"] = dict(resources)
    if retries:
        opts["retries"] = int(retries)
    if priority:
        opts["priority"] = int(priority)
    if allow_other_workers:
        opts["allow_other_workers"] = True
    if task_timeout:
        opts["task_timeout"] = float(task_timeout)
    return opts or None


def _actor_task(cls, args: tuple):
    """``(function, args, pure)`` of the task that builds an actor of ``cls`` on a worker."""
    if not isinstance(cls, type):
        raise TypeError(f"actor=True needs a class, got {type(cls).__name__}")
    return create, (cls, *args), False
