"""A task's way through a worker: arrival (``compute``: inline dependencies stored, missing
ones fetched), hand-off to the executor by priority, the outcome (kept, reported inline or by
size, or erred), freeing, and ``run`` calls.

Methods of :class:`~zfabric.worker.core.WorkerLoop` (mixed in); they run on its loop thread.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from collections import ChainMap, deque

from .. import serialize
from ..errors import SerializationError
from .execute import Outcome

logger = logging.getLogger(__name__)


class TaskFlow:
    """WorkerLoop's handling of tasks (see the module docstring)."""

    def _compute(self, key, payload, inline, who_has, options, fid=None) -> None:
        self.cancelled.discard(key)
        # A run of this key freed earlier must not make the executor skip this one.
        self.executor.cancelled.discard(key)
        if who_has:
            self._borrow(key, list(who_has))
        if inline:
            for k, v in inline.items():
                if k not in self.store:
                    value = serialize.loads_or_mark(k, v)
                    self.store.put(k, value, len(v))
                    if type(value) is serialize.Undecodable:
                        logger.warning("worker %s: %s", self.name, value.reason)
                        self.serialized[k] = (v, [], len(v))
        missing = fetch = None
        if who_has:
            for dep, addresses in who_has.items():
                if dep in self.store:
                    continue
                if missing is None:
                    missing, fetch = set(), []
                missing.add(dep)
                waiters = self.fetching.get(dep)
                if waiters is None:
                    self.fetching[dep] = [key]
                    fetch.append((dep, addresses))
                else:
                    waiters.append(key)
        if self.plugins:
            self.plugins.transition(key, "released", "waiting" if missing else "ready")
        if missing:
            # Waiting before any fetch starts: one that fails at once (no holder left) must
            # find the task here to report it ``missing``, or the task would wait forever.
            self.waiting[key] = [payload, missing, options, fid]
            for dep, addresses in fetch:
                self._fetch(dep, addresses)
        else:
            self.ready.append((key, payload, options, fid))

    def _borrow(self, key: str, deps: list[str]) -> None:
        self._release(key)  # a task sent again (after a lost dependency) borrows afresh
        mine = [d for d in deps if d in self.borrowed or d not in self.store]
        for d in mine:
            self.borrowed[d] = self.borrowed.get(d, 0) + 1
        if mine:
            self.borrows[key] = mine

    def _release(self, key: str) -> None:
        """Task ``key`` no longer needs its borrowed dependencies; drop those nobody needs."""
        for d in self.borrows.pop(key, ()):
            n = self.borrowed.get(d)
            if n is None:
                continue  # it became this worker's own value meanwhile
            if n > 1:
                self.borrowed[d] = n - 1
            else:
                del self.borrowed[d]
                self.store.pop(d, None)
                self.serialized.pop(d, None)
                self.raw_keys.discard(d)

    def _free(self, key: str) -> None:
        self.unconfirmed.pop(key, None)
        if key in self.actors.objects:
            self.actors.forget(key)
        if self.plugins and key in self.store:
            self.plugins.transition(key, "memory", "released")
        if key not in self.executing:
            self._release(key)  # an executing task releases when it ends
        self.raw_keys.discard(key)
        self.store.pop(key, None)
        self.serialized.pop(key, None)
        self.waiting.pop(key, None)
        if key in self.executing:
            self.cancelled.add(key)
            self.executor.cancelled.add(key)
        if self.ready and any(r[0] == key for r in self.ready):
            self.ready = deque(r for r in self.ready if r[0] != key)

    def _run_ready(self) -> None:
        ex = self.executor
        while self.ready:
            key, payload, options, fid = self.ready.popleft()
            if key in self.waiting:
                continue
            func = self.functions.get(fid) if fid is not None else None
            if func is None and fid is not None:
                func = SerializationError(f"function {fid!r} of task {key!r} never arrived")
            timeout = options.get("task_timeout") if options else None
            self.executing[key] = timeout or 0.0
            if self.plugins:
                self.plugins.transition(key, "ready", "executing")
            values = self.store
            borrowed = self.borrows.get(key)
            if borrowed:  # the run keeps its own references: a copy may go before it starts
                values = ChainMap({d: self.store[d] for d in borrowed if d in self.store}, values)
            ex.submit(key, func, payload, values,
                      options.get("priority", 0) if options else 0)

    def _drain_done(self) -> None:
        try:
            os.eventfd_read(self.wake)
        except BlockingIOError:
            pass
        started = self.executor.started
        while started:
            self.started_keys.append(started.popleft())
        done = self.executor.done
        while done:
            self._finish(done.popleft())

    def _finish(self, out: Outcome) -> None:
        key = out.key
        self.executing.pop(key, None)
        self._release(key)
        if key in self.cancelled or (not out.ok and out.error is None):
            if key in self.cancelled and out.start:  # it ran: its thread is free again
                self.outbox.append({"op": "thread-free", "keys": [key]})
            self.cancelled.discard(key)
            return
        if self.plugins:
            self.plugins.transition(key, "executing", "memory" if out.ok else "error")
        if out.ok:
            self.borrowed.pop(key, None)
            self.store.put(key, out.value, out.nbytes)
            self.serialized[key] = (out.header, out.buffers, out.nbytes)
            small = not out.buffers and out.nbytes < self.config.INLINE_BYTES
            inline = out.header if small else None
            self.finished_items.append([key, out.nbytes, inline, out.duration, out.start,
                                        out.stop, out.thread])
        else:
            data, tb, text, kind = out.error
            self.outbox.append({"op": "erred", "items": [[key, data, tb, text, kind, out.start,
                                                          out.stop, out.thread]]})

    def _run_function(self, rid: int, payload: bytes) -> None:
        try:
            func, args, kwargs = serialize.loads_task(payload, self.store)
            if _takes(func, "dask_worker"):  # dask.distributed's convention
                kwargs["dask_worker"] = self.owner or self
            value = func(*args, **kwargs)
            if inspect.iscoroutine(value):
                value = asyncio.run(value)
            header, _ = serialize.dumps_value(value, inline_bytes=1 << 62)
            self.outbox.append({"op": "run-result", "id": rid, "value": header})
        except Exception as exc:
            data, tb, text = serialize.exception_payload(exc)
            self.outbox.append({"op": "run-result", "id": rid, "error": [data, tb, text]})


def _takes(func, name: str) -> bool:
    try:
        return name in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
