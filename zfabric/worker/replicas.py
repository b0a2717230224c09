"""Copies the scheduler asks a worker to keep (``acquire``): for ``replicate`` and retirement.

A mixin of :class:`~zfabric.worker.core.WorkerLoop`, on its loop thread. Each item of an
``acquire`` op is ``[key, inline value or None, [holder addresses]]``. The value is fetched
through the same queue as task dependencies (:mod:`.data`); once stored it is this worker's
own (not a borrowed dependency that leaves with the task that needed it), and the scheduler is
told with ``acquired`` (``keys`` now held, ``failed`` those that could not be had), after
which it counts this worker among the key's holders.
"""

from __future__ import annotations

import logging

from .. import serialize

logger = logging.getLogger("zfabric.worker.core")


class Replicas:
    """The acquire methods of the worker loop (see the module docstring)."""

    def _acquire(self, items: list) -> None:
        done, failed = [], []
        for item in items:
            try:
                key, value, addresses = item
            except (TypeError, ValueError):
                logger.warning("ignoring a malformed acquire item %r", item)
                continue
            if key in self.store and key not in self.fetching:
                self.borrowed.pop(key, None)  # a borrowed copy becomes its own
                done.append(key)
            elif value is not None:
                try:
                    self.store[key] = serialize.loads_value(value)
                except Exception as exc:
                    logger.warning("could not load acquired %r: %s", key, exc)
                    failed.append(key)
                    continue
                self.serialized.pop(key, None)
                self.borrowed.pop(key, None)
                done.append(key)
            else:
                self.acquiring.add(key)
                if key not in self.fetching:
                    self.fetching[key] = []
                    self._fetch(key, list(addresses or ()))
        self._report_acquired(done, failed)

    def _acquire_ended(self, key: str, ok: bool) -> None:
        """A fetch of ``key`` ended (called from the data plane before its waiters)."""
        if key not in self.acquiring:
            return
        self.acquiring.discard(key)
        if ok:
            self.borrowed.pop(key, None)
            self._report_acquired([key], [])
        else:
            self._report_acquired([], [key])

    def _report_acquired(self, done: list, failed: list) -> None:
        if done or failed:
            self.outbox.append({"op": "acquired", "keys": done, "failed": failed})
