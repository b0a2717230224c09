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

The class keeps the records and the transitions (dispatch, time, task-state moves) and hands
each other concern to a part, one module each, that it builds and gives what it needs:
:mod:`.peers` (``peer_ops``: hellos and each role's ops), :mod:`.queries` (``queries``: answers
to requests), :mod:`.client_ops` (``keys``: submit, release, cancel, scatter, the keys shared
state holds), :mod:`.worker_loss` (``exits``: a worker leaves or dies), :mod:`.retire`
(``retirement``: retiring workers, replicas), :mod:`.roles` (``roles``: who may do what),
:mod:`.shared_state` (``coord``: locks, queues, variables...), :mod:`.plugin_registry`
(``plugin_registry``: worker and nanny plugins), :mod:`.recovery` (``recovery``: a restarted
scheduler rebuilt from its peers). The parts that need the whole state get it
(``s``); the others get only what they use (callables, the outbox, the fan-out). Pure helpers:
:mod:`.policy` (where a task runs, whom to blame), :mod:`.records`, :mod:`.queue`,
:mod:`.outbox`, :mod:`.requests`, :mod:`.observe`.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable

from ..config import DEFAULT, Config
from ..errors import RemoteProtocolError
from ..protocol import check_items, submitted_keys
from ..transition_log import StoryLog
from .candidates import Candidates
from .client_ops import ClientOps
from .liveness import Liveness
from .observe import LIVE as LIVE_STATES
from .observe import Observer
from .outbox import Outbox
from .peers import PeerOps
from .plugin_registry import PluginRegistry
from .queries import Queries
from .queue import ReadyQueue, RestrictedQueue
from .records import FIRE_AND_FORGET, HELD, ClientState, NannyState, TaskState, WorkerState
from .recovery import Recovery
from .requests import FanOut
from .retire import Retirement
from .roles import Roles
from .runs import Reserves, RootRun, wants_runs
from .shared_state import Coordination
from .subscriptions import Subscriptions
from .worker_loss import WorkerLoss

logger = logging.getLogger(__name__)

#: Allowed task-state moves.
TRANSITIONS: dict[str, frozenset[str]] = {
    "new": frozenset({"waiting", "queued", "processing", "memory", "erred"}),
    "waiting": frozenset({"queued", "processing", "erred", "released", "memory"}),
    "queued": frozenset({"processing", "erred", "released", "memory"}),
    "processing": frozenset({"memory", "erred", "queued", "processing", "released"}),
    "memory": frozenset({"released", "waiting", "queued", "processing", "erred"}),
    "released": frozenset({"waiting", "queued", "processing", "erred", "memory"}),
    "erred": frozenset({"released"}),
}



#: Set (to anything) in the environment, a bug of the scheduler's own code met while it applies
#: an op is raised again after it is logged, instead of only answered: tests set it
#: (tests/conftest.py), so that a bug fails the test that found it.
RAISE_BUGS_ENV = "ZFABRIC_RAISE_BUGS"


class InvalidTransition(RuntimeError):
    """Raised when code (ours) tries a task-state move that the table forbids."""


def _no_key(peer: bytes) -> bytes | None:
    return None


