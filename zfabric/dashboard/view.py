"""The dashboard's whole picture, kept up to date from the scheduler's deltas.

The scheduler sends only what changed (:mod:`zfabric.scheduler.feed`); :class:`View` merges
each delta in (cost: the size of the delta) and gives the whole picture in the shape
``/api/snapshot`` and ``/metrics`` serve (:meth:`View.full`). It also keeps what only the
dashboard draws: each process's CPU, memory, disk and network over the last minutes (the
system page: the workers' from their rows, the scheduler's own from :func:`own_process`),
the merged profiles as last sent, and which erred groups the user dismissed.

Not thread-safe by itself: the :class:`~zfabric.dashboard.server.Hub` holds its lock around
every call.
"""

from __future__ import annotations

from collections import deque

#: Samples kept of each process for the system page (one a heartbeat or a second).
SYSTEM_POINTS = 120
#: Task-stream entries, transfers, throughput samples and events kept.
STREAM = 1000
TRANSFERS = 200
SERIES = 600
EVENTS = 50
#: Log lines kept per worker, and workers.
LOG_LINES = 100
LOGGED_WORKERS = 2000


class View:
    def __init__(self) -> None:
        self.dismissed: dict[str, int] = {}  # group -> failures it had when dismissed
        self._reset()

    def _reset(self) -> None:
        self.scalars: dict = {}
        self.workers: dict[str, dict] = {}
        self.groups: dict[str, dict] = {}
        self.erred: dict[str, dict] = {}  # groups with failures, kept until dismissed
        self.stream: deque = deque(maxlen=STREAM)
        self.transfers: deque = deque(maxlen=TRANSFERS)
        self.series: deque = deque(maxlen=SERIES)
        self.events: deque = deque(maxlen=EVENTS)
        self.fine: deque = deque(maxlen=300)
        self.coarse: deque = deque(maxlen=360)
        self.durations: dict = {}
        self.graph: dict = {"nodes": [], "edges": []}
        self.tasks = None
        self.profiles: dict[str, list] = {}
        self.profiles_version = 0
        self.system: dict[str, deque] = {}  # process -> [[t, cpu %, rss, disk r, w, net r, s]]
        self.names: dict[str, str] = {"scheduler": "scheduler"}
        self.logs: dict[str, deque] = {}  # worker address -> [time, level, text]
        self.empty = True

    def merge(self, delta: dict) -> None:
        self.empty = False
        if delta.get("kind") != "delta":  # a whole snapshot (Observer.snapshot)
            self._reset()
            self.empty = False
        t = delta.get("time") or 0.0
        for key in ("time", "address", "dashboard", "totals", "counters", "buckets",
                    "event_counts"):
            if key in delta:
                self.scalars[key] = delta[key]
        for row in delta.get("workers") or ():
            self.workers[row["address"]] = row
            self.names[row["address"]] = row["name"]
            points = self.system.get(row["address"])
            if points is None:
                points = self.system[row["address"]] = deque(maxlen=SYSTEM_POINTS)
            if not points or points[-1][0] < t:
                points.append([t, row.get("cpu", 0.0), row.get("memory", 0),
                               *(row.get("io") or (0, 0, 0, 0))])
        for address in delta.get("workers_gone") or ():
            self.workers.pop(address, None)
            self.system.pop(address, None)
        for row in delta.get("groups") or ():
            row = dict(row, changed=t)
            self.groups[row["name"]] = row
            if row.get("nerred", 0) > self.dismissed.get(row["name"], 0):
                self.erred[row["name"]] = row
        for name in delta.get("groups_gone") or ():
            self.groups.pop(name, None)
        self.stream.extend(delta.get("stream") or ())
        self.transfers.extend(delta.get("transfers") or ())
        self.series.extend(delta.get("series") or ())
        self.events.extend(delta.get("events") or ())
        history = delta.get("history")
        if isinstance(history, dict):  # a whole snapshot's
            self.fine.extend(history.get("fine") or ())
            self.coarse.extend(history.get("coarse") or ())
        else:
            self.fine.extend(history or ())
            self.coarse.extend(delta.get("history_coarse") or ())
        self.durations.update(delta.get("durations") or {})
        for address, t_log, level, text in delta.get("logs") or ():
            q = self.logs.get(address)
            if q is None:
                if len(self.logs) >= LOGGED_WORKERS:
                    del self.logs[next(iter(self.logs))]
                q = self.logs[address] = deque(maxlen=LOG_LINES)
            q.append([t_log, level, text])
        if "graph" in delta:
            self.graph = delta["graph"]
        if "tasks" in delta:
            self.tasks = delta["tasks"]
        if delta.get("profiles"):
            self.profiles.update(delta["profiles"])
            self.profiles_version += 1

    def dismiss(self, name: str) -> bool:
        row = self.erred.pop(name, None)
        if row is None:
            return False
        self.dismissed[name] = row.get("nerred", 0)
        if len(self.dismissed) > 10_000:
            del self.dismissed[next(iter(self.dismissed))]
        return True

    def own_process(self, t: float, point: list) -> None:
        """A sample of the scheduler's own process: ``[cpu %, rss, disk r, w, net r, s]``."""
        points = self.system.get("scheduler")
        if points is None:
            points = self.system["scheduler"] = deque(maxlen=SYSTEM_POINTS)
        points.append([t, *point])

    def full(self) -> dict:
        """The whole picture (shallow copies: rows are never changed once merged)."""
        groups = list(self.groups.values())
        groups.extend(row for name, row in self.erred.items() if name not in self.groups)
        return {
            "kind": "full",
            **self.scalars,
            "workers": list(self.workers.values()),
            "groups": groups,
            "erred_groups": sorted(self.erred),
            "stream": list(self.stream),
            "transfers": list(self.transfers),
            "series": list(self.series),
            "events": list(self.events),
            "history": {"fine": list(self.fine), "coarse": list(self.coarse)},
            "durations": dict(self.durations),
            "graph": self.graph,
            "tasks": self.tasks,
            "profiles_version": self.profiles_version,
            "profile_groups": sorted(self.profiles),
        }

    def system_series(self) -> dict:
        return {"names": dict(self.names),
                "series": {p: list(points) for p, points in self.system.items()}}

    def worker_logs(self, address: str | None) -> list:
        return list(self.logs.get(address or "", ()))

    def profile(self, group: str | None) -> dict:
        if group is None:
            return {"groups": sorted(self.profiles), "version": self.profiles_version}
        return {"group": group, "tree": self.profiles.get(group),
                "version": self.profiles_version}
