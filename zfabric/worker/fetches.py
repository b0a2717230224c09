"""Which values a worker asks which peer for, in what batches: the fetch plan, sans-IO.

A part of :class:`~zfabric.worker.state.WorkerCore`. Dependencies to fetch wait in a queue per
peer and leave in requests of at most ``FETCH_BATCH_KEYS`` keys, with at most
``FETCHES_PER_PEER`` requests in flight to one peer and ``FETCHES_TOTAL`` in all, so that a task
with thousands of dependencies does not flood its peers (near the memory thresholds: one key,
one request in all). Each request has an id; its answer, a refusal of the peer's whole
connection, or ``FETCH_TIMEOUT_S`` of silence ends it.

Sizes are learned per *group* of keys (a dask collection's chunks share the name before their
index; other keys their prefix before the last ``-``): a request for keys of a group whose
values were large and alike in size comes with a guess of their sizes, so that on one host the
shell can name shared-memory segments in the first request and the peer write into them at
once, saving the round trip of asking for sizes first (a value larger than its guess is asked
again, as before).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Container

__all__ = ["FETCHES_PER_PEER", "FETCHES_TOTAL", "FETCH_BATCH_KEYS", "FETCH_TIMEOUT_S",
           "GUESS_MIN_BYTES", "Fetches", "group_of"]

#: A dependency fetch with no answer for this long is given up and reported missing.
FETCH_TIMEOUT_S = 15.0
#: Keys asked for in one ``get-data`` request.
FETCH_BATCH_KEYS = 64
#: Fetch requests in flight to one peer at once, and to all peers.
FETCHES_PER_PEER = 2
FETCHES_TOTAL = 16
#: Sizes are guessed for groups whose values had at least this many bytes (the shared-memory
#: threshold, ``zfabric.transfer.SHM_THRESHOLD_BYTES``).
GUESS_MIN_BYTES = 1 << 20
#: Groups whose sizes are remembered, at most (the oldest are forgotten).
GUESS_GROUPS = 1024


def group_of(key: str) -> str:
    """The group a key belongs to: ``"\x1f('name-token', 0, 1)"`` -> its name, ``"f-abc"``
    -> ``"f"``."""
    if key.startswith("\x1f("):
        return key.partition(",")[0]
    return key.rpartition("-")[0] or key


class Fetches:
    """Queued keys by peer and the requests in flight (see the module docstring)."""

    def __init__(self) -> None:
        self.queue: dict[str, deque[str]] = {}  # peer address -> keys to ask it for
        self.per_peer: dict[str, int] = {}  # peer address -> requests in flight
        self.inflight: dict[int, tuple[str, list[str], float]] = {}  # id -> peer, keys, sent
        self.stats = {"requests": 0, "most_in_flight": 0}
        # key group -> smallest and largest value seen of it, in bytes
        self.sizes: dict[str, tuple[int, int]] = {}
        self._seq = 0

    def learn(self, key: str, nbytes: int) -> None:
        """A value of ``key``'s group had ``nbytes``."""
        group = group_of(key)
        sizes = self.sizes
        seen = sizes.get(group)
        if seen is None:
            if len(sizes) >= GUESS_GROUPS:
                del sizes[next(iter(sizes))]
            sizes[group] = (nbytes, nbytes)
        elif not seen[0] <= nbytes <= seen[1]:
            sizes[group] = (min(seen[0], nbytes), max(seen[1], nbytes))

    def guess(self, keys: list[str]) -> list[tuple[str, list[int]]] | None:
        """``(key, [bytes])`` for the keys whose group's values were large and alike in size
        (the largest at most twice the smallest, as chunks of one collection are), or None."""
        sizes = self.sizes
        if not sizes:
            return None
        out = None
        for k in keys:
            seen = sizes.get(group_of(k))
            if seen is not None and seen[1] >= GUESS_MIN_BYTES and seen[1] <= 2 * seen[0]:
                if out is None:
                    out = []
                out.append((k, [seen[1]]))
        return out

    def add(self, addr: str, key: str) -> None:
        queue = self.queue.get(addr)
        if queue is None:
            queue = self.queue[addr] = deque()
        queue.append(key)

    def due(self, wanted: Container[str], now: float, tight: bool) -> list[tuple]:
        """The requests to send now, ``(id, peer, keys)``, within the bounds; keys no longer
        ``wanted`` are left out."""
        out: list[tuple] = []
        total, batch = (1, 1) if tight else (FETCHES_TOTAL, FETCH_BATCH_KEYS)
        per_peer = self.per_peer
        for addr in list(self.queue):
            queue = self.queue[addr]
            while (queue and per_peer.get(addr, 0) < FETCHES_PER_PEER
                   and len(self.inflight) < total):
                keys = [queue.popleft() for _ in range(min(len(queue), batch))]
                keys = [k for k in keys if k in wanted]
                if keys:
                    out.append((self.start(addr, keys, now), addr, keys))
            if not queue:
                del self.queue[addr]
        return out

    def start(self, addr: str, keys: list[str], now: float) -> int:
        """Note a request to ``addr`` for ``keys``; returns its id."""
        self._seq += 1
        self.inflight[self._seq] = (addr, keys, now)
        n = self.per_peer[addr] = self.per_peer.get(addr, 0) + 1
        stats = self.stats
        stats["requests"] += 1
        if n > stats["most_in_flight"]:
            stats["most_in_flight"] = n
        return self._seq

    def end(self, fid: int) -> tuple[str, list[str], float] | None:
        """Request ``fid`` is over: ``(peer, keys, sent)``, or None if it was not in flight."""
        req = self.inflight.pop(fid, None)
        if req is not None:
            addr = req[0]
            n = self.per_peer.get(addr, 0) - 1
            if n > 0:
                self.per_peer[addr] = n
            else:
                self.per_peer.pop(addr, None)
        return req

    def to_peer(self, addr: str) -> list[int]:
        return [i for i, r in self.inflight.items() if r[0] == addr]

    def stale(self, now: float) -> list[int]:
        return [i for i, r in self.inflight.items() if now - r[2] > FETCH_TIMEOUT_S]

    def clear_queue(self) -> None:
        self.queue.clear()
