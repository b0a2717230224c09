"""Subscriptions: the scheduler pushes events of a topic, or task transitions, to the clients
that asked for them (``subscribe_topic``, ``TransitionListener``).

Theory of operation
-------------------
A client subscribes with a ``subscribe`` request (checked at the protocol's door:
:func:`zfabric.protocol.check_subscribe`) under an id of its own: to one topic's events, or to
task transitions, all of them or only those of some keys or key prefixes (dask's
``key_split``: the task group). Subscribers are indexed by what they follow (topic -> them;
key -> them; prefix -> them; those that follow every task), so an event costs the
subscribers it reaches, never a scan of all clients; while nobody follows transitions,
:attr:`Subscriptions.watching` is False and a transition costs one test.

Each subscriber has a queue of at most ``limit`` events. :meth:`Subscriptions.drain` (the
scheduler calls it before each flush) sends each subscriber a batch of at most
:data:`BATCH_EVENTS` as an ``events`` op, and at most :data:`WINDOW` batches it has not
acknowledged (``events-ack``): a slow subscriber's events wait in its queue, and a queue that
is full drops what comes next and counts it; the next batch tells the subscriber how many it
missed (``missed``). So a slow or dead subscriber costs the scheduler at most its queue, and
never blocks it. A client's subscriptions end with it (:meth:`Subscriptions.peer_gone`).

Pure: ops out through the ``send`` it is given; no clock, no I/O.
"""

from __future__ import annotations

from ..errors import RemoteProtocolError

__all__ = ["BATCH_EVENTS", "MAX_PER_CLIENT", "WINDOW", "Subscriptions"]

#: Events one ``events`` op carries at most.
BATCH_EVENTS = 1000
#: Batches sent to a subscriber and not yet acknowledged, at most.
WINDOW = 2
#: Subscriptions one client may hold.
MAX_PER_CLIENT = 1000


class Subscription:
    """One client's subscription: what it follows and what waits to go to it."""

    __slots__ = ("in_flight", "keys", "kind", "limit", "missed", "peer", "prefixes", "queue",
                 "sid", "topic")

    def __init__(self, peer: bytes, sid: int, kind: str, limit: int):
        self.peer = peer
        self.sid = sid
        self.kind = kind  # "topic" or "transitions"
        self.topic: str | None = None
        self.keys: list[str] = []
        self.prefixes: list[str] = []
        self.limit = limit
        self.queue: list = []
        self.missed = 0
        self.in_flight = 0


def _add(index: dict, name: str, sub: Subscription) -> None:
    group = index.get(name)
    if group is None:
        group = index[name] = {}
    group[sub.peer, sub.sid] = sub


def _remove(index: dict, name: str, sub: Subscription) -> None:
    group = index.get(name)
    if group is not None:
        group.pop((sub.peer, sub.sid), None)
        if not group:
            del index[name]


