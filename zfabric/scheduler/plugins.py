"""Worker and Nanny plugins in the scheduler: kept as opaque pickles by name, handed to every
worker (or Nanny) now and to each that joins later. The scheduler never unpickles them.

Methods of :class:`~zfabric.scheduler.state.SchedulerState` (mixed in), pure like it.
"""

from __future__ import annotations

from ..errors import RemoteProtocolError


class PluginOps:
    """SchedulerState's handling of plugins (see the module docstring)."""

    def plugin_request(self, peer: bytes, rid: int, kind: str, args: dict) -> None:
        """``register-plugin`` / ``unregister-plugin``: answered once every target did it."""
        role, name = args.get("role"), args.get("name")
        if role not in ("worker", "nanny") or type(name) is not str:
            raise RemoteProtocolError(f"{kind} needs role 'worker' or 'nanny' and a name")
        registry = self.plugins[role]
        if role == "worker":
            targets = [(ws.ident, ws.address) for ws in self.workers.values()]
        else:
            targets = [(ns.ident, ns.name) for ns in self.nannies.values()]
        if kind == "register-plugin":
            payload = args.get("payload")
            if type(payload) is not bytes:
                raise RemoteProtocolError("register-plugin needs the plugin's pickle")
            if args.get("idempotent") is True and name in registry:
                self.send(peer, {"op": "reply", "id": rid,
                                 "result": {t[1]: [None, None] for t in targets}})
                return
            registry[name] = payload
            op = {"op": "plugin-add", "name": name, "payload": payload}
        else:
            if registry.pop(name, None) is None:
                self.send(peer, {"op": "reply", "id": rid, "result": None})
                return
            op = {"op": "plugin-remove", "name": name}
        self._fan_out.start(peer, rid, op, targets)

    def plugins_for_newcomer(self, peer: bytes, role: str) -> None:
        """A worker or Nanny joined: set up the plugins registered before it."""
        for name, payload in self.plugins[role].items():
            self.send(peer, {"op": "plugin-add", "id": 0, "name": name, "payload": payload})
