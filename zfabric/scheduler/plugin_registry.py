"""Worker and Nanny plugins in the scheduler: kept as opaque pickles by name, handed to every
worker (or Nanny) now and to each that joins later. The scheduler never unpickles them.

Pure: :class:`PluginRegistry` is given the scheduler's ``send`` and its :class:`FanOut`, and
the peers to reach with each request.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import RemoteProtocolError
from .requests import FanOut


class PluginRegistry:
    """The registered plugins, by role (``worker``, ``nanny``) and name."""

    def __init__(self, send: Callable[[bytes, dict], None], fan_out: FanOut):
        self.send = send
        self.fan_out = fan_out
        self.plugins: dict[str, dict[str, bytes]] = {"worker": {}, "nanny": {}}  # name -> pickle

    def request(self, peer: bytes, rid: int, kind: str, args: dict,
                targets: Callable[[str], list[tuple[bytes, str]]]) -> None:
        """``register-plugin`` / ``unregister-plugin``: answered once every target did it.
        ``targets(role)``: the ``(ident, name)`` of every peer of that role now."""
        role, name = args.get("role"), args.get("name")
        if role not in ("worker", "nanny") or type(name) is not str:
            raise RemoteProtocolError(f"{kind} needs role 'worker' or 'nanny' and a name")
        registry = self.plugins[role]
        peers = targets(role)
        if kind == "register-plugin":
            payload = args.get("payload")
            if type(payload) is not bytes:
                raise RemoteProtocolError("register-plugin needs the plugin's pickle")
            if args.get("idempotent") is True and name in registry:
                self.send(peer, {"op": "reply", "id": rid,
                                 "result": {t[1]: [None, None] for t in peers}})
                return
            registry[name] = payload
            op = {"op": "plugin-add", "name": name, "payload": payload}
        else:
            if registry.pop(name, None) is None:
                self.send(peer, {"op": "reply", "id": rid, "result": None})
                return
            op = {"op": "plugin-remove", "name": name}
        self.fan_out.start(peer, rid, op, peers)

    def for_newcomer(self, peer: bytes, role: str) -> None:
        """A worker or Nanny joined: set up the plugins registered before it."""
        for name, payload in self.plugins[role].items():
            self.send(peer, {"op": "plugin-add", "id": 0, "name": name, "payload": payload})
