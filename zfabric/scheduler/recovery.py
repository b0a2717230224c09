"""A restarted scheduler rebuilds its state from its peers (docs/faults.md, "The scheduler
restarts").

A new scheduler incarnation at the same address knows nothing; its peers know everything it
needs. Workers that lost their scheduler keep what they hold and what runs; after their hello
they report it (``holding``: keys with sizes, and the keys that run). Clients that lost it
send again, after their hello, every task they still wait for (in the order they first sent
them, so dependencies come first), the small values they hold, and the keys they hold futures
for.

The first rejoining peer (a ``holding`` report, or a client's hello with ``rejoin``) starts
the *settle* time, ``RESTART_SETTLE_S``: clients' ops wait here meanwhile (:meth:`defer`) so
that the workers report first, and are applied in arrival order after it (:meth:`tick`).
Then a submitted task whose key a worker reported holding goes straight to memory with that
holder (:meth:`claim`): it is not run again; one reported running is left to finish where it
runs. A value reported for a task that waits, or is queued, or is processing somewhere it has
not started, is taken as the task's result (:meth:`held`). Reported values no client claims
within ``RESTART_GRACE_S`` of the restart are freed on their workers.

A part of :class:`~zfabric.scheduler.state.SchedulerState` (``recovery``), pure like it: it
changes records and queues ops, nothing else. Outside a restart its only cost is one attribute
test per client message (``settle_until``) and two per submitted task (``orphans``,
``running``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..protocol import FinishedItem
from .records import TaskState, WorkerState

if TYPE_CHECKING:
    from .state import SchedulerState


class Recovery:
    """What a restarted scheduler learns from its peers (see the module docstring)."""

    def __init__(self, s: SchedulerState):
        self.s = s
        self.settle_until = 0.0  # non-zero while clients' ops wait for the workers' reports
        self.grace_until = 0.0  # non-zero while reported values wait for a claim
        self.deferred: list[tuple[bytes, list]] = []
        #: key -> {worker: bytes}: values workers reported that no task record names yet
        self.orphans: dict[str, dict[WorkerState, int]] = {}
        #: key -> the worker it runs on: tasks running at the restart, no record yet
        self.running: dict[str, WorkerState] = {}
        self.counts = {"workers": 0, "clients": 0, "keys reported": 0, "kept": 0,
                       "left running": 0}

    # ------------------------------------------------------------------ who rejoins

    def rejoined(self, what: str) -> None:
        """A peer of the old incarnation is back (``what``: worker or client)."""
        s = self.s
        if not self.grace_until:
            self.settle_until = s.now + s.config.RESTART_SETTLE_S
            self.grace_until = s.now + s.config.RESTART_GRACE_S
            s.event("scheduler replaced: a new incarnation rebuilds its state from the workers"
                    " and clients of the old one", "scheduler-replaced")
        self.counts[what + "s"] += 1

    def holding(self, ws: WorkerState, items: list, running: list, epoch) -> None:
        """A rejoining worker's report (checked at the protocol's door); ``epoch``: the
        incarnation it knew (this one's when this scheduler dropped it and it came back)."""
        if epoch == self.s.epoch:
            # This scheduler declared the worker dead and has already dealt with its tasks
            # (run again elsewhere, or failed): what it still holds or runs is stale here.
            for key, _ in items:
                self.s.batch(ws.ident, "free", key)
            for key in running:
                self.s.batch(ws.ident, "free", key)
            return
        self.rejoined("worker")
        self.counts["keys reported"] += len(items)
        for key, nbytes in items:
            self.held(ws, key, nbytes)
        tasks = self.s.tasks
        for key in running:
            ts = tasks.get(key)
            if ts is None:
                self.running[key] = ws
            elif ts.state in ("waiting", "queued", "released"):
                self._run_on(ts, ws)

    def held(self, ws: WorkerState, key: str, nbytes: int) -> None:
        """``ws`` holds ``key`` (reported, or a task it ran across the restart finished)."""
        s = self.s
        if self.running.get(key) is ws:
            del self.running[key]
        ts = s.tasks.get(key)
        if ts is None:
            if self.grace_until:
                self.orphans.setdefault(key, {})[ws] = nbytes
            else:
                s.batch(ws.ident, "free", key)
            return
        if ts.held_by(ws):
            return
        state = ts.state
        if state == "memory":
            ts.add_holder(ws)
        elif state in ("waiting", "queued", "released") or (
                state == "processing" and ts.processing_on is not None
                and ts not in (ts.processing_on.started or ())):
            self._adopt(ts, {ws: nbytes})
        else:
            s.batch(ws.ident, "free", key)  # erred or running elsewhere: not its result

    # ------------------------------------------------------------------ clients' ops

    def defer(self, peer: bytes, ops: list) -> bool:
        """Called for each client message while ``settle_until`` is set: True when the ops
        were kept for later (the settle time runs), False when they apply now."""
        if self.s.now < self.settle_until:
            self.deferred.append((peer, ops))
            return True
        self._apply_deferred()
        return False

    def _apply_deferred(self) -> None:
        self.settle_until = 0.0
        deferred, self.deferred = self.deferred, []
        s = self.s
        for peer, ops in deferred:
            if peer in s.clients:
                s.handle(peer, ops, s.now)
        s.event(f"scheduler state rebuilt from {self.counts['workers']} worker report(s) and"
                f" {self.counts['clients']} client(s): {len(s.tasks)} tasks,"
                f" {self.counts['kept']} results kept, {self.counts['left running']} left"
                " running", "scheduler-rebuilt")

    def claim(self, ts: TaskState) -> bool:
        """A task submitted during recovery: True when a worker holds its result (it goes to
        memory, not run again) or runs it (it stays there)."""
        s = self.s
        holders = self.orphans.pop(ts.key, None)
        if holders:
            live = {ws: n for ws, n in holders.items() if ws.ident in s.workers}
            if live:
                self._adopt(ts, live)
                return True
        ws = self.running.pop(ts.key, None)
        if ws is not None and ws.ident in s.workers:
            self._run_on(ts, ws)
            return True
        return False

    def wanted(self, cs, key: str) -> TaskState | None:
        """A client wants a key no record names: a record for a value a worker reported (it
        cannot be recomputed: nothing says how), or None."""
        holders = self.orphans.pop(key, None)
        s = self.s
        live = {ws: n for ws, n in (holders or {}).items() if ws.ident in s.workers}
        if not live:
            return None
        ts = TaskState(key, None)
        s.tasks[key] = ts
        s.observe_new(ts)
        s.seq += 1
        ts.priority = s.seq
        ts.scattered = True
        ts.add_wanter(cs)  # (want_key tells it the state)
        self._adopt(ts, live)
        return ts

    def _adopt(self, ts: TaskState, holders: dict[WorkerState, int]) -> None:
        """``ts``'s result is held by ``holders``: it is in memory now."""
        s = self.s
        ws = ts.processing_on
        if ws is not None:  # queued there, not started: take it back
            ws.done(ts, 0.0)
            s.batch(ws.ident, "free", ts.key)
            ts.processing_on = None
        if ts.state == "queued":
            s.restricted_drop(ts)  # (the ready queue skips it: not queued any more)
        for w, n in holders.items():
            ts.nbytes = n
            ts.add_holder(w)
        s.set_state(ts, "memory")
        self.counts["kept"] += 1
        told = None
        for cs in ts.wanters():
            told = told or ts.memory_item()
            s.batch(cs.ident, "memory", told)
        s.release_dependents_waiting(ts)
        s.check_release([ts, *ts.deps])
        if ws is not None:
            s.fill(ws)

    def _run_on(self, ts: TaskState, ws: WorkerState) -> None:
        """``ts`` runs on ``ws`` since before the restart: it stays there (not sent again)."""
        s = self.s
        if ts.state == "queued":
            s.restricted_drop(ts)
        s.set_state(ts, "processing")
        ts.processing_on = ws
        ws.assign(ts)
        ws.mark_started(ts)
        self.counts["left running"] += 1

    def finished(self, ws: WorkerState, item: FinishedItem) -> bool:
        """A worker finished a task this incarnation did not give it: during recovery, its
        result is taken as a report of what it holds (True)."""
        if not self.grace_until:
            return False
        self.held(ws, item.key, item.nbytes)
        return True

    # ------------------------------------------------------------------ time

    def tick(self, now: float) -> None:
        if self.settle_until and now >= self.settle_until:
            self._apply_deferred()
        if self.grace_until and now >= self.grace_until and not self.settle_until:
            self.grace_until = 0.0
            s = self.s
            for key, holders in self.orphans.items():
                for ws in holders:
                    if ws.ident in s.workers:
                        s.batch(ws.ident, "free", key)
            if self.orphans:
                s.event(f"freed {len(self.orphans)} values workers kept across the restart"
                        " that no client claimed", "scheduler-rebuilt")
            self.orphans.clear()
            self.running.clear()

    def forget_worker(self, ws: WorkerState) -> None:
        """``ws`` left: what it reported is gone with it."""
        if self.orphans:
            for key in [k for k, h in self.orphans.items() if ws in h]:
                h = self.orphans[key]
                del h[ws]
                if not h:
                    del self.orphans[key]
        if self.running:
            for key in [k for k, w in self.running.items() if w is ws]:
                del self.running[key]
