"""The scheduler's brain: tasks, workers and clients, with no sockets and no clock.

Theory of operation
-------------------
The server shell calls :meth:`SchedulerState.handle` with the routing id of the peer that sent
a message, its decoded ops and the current time, and :meth:`SchedulerState.tick` every so often.
Both only change state and queue ops in an outbox; :meth:`SchedulerState.flush` hands the shell
``{peer: [ops]}`` to send, one message per peer. Nothing here reads the clock, opens a socket or
unpickles user data: payloads, values and exceptions are opaque bytes.

A task moves through these states (every move goes through :meth:`_set_state`, which refuses
moves not in :data:`TRANSITIONS`)::

    waiting ──▶ queued ──▶ processing ──▶ memory ──▶ released ──▶ (forgotten)
       │           ▲           │  │          │          │
       │           └───────────┘  ▼          ▼          ▼
       └──────────────────────▶ erred     waiting    waiting       (recompute, lineage)

*waiting*: some dependency is not in memory yet. *queued*: ready, no worker has a free slot.
*processing*: sent to a worker. *memory*: a worker holds the value (and, when it is small, the
scheduler holds its bytes too and hands them to dependents and clients inline). *released*:
the value was dropped because nothing needs it now, but the record stays while dependents exist
so that it can be recomputed if their results are lost. A task is forgotten (removed) when no
client wants it and no dependent record exists.

The class is spread over a few modules, one concern each: this one (dispatch, time, the
transitions), :mod:`.client_ops` (submit, release, cancel, scatter), :mod:`.worker_loss`
(a worker leaves or dies), :mod:`.policy` (where a task runs, whom to blame), and the pure
helpers :mod:`.records`, :mod:`.queue`, :mod:`.outbox`, :mod:`.requests`.
"""

from __future__ import annotations

import logging
import uuid

from ..config import DEFAULT, PROTOCOL_VERSION, Config
from ..errors import RemoteProtocolError
from ..protocol import check_worker_hello, clean_metrics, safe_name, short, version_mismatches
from . import policy
from .client_ops import ClientOps
from .coordination import Coordination, SharedStateOps
from .observe import LIVE as LIVE_STATES
from .observe import Observer
from .outbox import Outbox
from .plugins import PluginOps
from .queue import ReadyQueue, RestrictedQueue
from .records import FIRE_AND_FORGET, HELD, ClientState, NannyState, TaskState, WorkerState
from .requests import FanOut
from .retire import Retirement
from .roles import Roles
from .worker_loss import WorkerLoss

logger = logging.getLogger(__name__)

#: Allowed task-state moves.
TRANSITIONS: dict[str, frozenset[str]] = {
    "new": frozenset({"waiting", "queued", "processing", "memory", "erred"}),
    "waiting": frozenset({"queued", "processing", "erred", "released"}),
    "queued": frozenset({"processing", "erred", "released"}),
    "processing": frozenset({"memory", "erred", "queued", "processing", "released"}),
    "memory": frozenset({"released", "waiting", "queued", "processing", "erred"}),
    "released": frozenset({"waiting", "queued", "processing", "erred", "memory"}),
    "erred": frozenset({"released"}),
}



class InvalidTransition(RuntimeError):
    """Raised when code (ours) tries a task-state move that the table forbids."""


