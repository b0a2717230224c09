"""Shared state between tasks: locks, semaphores, events, variables, queues and datasets.

Theory of operation
-------------------
Each primitive is a plain record named by the user. Clients (and tasks, through their worker's
client) send ``coord`` ops (``{"op": "coord", "id", "kind", "name", ...}``, checked at the
protocol's door); :meth:`Coordination.handle` changes the records and answers with a ``reply``
op for that id, either at once or later, when another op frees the waiter (a release, a put, a
set). Nothing polls: a waiter sits in its record's deque until an op wakes it, or until
:meth:`Coordination.tick` passes its deadline (a heap of deadlines, so a tick costs nothing
when nothing expires).

Values are *items*: ``["v", pickle, [keys]]`` (a small value, with the keys of the Futures
pickled inside it), ``["f", key]`` (a Future: the reader gets a Future) or ``["s", key]`` (a
value over the inline limit, which the client scattered first: the reader gets the value, from
a worker, never through the scheduler). The keys an item refers to are *held*: the scheduler
keeps them alive (``hold``/``unhold`` count references on behalf of one pseudo client) until
the item is replaced, taken from its queue, or its record deleted.

Lifetimes follow dask.distributed: a Variable until ``delete()``, a Queue until every client
that used it has closed it or left, a Lock or Semaphore until ``close()``, an Event while it is
set or waited on, a dataset until it is unpublished. A client that leaves (or whose worker dies,
for a task's client) loses its leases and its waits at once, and stops keeping queues open.
Semaphore leases also lapse when their holder is silent for longer than ``lease_timeout``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections import deque
from collections.abc import Callable

from ..errors import RemoteProtocolError
from ..protocol import coord_item_keys as item_keys

logger = logging.getLogger(__name__)

#: How often (seconds) lease timeouts are checked; leases are few, checking is O(leases).
LEASE_CHECK_S = 0.5


class Waiter:
    __slots__ = ("deadline", "done", "extra", "peer", "rid")

    def __init__(self, peer: bytes, rid: int, deadline: float | None, extra=None):
        self.peer, self.rid, self.deadline, self.extra = peer, rid, deadline, extra
        self.done = False


class Semaphore:
    __slots__ = ("lease_timeout", "leases", "max_leases", "waiters")

    def __init__(self, max_leases: int, lease_timeout: float | None):
        self.max_leases = max_leases
        self.lease_timeout = lease_timeout
        self.leases: dict[str, bytes] = {}  # lease id -> holder peer
        self.waiters: deque[Waiter] = deque()  # extra: the lease id


class Event:
    __slots__ = ("is_set", "waiters")

    def __init__(self):
        self.is_set = False
        self.waiters: deque[Waiter] = deque()


class Variable:
    __slots__ = ("item", "waiters")

    def __init__(self):
        self.item: list | None = None
        self.waiters: deque[Waiter] = deque()


class Queue:
    __slots__ = ("getters", "items", "maxsize", "openers", "putters")

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self.items: deque[list] = deque()
        self.getters: deque[Waiter] = deque()  # extra: batch
        self.putters: deque[Waiter] = deque()  # extra: the item
        self.openers: set[bytes] = set()

    def full(self) -> bool:
        return bool(self.maxsize) and len(self.items) >= self.maxsize


class Coordination:
    """The records and their waiters; ops in, replies out through ``send(peer, op)``.

    ``hold(key)``/``unhold(key)`` keep a task's result alive on behalf of the records (the
    scheduler counts the references); ``hold`` raises KeyError for a key it does not know.
    ``last_seen(peer)`` is when a client was last heard (None once it is gone).
    ``give(peer, key)`` makes a client want a key that a queue hands it (its Future for the key
    then keeps it alive, as if the client had made it).
    """

    def __init__(self, send: Callable[[bytes, dict], None], hold: Callable[[str], None],
                 unhold: Callable[[str], None], last_seen: Callable[[bytes], float | None],
                 give: Callable[[bytes, str], None]):
        self.send = send
        self._hold, self._unhold, self._give = hold, unhold, give
        self.last_seen = last_seen
        self.semaphores: dict[str, Semaphore] = {}
        self.events: dict[str, Event] = {}
        self.variables: dict[str, Variable] = {}
        self.queues: dict[str, Queue] = {}
        self.datasets: dict[str, list] = {}
        self.held: dict[str, int] = {}  # key -> references from records
        self.client_worker: dict[bytes, str] = {}  # a task's client -> its worker's address
        self._deadlines: list = []  # heap of (deadline, seq, waiter, record waiters deque)
        self._seq = itertools.count()
        self._next_lease_check = 0.0

    # ------------------------------------------------------------------ entry points

    def handle(self, peer: bytes, op: dict, now: float) -> None:
        """Apply one ``coord`` op (checked at the protocol's door: :func:`protocol.check`)."""
        kind, name, rid = op["kind"], op["name"], op["id"]
        method = getattr(self, "_" + kind.replace("-", "_"))
        try:
            result = method(peer, rid, name, op, now)
        except _Refused as exc:
            self.send(peer, {"op": "reply", "id": rid, "error": str(exc), "type": exc.kind})
            return
        except RemoteProtocolError as exc:  # a malformed op that skipped the door
            self.send(peer, {"op": "reply", "id": rid, "type": "ValueError", "error": str(exc)})
            return
        except Exception as exc:  # a bug of ours: the caller must not wait for ever
            logger.exception("coordination op %r on %r failed", kind, name)
            self.send(peer, {"op": "reply", "id": rid, "type": "RuntimeError",
                             "error": f"the scheduler failed on {kind} {name!r}: {exc!r}"})
            return
        if result is not _LATER:
            self.send(peer, {"op": "reply", "id": rid, "result": result})

    def tick(self, now: float) -> None:
        """Expire waits whose deadline passed, and leases whose holder fell silent."""
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, _, w, queue = heapq.heappop(heap)
            if w.done:
                continue
            w.done = True
            try:
                queue.remove(w)
            except ValueError:
                pass
            self._expired(w)
        if now >= self._next_lease_check:
            self._next_lease_check = now + LEASE_CHECK_S
            for name, sem in list(self.semaphores.items()):
                if sem.lease_timeout is None:
                    continue
                for lease, holder in list(sem.leases.items()):
                    seen = self.last_seen(holder)
                    if seen is None or now - seen > sem.lease_timeout:
                        del sem.leases[lease]
                self._grant(name, sem)

    def client_gone(self, peer: bytes) -> None:
        """A client left (or the worker whose tasks it served died): free what it held."""
        self.client_worker.pop(peer, None)
        for name, sem in list(self.semaphores.items()):
            for lease in [k for k, h in sem.leases.items() if h == peer]:
                del sem.leases[lease]
            self._drop_waits(sem.waiters, peer)
            self._grant(name, sem)
        for name, ev in list(self.events.items()):
            self._drop_waits(ev.waiters, peer)
            self._maybe_forget_event(name, ev)
        for var in self.variables.values():
            self._drop_waits(var.waiters, peer)
        for name, q in list(self.queues.items()):
            self._drop_waits(q.getters, peer)
            self._drop_waits(q.putters, peer)
            q.openers.discard(peer)
            self._maybe_forget_queue(name, q)

    def worker_gone(self, address: str) -> list[bytes]:
        """The clients that tasks of a dead worker used (the caller removes them)."""
        return [p for p, a in self.client_worker.items() if a == address]

    # ------------------------------------------------------------------ helpers

    def _reply(self, w: Waiter, result=None, error: str | None = None, kind: str = "") -> None:
        w.done = True
        op = {"op": "reply", "id": w.rid}
        if error is None:
            op["result"] = result
        else:
            op["error"], op["type"] = error, kind
        self.send(w.peer, op)

    def _park(self, waiters: deque, peer: bytes, rid: int, timeout, now: float, extra=None):
        w = Waiter(peer, rid, None if timeout is None else now + timeout, extra)
        waiters.append(w)
        if w.deadline is not None:
            heapq.heappush(self._deadlines, (w.deadline, next(self._seq), w, waiters))
        return _LATER

    def _expired(self, w: Waiter) -> None:
        kind = w.extra[0]
        if kind in ("acquire", "wait"):
            self.send(w.peer, {"op": "reply", "id": w.rid, "result": False})
        else:
            what = {"get": "Variable.get", "qget": "Queue.get", "qput": "Queue.put"}[kind]
            self.send(w.peer, {"op": "reply", "id": w.rid, "type": "TimeoutError",
                               "error": f"{what} timed out"})
        if kind == "qput":
            self.unhold(item_keys(w.extra[1]))
        elif kind == "wait":  # an Event lives while it is set or waited on
            ev = self.events.get(w.extra[1])
            if ev is not None:
                self._maybe_forget_event(w.extra[1], ev)

    def _drop_waits(self, waiters: deque, peer: bytes) -> None:
        for w in [w for w in waiters if w.peer == peer]:
            w.done = True
            waiters.remove(w)
            if w.extra[0] == "qput":
                self.unhold(item_keys(w.extra[1]))

    def hold(self, keys: list[str]) -> None:
        for i, key in enumerate(keys):
            # every time (it is idempotent): a restart may have dropped what the count knows
            try:
                self._hold(key)
            except KeyError:
                self.unhold(keys[:i])
                raise _Refused(f"the future {key!r} is not known to the scheduler (was it"
                               " released?); keep it until it is stored", "ValueError") from None
            self.held[key] = self.held.get(key, 0) + 1

    def unhold(self, keys: list[str]) -> None:
        for key in keys:
            n = self.held.get(key, 0) - 1
            if n > 0:
                self.held[key] = n
            elif key in self.held:
                del self.held[key]
                self._unhold(key)

    # ------------------------------------------------------------------ semaphores and locks

    def _sem_acquire(self, peer, rid, name, op, now):
        sem = self.semaphores.get(name)
        if sem is None:
            sem = self.semaphores[name] = Semaphore(op["max_leases"], op["lease_timeout"])
        elif sem.max_leases != op["max_leases"]:
            raise _Refused(f"semaphore {name!r} exists with max_leases={sem.max_leases}, not"
                           f" {op['max_leases']}; use the same value or another name",
                           "ValueError")
        lease = op["lease"]
        if lease in sem.leases:
            raise _Refused(f"lease {lease!r} of {name!r} is held already", "RuntimeError")
        if len(sem.leases) < sem.max_leases and not sem.waiters:
            sem.leases[lease] = peer
            return True
        if op["timeout"] == 0:
            return False
        return self._park(sem.waiters, peer, rid, op["timeout"], now, ("acquire", lease))

    def _grant(self, name: str, sem: Semaphore) -> None:
        while sem.waiters and len(sem.leases) < sem.max_leases:
            w = sem.waiters.popleft()
            sem.leases[w.extra[1]] = w.peer
            self._reply(w, True)

    def _sem_release(self, peer, rid, name, op, now):
        sem = self.semaphores.get(name)
        if sem is None or sem.leases.pop(op["lease"], None) is None:
            return False  # it lapsed (lease timeout, or the semaphore was closed)
        self._grant(name, sem)
        return True

    def _abandon(self, peer, rid, name, op, now):
        """A caller stopped waiting (cancelled): drop its wait, or the lease it was given."""
        sem = self.semaphores.get(name)
        if sem is not None:
            for w in [w for w in sem.waiters if w.peer == peer and w.extra[1] == op["lease"]]:
                w.done = True
                sem.waiters.remove(w)
            if sem.leases.get(op["lease"]) == peer:
                del sem.leases[op["lease"]]
                self._grant(name, sem)
        return None

    def _sem_value(self, peer, rid, name, op, now):
        sem = self.semaphores.get(name)
        return len(sem.leases) if sem is not None else 0

    def _sem_close(self, peer, rid, name, op, now):
        sem = self.semaphores.pop(name, None)
        if sem is not None:
            for w in sem.waiters:
                self._reply(w, error=f"semaphore {name!r} was closed", kind="RuntimeError")
        return None

    # ------------------------------------------------------------------ events

    def _event_set(self, peer, rid, name, op, now):
        ev = self.events.setdefault(name, Event())
        ev.is_set = True
        while ev.waiters:
            self._reply(ev.waiters.popleft(), True)
        return None

    def _event_clear(self, peer, rid, name, op, now):
        ev = self.events.get(name)
        if ev is not None:
            ev.is_set = False
            self._maybe_forget_event(name, ev)
        return None

    def _event_is_set(self, peer, rid, name, op, now):
        ev = self.events.get(name)
        return bool(ev and ev.is_set)

    def _event_wait(self, peer, rid, name, op, now):
        ev = self.events.get(name)
        if ev is not None and ev.is_set:
            return True
        if op["timeout"] == 0:
            return False
        ev = self.events.setdefault(name, Event())
        return self._park(ev.waiters, peer, rid, op["timeout"], now, ("wait", name))

    def _maybe_forget_event(self, name: str, ev: Event) -> None:
        if not ev.is_set and not ev.waiters and self.events.get(name) is ev:
            del self.events[name]

    # ------------------------------------------------------------------ variables

    def _var_set(self, peer, rid, name, op, now):
        item = op["item"]
        self.hold(item_keys(item))
        var = self.variables.setdefault(name, Variable())
        if var.item is not None:
            self.unhold(item_keys(var.item))
        var.item = item
        while var.waiters:
            self._reply(var.waiters.popleft(), item)
        return None

    def _var_get(self, peer, rid, name, op, now):
        var = self.variables.get(name)
        if var is not None and var.item is not None:
            return var.item
        if op["timeout"] == 0:
            raise _Refused(f"Variable {name!r} has no value", "TimeoutError")
        var = self.variables.setdefault(name, Variable())
        return self._park(var.waiters, peer, rid, op["timeout"], now, ("get",))

    def _var_delete(self, peer, rid, name, op, now):
        var = self.variables.get(name)
        if var is not None:
            if var.item is not None:
                self.unhold(item_keys(var.item))
                var.item = None
            if not var.waiters:
                del self.variables[name]
        return None

    # ------------------------------------------------------------------ queues

    def _queue(self, peer: bytes, name: str, op: dict) -> Queue:
        q = self.queues.get(name)
        if q is None:
            q = self.queues[name] = Queue(op["maxsize"])
        elif op["maxsize"] != q.maxsize:
            raise _Refused(f"queue {name!r} exists with maxsize={q.maxsize}, not"
                           f" {op['maxsize']}; use the same value or another name", "ValueError")
        q.openers.add(peer)
        return q

    def _queue_put(self, peer, rid, name, op, now):
        q = self._queue(peer, name, op)
        item = op["item"]
        self.hold(item_keys(item))
        if q.full() or q.putters:
            if op["timeout"] == 0:
                self.unhold(item_keys(item))
                raise _Refused(f"Queue {name!r} is full", "TimeoutError")
            return self._park(q.putters, peer, rid, op["timeout"], now, ("qput", item))
        q.items.append(item)
        self._serve_getters(q)
        return None

    def _queue_get(self, peer, rid, name, op, now):
        q = self._queue(peer, name, op)
        batch = op["batch"]
        if batch is True:  # everything there is now, without waiting
            return self._take(q, len(q.items) + len(q.putters), peer)
        need = 1 if batch is False else int(batch)
        if need < 1:
            raise _Refused("batch must be True, False or a positive number", "ValueError")
        if not q.getters and len(q.items) >= need:
            out = self._take(q, need, peer)
            return out[0] if batch is False else out
        if op["timeout"] == 0:
            raise _Refused(f"Queue {name!r} has fewer than {need} items", "TimeoutError")
        self._park(q.getters, peer, rid, op["timeout"], now, ("qget", batch))
        self._serve_getters(q)  # putters may fill it now that someone waits
        return _LATER

    def _take(self, q: Queue, n: int, peer: bytes) -> list:
        """Up to ``n`` items for ``peer``: its client wants their keys from now on (its
        Futures keep them), and the queue's hold goes."""
        out: list = []
        self._refill(q)
        while len(out) < n and q.items:
            item = q.items.popleft()
            keys = item_keys(item)
            for key in keys:
                self._give(peer, key)
            self.unhold(keys)
            out.append(item)
            self._refill(q)
        return out

    def _refill(self, q: Queue) -> None:
        while q.putters and not q.full():
            w = q.putters.popleft()
            q.items.append(w.extra[1])
            self._reply(w, None)

    def _serve_getters(self, q: Queue) -> None:
        while q.getters:
            w = q.getters[0]
            batch = w.extra[1]
            need = 1 if batch is False else int(batch)
            if len(q.items) < need:
                self._refill(q)
                if len(q.items) < need:
                    return
            q.getters.popleft()
            out = self._take(q, need, w.peer)
            self._reply(w, out[0] if batch is False else out)

    def _queue_qsize(self, peer, rid, name, op, now):
        return len(self._queue(peer, name, op).items)

    def _queue_close(self, peer, rid, name, op, now):
        q = self.queues.get(name)
        if q is not None:
            q.openers.discard(peer)
            self._maybe_forget_queue(name, q)
        return None

    def _maybe_forget_queue(self, name: str, q: Queue) -> None:
        if q.openers or self.queues.get(name) is not q:
            return
        del self.queues[name]
        for item in q.items:
            self.unhold(item_keys(item))
        for w in list(q.getters) + list(q.putters):
            self._reply(w, error=f"queue {name!r} was closed", kind="RuntimeError")
        for w in q.putters:
            self.unhold(item_keys(w.extra[1]))

    # ------------------------------------------------------------------ datasets

    def _ds_publish(self, peer, rid, name, op, now):
        if name in self.datasets and not op["override"]:
            raise _Refused(f"Dataset {name!r} already exists; pass override=True to replace"
                           " it", "KeyError")
        item = op["item"]
        self.hold(item_keys(item))
        old = self.datasets.pop(name, None)
        if old is not None:
            self.unhold(item_keys(old))
        self.datasets[name] = item
        return None

    def _ds_get(self, peer, rid, name, op, now):
        item = self.datasets.get(name)
        if item is None:
            raise _Refused(f"Dataset {name!r} not found", "KeyError")
        return item

    def _ds_list(self, peer, rid, name, op, now):
        return sorted(self.datasets)

    def _ds_unpublish(self, peer, rid, name, op, now):
        item = self.datasets.pop(name, None)
        if item is not None:
            self.unhold(item_keys(item))
        return None


class _Refused(Exception):
    """An op that cannot be done: its caller gets an error of ``kind`` (a builtin name)."""

    def __init__(self, text: str, kind: str):
        super().__init__(text)
        self.kind = kind


_LATER = object()
