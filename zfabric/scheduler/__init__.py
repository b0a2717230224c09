"""The scheduler: a pure state machine (``state``, ``policy``) behind a ROUTER shell (``server``)."""

from .server import Scheduler
from .state import SchedulerState

__all__ = ["Scheduler", "SchedulerState"]
