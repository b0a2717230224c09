"""``TransitionListener``: what users write scheduler plugins for, from the client side.

zfabric's scheduler runs no user code, so a ``SchedulerPlugin`` cannot be registered. A
:class:`TransitionListener` gets the same news where the user's code runs: subclass it,
override ``transition(key, start, finish, **kwargs)`` and ``start()`` it with a client. While
it runs the scheduler pushes it every transition of every task (or only of the ``keys`` and
key ``prefixes`` it names: dask's ``key_split``, the task group), as it makes them
(:mod:`zfabric.scheduler.subscriptions`): ``transition`` is called once per move, in order,
with ``stimulus_id`` (what caused it, as in ``Client.story``), ``worker`` (the worker the task
was sent to or that reported it; None otherwise) and ``timestamp`` (the scheduler's wall
clock) as keyword arguments. A task that is forgotten moves to ``"forgotten"``. Calls run one
at a time on the client's callback thread, never on its I/O loop. A listener that falls
behind by more than the scheduler's ``SUBSCRIPTION_QUEUE_EVENTS`` transitions misses some:
:meth:`TransitionListener.missed` is told how many. For events of your own, see
``Client.subscribe_topic``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from . import current
from .keys import from_wire, to_wire

__all__ = ["TransitionListener"]

logger = logging.getLogger("zfabric.client")


class TransitionListener:
    """Subclass, override :meth:`transition`, then ``listener.start(client)`` (or use it as a
    context manager); :meth:`stop` ends it. On an asynchronous client ``await`` both (or use
    ``async with``). See the module docstring.

    ``keys`` (task keys or Futures) and ``prefixes`` (task-group names, such as ``"inc"``)
    narrow what it hears; with neither it hears every task."""

    #: Kept for code written against the polling listener of earlier versions; unused.
    interval = 0.1

    def __init__(self, keys: Iterable | None = None, prefixes: Iterable[str] | None = None):
        self.keys = None if keys is None else [getattr(k, "key", k) for k in keys]
        self.prefixes = None if prefixes is None else [str(p) for p in prefixes]

    def transition(self, key, start: str, finish: str, **kwargs) -> None:
        """Called for each move: ``key`` as the user gave it."""

    def missed(self, n: int) -> None:
        """Called when ``n`` transitions were dropped because this listener fell behind."""
        logger.warning("%s missed %d transitions: it fell behind (more than"
                       " SUBSCRIPTION_QUEUE_EVENTS waited on the scheduler)",
                       type(self).__name__, n)

    def start(self, client=None):
        """Start listening through ``client`` (the default client if None) and return the
        listener; on an asynchronous client, ``await listener.start(client)``."""
        if getattr(self, "_sid", None) is not None:
            return self._done_async() if self.client.asynchronous else self
        self.client = current.default_client(client)
        self._sid: int | None = None
        if self.client.asynchronous:
            return self._start_async()
        self.client.sync(self._start)
        return self

    async def _start_async(self) -> TransitionListener:
        await self._start()
        return self

    async def _done_async(self) -> TransitionListener:
        return self

    async def _start(self) -> None:
        args: dict[str, Any] = {"what": "transitions"}
        keys = getattr(self, "keys", None)
        prefixes = getattr(self, "prefixes", None)
        if keys:
            args["keys"] = [to_wire(k) for k in keys]
        if prefixes:
            args["prefixes"] = list(prefixes)
        self._sid, _ = await self.client.core.subscribe(self._batch, **args)

    def _batch(self, sid: int, items: list, missed: int) -> None:
        """A batch of transitions (on the client's loop): handed to the callback thread,
        acknowledged once delivered."""
        core = self.client.core

        def deliver(_):
            if missed:
                try:
                    self.missed(missed)
                except Exception:
                    logger.exception("error in %s.missed", type(self).__name__)
            for item in items:
                if type(item) is not list or len(item) != 6:
                    continue
                key, start, finish, timestamp, worker, stimulus = item
                try:
                    self.transition(from_wire(key), start, finish, stimulus_id=stimulus,
                                    worker=worker, timestamp=timestamp)
                except Exception:
                    logger.exception("error in %s.transition", type(self).__name__)
            core.on_loop(lambda: core.took(sid))

        core.run_callback(deliver, None)

    def stop(self):
        """Stop listening (safe to call again); on an asynchronous client,
        ``await listener.stop()``."""
        sid, self._sid = getattr(self, "_sid", None), None
        client = getattr(self, "client", None)
        if client is not None and client.asynchronous:
            return self._stop_async(sid)
        if sid is not None and client is not None:
            client.sync(client.core.unsubscribe, sid)
        return None

    async def _stop_async(self, sid: int | None) -> None:
        if sid is not None:
            await self.client.core.unsubscribe(sid)

    async def __aenter__(self) -> TransitionListener:
        return await self.start()  # through the default client, which must be asynchronous

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    def __enter__(self) -> TransitionListener:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
