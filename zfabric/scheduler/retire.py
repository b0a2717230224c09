"""Moving data between workers on request: ``replicate``, ``retire_workers``, ``restart_workers``.

A part of :class:`~zfabric.scheduler.state.SchedulerState`, which it is given (``s``), pure like it.

Theory of operation
-------------------
A *move* puts a copy of a key on a worker: the scheduler sends it ``acquire`` with
``[key, inline value or None, [holder addresses]]``; the worker fetches the value from a
holder (or takes the inline bytes), keeps it as its own (not as a borrowed dependency it would
drop), and answers ``acquired`` with the keys it now holds and the ones it ``failed`` to get.
Only then is it recorded among the key's holders, so ``who_has`` lists it and a retirement or
a lost worker can rely on it. One move per ``(worker, key)`` is in flight at a time; every
*job* (a client's request) waiting on it is told when it ends.

- ``replicate`` (keys, ``n`` copies, optional ``workers``): starts the missing moves, and drops
  copies beyond ``n`` (as dask.distributed does) where no task on that worker needs them.
  It answers once its moves have ended.
- ``retire-workers`` (``workers`` by address or name, or ``n`` of the scheduler's choosing):
  marks each worker *retiring* (its task allowance drops to zero, so it gets no new task;
  tasks it was given but has not started go elsewhere), moves every value it is the only
  holder of to a worker that stays, and once it runs nothing and holds nothing unique, drops
  it as a holder and tells it to ``close`` (its Nanny then lets it go). When no worker would
  stay to take its data, the worker is not retired and the answer says why.
  Progress is checked on each ``acquired`` and on each :meth:`tick`; a move whose target
  left fails, and a value whose move failed gets another target, up to
  :data:`MOVE_ATTEMPTS` times.
- ``restart-workers``: asks each named worker's Nanny to restart that process (the Nanny's
  ``restart`` op with a ``workers`` list); answers once they are back, like ``restart``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..errors import RemoteProtocolError
from .records import TaskState, WorkerState

if TYPE_CHECKING:
    from .state import SchedulerState

logger = logging.getLogger(__name__)

#: How many times one value is given a new target after a move of it failed.
MOVE_ATTEMPTS = 3
#: How often :meth:`Retirement.moves_tick` looks again at a retirement (a step scans what the
#: retiring workers hold; answers from workers trigger a step at once anyway).
RETIRE_STEP_S = 0.2


class Job:
    """A client's replicate or retire request in progress."""

    __slots__ = ("attempts", "id", "kind", "left", "next_step", "peer", "result", "rid",
                 "workers")

    def __init__(self, id: int, kind: str, peer: bytes, rid: int):
        self.id = id
        self.kind = kind
        self.peer = peer
        self.rid = rid
        self.left: set[tuple[bytes, str]] = set()  # moves it waits for
        self.workers: list[WorkerState] = []  # retire: the workers still to close
        self.attempts: dict[str, int] = {}  # key -> failed moves
        self.next_step = 0.0  # retire: when moves_tick looks at it again
        self.result: dict = {"retired": {}, "kept": {}, "failed": []}


def _names(args: dict, field: str) -> list[str] | None:
    value = args.get(field)
    if value is None:
        return None
    if type(value) is not list or any(type(v) is not str for v in value):
        raise RemoteProtocolError(f"{field!r} must be a list of strings")
    return value


def _matches(ws: WorkerState, names: list[str]) -> bool:
    return ws.address in names or ws.name in names


