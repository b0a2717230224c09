"""What a running task can reach: its worker, a client of its scheduler, secede and rejoin.

A task that submits tasks and waits for them would hold one of its worker's slots while it
waits; on a one-thread worker the tasks it waits for could then never run. ``secede()`` gives
the slot back (the worker starts another task in its place, and the scheduler counts the task
as taking no slot), ``rejoin()`` waits for a free slot again, and :func:`worker_client` does
both around a block::

    def fib(n):
        if n < 2:
            return n
        with worker_client() as client:
            a, b = client.submit(fib, n - 1), client.submit(fib, n - 2)
            return a.result() + b.result()

``get_client()`` inside a task gives one blocking client per worker, connected to the same
scheduler, made on first use and closed with the worker.
"""

from __future__ import annotations

import contextlib
import threading

from . import current
from .client import Client
from .current import current_task

__all__ = ["get_client", "get_worker", "local_client", "rejoin", "secede", "worker_client"]

_lock = threading.Lock()


def get_worker():
    """The :class:`~zfabric.Worker` running the calling task.

    Raises ``ValueError`` outside a task (dask.distributed's behaviour).
    """
    _, executor = current_task()
    if executor is None or executor.context is None:
        raise ValueError("No worker found: get_worker() works only inside a task running on a"
                         " zfabric worker")
    return executor.context


def get_client(address: str | None = None, timeout=None):
    """A client: inside a task, its worker's own client (made on first use, one per worker,
    connected to the same scheduler); elsewhere the default client, or a new one to
    ``address``."""
    _, executor = current_task()
    if executor is not None and executor.context is not None:
        worker = executor.context
        if address is not None and address != worker.scheduler_address:
            raise ValueError(f"this task runs on a worker of {worker.scheduler_address}; it"
                             f" cannot get a client of {address}: create one with Client()")
        return tasks_client(worker, timeout)
    try:
        return current.default_client()
    except ValueError:
        if address is None:
            raise ValueError("No client found: get_client() works inside a task, or after a"
                             " Client was created; or pass the scheduler's address") from None
        return Client(address, timeout=timeout)


def tasks_client(worker, timeout=None):
    """The client of ``worker``'s tasks: made on first use, one per worker (the package
    installs this as :mod:`zfabric.current`'s task client)."""
    with _lock:
        client = getattr(worker, "_task_client", None)
        if client is not None and client.status not in ("closing", "closed"):
            return client
        kwargs = {"timeout": timeout} if timeout is not None else {}
        # with security on it connects with the client key of the worker's keys
        client = Client(worker.scheduler_address, config=worker.config,
                        name=f"worker-client-{worker.name}", _for_worker=worker.address,
                        security=getattr(worker, "security", None), **kwargs)
        worker._task_client = client
        return client


def close_worker_client(worker) -> None:
    """Close the client that tasks of ``worker`` made (the worker is closing)."""
    with _lock:
        client = getattr(worker, "_task_client", None)
        worker._task_client = None
    if client is not None:
        client.close()


def secede() -> None:
    """Give the calling task's slot back while it waits on other tasks (see the module
    docstring). Raises ``ValueError`` outside a task."""
    key, executor = current_task()
    if executor is None:
        raise ValueError("secede() works only inside a task running on a zfabric worker")
    executor.secede(key)


def rejoin() -> None:
    """Take a slot again after :func:`secede`, waiting until one is free."""
    key, executor = current_task()
    if executor is None:
        raise ValueError("rejoin() works only inside a task running on a zfabric worker")
    executor.rejoin(key)


@contextlib.contextmanager
def worker_client(timeout=None, separate_thread: bool = True):
    """``with worker_client() as client:`` secede, use the worker's client, rejoin.

    ``separate_thread=False`` keeps the slot (for short waits that must not let another task
    start on this worker).
    """
    client = get_client(timeout=timeout)
    if separate_thread:
        secede()
    try:
        yield client
    finally:
        if separate_thread:
            rejoin()


#: dask.distributed's older name of :func:`worker_client`.
local_client = worker_client
