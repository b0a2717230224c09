"""Requests the scheduler answers only once several peers have: ``run`` on every worker and
``restart`` through every Nanny."""

from __future__ import annotations

from collections.abc import Callable, Iterable


class FanOut:
    """Requests in flight: who still has to answer each, and what the others said.

    ``send(peer, op)`` queues an op; the reply to the asking peer goes out through it too.
    """

    def __init__(self, send: Callable[[bytes, dict], None]):
        self.send = send
        self._open: dict[int, dict] = {}
        self._seq = 0

    def start(self, asker: bytes, rid: int, op: dict, targets: Iterable[tuple[bytes, str]]):
        """Send ``op`` (given a fresh id) to each ``(ident, name)``; reply when all answered."""
        self._seq += 1
        internal = self._seq
        pending = dict(targets)
        self._open[internal] = {"peer": asker, "id": rid, "pending": pending, "results": {}}
        for ident in pending:
            self.send(ident, {**op, "id": internal})
        self._maybe_finish(internal)

    def answer(self, ident: bytes, op: dict) -> None:
        req = self._open.get(op["id"])
        if req is None or ident not in req["pending"]:
            return
        name = req["pending"].pop(ident)
        req["results"][name] = [op.get("value"), op.get("error")]
        self._maybe_finish(op["id"])

    def peer_left(self, ident: bytes) -> None:
        """A worker or Nanny left: requests stop waiting for it."""
        for internal, req in list(self._open.items()):
            name = req["pending"].pop(ident, None)
            if name is not None:
                req["results"][name] = [None, [None, None, f"{name} left before answering"]]
                self._maybe_finish(internal)

    def _maybe_finish(self, internal: int) -> None:
        req = self._open[internal]
        if req["pending"]:
            return
        del self._open[internal]
        self.send(req["peer"], {"op": "reply", "id": req["id"], "result": req["results"]})