class Subscriptions:
    """Every client's subscriptions, indexed (see the module docstring)."""

    def __init__(self, send, queue_events: int, history=None):
        self.send = send
        #: topic -> its kept events, ``(wall time, msg)`` oldest first (a topic subscription
        #: with ``after`` gets those logged after it in its answer)
        self.history = history
        self.queue_events = max(1, int(queue_events))
        self.by_peer: dict[bytes, dict[int, Subscription]] = {}
        self.topics: dict[str, dict] = {}  # topic -> {(peer, id): subscription}
        self.every_task: dict[tuple, Subscription] = {}
        self.by_key: dict[str, dict] = {}
        self.by_prefix: dict[str, dict] = {}
        #: Whether anyone follows transitions (the scheduler's hot path tests only this).
        self.watching = False
        self.dirty: dict[tuple, Subscription] = {}  # subscribers with events to send
        self.work = 0  # subscribers the last event reached (tests read it)

    # ------------------------------------------------------------------ requests

    def request(self, peer: bytes, kind: str, args: dict) -> bool | list:
        """A ``subscribe`` or ``unsubscribe`` request (checked at the protocol's door). The
        answer: whether it did something, or, for a topic subscription with ``after``, the
        topic's kept events logged after it (``[[wall time, msg], ...]``)."""
        sid = args["id"]
        if kind == "unsubscribe":
            return self.unsubscribe(peer, sid)
        mine = self.by_peer.get(peer)
        if mine is None:
            mine = self.by_peer[peer] = {}
        if sid in mine:
            self.unsubscribe(peer, sid)
        elif len(mine) >= MAX_PER_CLIENT:
            raise RemoteProtocolError(f"a client may hold at most {MAX_PER_CLIENT}"
                                      " subscriptions; unsubscribe some first")
        limit = min(args.get("queue") or self.queue_events, self.queue_events)
        sub = Subscription(peer, sid, args["what"], limit)
        mine[sid] = sub
        if sub.kind == "topic":
            sub.topic = args["topic"]
            _add(self.topics, sub.topic, sub)
            after = args.get("after")
            if after is not None and self.history is not None:
                return [list(e) for e in self.history(sub.topic) if e[0] > after]
        else:
            sub.keys = list(dict.fromkeys(args.get("keys") or ()))
            sub.prefixes = list(dict.fromkeys(args.get("prefixes") or ()))
            if not sub.keys and not sub.prefixes:
                self.every_task[peer, sid] = sub
            for key in sub.keys:
                _add(self.by_key, key, sub)
            for prefix in sub.prefixes:
                _add(self.by_prefix, prefix, sub)
            self._watching()
        return True

    def unsubscribe(self, peer: bytes, sid: int) -> bool:
        """End a subscription; False if there was none."""
        mine = self.by_peer.get(peer)
        sub = mine.pop(sid, None) if mine is not None else None
        if sub is None:
            return False
        if not mine:
            del self.by_peer[peer]
        self._drop(sub)
        return True

    def peer_gone(self, peer: bytes) -> None:
        """A client left: its subscriptions end."""
        for sub in (self.by_peer.pop(peer, None) or {}).values():
            self._drop(sub)

    def _drop(self, sub: Subscription) -> None:
        ident = (sub.peer, sub.sid)
        self.dirty.pop(ident, None)
        if sub.kind == "topic":
            assert sub.topic is not None
            _remove(self.topics, sub.topic, sub)
            return
        self.every_task.pop(ident, None)
        for key in sub.keys:
            _remove(self.by_key, key, sub)
        for prefix in sub.prefixes:
            _remove(self.by_prefix, prefix, sub)
        self._watching()

    def _watching(self) -> None:
        self.watching = bool(self.every_task or self.by_key or self.by_prefix)

    def ack(self, peer: bytes, sid: int) -> None:
        """The subscriber took a batch: another may go."""
        sub = (self.by_peer.get(peer) or {}).get(sid)
        if sub is not None and sub.in_flight > 0:
            sub.in_flight -= 1
            if sub.queue or sub.missed:
                self.dirty[peer, sid] = sub

    # ------------------------------------------------------------------ events

    def topic_event(self, topic: str, item: list) -> None:
        """An event was logged under ``topic``: ``[wall time, msg]``."""
        subs = self.topics.get(topic)
        if subs:
            self._push(subs.values(), item)

    def transition(self, key: str, prefix: str | None, item: list) -> None:
        """A task moved: ``item`` is ``[key, start, finish, wall time, worker, stimulus]``;
        ``prefix``: its group's name."""
        every = self.every_task
        by_key = self.by_key.get(key) if self.by_key else None
        by_prefix = self.by_prefix.get(prefix) if self.by_prefix and prefix else None
        if by_key and by_prefix:  # a subscriber that follows both hears it once
            subs = {**by_key, **by_prefix}
            if every:
                subs.update(every)
            self._push(subs.values(), item)
            return
        if every:
            self._push(every.values(), item)
        if by_key:
            self._push(by_key.values(), item)
        if by_prefix:
            self._push(by_prefix.values(), item)

    def _push(self, subs, item: list) -> None:
        dirty = self.dirty
        n = 0
        for sub in subs:
            n += 1
            if len(sub.queue) >= sub.limit:
                sub.missed += 1
                continue
            sub.queue.append(item)
            if sub.in_flight < WINDOW:
                dirty[sub.peer, sub.sid] = sub
        self.work = n

    def drain(self) -> None:
        """Send each subscriber with events a batch, as its window allows."""
        dirty, self.dirty = self.dirty, {}
        for ident, sub in dirty.items():
            if sub.in_flight >= WINDOW:
                continue  # its ack puts it back
            queue = sub.queue
            batch, sub.queue = queue[:BATCH_EVENTS], queue[BATCH_EVENTS:]
            op: dict = {"op": "events", "id": sub.sid, "items": batch}
            if sub.missed:
                op["missed"], sub.missed = sub.missed, 0
            sub.in_flight += 1
            self.send(sub.peer, op)
            if sub.queue and sub.in_flight < WINDOW:
                self.dirty[ident] = sub

    def count(self) -> int:
        """Subscriptions held (all clients)."""
        return sum(len(m) for m in self.by_peer.values())
