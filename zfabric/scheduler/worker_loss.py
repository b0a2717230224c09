"""Losing a worker: move its tasks, blame what it was running, recompute or fail its data.

Methods of :class:`~zfabric.scheduler.state.SchedulerState` (mixed in), pure like it.
"""

from __future__ import annotations

import logging

from . import policy
from .records import TaskState, WorkerState

logger = logging.getLogger(__name__)


class WorkerLoss:
    """SchedulerState's handling of workers that leave or die (see the module docstring)."""

    def peer_gone(self, peer: bytes, now: float, why: str = "its connection is gone") -> None:
        """A send to ``peer`` failed because its connection is gone (the ROUTER's
        ``ROUTER_MANDATORY`` says so at once), or it does not read what we send: drop it now
        rather than after its ttl."""
        self.now = now
        ws = self.workers.get(peer)
        if ws is not None:
            # What we could not send it, it never ran: blame only what it said it started.
            self.remove_worker(ws, why, died=True, unheard=False)
            return
        cs = self.clients.get(peer)
        if cs is not None:
            self._event(f"client {cs.name}: {why}; releasing its futures")
            self.remove_client(cs)
            return
        self._drop_nanny(peer)

    def _missing(self, ws: WorkerState, key: str, dep: str, address: str) -> None:
        """A worker could not fetch ``dep`` from ``address``: fix who_has and try again."""
        ts = self.tasks.get(key)
        dts = self.tasks.get(dep)
        # Only about a task it was given, and one of that task's dependencies.
        if ts is None or ts.processing_on is not ws or dts is None or dts not in ts.deps:
            return
        holder = self.workers_by_address.get(address)
        if holder is not None and dts.held_by(holder):
            dts.drop_holder(holder)
        ws.done(ts, 0.0)
        ts.processing_on = None
        self._set_state(ts, "released")
        if dts.state == "memory" and dts.holders is None and dts.value is None:
            self._lose(dts)
        self._start(ts)

    def remove_worker(self, ws: WorkerState, reason: str, *, died: bool,
                      unheard: bool = True) -> None:
        """Take a worker out: move its tasks elsewhere, recompute or fail what it held.

        When it ``died``, the tasks it was running are blamed (see :func:`policy.probably_running`;
        ``unheard=False`` blames only those it said it started).
        """
        if self.workers.pop(ws.ident, None) is None:
            return
        self._fan_out.peer_left(ws.ident)
        if self.workers_by_address.get(ws.address) is ws:
            del self.workers_by_address[ws.address]
        self._event(f"worker {ws.name} ({ws.address}) removed: {reason}",
                    "worker-died" if died else "worker-removed")
        for ident in self.coord.worker_gone(ws.address):  # its tasks' leases and waits
            self.coord.client_gone(ident)
        if ws.nanny in self.nannies:
            self.nannies[ws.nanny].workers.discard(ws.ident)
        if not died:
            self.send(ws.ident, {"op": "reregister", "reason": f"removed: {reason}"})
        processing = list(ws.processing.values())
        if not died:
            blamed = ()
        elif unheard:
            blamed = policy.probably_running(ws, processing)
        else:
            blamed = {ts for ts in processing if ts.started}
        for ts in processing:
            ws.done(ts, 0.0)
            ts.processing_on = None
            if ts in blamed:
                ts.suspicious += 1
                if ts.suspicious > self.config.ALLOWED_FAILURES:
                    self._event(f"KilledWorker: task {ts.key!r} was running on {ts.suspicious}"
                                " workers that died", "killed-worker")
                    self._fail(
                        ts,
                        None,
                        None,
                        f"task {ts.key!r} was running on {ts.suspicious} workers that died"
                        f" (the last one {ws.address}, {reason}); it probably crashes or"
                        " exhausts the worker. Allowed failures:"
                        f" {self.config.ALLOWED_FAILURES}",
                        kind="KilledWorker",
                        extra={"task": ts.key, "last_worker": ws.address, "count": ts.suspicious},
                    )
                    continue
            self._set_state(ts, "released")
            self._start(ts)
        for ts in ws.has_what:
            ts.drop_holder(ws)
            if ts.state == "memory" and ts.holders is None and ts.value is None:
                self._lose(ts)
        ws.clear_held()
        self._fill_restricted()
        for other in list(self.workers.values()):
            self._fill(other)

    def _lose(self, ts: TaskState) -> None:
        """The only copy of a large value is gone: recompute it, or fail if it was scattered."""
        if ts.scattered:
            self._fail(ts, None, None,
                       f"scattered data {ts.key!r} was lost with its worker and cannot be"
                       " recomputed; scatter it again", kind="LostDataError")
            return
        for cs in ts.wanters():
            self.send(cs.ident, {"op": "lost", "keys": [ts.key]})
        self._set_state(ts, "released")
        # Dependents counted it as there: waiting ones wait for it again, queued ones go back
        # to waiting (they would run without it).
        requeue = []
        for d in ts.dependents or ():
            if d.state == "waiting":
                d.waiting_on += 1
            elif d.state == "queued":
                self._restricted_drop(d)
                self._set_state(d, "released")
                requeue.append(d)
        needed = bool(ts.who_wants) or any(
            d.state in ("waiting", "queued", "processing") for d in ts.dependents or ()
        )
        # Dependents given to a worker but not started there may be fetching the value from
        # the holder that is gone, which fails only after the fetch timeout: take them back
        # to wait for the new copy.
        moved = [d for d in ts.dependents or () if d.state == "processing" and not d.started]
        for d in moved:
            self._drop_work(d)
            self._set_state(d, "released")
        if needed or requeue:
            self._recompute(ts)
        for d in (*moved, *requeue):
            if d.state == "released":
                self._start(d)

    def _recompute(self, ts: TaskState) -> None:
        """Bring a released task back, with whatever of its lineage is missing."""
        stack = [ts]
        while stack:
            t = stack.pop()
            if t.state != "released":
                continue
            if t.payload is None:
                self._fail(t, None, None, f"scattered data {t.key!r} was released or lost and"
                           " cannot be recomputed", kind="LostDataError")
                continue
            self._start(t)
            stack.extend(d for d in t.deps if d.state == "released")
