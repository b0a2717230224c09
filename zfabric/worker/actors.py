"""Actors on a worker: objects that live here, whose methods callers run one at a time.

A task made by ``submit(Class, actor=True)`` builds the object (:func:`zfabric.actor.create`)
and registers it under the task's key with :meth:`Actors.register`. Callers then send
``actor-call`` ops straight to this worker's data port (never through the scheduler); the loop
thread hands each call to the one actor thread of this worker, which runs them in arrival
order (so calls to one actor never overlap, as in dask.distributed) and posts the answers back
for the loop thread to send (the loop owns the socket; the eventfd wakes it). An actor goes
when the scheduler frees its key.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import threading
from collections import deque

from .. import serialize
from ..errors import ActorLost

logger = logging.getLogger(__name__)


class Actors:
    """The actors of one worker and the thread that runs their calls."""

    def __init__(self, poke, inline_bytes: int, identity: str = ""):
        self.identity = identity  # this process's worker id: calls name the one they mean
        self.poke = poke  # wakes the loop thread (thread-safe)
        self.inline_bytes = inline_bytes
        self.objects: dict[str, object] = {}
        self.replies: deque = deque()  # (peer, op, frames) for the loop thread to send
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None  # for coroutine methods

    def register(self, key: str, obj) -> None:
        self.objects[key] = obj

    def forget(self, key: str) -> None:
        self.objects.pop(key, None)

    def call(self, peer: bytes, op: dict) -> None:
        """Queue one ``actor-call`` (on the loop thread); the answer comes back in
        :attr:`replies`."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="zfabric-actors")
                self._thread.start()
        self._calls.put((peer, op))

    def stop(self) -> None:
        if self._thread is not None:
            self._calls.put(None)

    def _run(self) -> None:
        while True:
            item = self._calls.get()
            if item is None:
                if self._loop is not None:
                    self._loop.close()
                return
            peer, op = item
            reply = {"op": "actor-result", "id": op["id"]}
            frames: list = []
            try:
                value = self._execute(op)
                header, frames = serialize.dumps_value(value, self.inline_bytes)
                reply["value"] = header
                reply["nframes"] = len(frames)
            except BaseException as exc:  # the caller gets it; this thread carries on
                data, tb, text = serialize.exception_payload(exc)
                reply["error"] = [data, tb, text]
                frames = []
            self.replies.append((peer, reply, frames))
            self.poke()

    def holds(self, key: str, worker) -> bool:
        return key in self.objects and (not worker or worker == self.identity)

    def _execute(self, op: dict):
        obj = self.objects.get(op["key"])
        if obj is None or not self.holds(op["key"], op.get("worker")):
            raise ActorLost(f"actor {op['key']!r} is not on this worker (it was released, or"
                            " its worker died and another took its address); its state is"
                            " lost: create the actor again")
        name = op["name"]
        if op.get("attr"):
            return getattr(obj, name)
        args, kwargs = serialize.loads_value(op["args"]) if op.get("args") else ((), {})
        value = getattr(obj, name)(*args, **kwargs)
        if inspect.isawaitable(value):
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
            value = self._loop.run_until_complete(_await(value))
        return value


async def _await(value):
    return await value
