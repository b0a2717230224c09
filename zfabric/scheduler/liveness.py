"""How often peers heartbeat, and how long the scheduler waits for a silent one.

The scheduler tells every peer its heartbeat interval (the welcome's ``heartbeat_s``) and,
when the cluster grows or shrinks enough, a new one (a ``heartbeat-interval`` op to every
worker and Nanny), so that at most :data:`~zfabric.config.Config.HEARTBEATS_PER_S_MAX`
heartbeats a second reach it whatever the number of peers: the interval is
``peers / HEARTBEATS_PER_S_MAX`` seconds, never below ``HEARTBEAT_INTERVAL_S``. It is
announced with a quarter of headroom, so that a growing cluster is told again only each time
it grows by a quarter, and a shrinking one once it has shrunk by a third.

A worker or Nanny silent for ``WORKER_TTL_HEARTBEATS`` intervals (``WORKER_TTL_S`` at least)
is declared dead. When the interval shrinks, peers that have not heard it yet beat at the old
one: the old interval keeps counting for one old time-to-live.

Pure: the numbers in, ops out through ``send``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ..config import Config

#: The interval announced is this much longer than the peers' number needs.
HEADROOM = 1.25


class Liveness:
    """The heartbeat interval the peers were told, and the time-to-live it implies."""

    __slots__ = ("_old_s", "_old_until", "config", "interval_s", "send")

    def __init__(self, config: Config, send: Callable[[bytes, dict], None]):
        self.config = config
        self.send = send
        self.interval_s = config.HEARTBEAT_INTERVAL_S  # what the peers were told
        self._old_s = 0.0  # an interval told before a shorter one...
        self._old_until = 0.0  # ... counts until then

    def needed_s(self, peers: int) -> float:
        """The shortest interval that keeps ``peers`` within the bound."""
        return max(self.config.HEARTBEAT_INTERVAL_S, peers / self.config.HEARTBEATS_PER_S_MAX)

    def peers_changed(self, peers: int, now: float, told: Callable[[], Iterable[bytes]]) -> None:
        """There are ``peers`` now: announce a new interval to ``told()`` if it must change."""
        need = self.needed_s(peers)
        base = self.config.HEARTBEAT_INTERVAL_S
        current = self.interval_s
        target = base if need <= base else need * HEADROOM
        if need > current or current >= 1.5 * target:
            new = target
        else:
            return
        if new < current:
            old = current if now >= self._old_until else max(current, self._old_s)
            self._old_s, self._old_until = old, now + self._ttl(old)
        self.interval_s = new
        op = {"op": "heartbeat-interval", "heartbeat_s": new}
        for peer in told():
            self.send(peer, op)

    def _ttl(self, interval_s: float) -> float:
        return max(self.config.WORKER_TTL_S, self.config.WORKER_TTL_HEARTBEATS * interval_s)

    def worker_ttl_s(self, now: float) -> float:
        """How long a worker or Nanny may be silent before it is declared dead."""
        interval = self.interval_s
        if now < self._old_until and self._old_s > interval:
            interval = self._old_s
        return self._ttl(interval)
