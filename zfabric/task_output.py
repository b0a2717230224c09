"""``zfabric.print`` and ``zfabric.warn``: what a task prints or warns reaches the client.

Inside a task each prints (or warns) on the worker as the builtin does, and logs an event
under the topic ``"print"`` (``"warn"``) through the worker's client; every client that has
submitted tasks prints (warns) it in turn (:mod:`zfabric.topics`). Outside a task they are
the builtins.
"""

from __future__ import annotations

import builtins
import pickle
import sys
import warnings

from . import current

__all__ = ["print", "warn"]


def _in_task() -> bool:
    return current.task_worker() is not None


def print(*args, sep: str | None = " ", end: str | None = "\n", file=None,
          flush: bool = False) -> None:
    """The builtin ``print``; inside a task, also printed by the clients (``file`` must be
    ``sys.stdout`` or ``sys.stderr`` there)."""
    builtins.print(*args, sep=sep, end=end, file=file, flush=flush)
    if not _in_task():
        return
    if file not in (None, sys.stdout, sys.stderr):
        raise TypeError("zfabric.print in a task prints to sys.stdout or sys.stderr only;"
                        f" got file={file!r}")
    msg = {"args": tuple(str(a) for a in args), "sep": sep, "end": end, "flush": flush,
           "file": 2 if file is sys.stderr else 1}
    current.client().log_event("print", msg)


def warn(message, category: type[Warning] | None = UserWarning, stacklevel: int = 1,
         source=None) -> None:
    """``warnings.warn``; inside a task, also warned by the clients."""
    warnings.warn(message, category, stacklevel=stacklevel + 1, source=source)
    if not _in_task():
        return
    msg = {"message": pickle.dumps(message), "text": str(message)}
    if category is not None:
        msg["category"] = pickle.dumps(category)
    current.client().log_event("warn", msg)
