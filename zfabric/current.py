"""What am I running in: the task this thread runs, the client to use, this process's keys.

The ground floor's answer to questions that code at every layer asks, so that none of it has
to import the layer that knows (a lower module importing the client or the worker to ask would
go up a layer):

- **The task of this thread** (:func:`current_task`): a worker's executor sets
  :data:`thread_task` around each task it runs; ``get_worker()``, ``secede()`` and actors
  read it.
- **The default client** (:func:`default_client`): clients made with ``set_as_default=True``
  stack up, the newest open one is the default and closing it hands over to the one before;
  ``with client.as_current():`` overrides it for a block (per thread and asyncio task).
- **A task's client** (:func:`client`): inside a task, its worker's own client, made by the
  factory the task API installs (:func:`install_task_client`); elsewhere the default client.
  Futures and handles that arrive in a process (unpickled) bind to it.
- **A local cluster** (:func:`start_local_cluster`): ``Client()`` with no address starts one
  through the factory the cluster layer installs (:func:`install_local_cluster`).
- **This process's keys** (:func:`process_keys`): the last keys a Client or Worker of this
  process was made with; connections made with no keys at hand (an actor handle that
  travelled into a task) use them.

Nothing here imports zmq or asyncio; the installers are called by the package's top layer.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["client", "current_task", "default_client", "install_local_cluster",
           "install_task_client", "process_keys", "set_process_keys", "start_local_cluster",
           "thread_task", "worker_client_of"]


# ---------------------------------------------------------------------------- the task


class _TaskLocal(threading.local):
    key: Any = None  # the key of the task this thread runs, or None between tasks
    executor: Any = None  # the worker's executor running it (its .context is the worker)


#: The task this thread runs: the worker's executor sets ``key`` and ``executor`` before
#: each task and clears them after (two attribute writes: it is on the per-task path).
thread_task = _TaskLocal()


def current_task() -> tuple[Any, Any]:
    """``(key, executor)`` of the task the calling thread runs, or ``(None, None)``."""
    t = thread_task
    return t.key, t.executor


def task_worker():
    """The worker running the calling task (its executor's context), or None."""
    executor = thread_task.executor
    return executor.context if executor is not None else None


# ---------------------------------------------------------------------------- clients


#: Clients created with ``set_as_default=True``, oldest first.
_defaults: list[weakref.ref] = []
_defaults_lock = threading.Lock()
#: The client of ``with client.as_current():`` blocks, per thread and task.
_current: contextvars.ContextVar = contextvars.ContextVar("zfabric_current_client",
                                                         default=None)


def _open(c) -> bool:
    return c is not None and c.status not in ("closing", "closed")


def default_client(c=None):
    """The client to use when none is given: ``c`` if given, else the client of the
    innermost ``as_current()`` block, else the newest open default client (falling back to
    the one before when it closes). Raises ``ValueError`` if none."""
    if c is not None:
        return c
    c = _current.get()
    if _open(c):
        return c
    with _defaults_lock:
        for ref in reversed(_defaults):
            found = ref()
            if _open(found):
                return found
    raise ValueError("No client is open; create one with Client(address)")


def as_current_client():
    """The client of the innermost ``as_current()`` block if it is open, else None."""
    c = _current.get()
    return c if _open(c) else None


@contextlib.contextmanager
def using_client(c) -> Iterator[None]:
    """``c`` is the current client within the block (``Client.as_current``)."""
    token = _current.set(c)
    try:
        yield
    finally:
        _current.reset(token)


def add_default(c) -> None:
    """``c`` is the newest default client."""
    with _defaults_lock:
        _defaults[:] = [r for r in _defaults if _open(r()) and r() is not c]
        _defaults.append(weakref.ref(c))


def drop_default(c) -> None:
    """``c`` is no longer a default client (it is closing)."""
    with _defaults_lock:
        _defaults[:] = [r for r in _defaults if r() is not c and _open(r())]


_task_client: Callable[[Any, Any], Any] | None = None
_close_task_client: Callable[[Any], None] | None = None


def install_task_client(factory: Callable[[Any, Any], Any],
                        close: Callable[[Any], None]) -> None:
    """``factory(worker, timeout)`` gives the client of ``worker``'s tasks, ``close(worker)``
    closes it (the task API installs them)."""
    global _task_client, _close_task_client
    _task_client, _close_task_client = factory, close


def close_task_client(worker) -> None:
    """Close the client that tasks of ``worker`` made, if any (the worker is closing)."""
    if _close_task_client is not None:
        _close_task_client(worker)


def worker_client_of(worker, timeout=None):
    """The client of ``worker``'s tasks (made on first use), from any thread of the worker's
    process: for worker plugins that talk to the scheduler outside a task."""
    if _task_client is None:
        raise RuntimeError("no factory for a task's client is installed; import zfabric"
                           " (its package) in the worker process")
    return _task_client(worker, timeout)


def client(timeout=None):
    """Inside a task, its worker's client; elsewhere the default client. Raises
    ``ValueError`` when there is none."""
    worker = task_worker()
    if worker is not None:
        if _task_client is None:
            raise RuntimeError("no factory for a task's client is installed; import zfabric"
                               " (its package) in the worker process")
        return _task_client(worker, timeout)
    try:
        return default_client()
    except ValueError:
        raise ValueError("No client found: get_client() works inside a task, or after a"
                         " Client was created; or pass the scheduler's address") from None


# ---------------------------------------------------------------------------- local cluster


_local_cluster: Callable[..., Any] | None = None


def install_local_cluster(factory: Callable[..., Any]) -> None:
    """``factory(**kwargs)`` starts a LocalCluster (the cluster layer installs it)."""
    global _local_cluster
    _local_cluster = factory


def start_local_cluster(**kwargs):
    """A new LocalCluster (awaitable when ``asynchronous=True``), for ``Client()`` with no
    address."""
    if _local_cluster is None:
        raise RuntimeError("Client() without an address needs zfabric's LocalCluster; import"
                           " zfabric (its package) first, or pass a scheduler's address")
    return _local_cluster(**kwargs)


# ---------------------------------------------------------------------------- keys


_process_keys: Any = None  # a zfabric.security.Security, or None (security off)


def set_process_keys(security) -> None:
    """A Client or Worker of this process was made with ``security``: connections made with
    no keys at hand use it from now on (the last one set wins; None changes nothing)."""
    global _process_keys
    if security is not None:
        _process_keys = security


def process_keys():
    """The keys of :func:`set_process_keys`, or None (security off)."""
    return _process_keys
