"""``TransitionListener``: what users write scheduler plugins for, from the client side.

zfabric's scheduler runs no user code, so a ``SchedulerPlugin`` cannot be registered. A
:class:`TransitionListener` gets the same news where the user's code runs: subclass it,
override ``transition(key, start, finish, **kwargs)`` and ``start()`` it with a client. While
it runs it asks the scheduler for the state of every task every ``interval`` seconds and calls
``transition`` for each task whose state changed since (one call per change it saw: a task
that went through several states between two looks is reported from the first to the last,
and a task the scheduler forgot goes to ``"forgotten"``). Calls run one at a time on the
client's callback thread, never on its I/O loop. For events of your own, see
``Client.subscribe_topic``.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from . import current
from .keys import from_wire

__all__ = ["TransitionListener"]


class TransitionListener:
    """Subclass, override :meth:`transition`, then ``listener.start(client)`` (or use it as a
    context manager); :meth:`stop` ends it. See the module docstring."""

    #: Seconds between two looks at the scheduler's tasks.
    interval = 0.1

    def transition(self, key, start: str, finish: str, **kwargs) -> None:
        """Called for each change seen: ``key`` as the user gave it."""

    def start(self, client=None) -> TransitionListener:
        self.client = current.default_client(client)
        self._states: dict[str, str] | None = None
        self._task: asyncio.Task | None = None
        self.client.sync(self._start)
        return self

    async def _start(self) -> None:
        self._states = await self.client.core.request("task-states")
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        core = self.client.core
        while core.status == "running":
            await asyncio.sleep(self.interval)
            try:
                states = await core.request("task-states")
            except Exception:  # closing, or the scheduler is away
                continue
            old = self._states or {}
            changes = [(k, old.get(k, "released"), s) for k, s in states.items()
                       if old.get(k) != s]
            changes += [(k, s, "forgotten") for k, s in old.items() if k not in states]
            self._states = states
            if changes:
                core.run_callback(self._deliver, changes)

    def _deliver(self, changes: list) -> None:
        for key, start, finish in changes:
            self.transition(from_wire(key), start, finish)

    def stop(self) -> None:
        """Stop listening (safe to call again)."""
        task, self._task = getattr(self, "_task", None), None
        if task is not None:
            self.client.sync(self._stop, task)

    @staticmethod
    async def _stop(task: asyncio.Task) -> None:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task

    def __enter__(self) -> TransitionListener:
        return self.start() if getattr(self, "_task", None) is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
