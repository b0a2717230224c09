"""The scheduler's records of tasks, workers, clients and nannies: compact, slotted, pure."""

from __future__ import annotations

from ..config import DEFAULT


class TaskState:
    """One key the scheduler holds. Containers stay ``None`` until needed, to keep it small."""

    __slots__ = (
        "dependents",
        "deps",
        "error",
        "func",
        "key",
        "nbytes",
        "options",
        "payload",
        "priority",
        "processing_on",
        "restricted",
        "retries",
        "scattered",
        "started",
        "state",
        "suspicious",
        "value",
        "waiting_on",
        "who_has",
        "who_wants",
    )

    def __init__(self, key: str, payload: bytes | None):
        self.key = key
        self.payload = payload
        self.func: str | None = None
        self.state = "new"
        self.deps: tuple = ()
        self.dependents: set | None = None
        self.waiting_on = 0
        self.who_has: set | None = None
        self.who_wants = None  # None, one ClientState, or a set of them
        self.processing_on = None
        self.priority = 0  # smaller runs first: -user priority * 2**40 + submission order
        self.retries = 0
        self.value: bytes | None = None
        self.nbytes = 0
        self.error: list | None = None  # [exception, traceback, text, kind, extra] once erred
        self.options: dict | None = None
        self.restricted = False
        self.suspicious = 0
        self.started = False
        self.scattered = False

    def __repr__(self) -> str:
        return f"<Task {self.key!r} {self.state}>"

    def __lt__(self, other: TaskState) -> bool:  # heap tie-break (priorities are unique)
        return self.priority < other.priority

    def set_options(self, opts: dict) -> None:
        """Keep the options a worker or the policy needs; drop the empty ones."""
        keep = {k: v for k, v in opts.items() if v and k not in ("priority", "retries")}
        self.options = keep or None
        self.restricted = bool(keep.get("workers") or keep.get("resources"))

    # containers that are usually empty or hold one item

    def add_dependent(self, ts: TaskState) -> None:
        if self.dependents is None:
            self.dependents = {ts}
        else:
            self.dependents.add(ts)

    def discard_dependent(self, ts: TaskState) -> None:
        if self.dependents is not None:
            self.dependents.discard(ts)
            if not self.dependents:
                self.dependents = None

    def add_holder(self, ws) -> None:
        if self.who_has is None:
            self.who_has = {ws}
        else:
            self.who_has.add(ws)
        ws.has_what.add(self)

    def drop_holder(self, ws) -> None:
        if self.who_has is not None:
            self.who_has.discard(ws)
            if not self.who_has:
                self.who_has = None

    def add_wanter(self, cs) -> None:
        w = self.who_wants
        if w is None:
            self.who_wants = cs
        elif type(w) is set:
            w.add(cs)
        elif w is not cs:
            self.who_wants = {w, cs}

    def drop_wanter(self, cs) -> None:
        w = self.who_wants
        if w is cs:
            self.who_wants = None
        elif type(w) is set:
            w.discard(cs)
            if len(w) == 1:
                self.who_wants = next(iter(w))
            elif not w:
                self.who_wants = None

    def wanters(self) -> tuple:
        w = self.who_wants
        if w is None:
            return ()
        if type(w) is set:
            return tuple(w)
        return (w,)

    # what clients are told

    def memory_item(self) -> list:
        addresses = None if self.value is not None else [w.address for w in self.who_has or ()]
        return [self.key, self.value, addresses, self.nbytes]

    def erred_item(self) -> list:
        return [self.key, *(self.error or (None, None, "", None, None))]


class WorkerState:
    """A connected worker: what it runs, what it holds, how fast it goes."""

    __slots__ = (
        "address",
        "available",
        "avg_duration",
        "functions",
        "has_what",
        "host",
        "id",
        "ident",
        "last_seen",
        "limit",
        "memory_limit",
        "metrics",
        "name",
        "nanny",
        "nthreads",
        "pid",
        "processing",
        "resources",
    )

    def __init__(self, *, ident, id, address, name, nthreads, memory_limit, resources, nanny,
                 pid, host, now):
        self.ident = ident
        self.id = id
        self.address = address
        self.name = name
        self.nthreads = max(1, nthreads)
        self.memory_limit = memory_limit
        self.resources = resources
        self.available = dict(resources)
        self.nanny = nanny
        self.pid = pid
        self.host = host
        self.last_seen = now
        self.metrics: dict = {}
        self.processing: dict = {}
        self.has_what: set = set()
        self.functions: set = set()  # function ids this worker has been sent
        self.avg_duration: float | None = None
        self.limit = self.nthreads * 2 + 2  # until task durations are known

    def __repr__(self) -> str:
        return f"<Worker {self.name} {self.address}>"

    def has_slot(self) -> bool:
        return len(self.processing) < self.limit

    def assign(self, ts: TaskState) -> None:
        self.processing[ts.key] = ts
        if ts.options and ts.options.get("resources"):
            for name, amount in ts.options["resources"].items():
                self.available[name] = self.available.get(name, 0) - amount

    def done(self, ts: TaskState, duration: float) -> None:
        if self.processing.pop(ts.key, None) is None:
            return
        if ts.options and ts.options.get("resources"):
            for name, amount in ts.options["resources"].items():
                self.available[name] = self.available.get(name, 0) + amount
        if duration > 0:
            avg = self.avg_duration
            avg = duration if avg is None else avg * 0.9 + duration * 0.1
            self.avg_duration = avg
            extra = int(DEFAULT.PREFETCH_TARGET_S * self.nthreads / max(avg, 1e-6))
            self.limit = self.nthreads + min(DEFAULT.PREFETCH_MAX, max(1, extra))

    def info(self) -> dict:
        return {
            "type": "Worker",
            "id": self.id,
            "name": self.name,
            "host": self.host,
            "pid": self.pid,
            "nthreads": self.nthreads,
            "memory_limit": self.memory_limit,
            "resources": self.resources,
            "nanny": self.nanny.decode() if self.nanny else None,
            "last_seen": self.last_seen,
            "metrics": self.metrics,
            "processing": len(self.processing),
            "in_memory": len(self.has_what),
        }


class ClientState:
    """A connected client and the keys it holds futures for."""

    __slots__ = ("ident", "last_seen", "name", "wants")

    def __init__(self, ident: bytes, name: str = "", now: float = 0.0):
        self.ident = ident
        self.name = name or ident.decode(errors="replace")
        self.wants: set = set()
        self.last_seen = now

    def __repr__(self) -> str:
        return f"<Client {self.name}>"


class NannyState:
    """A connected Nanny and the workers it supervises (and vouches for)."""

    __slots__ = ("ident", "last_seen", "name", "vouched", "workers")

    def __init__(self, ident: bytes, name: str = "", now: float = 0.0):
        self.ident = ident
        self.name = name
        self.workers: set = set()
        self.vouched: set = set()
        self.last_seen = now
