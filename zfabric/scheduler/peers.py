"""What each kind of peer may say to the scheduler: hellos, and the ops of clients, nannies
and workers (a task finished or erred, a worker's status), dispatched by role.

A part of :class:`~zfabric.scheduler.state.SchedulerState`, which it is given (``s``), pure like it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..config import PROTOCOL_VERSION
from ..errors import RemoteProtocolError
from ..protocol import (
    FinishedItem,
    check_worker_hello,
    safe_name,
    short,
    version_mismatches,
)
from ..reports import clean_logs, clean_metrics, clean_profile, clean_transfers
from .records import FIRE_AND_FORGET, ClientState, NannyState, WorkerState

if TYPE_CHECKING:
    from .state import SchedulerState

logger = logging.getLogger(__name__)


class PeerOps:
    """SchedulerState's handling of each role's ops (see the module docstring)."""

    def __init__(self, s: SchedulerState):
        self.s = s

    # ------------------------------------------------------------------ hello

    def _welcome(self, warnings: list[str]) -> dict:
        op = {
            "op": "welcome",
            "epoch": self.s.epoch,
            "address": self.s.address,
            "warnings": warnings,
            "heartbeat_s": self.s.liveness.interval_s,
        }
        if self.s.dashboard_link:
            op["dashboard"] = self.s.dashboard_link
        return op

    def handle_hello(self, peer: bytes, op: dict) -> None:
        if op["protocol"] != PROTOCOL_VERSION:
            self.s.send(
                peer,
                {
                    "op": "error",
                    "fatal": True,
                    "message": f"protocol version {op['protocol']} is not supported by this"
                    f" scheduler, which speaks version {PROTOCOL_VERSION}; install the same"
                    " zfabric version on every host",
                },
            )
            return
        warnings = version_mismatches(self.s.versions, op["versions"]) if self.s.versions else []
        role = op["role"]
        if role in ("worker", "client", "nanny"):
            self.s.peers_changed(joining=1)  # the welcome tells the interval with it counted
        welcome = self._welcome(warnings)
        if role in ("client", "worker") and self.s.key_of(peer) is not None:
            # the data ports' keys (security on)
            welcome["worker_keys"] = self.s.roles.worker_keys()
        if role == "worker":
            fields = check_worker_hello(op)
            if peer in self.s.reported_dead and self.s.reported_dead[peer] == fields["nanny"]:
                self.s.send(peer, {"op": "close", "reason": "its nanny reported it dead"})
                return
            address = fields["address"]
            old = self.s.workers_by_address.get(address)
            if old is not None and self.s.roles.same_key(old, peer):
                # Its restart (the same keys at the same address): the old process is gone,
                # or, if it lives, two workers share one address by mistake. Close the old
                # one rather than ask it to say hello again, which would make them flap.
                self.s.send(old.ident, {"op": "close", "reason": f"a new worker with the same"
                                      f" key took its data address {address}"})
                self.s.exits.remove_worker(old, "replaced by a new worker with the same key",
                                   died=True, unheard=False)
            elif old is not None:
                if not self.s.roles.replaceable(old):
                    # A live worker serves there: a second one would make it flap. Probe the
                    # old one (a send to a gone connection removes it at once) and let the
                    # new one try again after a heartbeat.
                    self.s.send(old.ident, {"op": "heartbeat"})
                    self.s.send(peer, {
                        "op": "error", "retry_s": self.s.liveness.interval_s,
                        "message": f"data address {address} is in use by live worker"
                        f" {old.name}; a worker replaces it only once it has been silent for"
                        " two heartbeat intervals or its nanny reported it gone"})
                    return
                self.s.exits.remove_worker(old, "replaced by a new incarnation", died=False)
            ws = WorkerState(ident=peer, id=safe_name(op["id"]), now=self.s.now, **fields)
            local = op.get("local_directory")
            ws.local_directory = local[:4096] if type(local) is str else None
            self.s.workers[peer] = ws
            self.s.candidates.add(ws)
            self.s.workers_by_address[address] = ws
            self.s.send(peer, welcome)
            self.s.roles.tell_worker_key(ws)
            self.s.event(f"worker {ws.name} joined at {address} ({ws.nthreads} threads)",
                        "worker-joined")
            if ws.nanny in self.s.nannies:
                self.s.nannies[ws.nanny].workers.add(peer)
            self.s.plugin_registry.for_newcomer(peer, "worker")
            self.s.fill(ws)
            self.s.fill_restricted()
        elif role == "client":
            cs = ClientState(peer, name=safe_name(op["id"]), now=self.s.now)
            self.s.clients[peer] = cs
            if op.get("rejoin") is True and op.get("epoch") != self.s.epoch:
                # it lost its scheduler (the old incarnation) and sends its work again
                self.s.recovery.rejoined("client")
            if type(op.get("worker")) is str:  # the client of a worker's tasks
                self.s.coord.client_worker[peer] = op["worker"]
            self.s.send(peer, welcome)
        elif role == "nanny":
            ns = NannyState(peer, name=safe_name(op["id"]), now=self.s.now)
            self.s.nannies[peer] = ns
            self.s.send(peer, welcome)
            self.s.plugin_registry.for_newcomer(peer, "nanny")
        else:
            raise RemoteProtocolError(f"unknown role {short(role)}")
        for w in warnings:
            logger.warning("%s %s: version mismatch: %s", role, safe_name(op["id"]), w)

    # ------------------------------------------------------------------ clients

    def handle_client(self, cs: ClientState, op: dict) -> None:
        match op["op"]:
            case "submit":
                added = self.s.keys.add_functions(op.get("functions"))
                try:
                    self.s.keys.submit(cs, op["tasks"])
                finally:
                    # Functions no task of it (or before it) uses are not kept.
                    for fid in added:
                        entry = self.s.functions.get(fid)
                        if entry is not None and entry[1] <= 0:
                            del self.s.functions[fid]
            case "release":
                for key in op["keys"]:
                    self.s.keys.release_key(cs, key)
            case "want":
                target = self.s.clients[FIRE_AND_FORGET] if op.get("fire_and_forget") else cs
                for key in op["keys"]:
                    self.s.keys.want_key(target, key)
            case "cancel":
                reason = op.get("reason")
                self.s.keys.cancel(op["keys"], str(reason)[:1000] if reason is not None else None,
                            by=None if op.get("force") is True else cs)
            case "retry":
                self.s.keys.retry(op["keys"])
            case "scatter":
                self.s.keys.scatter(cs, op["items"], op.get("fire_and_forget", False))
            case "request":
                self.s.queries.request(cs.ident, op)
            case "coord":
                self.s.coord.handle(cs.ident, op, self.s.now)
            case "heartbeat":
                pass
            case "events-ack":  # it took a batch of a subscription's events
                self.s.subs.ack(cs.ident, op["id"])
            case "goodbye":
                self.s.keys.remove_client(cs)
            case "hello":
                # It thought us gone (we were silent past its SCHEDULER_LOST_TIMEOUT_S) and
                # failed its futures; it waits for a welcome before it talks to us again.
                self.s.send(cs.ident, self._welcome([]))
            case other:
                raise RemoteProtocolError(f"a client may not send {other!r}")

    # ------------------------------------------------------------------ nannies

    def handle_nanny(self, ns: NannyState, op: dict) -> None:
        match op["op"]:
            case "heartbeat":
                ns.vouched = {w.encode() for w in op.get("workers") or ()}
            case "worker-died":
                # Only about a worker of its own: a worker that names it as its nanny.
                ident = op["worker"].encode()
                ws = self.s.workers.get(ident)
                if ws is not None and ws.nanny != ns.ident:
                    raise RemoteProtocolError(
                        f"nanny {ns.name} reported worker {ws.name}, which is not its own")
                self.s.reported_dead[ident] = ns.ident
                if len(self.s.reported_dead) > 10_000:
                    del self.s.reported_dead[next(iter(self.s.reported_dead))]
                if ws is not None:
                    self.s.exits.remove_worker(ws, safe_name(op["reason"], 500), died=True)
            case "reply":
                self.s.fan_out.answer(ns.ident, op)
            case "goodbye":
                self.s.queries.drop_nanny(ns.ident)
            case "request":
                self.s.roles.check_read_only(op, "nanny")
                self.s.queries.request(ns.ident, op)
            case "hello":
                pass
            case other:
                raise RemoteProtocolError(f"a nanny may not send {other!r}")

    # ------------------------------------------------------------------ workers

    def handle_worker(self, ws: WorkerState, op: dict) -> None:
        match op["op"]:
            case "finished":
                if "transfers" in op:
                    self.s.observe.transferred(ws, clean_transfers(op["transfers"]))
                for item in op["tasks"]:
                    self.task_finished(ws, item)
                self.s.fill(ws)
            case "erred":
                for item in op["items"]:
                    self.task_erred(ws, *item)
                self.s.fill(ws)
            case "long-running":
                # a task waiting on tasks it submitted gives its slot back (secede), or takes
                # it again (rejoin)
                for item in op["items"]:
                    ts = ws.processing.get(item[0])
                    if ts is not None:
                        ws.set_long_running(ts, bool(item[1]))
                self.s.fill(ws)
            case "started":
                for key in op["keys"]:
                    ts = ws.processing.get(key)
                    if ts is not None:
                        ws.mark_started(ts)
            case "given-back":  # tasks it had not started (retirement): run them elsewhere
                for key in op["keys"]:
                    ts = ws.processing.get(key)
                    if ts is not None and ts not in ws.started:
                        ws.done(ts, 0.0)
                        ts.processing_on = None
                        self.s.set_state(ts, "released")
                        self.s.start(ts)
                self.s.fill(ws)
            case "thread-free":  # tasks released while they ran have ended: slots again
                if ws.cancelled_running:
                    ws.threads_free(op["keys"])
                    self.s.fill(ws)
            case "heartbeat":
                metrics = op.get("metrics")
                if metrics is not None:
                    ws.metrics = clean_metrics(metrics)
                if "transfers" in op:
                    self.s.observe.transferred(ws, clean_transfers(op["transfers"]))
                if "profile" in op:
                    self.s.observe.profiled(clean_profile(op["profile"]), self.s.now)
                if "logs" in op:
                    self.s.observe.logged(ws, clean_logs(op["logs"]), self.s.now)
            case "worker-status":
                self.worker_status(ws, op["status"], op["reason"])
            case "missing":
                self.s.exits.missing(ws, op["key"], op["dep"], op["address"])
            case "holding":  # what it kept across a restart of the scheduler
                self.s.recovery.holding(ws, op["items"], op["running"], op.get("epoch"))
                self.s.fill(ws)
            case "acquired":
                self.s.retirement.acquired(ws, op["keys"], op.get("failed") or [])
            case "run-result":
                self.s.fan_out.answer(ws.ident, op)
            case "request":
                self.s.roles.check_read_only(op, "worker")
                self.s.queries.request(ws.ident, op)
            case "goodbye":
                crashed = op.get("crashed") is True  # a crash, not a close: blame what ran
                self.s.exits.remove_worker(ws, safe_name(op.get("reason") or "closed", 500),
                                   died=crashed)
            case "hello":
                pass
            case other:
                raise RemoteProtocolError(f"a worker may not send {other!r}")

    def worker_status(self, ws: WorkerState, status: str, reason: str) -> None:
        """A worker paused (memory is short: it starts no new task) or resumed. The tasks
        queued on it and not started go elsewhere; a resumed worker gets work again."""
        if status not in ("running", "paused"):
            raise RemoteProtocolError(f"unknown worker status {status!r}; expected running"
                                      " or paused")
        if status == ws.status:
            return
        ws.status = status
        ws.changed()
        ws.status_reason = reason[:500]
        if status == "paused":
            self.s.event(f"worker {ws.name} paused: {ws.status_reason or 'memory'}")
            self.s.give_back_reserve(ws)
            queued = [ts for ts in ws.processing.values() if ts not in ws.started]
            for ts in queued:
                ws.done(ts, 0.0)
                ts.processing_on = None
                self.s.batch(ws.ident, "free", ts.key)
                self.s.set_state(ts, "released")
            for ts in queued:
                if ts.state == "released":
                    self.s.start(ts)
        else:
            self.s.event(f"worker {ws.name} resumed")
            self.s.fill(ws)
            self.s.fill_restricted()

    def task_finished(self, ws: WorkerState, item: FinishedItem) -> None:
        """A task ``ws`` ran (checked at the protocol's door)."""
        key, nbytes, value, duration, start, stop, thread = item
        s = self.s
        ts = s.tasks.get(key)
        if ts is None or ts.state != "processing" or ts.processing_on is not ws:
            # Not its task (now): it does not become a holder, whatever it says; a worker
            # that finished a task taken from it frees its copy. (After a restart, a task
            # that ran across it: see .recovery.)
            if s.recovery.grace_until and s.recovery.finished(ws, item):
                return
            if ts is None or not ts.held_by(ws):
                s.batch(ws.ident, "free", key)
            return
        ws.done(ts, duration)
        ts.processing_on = None
        ts.nbytes = nbytes
        ts.value = value
        ts.add_holder(ws)
        s.counts["finished"] += 1
        s.observe.finished(ts, ws, "OK", start, stop, thread, s.now)
        s.set_state(ts, "memory")
        told = None
        for cs in ts.wanters():
            told = told or ts.memory_item()
            s.batch(cs.ident, "memory", told)
        s.release_dependents_waiting(ts)
        s.keys.drop_fire_and_forget(ts)
        release = [ts]
        if ts.deps:
            release.extend(ts.deps)
        s.check_release(release)

    def task_erred(self, ws: WorkerState, key: str, exc: bytes | None, tb: bytes | None,
                   text: str, kind: str | None = None, start: float | None = None,
                   stop: float | None = None, thread: int | None = None) -> None:
        ts = self.s.tasks.get(key)
        if ts is None or ts.state != "processing" or ts.processing_on is not ws:
            return
        ws.done(ts, 0.0)
        ts.processing_on = None
        self.s.observe.finished(ts, ws, "error", start, stop, thread, self.s.now)
        if ts.retries > 0:
            ts.retries -= 1
            self.s.set_state(ts, "released")
            self.s.start(ts)
            return
        self.s.counts["erred"] += 1
        self.s.fail(ts, exc, tb, text, kind=kind)

