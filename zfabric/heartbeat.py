"""Pure liveness tracking shared by every role: who was last heard from, and when."""

from __future__ import annotations


class Liveness:
    """Tracks when each peer was last heard from; ``now`` always comes in as an argument."""

    __slots__ = ("_seen", "ttl_s")

    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._seen: dict = {}

    def beat(self, peer, now: float) -> None:
        self._seen[peer] = now

    def forget(self, peer) -> None:
        self._seen.pop(peer, None)

    def last_seen(self, peer) -> float | None:
        return self._seen.get(peer)

    def expired(self, now: float) -> list:
        """Peers silent for longer than the ttl."""
        limit = now - self.ttl_s
        return [p for p, t in self._seen.items() if t < limit]
