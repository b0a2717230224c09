"""Every error zfabric raises, under one root.

::

    ZFabricError
    ├── ClosedError              you closed the object, then used it
    ├── SchedulerLost            the scheduler went away under you (also a ConnectionError)
    ├── CommTimeoutError         nothing answered at an address in time (also a TimeoutError)
    ├── ProtocolError
    │   ├── RemoteProtocolError  a peer sent something malformed or incompatible
    │   └── LocalProtocolError   we were about to send something malformed (a bug of ours)
    ├── SerializationError       a value could not be pickled or unpickled (also a TypeError)
    ├── KilledWorker             a task was on too many workers that died
    ├── TaskTimeout              a task ran past its task_timeout (also a TimeoutError)
    ├── LostDataError            data that cannot be recomputed (scattered) was lost with a worker
    ├── TaskCancelled            the result of a cancelled task was asked for (also
    │                            concurrent.futures.CancelledError, as dask.distributed raises)
    ├── ResultTooLarge           a value passed the configured message size limit
    ├── TaskTooLarge             a task's function and arguments pass the scheduler's frame
    │                            limit (also a ValueError)
    ├── ActorLost                an actor's worker is gone (also a ConnectionError)
    └── SecurityError            security is misconfigured: missing keys, a refused key, or
        │                        a peer that requires encryption met without it
        └── KeyRevoked           the scheduler ended this client's session because its key
                                 was revoked (also a SchedulerLost)

A task that raises keeps its own exception type: ``future.result()`` re-raises the very
exception the function raised, with the remote traceback attached.
"""

from __future__ import annotations

from concurrent.futures import CancelledError

__all__ = [
    "ActorLost",
    "CancelledError",
    "ClosedError",
    "CommTimeoutError",
    "KilledWorker",
    "LocalProtocolError",
    "LostDataError",
    "ProtocolError",
    "KeyRevoked",
    "RemoteProtocolError",
    "Reschedule",
    "ResultTooLarge",
    "SchedulerLost",
    "SecurityError",
    "SerializationError",
    "TaskCancelled",
    "TaskTimeout",
    "TaskTooLarge",
    "TimeoutError",
    "ZFabricError",
]

#: dask.distributed's names: ``except zfabric.CancelledError`` catches a cancelled future's
#: error (:class:`TaskCancelled` is one), ``except zfabric.TimeoutError`` a timeout (the
#: builtin, which asyncio's is too).
TimeoutError = TimeoutError


class ZFabricError(Exception):
    """Raised for every failure that belongs to zfabric itself (not to the user's task)."""


class ClosedError(ZFabricError):
    """Raised when an object is used after its own ``close()``."""


class SchedulerLost(ZFabricError, ConnectionError):
    """Raised when the scheduler stopped answering while work was pending."""


class CommTimeoutError(ZFabricError, TimeoutError):
    """Raised when nothing answered at an address within the allowed time."""


class ProtocolError(ZFabricError):
    """Raised when a message breaks the wire protocol."""


class RemoteProtocolError(ProtocolError):
    """Raised when a peer sent a malformed or incompatible message."""


class LocalProtocolError(ProtocolError):
    """Raised when this process was about to send a malformed message."""


class SerializationError(ZFabricError, TypeError):
    """Raised when a function, argument or result cannot be pickled or unpickled (also a
    ``TypeError``, the type dask.distributed raises)."""


class KilledWorker(ZFabricError):
    """Raised when a task was running on more workers that died than allowed."""

    def __init__(self, message: str, task: str = "", last_worker: str = "", count: int = 0):
        super().__init__(message)
        self.task = task
        self.last_worker = last_worker
        self.count = count

    def __reduce__(self):
        return (type(self), (str(self), self.task, self.last_worker, self.count))


class TaskTimeout(ZFabricError, TimeoutError):
    """Raised when a task ran longer than the ``task_timeout`` it was submitted with."""


class LostDataError(ZFabricError):
    """Raised when data that cannot be recomputed (scattered data) was lost with its worker."""


class TaskCancelled(ZFabricError, CancelledError):
    """Raised when the result of a cancelled future is asked for."""


class ResultTooLarge(ZFabricError):
    """Raised when a value is larger than the configured message size limit."""


class TaskTooLarge(ZFabricError, ValueError):
    """Raised when a task's pickled function and arguments are larger than the scheduler
    takes in one frame (``SCHEDULER_FRAME_BYTES``); ``scatter`` the large values first."""


class ActorLost(ZFabricError, ConnectionError):
    """Raised when an actor's worker died or cannot be reached: the actor's state is gone."""


class SecurityError(ZFabricError):
    """Raised when security is misconfigured: missing keys, a refused key, or a peer that
    requires encryption met without it."""


class KeyRevoked(SecurityError, SchedulerLost):
    """Raised when the scheduler ended a client's session because its key was revoked: every
    future that was pending and every later call of that client fails with it at once."""


class Reschedule(Exception):
    """Raised by a task to give up this run, as dask.distributed's: zfabric's scheduler does
    not place the task again by itself, so the task fails with it (submit it with
    ``retries=`` to have it run again)."""
