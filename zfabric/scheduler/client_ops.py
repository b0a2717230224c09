"""What clients ask of the scheduler: submit, want, release, cancel, scatter.

A part of :class:`~zfabric.scheduler.state.SchedulerState`, which it is given (``s``), pure like it:
it changes records and queues ops, nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..errors import RemoteProtocolError
from ..protocol import ScatterItem, TaskSpec
from .records import FIRE_AND_FORGET, HELD, ClientState, TaskState

if TYPE_CHECKING:
    from .state import SchedulerState

logger = logging.getLogger(__name__)


class ClientOps:
    """SchedulerState's handling of clients' keys (see the module docstring)."""

    def __init__(self, s: SchedulerState):
        self.s = s

    def remove_client(self, cs: ClientState) -> None:
        self.s.clients.pop(cs.ident, None)
        self.s.peers_changed()
        self.s.admins.discard(cs.ident)
        self.s.coord.client_gone(cs.ident)
        self.s.subs.peer_gone(cs.ident)
        # O(tasks), but only when a client leaves (see ClientState).
        for ts in [t for t in self.s.tasks.values() if t.wanted_by(cs)]:
            self.release_key(cs, ts.key)

    def add_functions(self, functions) -> list[str]:
        """Keep the function pickles that submitted tasks refer to by id (one copy each);
        returns the ids that were new (dropped again if no task comes to use them)."""
        if not functions:
            return []
        added = []
        for fid, data in functions.items():
            if fid not in self.s.functions:
                # pickle, tasks using it, the id all its tasks share, the workers sent it
                self.s.functions[fid] = [data, 0, fid, []]
                added.append(fid)
        return added

    def drop_function(self, fid: str) -> None:
        entry = self.s.functions.get(fid)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del self.s.functions[fid]
            for ws in entry[3]:  # O(workers sent it), not O(workers)
                if fid in ws.functions and ws.index is not None:  # (still connected)
                    ws.forget_function(fid)
                    self.s.batch(ws.ident, "forget-functions", fid)

    def submit(self, cs: ClientState, items: list[TaskSpec]) -> None:
        """Add tasks (checked at the protocol's door: :class:`~zfabric.protocol.TaskSpec`)."""
        if cs.ident == FIRE_AND_FORGET:
            return
        # Root tasks (no dependency, no restriction) in priority order: started together
        # once the op is read, so that many of them are placed in runs (see .runs).
        roots: list[TaskState] = []
        try:
            self._submit(cs, items, roots)
        finally:  # (a bad item refuses the rest of the op, not the tasks before it)
            if roots:
                self.s.start_roots(roots)

    def _submit(self, cs: ClientState, items: list[TaskSpec], roots: list[TaskState]) -> None:
        for key, payload, deps, opts, fid in items:
            entry = None
            if fid is not None:
                entry = self.s.functions.get(fid)
                if entry is None:
                    raise RemoteProtocolError(
                        f"task {key!r} refers to function {fid!r}, which was not sent with it")
            ts = self.s.tasks.get(key)
            if ts is not None and ts.state != "released":
                self._want(cs, ts)
                if opts and opts.get("fire_and_forget"):
                    self._want(self.s.clients[FIRE_AND_FORGET], ts)
                continue
            dep_states = []
            missing = None
            for d in deps:
                dts = self.s.tasks.get(d)
                if dts is None:
                    missing = d
                    break
                dep_states.append(dts)
            if ts is None:
                ts = TaskState(key, payload)
                self.s.tasks[key] = ts
                self.s.observe_new(ts)
            else:
                ts.payload = payload
                if ts.func is not None:
                    self.drop_function(ts.func)
            if entry is not None:
                entry[1] += 1
                ts.func = entry[2]  # one id string shared by all its tasks
            self.s.seq += 1
            prio = 0
            if opts:
                prio = -int(opts.get("priority") or 0)
                ts.retries = int(opts.get("retries") or 0)
                ts.set_options(opts)
            ts.priority = prio * 2**40 + self.s.seq
            self._want(cs, ts)
            if opts and opts.get("fire_and_forget"):
                self._want(self.s.clients[FIRE_AND_FORGET], ts)
            if missing is not None:
                self.s.fail(
                    ts,
                    None,
                    None,
                    f"dependency {missing!r} of {key!r} is not known to the scheduler (was its"
                    " future released or cancelled?); keep a future for it while it is needed",
                    kind="LostDataError",
                )
                continue
            if len(dep_states) > 1:
                # each once: a task waits on, and is a dependent of, each dependency once
                dep_states = list(dict.fromkeys(dep_states))
            old = ts.deps
            ts.deps = dep_states
            if old:  # a released task submitted again keeps its links
                for dts in old:
                    if dts not in dep_states:
                        dts.discard_dependent(ts)
                dep_states = [dts for dts in dep_states if dts not in old]
            for dts in dep_states:
                dts.add_dependent(ts)
            rec = self.s.recovery
            if (rec.orphans or rec.running) and rec.claim(ts):
                continue  # a worker kept its result, or runs it, across a restart
            if ts.parents is None and not ts.restricted \
                    and (not roots or roots[-1].priority < ts.priority):
                roots.append(ts)
                continue
            self.s.start(ts)

    def _want(self, cs: ClientState, ts: TaskState) -> None:
        if ts.wanted_by(cs):
            return
        ts.add_wanter(cs)
        if ts.state == "memory":
            self.s.batch(cs.ident, "memory", ts.memory_item())
        elif ts.state == "erred":
            self.s.batch(cs.ident, "erred", ts.erred_item())

    def drop_fire_and_forget(self, ts: TaskState) -> None:
        faf = self.s.clients[FIRE_AND_FORGET]
        if ts.wanted_by(faf):
            ts.drop_wanter(faf)

    def want_key(self, cs: ClientState, key: str) -> None:
        ts = self.s.tasks.get(key)
        if ts is None and self.s.recovery.orphans:
            ts = self.s.recovery.wanted(cs, key)
        if ts is None:
            self.s.send(cs.ident, {"op": "cancelled", "keys": [key]})
            return
        if ts.wanted_by(cs):  # wanted for it already (a Queue gave it): tell it the state
            ts.drop_wanter(cs)
        self._want(cs, ts)
        if ts.state == "released":
            self.s.recompute(ts)

    def release_key(self, cs: ClientState, key: str) -> None:
        ts = self.s.tasks.get(key)
        if ts is None or not ts.wanted_by(cs):
            return
        ts.drop_wanter(cs)
        self.s.check_release([ts])

    def cancel(self, keys: Iterable[str], reason: str | None = None,
               restart: bool = False, by: ClientState | None = None) -> None:
        """Cancel these tasks and what depends on them; tell the clients that want them (with
        ``reason``; ``restart``: even finished ones).

        ``by``: the client asking, without ``force``: a key another client also wants is only
        released for ``by`` (its futures are cancelled, the others' are not).
        """
        stack = [self.s.tasks[k] for k in keys if k in self.s.tasks]
        if by is not None:
            shared = [ts for ts in stack if any(c is not by for c in ts.wanters())]
            if shared:
                stack = [ts for ts in stack if ts not in shared]
                op: dict = {"op": "cancelled", "keys": [ts.key for ts in shared]}
                if reason:
                    op["reason"] = reason
                self.s.send(by.ident, op)
                for ts in shared:
                    self.release_key(by, ts.key)
        seen = set()
        doomed = []
        while stack:
            ts = stack.pop()
            if ts in seen:
                continue
            seen.add(ts)
            doomed.append(ts)
            stack.extend(ts.dependents or ())
        by_client: dict[bytes, list[str]] = {}
        for ts in doomed:
            for cs in ts.wanters():
                by_client.setdefault(cs.ident, []).append(ts.key)
            ts.who_wants = None
        for ident, ks in by_client.items():
            op = {"op": "cancelled", "keys": ks}
            if reason:
                op["reason"] = reason
            if restart:
                op["restart"] = True
            self.s.send(ident, op)
        self.s.check_release(doomed)

    def retry(self, keys: Iterable[str]) -> None:
        """Run erred tasks again, with the erred tasks upstream of them (``Future.retry``)."""
        stack = [self.s.tasks[k] for k in keys if k in self.s.tasks]
        again, seen = [], set()
        while stack:
            ts = stack.pop()
            if ts in seen or ts.state != "erred" or ts.payload is None:
                continue
            seen.add(ts)
            ts.error = None
            self.s.set_state(ts, "released")
            again.append(ts)
            stack.extend(ts.deps)
        by_client: dict[bytes, list[str]] = {}
        for ts in again:
            for cs in ts.wanters():
                by_client.setdefault(cs.ident, []).append(ts.key)
        for ident, ks in by_client.items():
            self.s.send(ident, {"op": "retried", "keys": ks})
        for ts in again:
            if ts.state == "released":
                self.s.start(ts)

    def scatter(self, cs: ClientState, items: list[ScatterItem],
                fire_and_forget: bool = False) -> None:
        """Register data a client placed (checked at the protocol's door)."""
        for key, value, nbytes, addresses in items:
            ts = self.s.tasks.get(key)
            if ts is not None and ts.state not in ("memory", "released"):
                raise RemoteProtocolError(
                    f"cannot scatter {key!r}: a task with that key is {ts.state}; scatter under"
                    " another key")
            known = self.s.workers_by_address
            holders = [known[a] for a in addresses if a in known]
            if self.s.recovery.orphans:  # sent again after a restart: its holders reported it
                holders.extend(w for w in self.s.recovery.orphans.pop(key, ())
                               if w.ident in self.s.workers and w not in holders)
            if ts is None:
                ts = TaskState(key, None)
                self.s.tasks[key] = ts
                self.s.observe_new(ts)
                self.s.seq += 1
                ts.priority = self.s.seq
            ts.scattered = True
            ts.value = value
            for w in ts.who_has:  # their byte counts took the old size
                w.nbytes += nbytes - ts.nbytes
            ts.nbytes = nbytes
            for ws in holders:
                ts.add_holder(ws)
            if value is None and not holders:
                self._want(cs, ts)
                self.s.fail(ts, None, None, f"scattered {key!r} has no live worker holding it",
                           kind="LostDataError")
                continue
            if ts.state != "memory":
                self.s.set_state(ts, "memory")
            self._want(cs, ts)
            self.s.release_dependents_waiting(ts)

    def wanted_keys(self, cs: ClientState) -> list[str]:
        """The keys a client holds futures for (O(tasks); for tests and diagnostics)."""
        return [t.key for t in self.s.tasks.values() if t.wanted_by(cs)]

    # ------------------------------------------------------------------ shared state
    # Coordination's side: the keys records hold are wanted by the HELD pseudo client, so
    # reference counting needs no rule of its own.

    def hold(self, key: str) -> None:
        """Keep a key alive for a Variable, Queue or dataset (KeyError if unknown)."""
        ts = self.s.tasks[key]
        self._want(self.s.clients[HELD], ts)
        if ts.state == "released":
            self.s.recompute(ts)

    def unhold(self, key: str) -> None:
        self.release_key(self.s.clients[HELD], key)

    def give(self, peer: bytes, key: str) -> None:
        # quietly: the client's Future for the key asks ("want") and is told the state then
        cs, ts = self.s.clients.get(peer), self.s.tasks.get(key)
        if cs is not None and ts is not None and not ts.wanted_by(cs):
            ts.add_wanter(cs)

    def client_seen(self, peer: bytes) -> float | None:
        cs = self.s.clients.get(peer)
        return None if cs is None else cs.last_seen
