"""Who may do what: roles bound to keys, reports only about oneself, read-only requests.

A part of :class:`~zfabric.scheduler.state.SchedulerState`, which it is given (``s``), pure like it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..errors import RemoteProtocolError
from ..protocol import safe_name, short
from .records import WorkerState

if TYPE_CHECKING:
    from .state import SchedulerState

logger = logging.getLogger(__name__)

#: Requests a worker or a nanny may make (they only read).
READ_ONLY_REQUESTS = frozenset({"info", "who-has", "has-what", "nbytes", "processing",
                                "task-states"})


class Roles:
    """SchedulerState's checks of who may do what (see the module docstring)."""

    def __init__(self, s: SchedulerState):
        self.s = s

    def role_allows(self, peer: bytes, ops: list[dict], role: str) -> bool:
        if peer in self.s.workers:
            need: tuple[str, ...] = ("worker",)
        elif peer in self.s.clients:
            need = ("client", "admin")
        elif peer in self.s.nannies:
            need = ("nanny",)
        else:
            hello = next((op for op in ops if op["op"] == "hello"), None)
            if hello is None:
                return True  # answered with reregister
            claimed = hello["role"]
            need = ("client", "admin") if claimed == "client" else (claimed,)
            if role not in need:
                self.s.send(peer, {"op": "error", "fatal": True,
                                 "message": f"a {role} key cannot register as a"
                                 f" {safe_name(claimed, 20)}; use the {claimed} key that"
                                 " `zfabric keygen` wrote"})
                self.s.event(f"refused {peer!r}: a {role} key said hello as a"
                            f" {safe_name(claimed, 20)}")
                return False
            if role == "admin":
                self.s.admins.add(peer)
            return True
        if role not in need:
            logger.warning("dropping ops from %r: it holds a %s key", peer, role)
            self.s.send(peer, {"op": "error", "message": f"a {role} key may not act as a"
                             f" {need[0]}"})
            return False
        return True

    def worker_keys(self) -> dict[str, str]:
        """Each worker's data address -> the public key (Z85) it connected with, which is the
        key its data port serves with (empty without security). Peers check a data port
        against it, so a worker host can hold a key of its own (see docs/security.md)."""
        out = {}
        for ws in self.s.workers.values():
            key = self.s.key_of(ws.ident)
            if key is not None:
                out[ws.address] = key.decode()
        return out

    def tell_worker_key(self, ws: WorkerState) -> None:
        """A worker joined (security on): every client and worker learns its data port's key
        before any op of theirs names its address."""
        key = self.s.key_of(ws.ident)
        if key is None:
            return
        op = {"op": "worker-keys", "keys": {ws.address: key.decode()}}
        for peer in (*self.s.clients, *self.s.workers):
            if peer != ws.ident:
                self.s.send(peer, op)

    def replaceable(self, old: WorkerState) -> bool:
        """Whether a new worker may take ``old``'s data address: ``old`` has been silent for
        two heartbeat intervals or its Nanny reported it gone."""
        return (self.s.now - old.last_seen >= 2 * self.s.liveness.interval_s
                or old.ident in self.s.reported_dead)

    def same_key(self, old: WorkerState, peer: bytes) -> bool:
        """Whether the new worker ``peer`` holds the key ``old`` connected with (security on):
        a restart of the same worker, at a fixed port, with the same keys. It may take the
        address at once; only a stranger, or another key, must wait for ``_replaceable``."""
        key = self.s.key_of(old.ident)
        return key is not None and key == self.s.key_of(peer)

    def check_read_only(self, op: dict, role: str) -> None:
        """Workers and nannies may ask, not act: run, restart, shutdown are clients'."""
        if op["kind"] not in READ_ONLY_REQUESTS:
            raise RemoteProtocolError(f"a {role} may not make {short(op['kind'])} requests;"
                                      " only clients do")
