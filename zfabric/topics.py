"""Handlers for the scheduler's event topics: ``subscribe_topic``, ``forward_logging``, and the
printed output and warnings of tasks (``zfabric.print``, ``zfabric.warn``) reaching the client.

:class:`Topics` is the part of a :class:`~zfabric.client.Client` that holds these methods.
Events are what ``log_event`` records on the scheduler (:meth:`Client.log_event`, or a task
through its worker's client). While a topic has a handler, the client holds a subscription to
it (:mod:`zfabric.scheduler.subscriptions`): the scheduler pushes each new event as it is
logged, and the client hands it, ``(time, msg)``, to the handler on its callback thread (a
coroutine function of an asynchronous client runs on its loop), in order. Events logged
before ``subscribe_topic`` returned are not handed over, as in dask.distributed. A handler
that falls far behind (more than the scheduler's ``SUBSCRIPTION_QUEUE_EVENTS`` waiting) misses
events; the client logs a warning saying how many.

The topics ``"print"`` and ``"warn"`` have handlers from the first task a client submits:
what tasks print with ``zfabric.print`` is printed here, their ``zfabric.warn`` warned here.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import pickle
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

from .client_core import ClientCore
from .worker_plugins import ForwardLogging

logger = logging.getLogger("zfabric.client")

__all__ = ["Topics", "print_event", "warn_event"]

#: Printed output logged this long before a client's first task is still printed by it.
OUTPUT_GRACE_S = 1.0
#: The topic ``forward_logging`` sends records under.
LOGGING_TOPIC = "forward-logging"


def print_event(event) -> None:
    """The handler of topic ``"print"``: print what a task printed with ``zfabric.print``."""
    _, msg = event
    if not isinstance(msg, dict):
        print(msg)
        return
    stream = sys.stderr if msg.get("file") == 2 else sys.stdout
    print(*msg.get("args", ()), sep=msg.get("sep") or " ", end=msg.get("end") or "\n",
          file=stream, flush=bool(msg.get("flush")))


def warn_event(event) -> None:
    """The handler of topic ``"warn"``: warn what a task warned with ``zfabric.warn``."""
    _, msg = event
    if not isinstance(msg, dict) or "message" not in msg:
        warnings.warn(str(msg), stacklevel=1)
        return
    try:
        message = pickle.loads(msg["message"])
        category = pickle.loads(msg["category"]) if msg.get("category") else None
    except Exception:  # a class this process cannot import: its text will do
        message, category = msg.get("text", "a task warned"), None
    warnings.warn(message, category=category, stacklevel=1)


def _log_record(event) -> None:
    """The handler of ``forward_logging``'s topic: the record, emitted by the same-named
    logger here."""
    _, msg = event
    if not isinstance(msg, dict):
        return
    record = logging.makeLogRecord(msg)
    logging.getLogger(record.name).handle(record)


class Topics:
    """The Client's topic handlers (see the module docstring), for ``client``."""

    def __init__(self, client: Any, core: ClientCore):
        self.client = client
        self.core = core
        self.sync = client.sync
        self.request = core.request
        self.handlers: dict[str, Callable] = {}
        self._sids: dict[str, int] = {}  # topic -> its subscription's id
        #: topic -> batches pushed while its subscription's answer (with the events logged
        #: before it, when asked) was on its way: handed over after those
        self._early: dict[str, list] = {}
        self._forwarding: dict[str | None, str] = {}  # logger name -> plugin name
        core.on_first_submit = self._output_on_first_submit

    # ------------------------------------------------------------------ subscriptions

    def subscribe_topic(self, topic: str, handler: Callable) -> Any:
        """Call ``handler((time, msg))`` for each event logged under ``topic`` from now on
        (a later call for the same topic replaces the handler)."""
        if not isinstance(topic, str):
            raise TypeError(f"topic must be a string, got {topic!r}")
        if not callable(handler):
            raise TypeError(f"handler must be callable, got {handler!r}")
        return self.sync(self._subscribe, topic, handler)

    def unsubscribe_topic(self, topic: str) -> Any:
        """Stop handling ``topic``; ``ValueError`` if it had no handler."""
        if topic not in self.handlers:
            raise ValueError(f"no handler for topic {topic!r}; subscribe_topic adds one")
        return self.sync(self._unsubscribe, topic)

    async def _subscribe(self, topic: str, handler: Callable,
                         since: float | None = None) -> None:
        self.handlers[topic] = handler
        if topic in self._sids or topic in self._early:
            return  # subscribed (or on its way): the new handler takes the next events
        args: dict = {"what": "topic", "topic": topic}
        if since is not None:
            args["after"] = since
        self._early[topic] = []
        try:
            sid, past = await self.core.subscribe(
                lambda sid, items, missed: self._events(topic, sid, items, missed), **args)
        except BaseException:
            self.handlers.pop(topic, None)
            raise
        finally:
            early = self._early.pop(topic)
        self._sids[topic] = sid
        if type(past) is list:  # logged since ``since``, before the subscription
            self._events(topic, None, past, 0)
        for batch in early:
            self._events(topic, *batch)

    async def _unsubscribe(self, topic: str) -> None:
        self.handlers.pop(topic, None)
        sid = self._sids.pop(topic, None)
        if sid is not None:
            await self.core.unsubscribe(sid)

    def _events(self, topic: str, sid: int | None, items: list, missed: int) -> None:
        """A batch of ``topic``'s events (on the loop); acknowledged once handled."""
        early = self._early.get(topic)
        if early is not None and sid is not None:
            early.append((sid, items, missed))
            return
        if missed:
            logger.warning("missed %d events of topic %r: its handler fell behind (more than"
                           " SUBSCRIPTION_QUEUE_EVENTS waited on the scheduler)", missed, topic)
        handler = self.handlers.get(topic)
        if handler is None or not items:
            if sid is not None:
                self.core.took(sid)
            return
        events = [tuple(e) for e in items if type(e) is list and len(e) == 2]
        if inspect.iscoroutinefunction(handler):
            for event in events:
                self._own(handler(event))
            if sid is not None:
                self.core.took(sid)
            return

        def run(_):
            for event in events:
                try:
                    handler(event)
                except Exception:
                    logger.exception("error in the handler of topic %r", topic)
            if sid is not None:
                self.core.on_loop(lambda: self.core.took(sid))

        self.core.run_callback(run, None)

    def _output_on_first_submit(self) -> None:
        """The first tasks went out: tasks' ``zfabric.print``/``warn`` reach this client from
        now on (unless the user handles those topics already). Lock held: nothing here
        blocks."""

        # what the first tasks print may be logged before the subscription is made
        since = time.time() - OUTPUT_GRACE_S

        async def start():
            for topic, handler in (("print", print_event), ("warn", warn_event)):
                if topic not in self.handlers and self.core.status == "running":
                    with contextlib.suppress(Exception):
                        await self._subscribe(topic, handler, since)

        self.core.on_loop(lambda: self._own(start()))

    def _own(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def close(self) -> None:
        """Stop handling every topic (the client is closing; the scheduler ends its
        subscriptions with it)."""
        self.handlers.clear()
        self._sids.clear()

    # ------------------------------------------------------------------ logging

    def forward_logging(self, logger_name: str | None = None, level: int = logging.NOTSET):
        """Records of logger ``logger_name`` (None: the root logger) at ``level`` or above,
        emitted on any worker (current and later), are emitted here too by the logger of
        the same name."""
        name = f"forward-logging-{logger_name or 'root'}"
        self._forwarding[logger_name] = name
        self.subscribe_topic(LOGGING_TOPIC, _log_record)
        return self.client.register_plugin(ForwardLogging(logger_name, level, LOGGING_TOPIC),
                                           name=name)

    def unforward_logging(self, logger_name: str | None = None):
        """Stop what :meth:`forward_logging` of ``logger_name`` started."""
        name = self._forwarding.pop(logger_name, None)
        if name is None:
            raise ValueError(f"logger {logger_name!r} is not forwarded")
        if not self._forwarding and LOGGING_TOPIC in self.handlers:
            self.unsubscribe_topic(LOGGING_TOPIC)
        return self.client.unregister_worker_plugin(name)