class Retirement:
    """SchedulerState's data moves (see the module docstring)."""

    def __init__(self, s: SchedulerState):
        self.s = s
        self.moves: dict[tuple[bytes, str], set[int]] = {}  # (worker, key) -> job ids
        self.jobs: dict[int, Job] = {}
        self.retiring: dict[bytes, int] = {}  # worker ident -> retire job id
        self._job_seq = 0

    def _new_job(self, kind: str, peer: bytes, rid: int) -> Job:
        self._job_seq += 1
        job = Job(self._job_seq, kind, peer, rid)
        self.jobs[job.id] = job
        return job

    # ------------------------------------------------------------------ requests

    def move_request(self, peer: bytes, op: dict) -> None:
        """``replicate``, ``retire-workers`` or ``restart-workers`` from a client."""
        rid, kind, args = op["id"], op["kind"], op["args"]
        try:
            match kind:
                case "replicate":
                    self._replicate(self._new_job(kind, peer, rid), args)
                case "retire-workers":
                    self._retire(self._new_job(kind, peer, rid), args)
                case "restart-workers":
                    self._restart_workers(peer, rid, args)
        except (RemoteProtocolError, ValueError) as exc:
            for job in [j for j in self.jobs.values() if j.peer == peer and j.rid == rid]:
                self._drop_job(job)
            self.s.send(peer, {"op": "reply", "id": rid, "error": str(exc),
                             "kind": "ValueError" if isinstance(exc, ValueError) else None})

    def _replicate(self, job: Job, args: dict) -> None:
        keys = _names(args, "keys") or []
        names = _names(args, "workers")
        n = args.get("n")
        if n is not None and (type(n) is not int or n < 1):
            raise ValueError(f"n must be a positive integer or None, got {n!r}")
        pool = [ws for ws in self.s.workers.values()
                if ws.ident not in self.retiring and (not names or _matches(ws, names))]
        if not pool:
            raise ValueError(f"no worker to replicate to (workers={names!r})")
        want = len(pool) if n is None else min(n, len(pool))
        missing = []
        for key in keys:
            ts = self.s.tasks.get(key)
            if ts is None or ts.state != "memory":
                missing.append(key)
                continue
            self._spread(job, ts, pool, want)
        job.result["missing"] = missing
        self._maybe_done(job)

    def _spread(self, job: Job, ts: TaskState, pool: list[WorkerState], want: int) -> None:
        """Bring ``ts`` to ``want`` copies among ``pool`` (moves started count as copies)."""
        have = [ws for ws in pool if ts.held_by(ws)]
        coming = [ws for ws in pool if (ws.ident, ts.key) in self.moves]
        for ws in coming:
            self._join_move(job, ws, ts)
        short = want - len(have) - len(coming)
        if short > 0:
            free = sorted((ws for ws in pool if not ts.held_by(ws)
                           and (ws.ident, ts.key) not in self.moves),
                          key=lambda w: (w.nheld, len(w.processing)))
            for ws in free[:short]:
                self._join_move(job, ws, ts)
        elif short < 0 and not coming:
            # Copies beyond n go, as in dask.distributed, from the fullest workers first;
            # never the last copy, nor one a task given to that worker still reads.
            for ws in sorted(have, key=lambda w: -w.nheld)[: -short]:
                if any(d.processing_on is ws for d in ts.dependents or ()):
                    continue
                ts.drop_holder(ws)
                self.s.batch(ws.ident, "free", ts.key)
            self._tell_holders(ts)

    def _tell_holders(self, ts: TaskState) -> None:
        """Clients holding ``ts`` learn its holders anew (they fetch large values from one of
        those they were told, which must not be a worker that is leaving)."""
        if ts.value is None and ts.state == "memory":
            item = ts.memory_item()
            for cs in ts.wanters():
                self.s.batch(cs.ident, "memory", item)

    def _join_move(self, job: Job, ws: WorkerState, ts: TaskState) -> None:
        slot = (ws.ident, ts.key)
        waiting = self.moves.get(slot)
        if waiting is None:
            if ts.value is None and ts.holders is None:
                job.result["failed"].append(ts.key)
                return
            self.moves[slot] = {job.id}
            sources = None if ts.value is not None else [w.address for w in ts.who_has]
            self.s.batch(ws.ident, "acquire", [ts.key, ts.value, sources])
        else:
            waiting.add(job.id)
        job.left.add(slot)

    def _retire(self, job: Job, args: dict) -> None:
        names = _names(args, "workers")
        n = args.get("n")
        if n is not None and (type(n) is not int or n < 0):
            raise ValueError(f"n must be a non-negative integer or None, got {n!r}")
        if names is not None:
            chosen = [ws for ws in self.s.workers.values() if _matches(ws, names)]
        elif n is not None:
            # The workers with the least to move and the least to finish go first.
            idle = sorted((ws for ws in self.s.workers.values() if ws.ident not in self.retiring),
                          key=lambda w: (len(w.processing), w.nheld, w.name))
            chosen = idle[:n]
        else:
            raise ValueError("retire_workers needs workers= (addresses or names) or n=")
        for ws in chosen:
            if ws.ident in self.retiring:
                continue  # another retirement has it; this one does not wait for it
            self.retiring[ws.ident] = job.id
            job.workers.append(ws)
            ws.retiring = True
            ws.limit = 0
            ws.changed()
            self.s.event(f"retiring worker {ws.name} ({ws.address})")
            self.s.give_back_reserve(ws)
            self._take_back(ws)
        self._retire_step(job)

    def _take_back(self, ws: WorkerState) -> None:
        """Ask a retiring worker for the tasks it was given and has not started. Only those
        it gives back (``given-back``) go elsewhere: one it started meanwhile (its
        ``started`` may be on the wire) finishes there, and runs once."""
        for ts in ws.processing.values():
            if ts not in ws.started:
                self.s.batch(ws.ident, "give-back", ts.key)

    def _retire_step(self, job: Job) -> None:
        """Move what the job's workers alone hold; close those with nothing left to do."""
        for ws in list(job.workers):
            if ws.ident not in self.s.workers:  # it left (or died) meanwhile: nothing to move
                self._end_retirement(job, ws, "retired")
                continue
            stay = [w for w in self.s.workers.values() if w.ident not in self.retiring]
            unique = [ts for ts in ws.has_what if ts.value is None
                      and not any(w.ident not in self.retiring for w in ts.who_has)]
            if unique and not stay:
                self._end_retirement(job, ws, "kept", "no other worker would stay to take its"
                                     " data; start more workers first")
                continue
            incoming: dict[bytes, int] = {}  # moves started in this step, per target
            for ts in unique:
                if any((w.ident, ts.key) in self.moves for w in stay):
                    for w in stay:
                        if (w.ident, ts.key) in self.moves:
                            self._join_move(job, w, ts)
                    continue
                if job.attempts.get(ts.key, 0) >= MOVE_ATTEMPTS:
                    self._end_retirement(job, ws, "kept", f"could not move {ts.key!r} off it")
                    break
                # the emptiest worker, counting what this step already sends it
                target = min(stay, key=lambda w: (w.nheld + incoming.get(w.ident, 0),
                                                  len(w.processing)))
                incoming[target.ident] = incoming.get(target.ident, 0) + 1
                self._join_move(job, target, ts)
            else:
                if not unique and not ws.processing:
                    for ts in ws.has_what:
                        ts.drop_holder(ws)  # every one has another holder or inline bytes
                        self._tell_holders(ts)
                    self.s.send(ws.ident, {"op": "close", "reason": "retired"})
                    self._end_retirement(job, ws, "retired")
        self._maybe_done(job)

    def _end_retirement(self, job: Job, ws: WorkerState, how: str, why: str = "") -> None:
        job.workers.remove(ws)
        self.retiring.pop(ws.ident, None)
        if how == "retired":
            job.result["retired"][ws.address] = ws.info()
            self.s.event(f"worker {ws.name} ({ws.address}) retired")
        else:
            ws.retiring = False
            ws.limit = ws.nthreads * 2 + 2
            ws.changed()
            job.result["kept"][ws.address] = why
            self.s.event(f"worker {ws.name} not retired: {why}")
            self.s.fill(ws)

    def _restart_workers(self, peer: bytes, rid: int, args: dict) -> None:
        names = _names(args, "workers")
        if not names:
            raise ValueError("restart_workers needs the workers to restart")
        chosen = [ws for ws in self.s.workers.values() if _matches(ws, names)]
        unknown = [n for n in names if not any(_matches(ws, [n]) for ws in chosen)]
        if unknown:
            raise ValueError(f"no such workers: {unknown}")
        lone = [ws.address for ws in chosen if ws.nanny not in self.s.nannies]
        if lone:
            raise ValueError(f"workers {lone} have no Nanny to restart them; start workers"
                             " with a Nanny (the default of LocalCluster and `zfabric worker`)")
        nannies = {ws.nanny for ws in chosen}
        targets = [(ident, self.s.nannies[ident].name) for ident in nannies]
        op = {"op": "restart", "workers": [ws.ident.decode() for ws in chosen]}
        self.s.fan_out.start(peer, rid, op, targets)

    # ------------------------------------------------------------------ worker answers

    def acquired(self, ws: WorkerState, keys: list, failed: list) -> None:
        """A worker now holds ``keys`` as its own, and could not get ``failed``."""
        touched: set[int] = set()
        for key in keys:
            ts = self.s.tasks.get(key)
            if ts is not None and ts.state == "memory":
                ts.add_holder(ws)
            elif not (ts is not None and ts.held_by(ws)):
                self.s.batch(ws.ident, "free", key)  # nobody needs it any more
            touched |= self._move_ended(ws.ident, key, ok=True)
        for key in failed:
            touched |= self._move_ended(ws.ident, key, ok=False)
        for jid in touched:
            job = self.jobs.get(jid)
            if job is not None:
                self._progress(job)

    def _move_ended(self, ident: bytes, key: str, ok: bool) -> set[int]:
        jids = self.moves.pop((ident, key), set())
        for jid in jids:
            job = self.jobs.get(jid)
            if job is None:
                continue
            job.left.discard((ident, key))
            if not ok:
                job.attempts[key] = job.attempts.get(key, 0) + 1
                if job.kind == "replicate":
                    job.result["failed"].append(key)
        return jids

    def _progress(self, job: Job) -> None:
        if job.kind == "retire-workers":
            self._retire_step(job)
        else:
            self._maybe_done(job)

    def _maybe_done(self, job: Job) -> None:
        if job.left or job.workers:
            return
        self._drop_job(job)
        result = job.result
        if job.kind == "replicate":
            result = {"missing": result.get("missing", []),
                      "failed": sorted(set(result["failed"]))}
        self.s.send(job.peer, {"op": "reply", "id": job.rid, "result": result})

    def _drop_job(self, job: Job) -> None:
        self.jobs.pop(job.id, None)
        for slot in job.left:
            waiting = self.moves.get(slot)
            if waiting is not None:
                waiting.discard(job.id)
        for ws in job.workers:
            if self.retiring.get(ws.ident) == job.id:
                del self.retiring[ws.ident]

    def validate_moves(self) -> None:
        """Invariants of the moves and retirements (called by ``validate``)."""
        for ident, jid in self.retiring.items():
            job = self.jobs.get(jid)
            assert job is not None and any(w.ident == ident for w in job.workers), ident
            if ident in self.s.workers:
                ws = self.s.workers[ident]
                assert ws.retiring and ws.limit == 0 and not any(
                    not t.started for t in ws.processing.values()), ws
        # (a worker still retiring but in no retirement was told to close: it says goodbye)
        for slot, jids in self.moves.items():
            for jid in jids:
                job = self.jobs.get(jid)
                assert job is not None and slot in job.left, (slot, jid)
        for job in self.jobs.values():
            for slot in job.left:
                assert job.id in self.moves.get(slot, ()), (job.id, slot)

    def moves_tick(self) -> None:
        """Moves whose target left end as failed; retirements take the next step."""
        if not self.jobs and not self.moves:
            return
        for ident, key in [s for s in self.moves if s[0] not in self.s.workers]:
            self._move_ended(ident, key, ok=False)
        for job in list(self.jobs.values()):
            if job.id in self.jobs and self.s.now >= job.next_step:
                job.next_step = self.s.now + RETIRE_STEP_S
                self._progress(job)
