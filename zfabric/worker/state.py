"""The worker's state, sans-IO: what a worker decides, apart from the sockets, threads and files.

Theory of operation
-------------------
:class:`WorkerCore` is to the worker what :class:`~zfabric.scheduler.state.SchedulerState` is to
the scheduler. It never touches a socket, a thread, a file or the clock: ``now`` is an argument.
Its shell (:class:`~zfabric.worker.core.WorkerLoop`) feeds it

- the scheduler's ops (:meth:`WorkerCore.handle`): ``compute``, ``free``, ``acquire``,
  ``welcome``, ``heartbeat-interval``, ``reregister``, ``close``, ``error``, ...;
- what its I/O reported back: task outcomes (:meth:`done`), a peer's answer to a fetch
  (:meth:`fetched`, :meth:`fetch_refused`), values a client placed here (:meth:`placed`), the
  memory monitor's verdict (:meth:`memory`), and the heartbeat's time (:meth:`tick`);

and each call returns the **actions** still to do, plain tuples whose first item names them
(the constants below). Ops for the scheduler queue in the core; :meth:`flush` hands them out
in the order the scheduler expects (``started`` before ``finished``, a pause after both).

Per key the core knows: held (``held``: a value the shell stores), borrowed (a peer's copy
fetched for this worker's tasks: ``borrowed`` counts the tasks using it, ``borrows`` lists each
task's), waiting for dependencies (``waiting``, ``fetching``), ready, executing (``executing``:
its task_timeout), cancelled while executing (``cancelled``), placed by a client and not yet
confirmed by the scheduler (``unconfirmed``), fetched to keep (``acquiring``: replication and
retirement). Fetches wait in a queue per peer and leave at :meth:`pump` as the fetch plan
(:class:`~zfabric.worker.fetches.Fetches`) allows, none while paused; one unanswered for
``FETCH_TIMEOUT_S`` is given up and its tasks are reported ``missing``. A scheduler silent for
``death_timeout_s`` stops the worker. One that asks it to register again (``reregister``: a
new incarnation at the same address) is rejoined (:meth:`WorkerCore._rejoin`): the worker keeps
the values it holds as its own and the tasks that run, drops tasks not started and borrowed
copies, says hello again and reports what it holds and runs (``holding``), so that the new
scheduler runs nothing again that it already has; results of the tasks that ran on are sent
as usual once they end. With ``keep_on_rejoin`` False it forgets everything instead. Memory
thresholds are applied by the shell's :class:`~zfabric.worker.memory.MemoryManager` (it picks
what to spill and writes it); its verdict comes in through :meth:`memory`, and the core
decides what a pause means: the scheduler is told, no fetch leaves.

The heartbeat interval is the scheduler's: the ``heartbeat_s`` of its welcome, changed later by
a ``heartbeat-interval`` op (:func:`heartbeat_seconds` drops a value that is not a finite
positive number, with a warning).

The per-task path (``compute`` -> :data:`EXECUTE` -> :meth:`done` -> ``finished``) allocates
one tuple per action and appends to lists; a batch of ops is one call.
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from typing import Any

from .. import protocol, serialize
from ..errors import TaskTimeout
from .actions import (
    ACQUIRE_VALUES,
    CANCEL,
    DROP,
    END_FETCH,
    EXECUTE,
    FETCH,
    FORGET,
    FORGET_FUNCTIONS,
    KEEP,
    LOAD_FUNCTIONS,
    PLUGIN,
    REFUSED,
    REJOIN,
    REPLACE_THREAD,
    RUN,
    STOP,
    STORE,
    STORE_INLINE,
    TRANSITION,
    UNCANCEL,
    WELCOMED,
    WORKER_KEYS,
)
from .fetches import FETCH_BATCH_KEYS, FETCH_TIMEOUT_S, FETCHES_PER_PEER, FETCHES_TOTAL, Fetches

logger = logging.getLogger("zfabric.worker.core")

__all__ = ["FETCHES_PER_PEER", "FETCHES_TOTAL", "FETCH_BATCH_KEYS", "FETCH_TIMEOUT_S",
           "WorkerCore", "heartbeat_seconds"]

def heartbeat_seconds(value: Any) -> float | None:
    """The heartbeat interval a scheduler gave (``welcome`` or ``heartbeat-interval``), or
    None when it is no finite positive number of seconds (logged; the interval stays)."""
    if type(value) in (int, float) and math.isfinite(value) and value > 0:
        return float(value)
    if value is not None:
        logger.warning("ignoring heartbeat_s %s from the scheduler: not a positive number of"
                       " seconds", protocol.short(repr(value), 64))
    return None


class WorkerCore:
    """One worker's state machine (see the module docstring)."""

    def __init__(self, *, name: str = "worker", address: str = "", nanny: bool = False,
                 inline_bytes: int, heartbeat_s: float, death_timeout_s: float,
                 put_data_confirm_s: float, now: float = 0.0, keep_on_rejoin: bool = True):
        self.name = name
        self.address = address
        self.nanny = nanny  # a task past its task_timeout restarts the process
        self.inline_bytes = inline_bytes
        self.heartbeat_s = heartbeat_s
        self.death_timeout_s = death_timeout_s
        self.put_data_confirm_s = put_data_confirm_s
        self.keep_on_rejoin = keep_on_rejoin
        self.rejoined_at: float | None = None  # when it last said hello to a new incarnation
        self.hello_op: dict | None = None  # set by the shell once it knows its address
        self.hear_transitions = False  # a plugin hears task transitions
        self.wall_offset = 0.0  # time.time() - now, for the task stream's wall-clock times
        self.epoch: str | None = None
        self.last_heard = now
        self.hello_at = 0.0  # when to say hello again after a refusal that said to retry
        self.next_beat = now + heartbeat_s
        self.paused = False
        self.pause_reason = ""
        self.tight = False  # memory is near a threshold: fetch one value at a time
        # keys and tasks
        self.held: set[str] = set()
        self.borrowed: dict[str, int] = {}
        self.borrows: dict[str, list[str]] = {}
        self.waiting: dict[str, list] = {}  # key -> [payload, missing deps, options, fid]
        self.fetching: dict[str, list[str]] = {}  # dep key -> task keys waiting for it
        self.acquiring: set[str] = set()
        self.ready: deque[tuple] = deque()  # (key, payload, options, fid)
        self.executing: dict[str, float] = {}  # key -> task_timeout or 0
        self.cancelled: set[str] = set()
        self.unconfirmed: dict[str, float] = {}  # placed here (put-data) -> when
        self.confirming: tuple[int, list] | None = None  # who-has request in flight
        self.fetches = Fetches()
        self.fetch_stats = self.fetches.stats
        self.transfer_log: list[list] = []  # [peer, start, stop, nbytes, nkeys]
        self._request_seq = 0  # ids of requests to the scheduler
        # to the scheduler
        self.outbox: list[dict] = []
        self.started_keys: list = []
        self.finished_items: list = []
        self.seceded_items: list = []
        self.status_op: dict | None = None
        self._acts: list[tuple] = []

    # ------------------------------------------------------------------ outputs

    def _take(self) -> list[tuple]:
        acts = self._acts
        if acts:
            self._acts = []
        return acts

    def send(self, op: dict) -> None:
        """Queue an op the shell made (a heartbeat's metrics, a ``run`` result, ...)."""
        self.outbox.append(op)

    def started(self, keys) -> None:
        """The executor started these tasks (told as ``started``)."""
        self.started_keys.extend(keys)

    def seceded(self, items: list) -> None:
        """``[key, True]``: a task gave its slot back; ``[key, False]``: it took one again."""
        self.seceded_items.extend(items)

    def flush(self) -> list[dict]:
        """The ops for the scheduler queued since the last flush, in order."""
        if self.started_keys:
            keys = self.started_keys
            self.started_keys = []
            if self.finished_items and not self.seceded_items:
                # A task that started and finished since the last flush needs no ``started``:
                # its ``finished`` follows in this message (for tiny tasks, most of them).
                ended = {item[0] for item in self.finished_items}
                keys = [k for k in keys if k not in ended]
            if keys:
                self.outbox.append({"op": "started", "keys": keys})
        if self.seceded_items:
            self.outbox.append({"op": "long-running", "items": self.seceded_items})
            self.seceded_items = []
        if self.finished_items:
            op = {"op": "finished", "tasks": self.finished_items}
            if self.transfer_log:  # the fetches its tasks waited for: seen with them
                op["transfers"], self.transfer_log = self.transfer_log, []
            self.outbox.append(op)
            self.finished_items = []
        if self.status_op is not None:  # after ``started``: it tells what already runs
            self.outbox.append(self.status_op)
            self.status_op = None
        ops = self.outbox
        if ops:
            self.outbox = []
        return ops

    def hello(self) -> None:
        """Say hello (again), telling a pause that already holds."""
        if self.hello_op is not None:
            self.outbox.append(self.hello_op)
        if self.paused:
            self.status_op = self._status()

    # ------------------------------------------------------------------ scheduler ops

    def handle(self, ops: list[dict], now: float) -> list[tuple]:
        """Ops from the scheduler (decoded and checked at the protocol door)."""
        self.last_heard = now
        for op in ops:
            try:
                self._on_op(op, now)
            except Exception:  # one bad op must not stop the loop nor the ops beside it
                logger.exception("worker %s: could not handle %r from the scheduler",
                                 self.name, str(op.get("op"))[:64])
        return self._take()

    def _on_op(self, op: dict, now: float) -> None:
        match op["op"]:
            case "compute":
                for item in op["tasks"]:
                    try:
                        self._compute(*item)
                    except Exception as exc:  # one bad item, not the op
                        logger.warning("bad compute item from the scheduler: %s",
                                       protocol.short(exc, 300))
            case "free":
                for key in op["keys"]:
                    self._free(key)
            case "give-back":  # the scheduler retires this worker: what has not started goes
                queued = {r[0] for r in self.ready}
                given = [k for k in op["keys"] if k not in self.executing
                         and (k in queued or k in self.waiting)]
                for key in given:
                    self._free(key)
                if given:
                    self.outbox.append({"op": "given-back", "keys": given})
            case "acquire":
                self._acquire(op["items"])
            case "functions":
                self._acts.append((LOAD_FUNCTIONS, op["items"]))
            case "forget-functions":
                self._acts.append((FORGET_FUNCTIONS, op["keys"]))
            case "heartbeat":
                pass
            case "heartbeat-interval":
                self._set_heartbeat(op.get("heartbeat_s"), now)
            case "reply":
                self._on_confirmed(op)
            case "welcome":
                first = self.rejoined_at is None and self.epoch is None  # not a new one's
                self.epoch = op["epoch"]
                self._set_heartbeat(op.get("heartbeat_s"), now)
                if op.get("worker_keys") is not None:
                    self._acts.append((WORKER_KEYS, op["worker_keys"]))
                for w in op.get("warnings") or ():
                    logger.warning("version mismatch with the scheduler: %s", w)
                if first:
                    self._acts.append((WELCOMED,))
            case "worker-keys":
                self._acts.append((WORKER_KEYS, op["keys"]))
            case "reregister":
                if (self.rejoined_at is not None and self.epoch is None
                        and now - self.rejoined_at < self.heartbeat_s):
                    return  # one answer per message queued in the outage: hello sent already
                logger.info("worker %s registers again: %s", self.name, op["reason"])
                self.rejoined_at = now
                if self.keep_on_rejoin:
                    self._rejoin()
                else:
                    self._forget_everything()
                self.hello()
            case "run":
                self._acts.append((RUN, op["id"], op["payload"]))
            case "plugin-add" | "plugin-remove":
                # A plugin added now hears the transitions of the ops after this one; the
                # shell sets the flag right once the plugin is set up (telling too many is
                # harmless: nobody hears them).
                if op["op"] == "plugin-add":
                    self.hear_transitions = True
                self._acts.append((PLUGIN, op))
            case "close":
                why = op.get("reason")
                why = f"closed by the scheduler: {why:.500}" if type(why) is str else \
                    "closed by the scheduler"
                logger.info("worker %s: %s", self.name, why)
                self._acts.append((STOP, why, None))
            case "error":
                logger.error("scheduler says: %s", op["message"])
                retry = op.get("retry_s")
                if (self.epoch is None and isinstance(retry, (int, float))
                        and type(retry) is not bool and 0 < retry < 60):
                    self.hello_at = now + retry  # refused for now: ask again
                    return
                if op.get("fatal") and self.epoch is None:
                    self._acts.append((REFUSED, op["message"]))
            case other:
                logger.warning("ignoring %r from the scheduler", other)

    def _set_heartbeat(self, value: Any, now: float) -> None:
        seconds = heartbeat_seconds(value)
        if seconds is not None and seconds != self.heartbeat_s:
            self.heartbeat_s = seconds
            self.next_beat = min(self.next_beat, now + seconds)

    def _rejoin(self) -> None:
        """A new scheduler incarnation: keep this worker's own values and its running tasks
        (their results go out as usual), drop everything the old scheduler asked that has not
        started, and queue :data:`REJOIN` for the shell, which reports the keys and their
        sizes after the hello (``holding``)."""
        old, self.epoch = self.epoch, None
        self.confirming = None
        for key in list(self.waiting):
            self._release(key)
        for key, *_ in self.ready:
            self._release(key)
        self.waiting.clear()
        self.fetching.clear()
        self.acquiring.clear()
        self.fetches.clear_queue()
        self.ready.clear()
        for key in list(self.unconfirmed):  # the client that placed them tells the new one
            self.unconfirmed[key] = self.last_heard
        running = [k for k in self.executing if k not in self.cancelled]
        own = [k for k in self.held if k not in self.borrowed]
        self._acts.append((REJOIN, own, running, old))

    def _forget_everything(self) -> None:
        self.epoch = None
        self.held.clear()
        self.unconfirmed.clear()
        self.confirming = None
        self.borrowed.clear()
        self.borrows.clear()
        self.waiting.clear()
        self.fetching.clear()
        self.acquiring.clear()
        self.fetches.clear_queue()
        self.ready.clear()
        self.cancelled.update(self.executing)
        self.finished_items = []
        self.started_keys = []
        # the shell drops its values and queued messages, and cancels what is still queued
        self._acts.append((FORGET,))
        for key in self.executing:
            self._acts.append((CANCEL, key))

    # ------------------------------------------------------------------ tasks

    def _compute(self, key, payload, inline, who_has, options, fid=None) -> None:
        if key in self.executing and key not in self.cancelled:
            return  # it runs here already (kept across a scheduler restart): it reports
        if key in self.cancelled:
            self.cancelled.discard(key)
            # A run of this key freed earlier must not make the executor skip this one.
            self._acts.append((UNCANCEL, key))
        held = self.held
        if who_has:
            self._borrow(key, list(who_has))
        if inline:
            for k, v in inline.items():
                if k not in held:
                    held.add(k)
                    self._acts.append((STORE_INLINE, k, v))
        missing = fetch = None
        if who_has:
            for dep, addresses in who_has.items():
                if dep in held:
                    continue
                if missing is None:
                    missing, fetch = set(), []
                missing.add(dep)
                waiters = self.fetching.get(dep)
                if waiters is None:
                    self.fetching[dep] = [key]
                    fetch.append((dep, addresses))
                else:
                    waiters.append(key)
        if self.hear_transitions:
            self._acts.append((TRANSITION, key, "released", "waiting" if missing else "ready"))
        if missing:
            # Waiting before any fetch starts: one that fails at once (no holder left) must
            # find the task here to report it ``missing``, or the task would wait forever.
            self.waiting[key] = [payload, missing, options, fid]
            for dep, addresses in fetch or ():
                self._fetch(dep, addresses)
        else:
            self.ready.append((key, payload, options, fid))

    def _borrow(self, key: str, deps: list[str]) -> None:
        self._release(key)  # a task sent again (after a lost dependency) borrows afresh
        mine = [d for d in deps if d in self.borrowed or d not in self.held]
        for d in mine:
            self.borrowed[d] = self.borrowed.get(d, 0) + 1
        if mine:
            self.borrows[key] = mine

    def _release(self, key: str) -> None:
        """Task ``key`` no longer needs its borrowed dependencies; drop those nobody needs."""
        for d in self.borrows.pop(key, ()):
            n = self.borrowed.get(d)
            if n is None:
                continue  # it became this worker's own value meanwhile
            if n > 1:
                self.borrowed[d] = n - 1
            else:
                del self.borrowed[d]
                if d in self.held:
                    self.held.discard(d)
                    self._acts.append((DROP, d))

    def _free(self, key: str) -> None:
        self.unconfirmed.pop(key, None)
        if self.hear_transitions and key in self.held:
            self._acts.append((TRANSITION, key, "memory", "released"))
        executing = key in self.executing
        if not executing:
            self._release(key)  # an executing task releases when it ends
        self.held.discard(key)
        self._acts.append((DROP, key))
        self.waiting.pop(key, None)
        if executing:
            self.cancelled.add(key)
            self._acts.append((CANCEL, key))
        if self.ready and any(r[0] == key for r in self.ready):
            self.ready = deque(r for r in self.ready if r[0] != key)

    def pump(self, now: float) -> list[tuple]:
        """Once per turn of the shell's loop: send queued fetches (batched per peer) and hand
        the ready tasks to the executor."""
        if self.fetches.queue and not self.paused:  # paused: fetch nothing until it resumes
            # Near the memory thresholds one value at a time: a batch of large values could
            # overshoot the limit before it can be spilled.
            fetches = self.fetches
            for fid, addr, keys in fetches.due(self.fetching, now, self.tight):
                # sizes guessed from the keys' groups: segments named in the first request
                guess = None if self.tight else fetches.guess(keys)
                self._acts.append((FETCH, fid, addr, keys, None) if guess is None
                                  else (FETCH, fid, addr, keys, None, guess))
        ready = self.ready
        if ready:
            acts = self._acts
            executing = self.executing
            while ready:
                key, payload, options, fid = ready.popleft()
                if key in self.waiting:
                    continue
                executing[key] = (options.get("task_timeout") if options else None) or 0.0
                if self.hear_transitions:
                    acts.append((TRANSITION, key, "ready", "executing"))
                acts.append((EXECUTE, key, payload, options, fid, self.borrows.get(key)))
        return self._take()

    def done(self, outcomes) -> list[tuple]:
        """Outcomes of tasks (:class:`~zfabric.worker.execute.Outcome`), in the order they
        ended; a skipped (cancelled) call has ``ok`` False and no ``error``."""
        acts = self._acts
        for out in outcomes:
            key = out.key
            self.executing.pop(key, None)
            if key in self.borrows:
                self._release(key)
            if key in self.cancelled or (not out.ok and out.error is None):
                if key in self.cancelled and out.start:  # it ran: its thread is free again
                    self.outbox.append({"op": "thread-free", "keys": [key]})
                    acts.append((UNCANCEL, key))  # the executor's note is spent too
                self.cancelled.discard(key)
                continue
            if self.hear_transitions:
                acts.append((TRANSITION, key, "executing", "memory" if out.ok else "error"))
            if out.ok:
                self.borrowed.pop(key, None)
                self.held.add(key)
                acts.append((KEEP, out))
                small = not out.buffers and out.nbytes < self.inline_bytes
                self.finished_items.append([key, out.nbytes, out.header if small else None,
                                            out.duration, out.start, out.stop, out.thread])
            else:
                data, tb, text, kind = out.error
                self.outbox.append({"op": "erred", "items": [[key, data, tb, text, kind,
                                                              out.start, out.stop,
                                                              out.thread]]})
        return self._take()

    # ------------------------------------------------------------------ fetches

    def _fetch(self, dep: str, addresses: list[str]) -> None:
        if not addresses:
            self._fetch_failed(dep, "")
            return
        self.fetches.add(random.choice(addresses), dep)

    def fetched(self, fid: int, items: list | None, now: float) -> list[tuple]:
        """A peer answered fetch ``fid``: ``items`` are ``(key, header, buffers, raw, sizes,
        nbytes)`` (``header`` None: it does not hold the key; ``sizes``: too large for a frame,
        ask again naming shared-memory segments), or None when it answered with an error or
        its values could not be read."""
        req = self.fetches.end(fid)
        if req is None:
            return self._take()
        addr, keys, sent = req
        if items is None:
            for k in keys:
                self._fetch_failed(k, addr)
        else:
            later = []
            got = nkeys = 0
            learn = self.fetches.learn
            for key, header, bufs, raw, sizes, nbytes in items:
                if sizes is not None:
                    later.append((key, sizes))
                    learn(key, sum(sizes))
                elif header is None:
                    self._fetch_failed(key, addr)
                elif key in self.borrowed or key in self.acquiring:  # else nobody wants it
                    learn(key, nbytes)
                    got += nbytes
                    nkeys += 1
                    self.held.add(key)
                    self._acts.append((STORE, key, header, bufs, raw))
                    self._got_dep(key)
                else:
                    self.fetching.pop(key, None)
            if nkeys and len(self.transfer_log) < 1000:  # heartbeats carry them; sampled
                wall = now + self.wall_offset
                self.transfer_log.append([addr, sent + self.wall_offset, wall, got, nkeys])
            if later:
                # Too large for a frame, on this host: ask again, naming segments to write into.
                later_id = self.fetches.start(addr, [k for k, _ in later], now)
                self._acts.append((FETCH, later_id, addr, [k for k, _ in later], later))
        self._acts.append((END_FETCH, fid))
        return self._take()

    def fetch_refused(self, addr: str) -> list[tuple]:
        """A peer's data port refused this worker's connection: every request to it fails."""
        for fid in self.fetches.to_peer(addr):
            self._fetch_over(fid)
        return self._take()

    def _fetch_over(self, fid: int) -> None:
        """Fetch ``fid`` failed as a whole: its keys are missing where it asked."""
        req = self.fetches.end(fid)
        self._acts.append((END_FETCH, fid))
        if req is not None:
            for k in req[1]:
                self._fetch_failed(k, req[0])

    def _got_dep(self, dep: str) -> None:
        if self.acquiring:
            self._acquire_ended(dep, True)
        for key in self.fetching.pop(dep, ()):
            w = self.waiting.get(key)
            if w is None:
                continue
            w[1].discard(dep)
            if not w[1]:
                del self.waiting[key]
                self.ready.append((key, w[0], w[2], w[3]))
                if self.hear_transitions:
                    self._acts.append((TRANSITION, key, "waiting", "ready"))

    def _fetch_failed(self, dep: str, addr: str) -> None:
        if self.acquiring:
            self._acquire_ended(dep, False)
        for key in self.fetching.pop(dep, ()):
            if self.waiting.pop(key, None) is not None:
                self._release(key)
                self.outbox.append({"op": "missing", "key": key, "dep": dep, "address": addr})

    # ------------------------------------------------------------------ values placed here

    def placed(self, items: list, now: float) -> list[tuple]:
        """A client placed values here (``put-data``): ``(key, header, buffers, raw)``. They
        are this worker's own, and dropped if the scheduler does not list them in time."""
        for key, header, bufs, raw in items:
            self.borrowed.pop(key, None)
            self.held.add(key)
            self._acts.append((STORE, key, header, bufs, raw))
            self.unconfirmed[key] = now  # until the scheduler knows
        return self._take()

    def _confirm_placed(self, now: float) -> None:
        """Ask the scheduler about values placed here ``put_data_confirm_s`` ago; those it
        does not list this worker for are dropped (see :meth:`_on_confirmed`)."""
        if self.confirming is not None or self.epoch is None:
            return
        due = now - self.put_data_confirm_s
        keys = [k for k, t in self.unconfirmed.items() if t <= due][:10_000]
        if keys:
            self._request_seq += 1
            self.confirming = (self._request_seq, keys)
            self.outbox.append({"op": "request", "id": self._request_seq, "kind": "who-has",
                                "args": {"keys": keys}})

    def _on_confirmed(self, op: dict) -> None:
        if self.confirming is None or op.get("id") != self.confirming[0]:
            return
        keys, self.confirming = self.confirming[1], None
        result = op.get("result")
        if type(result) is not dict:
            return
        for key in keys:
            if self.unconfirmed.pop(key, None) is None:
                continue
            holders = result.get(key)
            if type(holders) is not list or self.address not in holders:
                logger.warning("dropping value %r placed here: the scheduler does not know it",
                               protocol.short(key))
                self._free(key)

    # ------------------------------------------------------------------ copies to keep

    def _acquire(self, items: list) -> None:
        """``acquire``: keep a copy of each key (``[key, inline value or None, holders]``),
        for ``replicate`` and for a retiring worker's values."""
        done: list[str] = []
        failed: list[str] = []
        load = []
        for item in items:
            try:
                key, value, addresses = item
            except (TypeError, ValueError):
                logger.warning("ignoring a malformed acquire item %r", item)
                continue
            if key in self.held and key not in self.fetching:
                self.borrowed.pop(key, None)  # a borrowed copy becomes its own
                done.append(key)
            elif value is not None:
                load.append((key, value))
            else:
                self.acquiring.add(key)
                if key not in self.fetching:
                    self.fetching[key] = []
                    self._fetch(key, list(addresses or ()))
        if load:  # the shell loads them and tells acquire_loaded() with done and failed
            self._acts.append((ACQUIRE_VALUES, load, done, failed))
        else:
            self._report_acquired(done, failed)

    def acquire_loaded(self, loaded: list[str], done: list[str], failed: list[str]) -> None:
        """The shell loaded and stored the values of an :data:`ACQUIRE_VALUES` (``loaded``;
        those that failed to load are in ``failed``)."""
        for key in loaded:
            self.held.add(key)
            self.borrowed.pop(key, None)
            done.append(key)
        self._report_acquired(done, failed)

    def _acquire_ended(self, key: str, ok: bool) -> None:
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

    # ------------------------------------------------------------------ memory and time

    def memory(self, paused: bool, reason: str, tight: bool) -> None:
        """The memory monitor's verdict: a change of ``paused`` is told to the scheduler;
        ``tight`` (near a threshold) fetches one value at a time."""
        self.tight = tight
        if paused != self.paused:
            self.paused = paused
            self.pause_reason = reason
            self.status_op = self._status()

    def _status(self) -> dict:
        return {"op": "worker-status", "status": "paused" if self.paused else "running",
                "reason": self.pause_reason}

    def tick(self, now: float, metrics: dict | None = None,
             running: list | None = None, extra: dict | None = None) -> list[tuple]:
        """The heartbeat (when ``now`` passed ``next_beat``): send ``metrics``, abandon tasks
        past their task_timeout (``running``: ``(thread id, key, start)``), give up stale
        fetches, confirm placed values, say hello again when told to, and stop when the
        scheduler has been silent for ``death_timeout_s``."""
        self.next_beat = now + self.heartbeat_s
        beat = {"op": "heartbeat", "metrics": {
            "executing": len(self.executing), "ready": len(self.ready),
            "fetching": len(self.fetching), **(metrics or {})}}
        if self.transfer_log:
            beat["transfers"], self.transfer_log = self.transfer_log, []
        if extra:  # profile samples and log lines since the last beat (worker/profiler.py)
            beat.update(extra)
        self.outbox.append(beat)
        restarting = False
        for ident, key, start in running or ():
            timeout = self.executing.get(key)
            if timeout and now - start > timeout:
                restarting = self._timed_out(key, ident, timeout)
                if restarting:
                    break
        for fid in () if restarting else self.fetches.stale(now):
            self._fetch_over(fid)
        if self.unconfirmed:
            self._confirm_placed(now)
        if self.hello_at and now >= self.hello_at and self.epoch is None:
            self.hello_at = 0.0
            self.hello()
        if now - self.last_heard > self.death_timeout_s:
            logger.error("worker %s: no scheduler for %.0f s; closing", self.name,
                         now - self.last_heard)
            self._acts.append((STOP, "scheduler unreachable", None))
        return self._take()

    def _timed_out(self, key: str, ident: int, timeout: float) -> bool:
        """A thread is stuck past its task's deadline (a thread cannot be killed). True when
        the worker restarts (under a Nanny)."""
        self.executing.pop(key, None)
        if key in self.cancelled:  # released while it ran: its slot is free now
            self.cancelled.discard(key)
            self._acts.append((UNCANCEL, key))
            self.outbox.append({"op": "thread-free", "keys": [key]})
        what = "the worker restarts" if self.nanny else "its thread was abandoned"
        err = TaskTimeout(f"task {key!r} ran longer than its task_timeout of {timeout:g} s;"
                          f" {what}")
        data, tb, text = serialize.exception_payload(err)
        self.outbox.append({"op": "erred", "items": [[key, data, tb, text, "TaskTimeout"]]})
        if self.nanny:
            # A thread cannot be killed: leave cleanly (no suspicion on our other tasks) and
            # let the Nanny start a fresh process.
            self._acts.append((STOP, f"task {key!r} passed its task_timeout; restarting", 75))
            return True
        self._acts.append((REPLACE_THREAD, ident))
        return False