class SchedulerState:
    """Tasks, workers and clients; ops in, ops out."""

    def __init__(
        self, *, address: str = "", config: Config = DEFAULT, versions: dict | None = None
    ):
        self.config = config
        self.address = address
        self.epoch = uuid.uuid4().hex
        self.versions = versions or {}
        self.tasks: dict[str, TaskState] = {}
        #: id -> [pickle, tasks using it, id, workers it was sent to]
        self.functions: dict[str, list] = {}
        self.workers: dict[bytes, WorkerState] = {}  # by routing id
        self.workers_by_address: dict[str, WorkerState] = {}
        self.clients: dict[bytes, ClientState] = {FIRE_AND_FORGET: ClientState(FIRE_AND_FORGET),
                                                  HELD: ClientState(HELD)}
        self.nannies: dict[bytes, NannyState] = {}
        # Worker processes their Nanny reported dead (it may still be killing them): one that
        # says hello again must not come back as a worker nobody will ever report.
        self.reported_dead: dict[bytes, bytes | None] = {}
        self._outbox = Outbox(ignore=frozenset({FIRE_AND_FORGET, HELD}))
        self.send = self._outbox.send  # queue an op for a peer
        self.batch = self._outbox.batch  # queue one item of a list-carrying op (see Outbox)
        self._queued = ReadyQueue()  # unrestricted queued tasks; stale entries are skipped
        self._restricted = RestrictedQueue()  # queued tasks that only some workers may run
        self.candidates = Candidates()  # workers by load, name, resource (see .candidates)
        self.reserves = Reserves()  # runs of root tasks workers claimed (see .runs)
        self.seq = 0
        self.fan_out = FanOut(self.send)  # run and restart requests in flight
        self.closing = False  # set by a remote shutdown request; the shell closes
        self.events: list[tuple[float, str]] = []  # recent notable events, for info and logs
        self.now = 0.0
        self.started = 0.0  # wall-clock time the shell started serving (it sets it)
        self.counts = {"finished": 0, "erred": 0}
        self.observe = Observer(config.TASK_STREAM_LENGTH)  # groups, task stream, topics
        self.dashboard_link: str | None = None  # set by the shell once its dashboard serves
        #: set by the shell: n -> recent log records of this process
        self.log_source: Callable[[int | None], list] | None = None
        #: The public key (Z85) a peer connected with, or None without security; the shell
        #: replaces it with a lookup in the keys its ZAP handler reported.
        self.key_of: Callable[[bytes], bytes | None] = _no_key
        self.secured = False  # set by the shell when keys bind roles (security on)
        self.admins: set[bytes] = set()  # clients holding an admin key (security on)
        self.admin_only = {k.strip() for k in config.ADMIN_ONLY.split(",") if k.strip()}
        # The parts (see the module docstring).
        self.keys = ClientOps(self)
        self.exits = WorkerLoss(self)
        self.peer_ops = PeerOps(self)
        self.queries = Queries(self)
        self.roles = Roles(self)
        self.retirement = Retirement(self)
        self.plugin_registry = PluginRegistry(self.send, self.fan_out)
        self.coord = Coordination(self.send, self.keys.hold, self.keys.unhold,
                                  self.keys.client_seen, self.keys.give)
        self.liveness = Liveness(config, self.send)  # heartbeat interval, time-to-live
        self.recovery = Recovery(self)  # a restart: what the peers of the old one report
        #: The transition log (Client.story), None when TRANSITION_LOG_LENGTH is 0.
        self.story = StoryLog(config.TRANSITION_LOG_LENGTH) \
            if config.TRANSITION_LOG_LENGTH > 0 else None
        #: What the ops being applied are: (op name, number, the sending worker's address or
        #: None);
        #: kept only while the log is on or someone follows transitions.
        self.stimulus: tuple = ("start", 0, None)
        self._stimuli = 0
        self.subs = Subscriptions(self.send, config.SUBSCRIPTION_QUEUE_EVENTS,
                                  lambda topic: self.observe.topics.get(topic, ()))
        self.observe.on_event = self.subs.topic_event

    def peers_changed(self, joining: int = 0) -> None:
        """Workers, nannies or clients came or went (``joining``: about to): the heartbeat
        interval follows their number (see .liveness)."""
        n = len(self.workers) + len(self.nannies) + len(self.clients) - 2 + joining
        self.liveness.peers_changed(n, self.now, lambda: (*self.workers, *self.nannies))

    # ------------------------------------------------------------------ what tests and the
    # shell ask of the parts

    @property
    def moves(self) -> dict[tuple[bytes, str], set[int]]:
        """Data moves in flight: (worker, key) -> the ids of the jobs waiting on each."""
        return self.retirement.moves

    @property
    def jobs(self) -> dict:
        """Replicate and retire requests in progress, by id."""
        return self.retirement.jobs

    @property
    def retiring(self) -> dict[bytes, int]:
        """Workers being retired -> their retirement's job id."""
        return self.retirement.retiring

    def info(self) -> dict:
        return self.queries.info()

    def remove_worker(self, ws: WorkerState, reason: str, *, died: bool,
                      unheard: bool = True) -> None:
        self.exits.remove_worker(ws, reason, died=died, unheard=unheard)

    def peer_gone(self, peer: bytes, now: float, why: str = "its connection is gone") -> None:
        ws = self.workers.get(peer)
        self.stimulate("peer-gone", ws.address if ws is not None else None)
        self.exits.peer_gone(peer, now, why)

    def flush(self) -> dict[bytes, list[dict]]:
        """``{peer: [ops]}`` queued since the last flush (subscribers' events join them)."""
        if self.subs.dirty:
            self.subs.drain()
        return self._outbox.flush()

    def stimulate(self, name: str, sender: str | None = None) -> None:
        """What comes next is caused by ``name`` (an op, ``tick``...), from the worker at
        address ``sender`` if one sent it: its transitions are logged with it
        (``Client.story``)."""
        self._stimuli += 1
        self.stimulus = stim = (name, self._stimuli, sender)
        if self.story is not None:
            self.story.stimulus = stim

    def wanted_keys(self, cs: ClientState) -> list[str]:
        return self.keys.wanted_keys(cs)

    def event(self, text: str, kind: str = "event") -> None:
        logger.info(text)
        self.events.append((self.now, text))
        if len(self.events) > 200:
            del self.events[:100]
        self.observe.event(kind)
        self.observe.log_event("scheduler", {"action": kind, "text": text}, self.now)

    def observe_new(self, ts: TaskState) -> None:
        self.observe.new_task(ts, self.workers)

    # ------------------------------------------------------------------ entry points

    def handle(self, peer: bytes, ops: list[dict], now: float, role: str | None = None) -> None:
        """Apply the ops one peer sent; the replies wait in :attr:`outbox`.

        ``role``: with security on, the role of the key the message came with (the ZAP
        user id); a peer may act only as its key's role."""
        self.now = now
        if role is not None and not self.roles.role_allows(peer, ops, role):
            return
        # Ops after one that ends the peer's session (goodbye, a removal) are not applied:
        # they would pin data to a record that is gone.
        ws = self.workers.get(peer)
        if ws is not None:
            ws.last_seen = now
            for op in ops:
                self._guard(peer, op, self.peer_ops.handle_worker, ws)
                if op["op"] == "goodbye" and self.workers.get(peer) is not ws:
                    return
            return
        cs = self.clients.get(peer)
        if cs is not None:
            cs.last_seen = now
            if self.recovery.settle_until and self.recovery.defer(peer, ops):
                return  # a restart settles: the workers report first (see .recovery)
            for op in ops:
                if self.clients.get(peer) is not cs:
                    return
                self._guard(peer, op, self.peer_ops.handle_client, cs)
            return
        ns = self.nannies.get(peer)
        if ns is not None:
            ns.last_seen = now
            for op in ops:
                if self.nannies.get(peer) is not ns:
                    return
                self._guard(peer, op, self.peer_ops.handle_nanny, ns)
            return
        for i, op in enumerate(ops):
            if op["op"] == "hello":
                self._guard(peer, op, self.peer_ops.handle_hello, None)
                if peer in self.workers or peer in self.clients or peer in self.nannies:
                    self.handle(peer, ops[i + 1 :], now)
                return
            if op["op"] in ("goodbye", "error", "reply", "data"):
                continue
            self.send(peer, {"op": "reregister", "reason": f"unknown peer sent {op['op']!r}"})
            return

    def _guard(self, peer, op, method, record) -> None:
        """Apply one op; a peer's bad op (a RemoteProtocolError: the protocol's door checked
        its shape, the handlers what it asks) is answered with an error op. Anything else is
        a bug of ours: logged as one, answered, and raised again where :data:`RAISE_BUGS_ENV`
        is set (the tests set it)."""
        story = self.story
        if story is not None or self.subs.watching:
            self._stimuli += 1
            self.stimulus = stim = (op["op"], self._stimuli, record.address
                                    if type(record) is WorkerState else None)
            if story is not None:
                story.stimulus = stim
        try:
            check_items(op)
            method(record, op) if record is not None else method(peer, op)
        except RemoteProtocolError as exc:
            self._refuse(peer, op, f"bad {op.get('op')!r} op from {peer!r}:"
                         f" {type(exc).__name__}: {exc}")
        except Exception as exc:
            logger.exception("bug: the scheduler failed on a %r op from %r", op.get("op"), peer)
            if os.environ.get(RAISE_BUGS_ENV):
                raise
            self._refuse(peer, op, f"the scheduler failed on a {op.get('op')!r} op (a bug;"
                         f" see its log): {type(exc).__name__}: {exc}")

    def _refuse(self, peer: bytes, op: dict, text: str) -> None:
        if len(text) > 1000:
            text = text[:997] + "..."
        logger.warning(text)
        reply: dict = {"op": "error", "message": text}
        if op.get("op") == "submit":
            reply["keys"] = self._refused_keys(peer, submitted_keys(op))
        elif op.get("op") == "request" and type(op.get("id")) is int:
            reply["request"] = op["id"]  # its requester waits: it fails with this error
        self.send(peer, reply)

    def _refused_keys(self, peer: bytes, keys: list[str]) -> list[str]:
        """Of the keys of a refused submit, those the client does not hold futures for already
        (it fails their futures instead of waiting)."""
        cs = self.clients.get(peer)
        tasks = self.tasks
        return [k for k in keys if not (k in tasks and cs is not None and tasks[k].wanted_by(cs))]

    def tick(self, now: float) -> None:
        """Time passes: declare silent workers dead and silent clients gone."""
        self.now = now
        self.stimulate("tick")
        self.observe.sample(now, self.counts["finished"])
        ttl = self.liveness.worker_ttl_s(now)
        limit = now - ttl
        for ws in [w for w in self.workers.values() if w.last_seen < limit]:
            if ws.nanny is not None and ws.nanny in self.nannies:
                ns = self.nannies[ws.nanny]
                if ns.last_seen >= limit and ws.ident in ns.vouched:
                    continue  # busy holding the GIL, but its Nanny sees it alive
            self.exits.remove_worker(ws, f"silent for {now - ws.last_seen:.1f} s", died=True)
        limit = now - self.config.CLIENT_TTL_S
        for cs in [c for c in self.clients.values() if c.ident not in (FIRE_AND_FORGET, HELD)]:
            if cs.last_seen < limit:
                self.event(f"client {cs.name} silent for {now - cs.last_seen:.0f} s; releasing")
                self.keys.remove_client(cs)
        silent = now - ttl
        for ns in [n for n in self.nannies.values() if n.last_seen < silent]:
            self.queries.drop_nanny(ns.ident)
        self.coord.tick(now)
        if self.recovery.grace_until:
            self.recovery.tick(now)
        if self.moves or self.jobs:
            self.retirement.moves_tick()

    # ------------------------------------------------------------------ transitions

    def set_state(self, ts: TaskState, new: str) -> None:
        old = ts.state
        if new not in TRANSITIONS[old]:
            raise InvalidTransition(f"{ts.key!r}: {old} -> {new}")
        g = ts.group
        if g is not None:
            c = g.counts
            c[old] -= 1
            c[new] += 1
        ts.state = new
        story = self.story
        if story is not None:  # StoryLog.add, inline: the hot path
            key = ts.key
            index = story.index
            seq = story.seq
            i = seq % story.length
            ws = ts.processing_on
            # (only strings and numbers in a record: the garbage collector stops tracking it)
            story.ring[i] = (key, old, new, ws.address if ws is not None else None, self.now,
                             story.stimulus, index.get(key, -1))
            index[key] = seq
            story.seq = seq + 1
            if not i:
                story.compact()
        if self.subs.watching:
            self.tell_transition(ts, old, new)

    def moved(self, ts: TaskState, old: str) -> None:
        """``ts`` moved from ``old`` outside :meth:`set_state` (it failed, or was forgotten):
        the log and the subscribers hear it."""
        if self.story is not None:
            self.story.add(ts.key, old, ts.state, None, self.now)
        if self.subs.watching:
            self.tell_transition(ts, old, ts.state)

    def tell_transition(self, ts: TaskState, old: str, new: str) -> None:
        """Subscribers to transitions hear one (``[key, start, finish, wall time, worker,
        stimulus id]``)."""
        ws = ts.processing_on
        name, number, sender = self.stimulus
        item = [ts.key, old, new, self.now + self.observe.wall_offset,
                ws.address if ws is not None else sender, f"{name}-{number}"]
        self.subs.transition(ts.key, ts.group.name if ts.group is not None else None, item)

    def start(self, ts: TaskState) -> None:
        """A new or released task: wait for its dependencies, or run it."""
        waiting = 0
        for dts in ts.deps:
            if dts.state == "erred":
                exc, tb, text, kind, extra = dts.error
                self.fail(ts, exc, tb, text, kind=kind, extra=extra)
                return
            if dts.state != "memory":
                waiting += 1
                if dts.state == "released":
                    self.recompute(dts)
        ts.waiting_on = waiting
        if waiting:
            self.set_state(ts, "waiting")
        else:
            self._ready(ts)

    def release_dependents_waiting(self, ts: TaskState) -> None:
        for dep in ts.dependents or ():
            if dep.state == "waiting":
                dep.waiting_on -= 1
                if dep.waiting_on <= 0:
                    self._ready(dep)

    def _ready(self, ts: TaskState) -> None:
        if self._queued and ts.parents is None and not ts.restricted:
            # A backlog means no worker has a free slot (slots are refilled from it first).
            self.set_state(ts, "queued")
            self._queued.push(ts)
            return
        ws = self.candidates.choose(ts)
        if ws is None:
            self.set_state(ts, "queued")
            if ts.restricted:
                self._restricted.add(ts)
            else:
                self._queued.push(ts)
            return
        self._dispatch(ts, ws)

    def _dispatch(self, ts: TaskState, ws: WorkerState) -> None:
        ts.processing_on = ws  # first: the transition is logged with its worker
        self.set_state(ts, "processing")
        ws.assign(ts)
        fid = ts.func
        if fid is not None and fid not in ws.functions:
            ws.add_function(fid)
            entry = self.functions[fid]
            entry[3].append(ws)
            self.send(ws.ident, {"op": "functions", "items": [[fid, entry[0]]]})
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

    def start_roots(self, roots: list[TaskState]) -> None:
        """Start the root tasks of one submit op (no dependencies, no restriction, new or
        released, in priority order): many of them are placed in runs (see :mod:`.runs`), a
        few as any task."""
        if not wants_runs(len(roots), self.candidates.nthreads):
            for ts in roots:
                self.start(ts)
            return
        run = RootRun(roots)
        for ts in roots:
            ts.waiting_on = 0
        if not self._queued:  # (a backlog: no worker has a free slot)
            least_loaded = self.candidates.least_loaded
            while run.tasks:
                ws = least_loaded()
                if ws is None:
                    break
                self._give_run(ws, self.reserves.claim(run, ws, self.candidates.nthreads))
        if run.tasks:
            for ts in run.tasks:
                self.set_state(ts, "queued")
            run.priority = run.tasks[0].priority
            self._queued.push(run)

    def _give_run(self, ws: WorkerState, run: list[TaskState]) -> None:
        """``ws`` claimed ``run``: it gets what it has slots for; the rest waits, queued, in
        its reserve."""
        i = 0
        for ts in run:
            if not ws.has_slot():
                break
            i += 1
            if ts.state in ("new", "queued"):
                self._dispatch(ts, ws)
        rest = run[i:]
        for ts in rest:
            if ts.state == "new":
                self.set_state(ts, "queued")
        self.reserves.keep(ws, rest)

    def fill_free(self) -> None:
        """Give queued work to the workers with free slots, least loaded first (O(log
        workers) a worker given work)."""
        q = self._queued
        least_loaded = self.candidates.least_loaded
        while q:
            ws = least_loaded()
            if ws is None:
                break
            self.fill(ws)

    def give_back_reserve(self, ws: WorkerState) -> None:
        """``ws`` leaves, pauses or retires: the runs it claimed go back to the queue."""
        run = self.reserves.give_back(ws)
        if run is not None:
            self._queued.push(run)
            self.fill_free()

    def fill(self, ws: WorkerState) -> None:
        """Give a worker with free slots the most urgent queued tasks: from the queue, or
        from its reserve of root tasks (see :mod:`.runs`), whichever comes first; with
        neither, when it has less than a task a thread beyond those running, half of another
        worker's reserve."""
        if ws.ident not in self.workers:
            return
        q = self._queued
        reserves = self.reserves
        while ws.has_slot():
            mine = reserves.head(ws)
            if q and (mine is None or q.head_priority() < mine.priority):
                ts = q.pop()
                if type(ts) is RootRun:
                    self._give_run(ws, reserves.claim(ts, ws, self.candidates.nthreads))
                    if ts.tasks:
                        q.push(ts)
                elif ts.state == "queued":
                    self._dispatch(ts, ws)
            elif mine is not None:
                self._dispatch(reserves.pop(ws), ws)
            elif ws.occupancy >= 2 * ws.nthreads or not reserves.steal(ws):
                break  # (it steals only when it is about to run out)
        if self._restricted and ws.has_slot():
            self.fill_restricted()

    def fill_restricted(self) -> None:
        self._restricted.fill(self.candidates.choose, self._dispatch)

    def restricted_drop(self, ts: TaskState) -> None:
        self._restricted.discard(ts)

    def fail(self, ts: TaskState, exc: bytes | None, tb: bytes | None, text: str, *,
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
            old, t.state = t.state, "erred"  # any state may fail
            self.moved(t, old)
            t.error = [exc, tb, text, kind, extra]
            item = None
            for cs in t.wanters():
                item = item or t.erred_item()
                self.batch(cs.ident, "erred", item)
            # Results computed already stay valid (lost scattered data does not undo them);
            # should one be lost later, its recomputation fails on this error then.
            stack.extend(d for d in t.dependents or () if d.state != "memory")
            self.keys.drop_fire_and_forget(t)
        self.check_release([ts])

    def _free_holders(self, ts: TaskState) -> None:
        if ts.holders is None:
            return
        for ws in ts.drop_holders():
            if ws.ident in self.workers:
                self.batch(ws.ident, "free", ts.key)

    def check_release(self, candidates: list[TaskState]) -> None:
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
                    self.drop_work(ts)
                    self.set_state(ts, "released")
                    stack.extend(ts.deps)
                continue
            self.drop_work(ts)
            del self.tasks[ts.key]
            if ts.group is not None:
                ts.group.move(ts.state, "forgotten" if ts.state in ("memory", "released")
                              else "cancelled")
            old, ts.state = ts.state, "forgotten"
            story = self.story
            if story is not None:  # StoryLog.add, inline (every task passes here)
                key = ts.key
                index = story.index
                seq = story.seq
                i = seq % story.length
                story.ring[i] = (key, old, "forgotten", None, self.now, story.stimulus,
                                 index.get(key, -1))
                index[key] = seq
                story.seq = seq + 1
                if not i:
                    story.compact()
            if self.subs.watching:
                self.tell_transition(ts, old, "forgotten")
            if ts.func is not None:
                self.keys.drop_function(ts.func)
                ts.func = None
            deps = ts.deps
            ts.parents = None  # first: a dependent drops its links, then is discarded
            for dts in deps:
                dts.discard_dependent(ts)
                stack.append(dts)

    def drop_work(self, ts: TaskState) -> None:
        ws = ts.processing_on
        if ws is not None:
            if ts in ws.started and ts not in ws.long_running:
                # it runs on: its thread stays busy until the worker says it ended
                ws.running_cancelled(ts.key)
            ws.done(ts, 0.0)  # (tells the candidate index)
            self.batch(ws.ident, "free", ts.key)
            self.fill(ws)
            ts.processing_on = None
        self._restricted.discard(ts)
        ts.value = None
        self._free_holders(ts)

    def recompute(self, ts: TaskState) -> None:
        """Bring a released task back, with whatever of its lineage is missing."""
        stack = [ts]
        while stack:
            t = stack.pop()
            if t.state != "released":
                continue
            if t.payload is None:
                self.fail(t, None, None, f"scattered data {t.key!r} was released or lost and"
                           " cannot be recomputed", kind="LostDataError")
                continue
            self.start(t)
            stack.extend(d for d in t.deps if d.state == "released")

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
                assert d.key in self.tasks and self.tasks[d.key] is d, (key, d.key)
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
        self.retirement.validate_moves()
        self.candidates.validate(self.workers.values())
        reserved: set[TaskState] = set()  # runs claimed: by workers that may run them, once
        for ws, run in self.reserves.reserved().items():
            assert self.workers.get(ws.ident) is ws and ws.status == "running" \
                and not ws.retiring, ws
            for ts in run:
                assert ts not in reserved and not ts.deps and not ts.restricted, ts
                reserved.add(ts)
