"""Answers to requests: info, who has what, what runs where, bytes held, and the requests
that fan out to workers or nannies (run, restart).

A part of :class:`~zfabric.scheduler.state.SchedulerState`, which it is given (``s``), pure like it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import RemoteProtocolError

if TYPE_CHECKING:
    from .state import SchedulerState


class Queries:
    """SchedulerState's answers to requests (see the module docstring)."""

    def __init__(self, s: SchedulerState):
        self.s = s

    # ------------------------------------------------------------------ requests

    def request(self, peer: bytes, op: dict) -> None:
        rid, kind, args = op["id"], op["kind"], op["args"]
        reply = {"op": "reply", "id": rid}
        if self.s.secured and kind in self.s.admin_only and peer not in self.s.admins:
            reply["error"] = f"{kind!r} requests need an admin key (ADMIN_ONLY)"
            self.s.send(peer, reply)
            return
        match kind:
            case "info":
                reply["result"] = self.info()
            case "who-has":
                keys = args.get("keys")
                tasks = (self.s.tasks.get(k) for k in keys) if keys else self.s.tasks.values()
                reply["result"] = {
                    ts.key: sorted(w.address for w in ts.who_has) for ts in tasks if ts
                }
            case "has-what":
                reply["result"] = {
                    ws.address: sorted(ts.key for ts in ws.has_what)
                    for ws in self.s.workers.values()
                }
            case "run" | "restart":
                if kind == "restart":
                    # As dask.distributed does: a restart forgets every task and its data.
                    self.s.event("restart requested: cancelling every task")
                    self.s.keys.cancel(list(self.s.tasks), "the cluster was restarted",
                                       restart=True)
                self._start_fan_out(peer, rid, kind, args)
                return
            case "register-plugin" | "unregister-plugin":
                self.s.plugin_registry.request(peer, rid, kind, args, self._targets)
                return
            case "replicate" | "retire-workers" | "restart-workers":
                self.s.retirement.move_request(peer, op)
                return
            case "shutdown":
                self.s.closing = True
                reply["result"] = True
            case "nbytes":
                keys = args.get("keys")
                tasks = (self.s.tasks.get(k) for k in keys) if keys else self.s.tasks.values()
                reply["result"] = [[ts.key, ts.nbytes] for ts in tasks
                                   if ts is not None and ts.state == "memory"]
            case "processing":
                reply["result"] = {
                    ws.address: sorted(ws.processing)
                    for ws in self.s.workers.values()
                }
            case "snapshot" | "task-stream" | "events" | "log-event" | "logs" | "profile" \
                    | "history":
                reply["result"] = self._observe_request(kind, args)
            case "story":  # Client.story: the scheduler's half (None: it keeps no log)
                story = self.s.story
                reply["result"] = None if story is None else story.story(
                    args["keys"], self.s.observe.wall_offset)
            case "subscribe" | "unsubscribe":  # pushed events (see .subscriptions)
                if peer not in self.s.clients:
                    raise RemoteProtocolError("only clients subscribe to events")
                reply["result"] = self.s.subs.request(peer, kind, args)
            case "task-states":
                keys = args.get("keys") or list(self.s.tasks)
                reply["result"] = {k: self.s.tasks[k].state for k in keys if k in self.s.tasks}
            case _:
                reply["error"] = f"unknown request {kind!r}"
        self.s.send(peer, reply)

    def _observe_request(self, kind: str, args: dict):
        obs = self.s.observe
        match kind:
            case "snapshot":
                return obs.snapshot(self.s, self.s.now)
            case "task-stream":
                out = obs.stream_since(args.get("since"), start=args.get("start"),
                                       stop=args.get("stop"), count=args.get("count"))
                if "transfers" in args:
                    out["transfers"] = obs.transfers_since(args["transfers"])
                return out
            case "events":
                return obs.get_events(args.get("topic"))
            case "log-event":
                topics = args["topic"]
                for topic in [topics] if type(topics) is str else topics:
                    obs.log_event(str(topic), args.get("msg"), self.s.now)
                return True
            case "logs":
                return self.s.log_source(args.get("n")) if self.s.log_source else []
            case "profile":  # {group: [label, count, [children]]}, see worker/profiler.py
                group = args.get("group")
                return obs.profile(group if type(group) is str else None)
            case "history":
                return obs.history.points()

    def _targets(self, role: str) -> list[tuple[bytes, str]]:
        if role == "worker":
            return [(ws.ident, ws.address) for ws in self.s.workers.values()]
        return [(ns.ident, ns.name) for ns in self.s.nannies.values()]

    def _start_fan_out(self, peer: bytes, rid: int, kind: str, args: dict) -> None:
        """A run (on workers) or restart (through nannies): reply once all have answered."""
        if kind == "run":
            names = args.get("workers")
            if type(args.get("payload")) is not bytes:
                raise RemoteProtocolError("a run request needs its payload as bytes")
            if names is not None and (type(names) is not list
                                      or any(type(n) is not str for n in names)):
                raise RemoteProtocolError("a run request's workers must be a list of addresses")
            targets = [(ws.ident, ws.address) for ws in self.s.workers.values()
                       if not names or ws.address in names]
            op = {"op": "run", "payload": args["payload"]}
        else:
            targets = [(ns.ident, ns.name) for ns in self.s.nannies.values()]
            op = {"op": "restart"}
        self.s.fan_out.start(peer, rid, op, targets)

    def drop_nanny(self, ident: bytes) -> None:
        if self.s.nannies.pop(ident, None) is not None:
            self.s.peers_changed()
            self.s.fan_out.peer_left(ident)

    def info(self) -> dict:
        counts: dict[str, int] = {}
        for ts in self.s.tasks.values():
            counts[ts.state] = counts.get(ts.state, 0) + 1
        workers = self.s.workers.values()
        return {
            "type": "Scheduler",
            "id": self.s.epoch,
            "address": self.s.address,
            "started": self.s.started,
            "n_workers": len(self.s.workers),
            "total_threads": sum(ws.nthreads for ws in workers),
            "total_memory": sum(ws.memory_limit or 0 for ws in workers),
            "versions": self.s.versions,
            "workers": {ws.address: ws.info() for ws in workers},
            "nannies": len(self.s.nannies),
            "clients": len(self.s.clients) - 2,
            "tasks": counts,
            "events": [list(e) for e in self.s.events[-20:]],
            "services": {"dashboard": self.s.dashboard_link} if self.s.dashboard_link else {},
        }

