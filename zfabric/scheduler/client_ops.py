"""What clients ask of the scheduler: submit, want, release, cancel, scatter.

Methods of :class:`~zfabric.scheduler.state.SchedulerState` (mixed in), pure like it: they
change records and queue ops, nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from ..errors import RemoteProtocolError
from ..protocol import check_task_options
from .records import FIRE_AND_FORGET, ClientState, TaskState

logger = logging.getLogger(__name__)


class ClientOps:
    """SchedulerState's handling of clients' keys (see the module docstring)."""

    def remove_client(self, cs: ClientState) -> None:
        self.clients.pop(cs.ident, None)
        self.admins.discard(cs.ident)
        self.coord.client_gone(cs.ident)
        # O(tasks), but only when a client leaves (see ClientState).
        for ts in [t for t in self.tasks.values() if t.wanted_by(cs)]:
            self.release_key(cs, ts.key)

    def add_functions(self, functions) -> list[str]:
        """Keep the function pickles that submitted tasks refer to by id (one copy each);
        returns the ids that were new (dropped again if no task comes to use them)."""
        if not functions:
            return []
        if type(functions) is not dict:
            raise RemoteProtocolError("submit's functions must map ids to pickles")
        for fid, data in functions.items():
            if type(fid) is not str or type(data) is not bytes:
                raise RemoteProtocolError("submit's functions must map string ids to bytes")
        added = []
        for fid, data in functions.items():
            if fid not in self.functions:
                self.functions[fid] = [data, 0, fid]  # pickle, tasks using it, shared id
                added.append(fid)
        return added

    def _drop_function(self, fid: str) -> None:
        entry = self.functions.get(fid)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del self.functions[fid]
            for ws in self.workers.values():
                if fid in ws.functions:
                    ws.functions.discard(fid)
                    self.batch(ws.ident, "forget-functions", fid)

    def submit(self, cs: ClientState, items: list) -> None:
        """Add tasks: each item is ``[key, args pickle, dep keys, options or None, function id]``
        (or, without the function id, ``[key, whole-call payload, dep keys, options]``)."""
        if cs.ident == FIRE_AND_FORGET:
            return
        for item in items:
            key, payload, deps, opts, *rest = item
            if type(key) is not str or type(payload) is not bytes or type(deps) is not list:
                raise RemoteProtocolError(f"malformed task {str(item)[:200]}")
            if opts is not None:
                check_task_options(key, opts)
            fid = rest[0] if rest else None
            entry = None
            if fid is not None:
                entry = self.functions.get(fid) if type(fid) is str else None
                if entry is None:
                    raise RemoteProtocolError(
                        f"task {key!r} refers to function {fid!r}, which was not sent with it")
            ts = self.tasks.get(key)
            if ts is not None and ts.state != "released":
                self._want(cs, ts)
                if opts and opts.get("fire_and_forget"):
                    self._want(self.clients[FIRE_AND_FORGET], ts)
                continue
            dep_states = []
            missing = None
            for d in deps:
                dts = self.tasks.get(d)
                if dts is None:
                    missing = d
                    break
                dep_states.append(dts)
            if ts is None:
                ts = TaskState(key, payload)
                self.tasks[key] = ts
                self._observe_new(ts)
            else:
                ts.payload = payload
                if ts.func is not None:
                    self._drop_function(ts.func)
            if entry is not None:
                entry[1] += 1
                ts.func = entry[2]  # one id string shared by all its tasks
            self._seq += 1
            prio = 0
            if opts:
                prio = -int(opts.get("priority") or 0)
                ts.retries = int(opts.get("retries") or 0)
                ts.set_options(opts)
            ts.priority = prio * 2**40 + self._seq
            self._want(cs, ts)
            if opts and opts.get("fire_and_forget"):
                self._want(self.clients[FIRE_AND_FORGET], ts)
            if missing is not None:
                self._fail(
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
            self._start(ts)

    def _want(self, cs: ClientState, ts: TaskState) -> None:
        if ts.wanted_by(cs):
            return
        ts.add_wanter(cs)
        if ts.state == "memory":
            self.batch(cs.ident, "memory", ts.memory_item())
        elif ts.state == "erred":
            self.batch(cs.ident, "erred", ts.erred_item())

    def _drop_fire_and_forget(self, ts: TaskState) -> None:
        faf = self.clients[FIRE_AND_FORGET]
        if ts.wanted_by(faf):
            ts.drop_wanter(faf)

    def want_key(self, cs: ClientState, key: str) -> None:
        ts = self.tasks.get(key)
        if ts is None:
            self.send(cs.ident, {"op": "cancelled", "keys": [key]})
            return
        if ts.wanted_by(cs):  # wanted for it already (a Queue gave it): tell it the state
            ts.drop_wanter(cs)
        self._want(cs, ts)
        if ts.state == "released":
            self._recompute(ts)

    def release_key(self, cs: ClientState, key: str) -> None:
        ts = self.tasks.get(key)
        if ts is None or not ts.wanted_by(cs):
            return
        ts.drop_wanter(cs)
        self._check_release([ts])

    def cancel(self, keys: Iterable[str], reason: str | None = None,
               restart: bool = False, by: ClientState | None = None) -> None:
        """Cancel these tasks and what depends on them; tell the clients that want them (with
        ``reason``; ``restart``: even finished ones).

        ``by``: the client asking, without ``force``: a key another client also wants is only
        released for ``by`` (its futures are cancelled, the others' are not).
        """
        stack = [self.tasks[k] for k in keys if type(k) is str and k in self.tasks]
        if by is not None:
            shared = [ts for ts in stack if any(c is not by for c in ts.wanters())]
            if shared:
                stack = [ts for ts in stack if ts not in shared]
                op = {"op": "cancelled", "keys": [ts.key for ts in shared]}
                if reason:
                    op["reason"] = reason
                self.send(by.ident, op)
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
            self.send(ident, op)
        self._check_release(doomed)

    def retry(self, keys: Iterable[str]) -> None:
        """Run erred tasks again, with the erred tasks upstream of them (``Future.retry``)."""
        stack = [self.tasks[k] for k in keys if type(k) is str and k in self.tasks]
        again, seen = [], set()
        while stack:
            ts = stack.pop()
            if ts in seen or ts.state != "erred" or ts.payload is None:
                continue
            seen.add(ts)
            ts.error = None
            self._set_state(ts, "released")
            again.append(ts)
            stack.extend(ts.deps)
        by_client: dict[bytes, list[str]] = {}
        for ts in again:
            for cs in ts.wanters():
                by_client.setdefault(cs.ident, []).append(ts.key)
        for ident, ks in by_client.items():
            self.send(ident, {"op": "retried", "keys": ks})
        for ts in again:
            if ts.state == "released":
                self._start(ts)

    def scatter(self, cs: ClientState, items: list, fire_and_forget: bool = False) -> None:
        """Register data a client placed: ``[key, inline bytes or None, nbytes, [addresses]]``."""
        for key, value, nbytes, addresses in items:
            # checked before any change, so a bad item cannot leave the state half-updated
            if (type(key) is not str or not (value is None or type(value) is bytes)
                    or type(nbytes) is not int or type(addresses) is not list):
                raise RemoteProtocolError(
                    f"malformed scatter item {[key, type(value).__name__, nbytes]!r:.200}")
            ts = self.tasks.get(key)
            if ts is not None and ts.state not in ("memory", "released"):
                raise RemoteProtocolError(
                    f"cannot scatter {key!r}: a task with that key is {ts.state}; scatter under"
                    " another key")
            known = self.workers_by_address
            holders = [known[a] for a in addresses if type(a) is str and a in known]
            if ts is None:
                ts = TaskState(key, None)
                self.tasks[key] = ts
                self._observe_new(ts)
                self._seq += 1
                ts.priority = self._seq
            ts.scattered = True
            ts.value = value
            for w in ts.who_has:  # their byte counts took the old size
                w.nbytes += nbytes - ts.nbytes
            ts.nbytes = nbytes
            for ws in holders:
                ts.add_holder(ws)
            if value is None and not holders:
                self._want(cs, ts)
                self._fail(ts, None, None, f"scattered {key!r} has no live worker holding it",
                           kind="LostDataError")
                continue
            if ts.state != "memory":
                self._set_state(ts, "memory")
            self._want(cs, ts)
            self._release_dependents_waiting(ts)

    def wanted_keys(self, cs: ClientState) -> list[str]:
        """The keys a client holds futures for (O(tasks); for tests and diagnostics)."""
        return [t.key for t in self.tasks.values() if t.wanted_by(cs)]