class SchedulerState(ClientOps, WorkerLoss, Roles, Retirement, PluginOps, SharedStateOps):
    """Tasks, workers and clients; ops in, ops out."""

    def __init__(
        self, *, address: str = "", config: Config = DEFAULT, versions: dict | None = None
    ):
        self.config = config
        self.address = address
        self.epoch = uuid.uuid4().hex
        self.versions = versions or {}
        self.tasks: dict[str, TaskState] = {}
        self.functions: dict[str, list] = {}  # id -> [pickle, tasks using it, id]
        self.workers: dict[bytes, WorkerState] = {}  # by routing id
        self.workers_by_address: dict[str, WorkerState] = {}
        self.clients: dict[bytes, ClientState] = {FIRE_AND_FORGET: ClientState(FIRE_AND_FORGET),
                                                  HELD: ClientState(HELD)}
        self.nannies: dict[bytes, NannyState] = {}
        # Worker processes their Nanny reported dead (it may still be killing them): one that
        # says hello again must not come back as a worker nobody will ever report.
        self.reported_dead: dict[bytes, None] = {}
        self._outbox = Outbox(ignore=frozenset({FIRE_AND_FORGET, HELD}))
        self.send = self._outbox.send  # queue an op for a peer
        self.batch = self._outbox.batch  # queue one item of a list-carrying op (see Outbox)
        self.flush = self._outbox.flush  # {peer: [ops]} queued since the last flush
        self._queued = ReadyQueue()  # unrestricted queued tasks; stale entries are skipped
        self._restricted = RestrictedQueue()  # queued tasks that only some workers may run
        self._seq = 0
        self._fan_out = FanOut(self.send)  # run and restart requests in flight
        self.closing = False  # set by a remote shutdown request; the shell closes
        self.events: list[tuple[float, str]] = []  # recent notable events, for info and logs
        self.now = 0.0
        self.started = 0.0  # wall-clock time the shell started serving (it sets it)
        self.counts = {"finished": 0, "erred": 0}
        self.observe = Observer(config.TASK_STREAM_LENGTH)  # groups, task stream, topics
        self.dashboard_link: str | None = None  # set by the shell once its dashboard serves
        self.log_source = None  # set by the shell: n -> recent log records of this process
        self._init_moves()  # replicate and retire (see .retire)
        # Locks, semaphores, events, variables, queues and datasets (scheduler/coordination.py)
        self.plugins: dict[str, dict[str, bytes]] = {"worker": {}, "nanny": {}}  # name -> pickle
        self.coord = Coordination(self.send, self._hold, self._unhold, self._client_seen,
                                  self._give)
        self.secured = False  # set by the shell when keys bind roles (security on)
        self.admins: set[bytes] = set()  # clients holding an admin key (security on)
        self.admin_only = {k.strip() for k in config.ADMIN_ONLY.split(",") if k.strip()}

    def _event(self, text: str, kind: str = "event") -> None:
        logger.info(text)
        self.events.append((self.now, text))
        if len(self.events) > 200:
            del self.events[:100]
        self.observe.event(kind)
        self.observe.log_event("scheduler", {"action": kind, "text": text}, self.now)

    def _observe_new(self, ts: TaskState) -> None:
        g = ts.group = self.observe.group_of(ts.key)
        g.counts["new"] += 1

    # ------------------------------------------------------------------ entry points

    def handle(self, peer: bytes, ops: list[dict], now: float, role: str | None = None) -> None:
        """Apply the ops one peer sent; the replies wait in :attr:`outbox`.

        ``role``: with security on, the role of the key the message came with (the ZAP
        user id); a peer may act only as its key's role."""
        self.now = now
        if role is not None and not self._role_allows(peer, ops, role):
            return
        # Ops after one that ends the peer's session (goodbye, a removal) are not applied:
        # they would pin data to a record that is gone.
        ws = self.workers.get(peer)
        if ws is not None:
            ws.last_seen = now
            for op in ops:
                self._guard(peer, op, self._handle_worker, ws)
                if op["op"] == "goodbye" and self.workers.get(peer) is not ws:
                    return
            return
        cs = self.clients.get(peer)
        if cs is not None:
            cs.last_seen = now
            for op in ops:
                if self.clients.get(peer) is not cs:
                    return
                self._guard(peer, op, self._handle_client, cs)
            return
        ns = self.nannies.get(peer)
        if ns is not None:
            ns.last_seen = now
            for op in ops:
                if self.nannies.get(peer) is not ns:
                    return
                self._guard(peer, op, self._handle_nanny, ns)
            return
        for i, op in enumerate(ops):
            if op["op"] == "hello":
                self._guard(peer, op, self._handle_hello, None)
                if peer in self.workers or peer in self.clients or peer in self.nannies:
                    self.handle(peer, ops[i + 1 :], now)
                return
            if op["op"] in ("goodbye", "error", "reply", "data"):
                continue
            self.send(peer, {"op": "reregister", "reason": f"unknown peer sent {op['op']!r}"})
            return

    def _guard(self, peer, op, method, record) -> None:
        try:
            method(record, op) if record is not None else method(peer, op)
        except (RemoteProtocolError, KeyError, TypeError, ValueError, IndexError,
                AttributeError) as exc:
            text = f"bad {op.get('op')!r} op from {peer!r}: {type(exc).__name__}: {exc}"
            if len(text) > 1000:
                text = text[:997] + "..."
            logger.warning(text)
            reply = {"op": "error", "message": text}
            if op.get("op") == "submit" and type(op.get("tasks")) is list:
                # Name the keys so that the client fails their futures instead of waiting.
                cs = self.clients.get(peer)
                reply["keys"] = [
                    t[0] for t in op["tasks"]
                    if type(t) is list and t and type(t[0]) is str
                    and not (t[0] in self.tasks and cs is not None
                             and self.tasks[t[0]].wanted_by(cs))
                ]
            self.send(peer, reply)

    def tick(self, now: float) -> None:
        """Time passes: declare silent workers dead and silent clients gone."""
        self.now = now
        self.observe.sample(now, self.counts["finished"])
        limit = now - self.config.WORKER_TTL_S
        for ws in [w for w in self.workers.values() if w.last_seen < limit]:
            if ws.nanny is not None and ws.nanny in self.nannies:
                ns = self.nannies[ws.nanny]
                if ns.last_seen >= limit and ws.ident in ns.vouched:
                    continue  # busy holding the GIL, but its Nanny sees it alive
            self.remove_worker(ws, f"silent for {now - ws.last_seen:.1f} s", died=True)
        limit = now - self.config.CLIENT_TTL_S
        for cs in [c for c in self.clients.values() if c.ident not in (FIRE_AND_FORGET, HELD)]:
            if cs.last_seen < limit:
                self._event(f"client {cs.name} silent for {now - cs.last_seen:.0f} s; releasing")
                self.remove_client(cs)
        silent = now - self.config.WORKER_TTL_S
        for ns in [n for n in self.nannies.values() if n.last_seen < silent]:
            self._drop_nanny(ns.ident)
        self.coord.tick(now)
        if self.moves or self.jobs:
            self.moves_tick()

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
        if role == "worker":
            fields = check_worker_hello(op)
            if peer in self.reported_dead and self.reported_dead[peer] == fields["nanny"]:
                self.send(peer, {"op": "close", "reason": "its nanny reported it dead"})
                return
            address = fields["address"]
            old = self.workers_by_address.get(address)
            if old is not None:
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

    # ------------------------------------------------------------------ requests

    def request(self, peer: bytes, op: dict) -> None:
        rid, kind, args = op["id"], op["kind"], op["args"]
        reply = {"op": "reply", "id": rid}
        if self.secured and kind in self.admin_only and peer not in self.admins:
            reply["error"] = f"{kind!r} requests need an admin key (ADMIN_ONLY)"
            self.send(peer, reply)
            return
        match kind:
            case "info":
                reply["result"] = self.info()
            case "who-has":
                keys = args.get("keys")
                tasks = (self.tasks.get(k) for k in keys) if keys else self.tasks.values()
                reply["result"] = {
                    ts.key: sorted(w.address for w in ts.who_has) for ts in tasks if ts
                }
            case "has-what":
                reply["result"] = {
                    ws.address: sorted(ts.key for ts in ws.has_what) for ws in self.workers.values()
                }
            case "run" | "restart":
                if kind == "restart":
                    # As dask.distributed does: a restart forgets every task and its data.
                    self._event("restart requested: cancelling every task")
                    self.cancel(list(self.tasks), "the cluster was restarted", restart=True)
                self._start_fan_out(peer, rid, kind, args)
                return
            case "register-plugin" | "unregister-plugin":
                self.plugin_request(peer, rid, kind, args)
                return
            case "replicate" | "retire-workers" | "restart-workers":
                self.move_request(peer, op)
                return
            case "shutdown":
                self.closing = True
                reply["result"] = True
            case "nbytes":
                keys = args.get("keys")
                tasks = (self.tasks.get(k) for k in keys) if keys else self.tasks.values()
                reply["result"] = [[ts.key, ts.nbytes] for ts in tasks
                                   if ts is not None and ts.state == "memory"]
            case "processing":
                reply["result"] = {
                    ws.address: sorted(ws.processing)
                    for ws in self.workers.values()
                }
            case "snapshot" | "task-stream" | "events" | "log-event" | "logs":
                reply["result"] = self._observe_request(kind, args)
            case "task-states":
                keys = args.get("keys") or list(self.tasks)
                reply["result"] = {k: self.tasks[k].state for k in keys if k in self.tasks}
            case _:
                reply["error"] = f"unknown request {kind!r}"
        self.send(peer, reply)

    def _observe_request(self, kind: str, args: dict):
        obs = self.observe
        match kind:
            case "snapshot":
                return obs.snapshot(self, self.now)
            case "task-stream":
                out = obs.stream_since(args.get("since"), start=args.get("start"),
                                       stop=args.get("stop"), count=args.get("count"))
                if "transfers" in args:
                    out["transfers"] = obs.transfers_since(args["transfers"])
                return out
            case "events":
                return obs.get_events(args.get("topic"))
            case "log-event":
                topics = args["topic"]
                for topic in [topics] if type(topics) is str else topics:
                    obs.log_event(str(topic), args.get("msg"), self.now)
                return True
            case "logs":
                return self.log_source(args.get("n")) if self.log_source else []

    def _start_fan_out(self, peer: bytes, rid: int, kind: str, args: dict) -> None:
        """A run (on workers) or restart (through nannies): reply once all have answered."""
        if kind == "run":
            names = args.get("workers")
            if type(args.get("payload")) is not bytes:
                raise RemoteProtocolError("a run request needs its payload as bytes")
            if names is not None and (type(names) is not list
                                      or any(type(n) is not str for n in names)):
                raise RemoteProtocolError("a run request's workers must be a list of addresses")
            targets = [(ws.ident, ws.address) for ws in self.workers.values()
                       if not names or ws.address in names]
            op = {"op": "run", "payload": args["payload"]}
        else:
            targets = [(ns.ident, ns.name) for ns in self.nannies.values()]
            op = {"op": "restart"}
        self._fan_out.start(peer, rid, op, targets)

    def _drop_nanny(self, ident: bytes) -> None:
        if self.nannies.pop(ident, None) is not None:
            self._fan_out.peer_left(ident)

    def info(self) -> dict:
        counts: dict[str, int] = {}
        for ts in self.tasks.values():
            counts[ts.state] = counts.get(ts.state, 0) + 1
        workers = self.workers.values()
        return {
            "type": "Scheduler",
            "id": self.epoch,
            "address": self.address,
            "started": self.started,
            "n_workers": len(self.workers),
            "total_threads": sum(ws.nthreads for ws in workers),
            "total_memory": sum(ws.memory_limit or 0 for ws in workers),
            "versions": self.versions,
            "workers": {ws.address: ws.info() for ws in workers},
            "nannies": len(self.nannies),
            "clients": len(self.clients) - 2,
            "tasks": counts,
            "events": [list(e) for e in self.events[-20:]],
            "services": {"dashboard": self.dashboard_link} if self.dashboard_link else {},
        }

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
                    self.observe.transferred(ws, op["transfers"])
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
            case "heartbeat":
                metrics = op.get("metrics")
                if metrics is not None:
                    ws.metrics = clean_metrics(metrics)
                if "transfers" in op:
                    self.observe.transferred(ws, op["transfers"])
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

    # ------------------------------------------------------------------ transitions

    def _set_state(self, ts: TaskState, new: str) -> None:
        if new not in TRANSITIONS[ts.state]:
            raise InvalidTransition(f"{ts.key!r}: {ts.state} -> {new}")
        g = ts.group
        if g is not None:
            c = g.counts
            c[ts.state] -= 1
            c[new] += 1
        ts.state = new

    def _start(self, ts: TaskState) -> None:
        """A new or released task: wait for its dependencies, or run it."""
        waiting = 0
        for dts in ts.deps:
            if dts.state == "erred":
                exc, tb, text, kind, extra = dts.error
                self._fail(ts, exc, tb, text, kind=kind, extra=extra)
                return
            if dts.state != "memory":
                waiting += 1
                if dts.state == "released":
                    self._recompute(dts)
        ts.waiting_on = waiting
        if waiting:
            self._set_state(ts, "waiting")
        else:
            self._ready(ts)

    def _release_dependents_waiting(self, ts: TaskState) -> None:
        for dep in ts.dependents or ():
            if dep.state == "waiting":
                dep.waiting_on -= 1
                if dep.waiting_on <= 0:
                    self._ready(dep)

    def _ready(self, ts: TaskState) -> None:
        if self._queued and ts.parents is None and not ts.restricted:
            # A backlog means no worker has a free slot (slots are refilled from it first).
            self._set_state(ts, "queued")
            self._queued.push(ts)
            return
        ws = policy.choose_worker(ts, self.workers.values())
        if ws is None:
            self._set_state(ts, "queued")
            if ts.restricted:
                self._restricted.add(ts)
            else:
                self._queued.push(ts)
            return
        self._dispatch(ts, ws)

    def _dispatch(self, ts: TaskState, ws: WorkerState) -> None:
        self._set_state(ts, "processing")
        ts.processing_on = ws
        ws.assign(ts)
        fid = ts.func
        if fid is not None and fid not in ws.functions:
            ws.functions.add(fid)
            self.send(ws.ident, {"op": "functions", "items": [[fid, self.functions[fid][0]]]})
        inline = who_has = None
        for dts in ts.deps:
            if dts.held_by(ws):
                continue
            if dts.value is not None:
                if inline is None:
                    inline = {}
                inline[dts.key] = dts.value
                dts.add_holder(ws)
            else:
                if who_has is None:
                    who_has = {}
                who_has[dts.key] = [w.address for w in dts.who_has]
        item = [ts.key, ts.payload, inline, who_has, ts.options]
        if fid is not None:
            item.append(fid)
        self.batch(ws.ident, "compute", item)

    def _fill(self, ws: WorkerState) -> None:
        """Give a worker with free slots the most urgent queued tasks."""
        if ws.ident not in self.workers:
            return
        q = self._queued
        while q and ws.has_slot():
            ts = q.pop()
            if ts.state == "queued":
                self._dispatch(ts, ws)
        if self._restricted and ws.has_slot():
            self._fill_restricted()

    def _fill_restricted(self) -> None:
        workers = self.workers.values()
        self._restricted.fill(lambda ts: policy.choose_worker(ts, workers), self._dispatch)

    def _restricted_drop(self, ts: TaskState) -> None:
        self._restricted.discard(ts)

    def _fail(self, ts: TaskState, exc: bytes | None, tb: bytes | None, text: str, *,
              kind: str | None = None, extra: dict | None = None) -> None:
        """Mark a task and everything downstream of it erred with the same error."""
        stack = [ts]
        while stack:
            t = stack.pop()
            if t.state == "erred":
                continue
            if t.processing_on is not None:
                t.processing_on.done(t, 0.0)
                self.batch(t.processing_on.ident, "free", t.key)
                t.processing_on = None
            t.value = None
            self._free_holders(t)
            if t.group is not None:
                t.group.move(t.state, "erred")
            t.state = "erred"  # any state may fail
            t.error = [exc, tb, text, kind, extra]
            item = None
            for cs in t.wanters():
                item = item or t.erred_item()
                self.batch(cs.ident, "erred", item)
            # Results computed already stay valid (lost scattered data does not undo them);
            # should one be lost later, its recomputation fails on this error then.
            stack.extend(d for d in t.dependents or () if d.state != "memory")
            self._drop_fire_and_forget(t)
        self._check_release([ts])

    def _free_holders(self, ts: TaskState) -> None:
        if ts.holders is None:
            return
        for ws in ts.drop_holders():
            if ws.ident in self.workers:
                self.batch(ws.ident, "free", ts.key)

    def _check_release(self, candidates: list[TaskState]) -> None:
        """Drop the data, or the whole record, of tasks that nothing needs any more."""
        stack = list(candidates)
        while stack:
            ts = stack.pop()
            if ts.who_wants or ts.key not in self.tasks:
                continue
            if any(d.state in ("waiting", "queued", "processing") for d in ts.dependents or ()):
                continue
            if ts.dependents:
                # Records downstream remain: keep ours for lineage, drop data and work.
                if ts.state in ("memory", "processing", "queued", "waiting"):
                    self._drop_work(ts)
                    self._set_state(ts, "released")
                    stack.extend(ts.deps)
                continue
            self._drop_work(ts)
            del self.tasks[ts.key]
            if ts.group is not None:
                ts.group.move(ts.state, "forgotten" if ts.state in ("memory", "released")
                              else "cancelled")
            ts.state = "forgotten"
            if ts.func is not None:
                self._drop_function(ts.func)
                ts.func = None
            deps = ts.deps
            ts.parents = None  # first: a dependent drops its links, then is discarded
            for dts in deps:
                dts.discard_dependent(ts)
                stack.append(dts)

    def _drop_work(self, ts: TaskState) -> None:
        if ts.processing_on is not None:
            ts.processing_on.done(ts, 0.0)
            self.batch(ts.processing_on.ident, "free", ts.key)
            self._fill(ts.processing_on)
            ts.processing_on = None
        self._restricted.discard(ts)
        ts.value = None
        self._free_holders(ts)

    # ------------------------------------------------------------------ checks

    def validate(self) -> None:
        """Check internal invariants (tests call this; it is O(tasks))."""
        dependents: dict[TaskState, set] = {}
        for key, ts in self.tasks.items():
            assert ts.key == key
            assert ts.state in TRANSITIONS, ts.state
            if ts.state == "processing":
                assert ts.processing_on is not None and ts.processing_on.ident in self.workers
                assert ts.processing_on.processing.get(key) is ts
            else:
                assert ts.processing_on is None, (key, ts.state)
            if ts.state == "memory":
                assert ts.holders is not None or ts.value is not None, key
            if ts.state == "waiting":
                assert ts.waiting_on == sum(d.state != "memory" for d in ts.deps), key
            deps = ts.deps
            assert len(set(deps)) == len(deps), key
            for d in deps:
                assert self.tasks.get(d.key) is d, (key, d.key)
                if d not in dependents:
                    dependents[d] = set(d.dependents)
                    assert len(dependents[d]) == len(d.dependents), d.key  # no duplicates
                assert ts in dependents[d], (key, d.key)
            for cs in ts.wanters():
                assert cs.ident in self.clients, (key, cs)
        held = {ws: set(ws.has_what) for ws in self.workers.values()}
        for ws in self.workers.values():
            for key, ts in ws.processing.items():
                assert ts.processing_on is ws and ts.key == key
            for ts in ws.started:
                assert ws.processing.get(ts.key) is ts, (ws, ts)
            assert len(held[ws]) == ws.nheld, (ws, len(held[ws]), ws.nheld)
            for ts in held[ws]:
                assert self.tasks.get(ts.key) is ts, (ws, ts)
        for key, ts in self.tasks.items():
            for ws in ts.who_has:
                assert ts in held.get(ws, ()), (key, ws)  # a live worker, which logs it
        by_group: dict[tuple, int] = {}  # the observer's counters agree with the tasks
        for ts in self.tasks.values():
            assert ts.group is None or self.observe.groups.get(ts.group.name) is ts.group
            if ts.group is not None:
                by_group[ts.group.name, ts.state] = by_group.get((ts.group.name, ts.state), 0) + 1
        for g in self.observe.groups.values():
            for st in LIVE_STATES:
                assert g.counts[st] == by_group.get((g.name, st), 0), (g.name, st, g.counts)
        self.validate_moves()
