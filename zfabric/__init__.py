"""zfabric: a compute fabric for Python on ZeroMQ, with dask.distributed's API.

>>> async with Scheduler() as s, Worker(s.address) as w:          # doctest: +SKIP
...     async with Client(s.address, asynchronous=True) as client:
...         assert await client.submit(lambda x: x + 1, 10) == 11
"""

import importlib
from typing import TYPE_CHECKING

from . import current as _current
from . import errors as _errors
from ._version import __version__
from .errors import *  # noqa: F403  (every public error: the list is errors.__all__)

if TYPE_CHECKING:
    from .actor import Actor, ActorFuture, BaseActorFuture
    from .adaptive import Adaptive
    from .client import Client, default_client
    from .cluster import LocalCluster
    from .context import get_client, get_worker, local_client, rejoin, secede, worker_client
    from .coordination import Event, Lock, Queue, Semaphore, Variable
    from .deploy import PBSCluster, SLURMCluster, SpecCluster, SSHCluster, SubprocessCluster
    from .diagnostics import get_task_metadata, get_task_stream, performance_report
    from .futures import Future, as_completed, fire_and_forget, futures_of, wait
    from .lifecycle import Status
    from .multilock import MultiLock
    from .nanny import Nanny
    from .plugins import NannyPlugin, SchedulerPlugin, UploadFile, WorkerPlugin
    from .progressbar import progress
    from .scheduler import Scheduler
    from .security import Security
    from .span import span
    from .transitions import TransitionListener
    from .worker import Worker
    from .worker_plugins import CondaInstall, Environ, InstallPlugin, PipInstall, UploadDirectory

# The I/O roles load on first use, so that the sans-IO core (protocol, scheduler.state,
# policy, heartbeat) imports without zmq, as its tests check.
_LAZY = {
    "Client": "client", "default_client": "client",
    "Future": "futures", "as_completed": "futures", "fire_and_forget": "futures",
    "wait": "futures", "futures_of": "futures",
    "progress": "progressbar",
    "performance_report": "diagnostics", "get_task_stream": "diagnostics",
    "Scheduler": "scheduler.server",
    "Worker": "worker",
    "Nanny": "nanny",
    "LocalCluster": "cluster",
    "get_client": "context", "get_worker": "context", "rejoin": "context", "secede": "context",
    "worker_client": "context",
    "Security": "security",
    "Event": "coordination", "Lock": "coordination", "Queue": "coordination",
    "Semaphore": "coordination", "Variable": "coordination", "MultiLock": "multilock",
    "Adaptive": "adaptive", "Status": "lifecycle",
    "SpecCluster": "deploy", "SSHCluster": "deploy", "SubprocessCluster": "deploy",
    "SLURMCluster": "deploy", "PBSCluster": "deploy",
    "WorkerPlugin": "plugins", "NannyPlugin": "plugins", "UploadFile": "plugins",
    "SchedulerPlugin": "plugins",
    "Environ": "worker_plugins", "InstallPlugin": "worker_plugins",
    "PipInstall": "worker_plugins", "CondaInstall": "worker_plugins",
    "UploadDirectory": "worker_plugins",
    "Actor": "actor", "ActorFuture": "actor", "BaseActorFuture": "actor",
    "TransitionListener": "transitions",
    "span": "span", "print": "task_output", "warn": "task_output",
    "get_task_metadata": "diagnostics", "local_client": "context",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'zfabric' has no attribute {name!r}")
    value = _load(module, name)
    globals()[name] = value
    return value


def _load(module: str, name: str):
    return getattr(importlib.import_module(f".{module}", __name__), name)


# The top layer wires what lower layers get from higher ones (see zfabric.current), each module
# loaded on first use: a task's client (zfabric.context) and the LocalCluster of Client().
_current.install_task_client(lambda worker, timeout: _load("context", "tasks_client")(worker,
                                                                                       timeout),
                             lambda worker: _load("context", "close_worker_client")(worker))
_current.install_local_cluster(lambda **kwargs: _load("cluster", "LocalCluster")(**kwargs))


__all__ = [
    # Cluster
    "Adaptive",
    "LocalCluster",
    "Nanny",
    "PBSCluster",
    "SLURMCluster",
    "SSHCluster",
    "Scheduler",
    "Security",
    "SpecCluster",
    "Status",
    "SubprocessCluster",
    "Worker",
    # Plugins
    "CondaInstall",
    "Environ",
    "InstallPlugin",
    "NannyPlugin",
    "PipInstall",
    "SchedulerPlugin",
    "TransitionListener",
    "UploadDirectory",
    "UploadFile",
    "WorkerPlugin",
    # Actors
    "Actor",
    "ActorFuture",
    "BaseActorFuture",
    # Client
    "Client",
    "Future",
    "as_completed",
    "default_client",
    "fire_and_forget",
    "futures_of",
    "wait",
    # Shared state
    "Event",
    "Lock",
    "MultiLock",
    "Queue",
    "Semaphore",
    "Variable",
    # Diagnostics
    "get_task_metadata",
    "get_task_stream",
    "performance_report",
    "progress",
    "span",
    # Inside tasks (zfabric.print and zfabric.warn too: not in __all__, so that a star
    # import does not replace the builtin print)
    "get_client",
    "get_worker",
    "local_client",
    "rejoin",
    "secede",
    "worker_client",
    "__version__",
    # Errors: every name in zfabric.errors.__all__
    *_errors.__all__,
]
