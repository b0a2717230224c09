"""zfabric: a compute fabric for Python on ZeroMQ, with dask.distributed's API.

>>> async with Scheduler() as s, Worker(s.address) as w:          # doctest: +SKIP
...     async with Client(s.address, asynchronous=True) as client:
...         assert await client.submit(lambda x: x + 1, 10) == 11
"""

__version__ = "0.1.0"

from .client import Client, default_client  # noqa: E402
from .errors import (  # noqa: E402
    ClosedError,
    CommTimeoutError,
    KilledWorker,
    LostDataError,
    ProtocolError,
    RemoteProtocolError,
    ResultTooLarge,
    SchedulerLost,
    SerializationError,
    TaskCancelled,
    TaskTimeout,
    ZFabricError,
)
from .futures import Future, as_completed, fire_and_forget, wait  # noqa: E402
from .scheduler import Scheduler  # noqa: E402
from .worker import Worker  # noqa: E402


def __getattr__(name):
    # Nanny and LocalCluster pull in process management; load them on first use.
    if name == "Nanny":
        from .nanny import Nanny

        return Nanny
    if name == "LocalCluster":
        from .cluster import LocalCluster

        return LocalCluster
    raise AttributeError(f"module 'zfabric' has no attribute {name!r}")


__all__ = [
    # Cluster
    "LocalCluster",
    "Nanny",
    "Scheduler",
    "Worker",
    # Client
    "Client",
    "Future",
    "as_completed",
    "default_client",
    "fire_and_forget",
    "wait",
    # Errors
    "ClosedError",
    "CommTimeoutError",
    "KilledWorker",
    "LostDataError",
    "ProtocolError",
    "RemoteProtocolError",
    "ResultTooLarge",
    "SchedulerLost",
    "SerializationError",
    "TaskCancelled",
    "TaskTimeout",
    "ZFabricError",
    "__version__",
]
