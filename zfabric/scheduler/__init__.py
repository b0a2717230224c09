"""The scheduler: a pure state machine (``state``, ``policy``) behind a ROUTER shell."""

from .state import SchedulerState

__all__ = ["Scheduler", "SchedulerState"]


def __getattr__(name):
    # The server (zmq, threads) loads on first use: the pure state imports without zmq.
    if name == "Scheduler":
        from .server import Scheduler

        return Scheduler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
