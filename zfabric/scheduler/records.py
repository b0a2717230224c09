"""The scheduler's records of tasks, workers, clients and nannies: compact, slotted, pure."""

from __future__ import annotations

from ..config import DEFAULT

#: Pseudo client that holds fire_and_forget keys until they finish.
FIRE_AND_FORGET = b"<fire-and-forget>"

# _one_or_set: a container that is None (empty), the one member itself, or a set of two or more.


def _add(container, item):
    if container is None:
        return item
    if type(container) is set:
        container.add(item)
        return container
    return container if container is item else {container, item}


def _discard(container, item):
    if container is item:
        return None
    if type(container) is set:
        container.discard(item)
        if len(container) == 1:
            return next(iter(container))
        if not container:
            return None
    return container


def _members(container):
    if container is None:
        return ()
    return container if type(container) is set else (container,)


def _has(container, item) -> bool:
    return container is item or (type(container) is set and item in container)


class TaskState:
    """One key the scheduler holds. Containers stay ``None`` until needed, to keep it small."""

    __slots__ = (
        "children",
        "error",
        "func",
        "holders",
        "key",
        "nbytes",
        "options",
        "parents",
        "payload",
        "priority",
        "processing_on",
        "retries",
        "scattered",
        "started",
        "state",
        "suspicious",
        "value",
        "waiting_on",
        "who_wants",
    )

    def __init__(self, key: str, payload: bytes | None):
        self.key = key
        self.payload = payload
        self.func: str | None = None
        self.state = "new"
        self.parents = None  # dependencies: None, one TaskState, or a tuple of them
        self.children = None  # tasks that depend on this one: None, one TaskState, or a set
        self.waiting_on = 0
        self.holders = None  # workers holding the value: None, one WorkerState, or a set
        self.who_wants = None  # None, one ClientState, or a set of them
        self.processing_on = None
        self.priority = 0  # smaller runs first: -user priority * 2**40 + submission order
        self.retries = 0
        self.value: bytes | None = None
        self.nbytes = 0
        self.error: list | None = None  # [exception, traceback, text, kind, extra] once erred
        self.options: dict | None = None
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


    # containers that are usually empty or hold one item

    @property
    def deps(self) -> tuple:
        """The tasks this one depends on."""
        p = self.parents
        if p is None:
            return ()
        if type(p) is tuple:
            return p
        return (p,)

    @deps.setter
    def deps(self, value) -> None:
        value = tuple(value)
        self.parents = None if not value else value[0] if len(value) == 1 else value

    @property
    def restricted(self) -> bool:
        """Whether only some workers may run it (``workers=`` or ``resources=``)."""
        o = self.options
        return o is not None and ("workers" in o or "resources" in o)

    # Who depends on it, who holds it, who wants it: usually nobody or one, so each is kept
    # as None, the one record, or a set (see _one_or_set) -- a set costs 216 bytes.

    @property
    def dependents(self):
        """The tasks that depend on this one (a set or tuple; empty when none)."""
        return _members(self.children)

    def add_dependent(self, ts: TaskState) -> None:
        self.children = _add(self.children, ts)

    def discard_dependent(self, ts: TaskState) -> None:
        self.children = _discard(self.children, ts)

    @property
    def who_has(self):
        """The workers holding the value (a set or tuple; empty when none)."""
        return _members(self.holders)

    def held_by(self, ws) -> bool:
        return _has(self.holders, ws)

    def add_holder(self, ws) -> None:
        self.holders = _add(self.holders, ws)
        ws.has_what.add(self)

    def drop_holder(self, ws) -> None:
        self.holders = _discard(self.holders, ws)

    def add_wanter(self, cs) -> None:
        self.who_wants = _add(self.who_wants, cs)

    def drop_wanter(self, cs) -> None:
        self.who_wants = _discard(self.who_wants, cs)

    def wanted_by(self, cs) -> bool:
        return _has(self.who_wants, cs)

    def wanters(self) -> tuple:
        return tuple(_members(self.who_wants))

    # what clients are told

    def memory_item(self) -> list:
        addresses = None if self.value is not None else [w.address for w in self.who_has]
        return [self.key, self.value, addresses, self.nbytes]

    def erred_item(self) -> list:
        return [self.key, *(self.error or (None, None, "", None, None))]


class WorkerState:
    """A connected worker: what it runs, what it holds, how fast it goes."""

    __slots__ = (
        "address",
        "available",
        "avg_duration",
        "finished",
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
        self.finished = 0
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
            self.finished += 1
            if self.finished & 15 == 1:  # the allowance need not move on every task
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

    # Which keys a client wants is kept on the tasks only (TaskState.who_wants), not here too:
    # a second per-task entry would cost ~50 bytes a task to speed up a rare event.
    __slots__ = ("ident", "last_seen", "name")

    def __init__(self, ident: bytes, name: str = "", now: float = 0.0):
        self.ident = ident
        self.name = name or ident.decode(errors="replace")
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
