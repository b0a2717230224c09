"""What each kind of peer may say to the scheduler: hellos, and the ops of clients, nannies
and workers (a task finished or erred, a worker's status), dispatched by role.

Methods of :class:`~zfabric.scheduler.state.SchedulerState` (mixed in), pure like it.
"""

from __future__ import annotations

import logging

from ..config import PROTOCOL_VERSION
from ..errors import RemoteProtocolError
from ..protocol import (
    check_worker_hello,
    clean_metrics,
    clean_profile,
    clean_transfers,
    safe_name,
    short,
    version_mismatches,
)
from .records import FIRE_AND_FORGET, ClientState, NannyState, WorkerState

logger = logging.getLogger(__name__)


class PeerOps:
    """SchedulerState's handling of each role's ops (see the module docstring)."""

    # ------------------------------------------------------------------ hello

    def _welcome(self, warnings: list[str]) -> dict:
        op = {
            "op": "welcome",
            "epoch": self.epoch,
            "address": self.address,
            "warnings": warnings,
            "heartbeat_s": self.config.HEARTBEAT_INTERVAL_S,
        }
        if self.dashboard_link:
            op["dashboard"] = self.dashboard_link
        return op

    def _handle_hello(self, peer: bytes, op: dict) -> None:
        if op["protocol"] != PROTOCOL_VERSION:
            self.send(
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
        warnings = version_mismatches(self.versions, op["versions"]) if self.versions else []
        role = op["role"]
        welcome = self._welcome(warnings)
        if role in ("client", "worker") and self.key_of(peer) is not None:
            welcome["worker_keys"] = self.worker_keys()  # the data ports' keys (security on)
        if role == "worker":
            fields = check_worker_hello(op)
            if peer in self.reported_dead and self.reported_dead[peer] == fields["nanny"]:
                self.send(peer, {"op": "close", "reason": "its nanny reported it dead"})
                return
            address = fields["address"]
            old = self.workers_by_address.get(address)
            if old is not None and self._same_key(old, peer):
                # Its restart (the same keys at the same address): the old process is gone,
                # or, if it lives, two workers share one address by mistake. Close the old
                # one rather than ask it to say hello again, which would make them flap.
                self.send(old.ident, {"op": "close", "reason": f"a new worker with the same"
                                      f" key took its data address {address}"})
                self.remove_worker(old, "replaced by a new worker with the same key",
                                   died=True, unheard=False)
            elif old is not None:
                if not self._replaceable(old):
                    # A live worker serves there: a second one would make it flap. Probe the
                    # old one (a send to a gone connection removes it at once) and let the
                    # new one try again after a heartbeat.
                    self.send(old.ident, {"op": "heartbeat"})
                    self.send(peer, {
                        "op": "error", "retry_s": self.config.HEARTBEAT_INTERVAL_S,
                        "message": f"data address {address} is in use by live worker"
                        f" {old.name}; a worker replaces it only once it has been silent for"
                        " two heartbeat intervals or its nanny reported it gone"})
                    return
                self.remove_worker(old, "replaced by a new incarnation", died=False)
            ws = WorkerState(ident=peer, id=safe_name(op["id"]), now=self.now, **fields)
            local = op.get("local_directory")
            ws.local_directory = local[:4096] if type(local) is str else None
            self.workers[peer] = ws
            self.workers_by_address[address] = ws
            self.send(peer, welcome)
            self._tell_worker_key(ws)
            self._event(f"worker {ws.name} joined at {address} ({ws.nthreads} threads)",
                        "worker-joined")
            if ws.nanny in self.nannies:
                self.nannies[ws.nanny].workers.add(peer)
            self.plugins_for_newcomer(peer, "worker")
            self._fill(ws)
            self._fill_restricted()
        elif role == "client":
            cs = ClientState(peer, name=safe_name(op["id"]), now=self.now)
            self.clients[peer] = cs
            if type(op.get("worker")) is str:  # the client of a worker's tasks
                self.coord.client_worker[peer] = op["worker"]
            self.send(peer, welcome)
        elif role == "nanny":
            ns = NannyState(peer, name=safe_name(op["id"]), now=self.now)
            self.nannies[peer] = ns
            self.send(peer, welcome)
            self.plugins_for_newcomer(peer, "nanny")
        else:
            raise RemoteProtocolError(f"unknown role {short(role)}")
        for w in warnings:
            logger.warning("%s %s: version mismatch: %s", role, safe_name(op["id"]), w)

    # ------------------------------------------------------------------ clients

    def _handle_client(self, cs: ClientState, op: dict) -> None:
        match op["op"]:
            case "submit":
                added = self.add_functions(op.get("functions"))
                try:
                    self.submit(cs, op["tasks"])
                finally:
                    # Functions no task of it (or before it) uses are not kept.
                    for fid in added:
                        entry = self.functions.get(fid)
                        if entry is not None and entry[1] <= 0:
                            del self.functions[fid]
            case "release":
                for key in op["keys"]:
                    self.release_key(cs, key)
            case "want":
                target = self.clients[FIRE_AND_FORGET] if op.get("fire_and_forget") else cs
                for key in op["keys"]:
                    self.want_key(target, key)
            case "cancel":
                reason = op.get("reason")
                self.cancel(op["keys"], str(reason)[:1000] if reason is not None else None,
                            by=None if op.get("force") is True else cs)
            case "retry":
                self.retry(op["keys"])
            case "scatter":
                self.scatter(cs, op["items"], op.get("fire_and_forget", False))
            case "request":
                self.request(cs.ident, op)
            case "coord":
                self.coord.handle(cs.ident, op, self.now)
            case "heartbeat":
                pass
            case "goodbye":
                self.remove_client(cs)
            case "hello":
                # It thought us gone (we were silent past its SCHEDULER_LOST_TIMEOUT_S) and
                # failed its futures; it waits for a welcome before it talks to us again.
                self.send(cs.ident, self._welcome([]))
            case other:
                raise RemoteProtocolError(f"a client may not send {other!r}")

    # ------------------------------------------------------------------ nannies

    def _handle_nanny(self, ns: NannyState, op: dict) -> None:
        match op["op"]:
            case "heartbeat":
                ns.vouched = {w.encode() for w in op.get("workers") or ()}
            case "worker-died":
                # Only about a worker of its own: a worker that names it as its nanny.
                ident = op["worker"].encode()
                ws = self.workers.get(ident)
                if ws is not None and ws.nanny != ns.ident:
                    raise RemoteProtocolError(
                        f"nanny {ns.name} reported worker {ws.name}, which is not its own")
                self.reported_dead[ident] = ns.ident
                if len(self.reported_dead) > 10_000:
                    del self.reported_dead[next(iter(self.reported_dead))]
                if ws is not None:
                    self.remove_worker(ws, safe_name(op["reason"], 500), died=True)
            case "reply":
                self._fan_out.answer(ns.ident, op)
            case "goodbye":
                self._drop_nanny(ns.ident)
            case "request":
                self._check_read_only(op, "nanny")
                self.request(ns.ident, op)
            case "hello":
                pass
            case other:
                raise RemoteProtocolError(f"a nanny may not send {other!r}")

    # ------------------------------------------------------------------ workers

    def _handle_worker(self, ws: WorkerState, op: dict) -> None:
        match op["op"]:
            case "finished":
                if "transfers" in op:
                    self.observe.transferred(ws, clean_transfers(op["transfers"]))
                for item in op["tasks"]:
                    self.task_finished(ws, *item)
                self._fill(ws)
            case "erred":
                for item in op["items"]:
                    self.task_erred(ws, *item)
                self._fill(ws)
            case "long-running":
                # a task waiting on tasks it submitted gives its slot back (secede), or takes
                # it again (rejoin)
                for item in op["items"]:
                    if type(item) is not list or len(item) != 2 or type(item[0]) is not str:
                        raise RemoteProtocolError(f"malformed long-running item {item!r:.100}")
                    ts = ws.processing.get(item[0])
                    if ts is not None:
                        if item[1]:
                            ws.long_running.add(ts)
                        else:
                            ws.long_running.discard(ts)
                self._fill(ws)
            case "started":
                for key in op["keys"]:
                    ts = ws.processing.get(key) if type(key) is str else None
                    if ts is not None:
                        ws.started.add(ts)
            case "thread-free":  # tasks released while they ran have ended: slots again
                if ws.cancelled_running:
                    for key in op["keys"]:
                        if type(key) is str:
                            ws.cancelled_running.discard(key)
                    self._fill(ws)
            case "heartbeat":
                metrics = op.get("metrics")
                if metrics is not None:
                    ws.metrics = clean_metrics(metrics)
                if "transfers" in op:
                    self.observe.transferred(ws, clean_transfers(op["transfers"]))
                if "profile" in op:
                    self.observe.profiled(clean_profile(op["profile"]), self.now)
            case "worker-status":
                self.worker_status(ws, op["status"], op["reason"])
            case "missing":
                self._missing(ws, op["key"], op["dep"], op["address"])
            case "acquired":
                self.acquired(ws, op["keys"], op.get("failed") or [])
            case "run-result":
                self._fan_out.answer(ws.ident, op)
            case "request":
                self._check_read_only(op, "worker")
                self.request(ws.ident, op)
            case "goodbye":
                crashed = op.get("crashed") is True  # a crash, not a close: blame what ran
                self.remove_worker(ws, safe_name(op.get("reason") or "closed", 500),
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
        ws.status_reason = reason[:500]
        if status == "paused":
            self._event(f"worker {ws.name} paused: {ws.status_reason or 'memory'}")
            queued = [ts for ts in ws.processing.values() if ts not in ws.started]
            for ts in queued:
                ws.done(ts, 0.0)
                ts.processing_on = None
                self.batch(ws.ident, "free", ts.key)
                self._set_state(ts, "released")
            for ts in queued:
                if ts.state == "released":
                    self._start(ts)
        else:
            self._event(f"worker {ws.name} resumed")
            self._fill(ws)
            self._fill_restricted()

    def task_finished(
        self, ws: WorkerState, key: str, nbytes: int, value: bytes | None, duration: float,
        start: float | None = None, stop: float | None = None, thread: int | None = None,
    ) -> None:
        if (type(key) is not str or type(nbytes) is not int
                or not (value is None or type(value) is bytes)
                or not isinstance(duration, int | float)):
            # checked before any change, so a bad item cannot leave the state half-updated
            raise RemoteProtocolError(f"malformed finished item {[key, nbytes, duration]!r:.200}")
        ts = self.tasks.get(key)
        if ts is None or ts.state != "processing" or ts.processing_on is not ws:
            # Not its task (now): it does not become a holder, whatever it says; a worker
            # that finished a task taken from it frees its copy.
            if ts is None or not ts.held_by(ws):
                self.batch(ws.ident, "free", key)
            return
        ws.done(ts, duration)
        ts.processing_on = None
        ts.nbytes = int(nbytes)
        ts.value = value
        ts.add_holder(ws)
        self.counts["finished"] += 1
        self.observe.finished(ts, ws, "OK", start, stop, thread, self.now)
        self._set_state(ts, "memory")
        item = None
        for cs in ts.wanters():
            item = item or ts.memory_item()
            self.batch(cs.ident, "memory", item)
        self._release_dependents_waiting(ts)
        self._drop_fire_and_forget(ts)
        release = [ts]
        if ts.deps:
            release.extend(ts.deps)
        self._check_release(release)

    def task_erred(self, ws: WorkerState, key: str, exc: bytes | None, tb: bytes | None,
                   text: str, kind: str | None = None, start: float | None = None,
                   stop: float | None = None, thread: int | None = None) -> None:
        if (type(key) is not str or type(text) is not str
                or not (exc is None or type(exc) is bytes) or not (tb is None or type(tb) is bytes)
                or not (kind is None or type(kind) is str)):
            raise RemoteProtocolError(f"malformed erred item for {key!r:.100}")
        ts = self.tasks.get(key)
        if ts is None or ts.state != "processing" or ts.processing_on is not ws:
            return
        ws.done(ts, 0.0)
        ts.processing_on = None
        self.observe.finished(ts, ws, "error", start, stop, thread, self.now)
        if ts.retries > 0:
            ts.retries -= 1
            self._set_state(ts, "released")
            self._start(ts)
            return
        self.counts["erred"] += 1
        self._fail(ts, exc, tb, text, kind=kind)

