"""Losing a worker: move its tasks, blame what it was running, recompute or fail its data.

A part of :class:`~zfabric.scheduler.state.SchedulerState`, which it is given (``s``), pure like it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from . import policy
from .records import TaskState, WorkerState

if TYPE_CHECKING:
    from .state import SchedulerState

logger = logging.getLogger(__name__)


class WorkerLoss:
    """SchedulerState's handling of workers that leave or die (see the module docstring)."""

    def __init__(self, s: SchedulerState):
        self.s = s

    def peer_gone(self, peer: bytes, now: float, why: str = "its connection is gone") -> None:
        """A send to ``peer`` failed because its connection is gone (the ROUTER's
        ``ROUTER_MANDATORY`` says so at once), or it does not read what we send: drop it now
        rather than after its ttl."""
        self.s.now = now
        ws = self.s.workers.get(peer)
        if ws is not None:
            # What we could not send it, it never ran: blame only what it said it started.
            self.remove_worker(ws, why, died=True, unheard=False)
            return
        cs = self.s.clients.get(peer)
        if cs is not None:
            self.s.event(f"client {cs.name}: {why}; releasing its futures")
            self.s.keys.remove_client(cs)
            return
        self.s.queries.drop_nanny(peer)

    def missing(self, ws: WorkerState, key: str, dep: str, address: str) -> None:
        """A worker could not fetch ``dep`` from ``address``: fix who_has and try again."""
        ts = self.s.tasks.get(key)
        dts = self.s.tasks.get(dep)
        # Only about a task it was given, and one of that task's dependencies.
        if ts is None or ts.processing_on is not ws or dts is None or dts not in ts.deps:
            return
        holder = self.s.workers_by_address.get(address)
        if holder is not None and dts.held_by(holder):
            dts.drop_holder(holder)
        ws.done(ts, 0.0)
        ts.processing_on = None
        self.s.set_state(ts, "released")
        if dts.state == "memory" and dts.holders is None and dts.value is None:
            self._lose(dts)
        self.s.start(ts)

    def remove_worker(self, ws: WorkerState, reason: str, *, died: bool,
                      unheard: bool = True) -> None:
        """Take a worker out: move its tasks elsewhere, recompute or fail what it held.

        When it ``died``, the tasks it was running are blamed (see :func:`policy.probably_running`;
        ``unheard=False`` blames only those it said it started).
        """
        if self.s.workers.pop(ws.ident, None) is None:
            return
        self.s.candidates.remove(ws)
        if self.s.recovery.grace_until:
            self.s.recovery.forget_worker(ws)
        self.s.peers_changed()
        self.s.fan_out.peer_left(ws.ident)
        if self.s.workers_by_address.get(ws.address) is ws:
            del self.s.workers_by_address[ws.address]
        self.s.event(f"worker {ws.name} ({ws.address}) removed: {reason}",
                    "worker-died" if died else "worker-removed")
        for ident in self.s.coord.worker_gone(ws.address):  # its tasks' leases and waits
            self.s.coord.client_gone(ident)
        if ws.nanny in self.s.nannies:
            self.s.nannies[ws.nanny].workers.discard(ws.ident)
        if not died:
            self.s.send(ws.ident, {"op": "reregister", "reason": f"removed: {reason}"})
        processing = list(ws.processing.values())
        blamed: set[TaskState] | tuple[()]
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
                if ts.suspicious > self.s.config.ALLOWED_FAILURES:
                    self.s.event(f"KilledWorker: task {ts.key!r} was running on {ts.suspicious}"
                                " workers that died", "killed-worker")
                    self.s.fail(
                        ts,
                        None,
                        None,
                        f"task {ts.key!r} was running on {ts.suspicious} workers that died"
                        f" (the last one {ws.address}, {reason}); it probably crashes or"
                        " exhausts the worker. Allowed failures:"
                        f" {self.s.config.ALLOWED_FAILURES}",
                        kind="KilledWorker",
                        extra={"task": ts.key, "last_worker": ws.address, "count": ts.suspicious},
                    )
                    continue
            self.s.set_state(ts, "released")
            self.s.start(ts)
        for ts in ws.has_what:
            ts.drop_holder(ws)
            if ts.state == "memory" and ts.holders is None and ts.value is None:
                self._lose(ts)
        ws.clear_held()
        self.s.give_back_reserve(ws)
        self.s.fill_restricted()
        for other in list(self.s.workers.values()):
            self.s.fill(other)

    def _lose(self, ts: TaskState) -> None:
        """The only copy of a large value is gone: recompute it, or fail if it was scattered."""
        if ts.scattered:
            self.s.fail(ts, None, None,
                       f"scattered data {ts.key!r} was lost with its worker and cannot be"
                       " recomputed; scatter it again", kind="LostDataError")
            return
        for cs in ts.wanters():
            self.s.send(cs.ident, {"op": "lost", "keys": [ts.key]})
        self.s.set_state(ts, "released")
        # Dependents counted it as there: waiting ones wait for it again, queued ones go back
        # to waiting (they would run without it).
        requeue = []
        for d in ts.dependents or ():
            if d.state == "waiting":
                d.waiting_on += 1
            elif d.state == "queued":
                self.s.restricted_drop(d)
                self.s.set_state(d, "released")
                requeue.append(d)
        needed = bool(ts.who_wants) or any(
            d.state in ("waiting", "queued", "processing") for d in ts.dependents or ()
        )
        # Dependents given to a worker but not started there may be fetching the value from
        # the holder that is gone, which fails only after the fetch timeout: take them back
        # to wait for the new copy.
        moved = [d for d in ts.dependents or () if d.state == "processing" and not d.started]
        for d in moved:
            self.s.drop_work(d)
            self.s.set_state(d, "released")
        if needed or requeue:
            self.s.recompute(ts)
        for d in (*moved, *requeue):
            if d.state == "released":
                self.s.start(d)
