"""The scheduler's records of tasks, workers, clients and nannies: compact, slotted, pure."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from ..config import DEFAULT

if TYPE_CHECKING:
    from .observe import Group

#: Pseudo client that holds fire_and_forget keys until they finish.
FIRE_AND_FORGET = b"<fire-and-forget>"
#: The pseudo client that wants the keys that Variables, Queues and datasets hold.
HELD = b"<held>"

#: The shared empty set of WorkerState's usually empty sets (see WorkerState.__init__): a
#: frozenset, so that a change made without the methods there fails at once.
_NONE: set = cast(set, frozenset())

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


class _Dependents(list):
    """Two or more dependents of a task, in a list rather than a set (8 bytes a member, not
    ~40 plus the tables a growing set leaves behind: one task may have millions).

    Removal is lazy: :func:`_drop_child` only counts a member out (``dead``) and the list is
    rebuilt once half of it is dead. A member is live while it lists the task among its
    dependencies, so a dependent must drop that link before it is discarded here.
    """

    __slots__ = ("dead",)

    def __init__(self, members):
        super().__init__(members)
        self.dead = 0


def _depends_on(child, parent) -> bool:
    p = child.parents
    return p is parent or (type(p) is tuple and parent in p)


def _add_child(container, child):
    if container is None:
        return child
    if type(container) is _Dependents:
        container.append(child)
        return container
    return container if container is child else _Dependents((container, child))


def _drop_child(container, child, parent):
    if container is child:
        return None
    if type(container) is not _Dependents:
        return container
    container.dead += 1
    if container.dead * 2 < len(container):
        return container
    # a new list: whoever iterates the old one (see TaskState.dependents) is not disturbed
    live = [c for c in container if _depends_on(c, parent)]
    if len(live) > 1:
        return _Dependents(live)
    return live[0] if live else None


class TaskExtra:
    """The fields of a task that most tasks never set, kept apart so every record is smaller.

    A :class:`TaskState` creates its one ``extra`` the first time any of them is set to
    something other than its default, and keeps it (it is cheap, and rare).
    """

    __slots__ = ("error", "options", "retries", "scattered", "suspicious")

    def __init__(self):
        self.error: list | None = None  # [exception, traceback, text, kind, extra] once erred
        self.options: dict | None = None  # what a worker or the policy needs (see set_options)
        self.retries = 0  # how many more times it may run after it errs
        self.scattered = False  # a client placed its value: it cannot be recomputed
        self.suspicious = 0  # workers that died while it was probably running there


def _extra_field(name: str, default, doc: str) -> property:
    """A TaskState attribute that lives in its TaskExtra; setting the default to a task
    without one creates none."""

    def get(ts):
        x = ts.extra
        return default if x is None else getattr(x, name)

    def set_(ts, value) -> None:
        x = ts.extra
        if x is None:
            if value == default:
                return
            x = ts.extra = TaskExtra()
        setattr(x, name, value)

    return property(get, set_, doc=doc)


class TaskState:
    """One key the scheduler holds. Containers stay ``None`` until needed, to keep it small.

    Memory per task is the figure that matters at scale (a scheduler may hold millions), so
    the record keeps only what most tasks use: rare fields live in :class:`TaskExtra`, and
    whether a processing task has started is kept by its worker (``WorkerState.started``).
    """

    __slots__ = (
        "children",
        "extra",
        "func",
        "group",
        "holders",
        "key",
        "nbytes",
        "parents",
        "payload",
        "priority",
        "processing_on",
        "state",
        "value",
        "waiting_on",
        "who_wants",
    )

    def __init__(self, key: str, payload: bytes | None):
        self.key = key
        self.payload = payload
        self.func: str | None = None
        self.group: Group | None = None  # counters by key prefix, set by the state
        self.state = "new"
        self.parents: Any = None  # dependencies: None, one TaskState, or a tuple of them
        self.children: Any = None  # tasks that depend on this one: None, one, or _Dependents
        self.waiting_on = 0
        self.holders: Any = None  # workers holding the value: None, one WorkerState, or a set
        self.who_wants: Any = None  # None, one ClientState, or a set of them
        self.processing_on: WorkerState | None = None
        self.priority = 0  # smaller runs first: -user priority * 2**40 + submission order
        self.value: bytes | None = None
        self.nbytes = 0
        self.extra: TaskExtra | None = None

    def __repr__(self) -> str:
        return f"<Task {self.key!r} {self.state}>"

    def __lt__(self, other: TaskState) -> bool:  # heap tie-break (priorities are unique)
        return self.priority < other.priority

    error = _extra_field("error", None, "[exception, traceback, text, kind, extra] once erred")
    options = _extra_field("options", None, "Options a worker or the policy needs, or None.")
    retries = _extra_field("retries", 0, "How many more times it may run after it errs.")
    scattered = _extra_field("scattered", False, "A client placed it: it cannot be recomputed.")
    suspicious = _extra_field("suspicious", 0, "Workers that died while it probably ran there.")

    def set_options(self, opts: dict) -> None:
        """Keep the options a worker or the policy needs; drop the empty ones. A user
        ``priority`` stays: the worker orders its queue by it too."""
        keep = {k: v for k, v in opts.items() if v and k != "retries"}
        self.options = keep or None

    @property
    def started(self) -> bool:
        """Whether the worker it is processing on said it started it."""
        ws = self.processing_on
        return ws is not None and self in ws.started

    # containers that are usually empty or hold one item

    @property
    def deps(self) -> tuple[TaskState, ...]:
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
        x = self.extra
        if x is None:
            return False
        o = x.options
        return o is not None and ("workers" in o or "resources" in o)

    # Who depends on it, who holds it, who wants it: usually nobody or one, so each is kept
    # as None or the one record; two or more are a set (holders, wanters: see _one_or_set; a
    # set costs 216 bytes) or a _Dependents list.

    @property
    def dependents(self):
        """The tasks that depend on this one (a list or tuple; empty when none; do not change
        it)."""
        c = self.children
        if c is None:
            return ()
        if type(c) is not _Dependents:
            return (c,)
        return c if not c.dead else [d for d in c if _depends_on(d, self)]

    def add_dependent(self, ts: TaskState) -> None:
        """``ts`` now lists this task among its dependencies (and was not a dependent)."""
        self.children = _add_child(self.children, ts)

    def discard_dependent(self, ts: TaskState) -> None:
        """``ts`` no longer lists this task among its dependencies (it dropped the link)."""
        self.children = _drop_child(self.children, ts, self)

    @property
    def who_has(self):
        """The workers holding the value (a set or tuple; empty when none)."""
        return _members(self.holders)

    def held_by(self, ws: WorkerState) -> bool:
        return _has(self.holders, ws)

    def add_holder(self, ws: WorkerState) -> None:
        h = self.holders
        if h is ws or (type(h) is set and ws in h):
            return
        self.holders = _add(h, ws)
        ws.hold(self)

    def drop_holder(self, ws: WorkerState) -> None:
        h = self.holders
        if h is ws or (type(h) is set and ws in h):
            self.holders = _discard(h, ws)
            ws.unhold(self)

    def drop_holders(self) -> tuple:
        """Forget every holder; returns them."""
        holders = _members(self.holders)
        self.holders = None
        for ws in holders:
            ws.unhold(self)
        return holders

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
        x = self.extra
        if self.value is None or (x is not None and x.options and "reply" in x.options):
            # (a client that asked for direct replies learns the holder: zfabric/replies.py)
            addresses = [w.address for w in self.who_has]
        else:
            addresses = None
        return [self.key, self.value, addresses, self.nbytes]

    def erred_item(self) -> list:
        x = self.extra
        return [self.key, *((x is not None and x.error) or (None, None, "", None, None))]


class WorkerState:
    """A connected worker: what it runs, what it holds, how fast it goes.

    What it holds is a log, not a set: :meth:`hold` appends the task, :meth:`unhold` only
    counts it out, and the log is compacted once most of it is stale. A set would cost ~50
    bytes a held task (plus the tables left behind as it grows); the log costs 8 to 16, and
    who holds what is known from the tasks (``TaskState.holders``), which the log is checked
    against when it is read (:attr:`has_what`, a rare event: a worker leaves, a diagnostic).
    """

    __slots__ = (
        "_held",
        "address",
        "available",
        "avg_duration",
        "cancelled_running",
        "finished",
        "functions",
        "host",
        "id",
        "ident",
        "index",
        "last_seen",
        "limit",
        "local_directory",
        "long_running",
        "memory_limit",
        "metrics",
        "name",
        "nanny",
        "nbytes",
        "nheld",
        "nthreads",
        "order",
        "pid",
        "processing",
        "resources",
        "retiring",
        "started",
        "status",
        "status_reason",
        "version",
        "window_avg",
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
        # These four are usually empty: they share one empty frozenset until the first member
        # comes (a thousand workers would otherwise hold 4,000 empty sets for the garbage
        # collector to walk); change them through the methods below.
        #: processing tasks it said it started (bounded by its slots)
        self.started: set[TaskState] = _NONE
        #: processing tasks that seceded: they take no slot
        self.long_running: set[TaskState] = _NONE
        #: keys of tasks released while they ran: their threads stay busy until the worker
        #: says they ended (``thread-free``), so they count against its slots
        self.cancelled_running: set[str] = _NONE
        self._held: list = []  # tasks it held at some point: every one it holds, some stale
        self.nheld = 0  # how many tasks list it among their holders
        self.nbytes = 0  # summed sizes of the values it holds (as they were when it got them)
        self.functions: set[str] = _NONE  # function ids this worker has been sent
        self.avg_duration: float | None = None
        self.finished = 0
        self.window_avg = 0.0  # the task duration its limit was last computed from
        self.limit = self.nthreads * 2 + 2  # until task durations are known
        self.status = "running"  # or "paused": it starts no new task (memory)
        self.local_directory: str | None = None  # where it spills (from its hello)
        self.status_reason = ""
        self.retiring = False  # being retired: no new tasks (its limit stays 0)
        #: The scheduler's Candidates (see .candidates) while it is a candidate: told of
        #: every change of its load or slots (:meth:`changed`).
        self.index: Any = None
        self.order = 0  # when it joined (Candidates breaks ties of load by it)
        self.version = 0  # Candidates' entries for it are live while they carry this

    def mark_started(self, ts: TaskState) -> None:
        if not self.started:
            self.started = set()
        self.started.add(ts)

    def set_long_running(self, ts: TaskState, seceded: bool) -> None:
        """A task it runs seceded (takes no slot) or rejoined."""
        if seceded:
            if not self.long_running:
                self.long_running = set()
            self.long_running.add(ts)
        elif ts in self.long_running:
            self.long_running.discard(ts)
        self.changed()

    def running_cancelled(self, key: str) -> None:
        """A task released while it ran keeps its thread until the worker says it ended."""
        if not self.cancelled_running:
            self.cancelled_running = set()
        self.cancelled_running.add(key)

    def threads_free(self, keys: list[str]) -> None:
        """Tasks released while they ran have ended: their threads are free."""
        if self.cancelled_running:
            for key in keys:
                self.cancelled_running.discard(key)
            self.changed()

    def add_function(self, fid: str) -> None:
        if not self.functions:
            self.functions = set()
        self.functions.add(fid)

    def forget_function(self, fid: str) -> None:
        if fid in self.functions:
            self.functions.discard(fid)

    def changed(self) -> None:
        """Its load or free slots changed: the candidate index learns it (O(log workers)).
        Whoever changes ``long_running``, ``cancelled_running``, ``status`` or ``limit``
        calls it; :meth:`assign` and :meth:`done` do."""
        if self.index is not None:
            self.index.update(self)

    def __repr__(self) -> str:
        return f"<Worker {self.name} {self.address}>"

    @property
    def has_what(self) -> list:
        """The tasks it holds (a new list; O(log) -- not for hot paths)."""
        return [ts for ts in dict.fromkeys(self._held) if ts.held_by(self)]

    def hold(self, ts: TaskState) -> None:
        """``ts`` now lists it among its holders (called by ``TaskState.add_holder``)."""
        self._held.append(ts)
        self.nheld += 1
        self.nbytes += ts.nbytes

    def unhold(self, ts: TaskState) -> None:
        """``ts`` no longer lists it (called by ``TaskState.drop_holder``)."""
        self.nheld -= 1
        self.nbytes -= ts.nbytes
        if len(self._held) > 2 * self.nheld + 64:  # amortised O(1): the log at least halves
            self._held = self.has_what

    def clear_held(self) -> None:
        self._held = []
        self.nheld = 0
        self.nbytes = 0

    def has_slot(self) -> bool:
        return (len(self.processing) - len(self.long_running) + len(self.cancelled_running)
                < self.limit and self.status == "running")

    @property
    def occupancy(self) -> int:
        """Tasks that hold (or wait for) its threads: those it processes, and those released
        while they ran, whose threads are still busy."""
        return len(self.processing) + len(self.cancelled_running)

    def assign(self, ts: TaskState) -> None:
        self.processing[ts.key] = ts
        x = ts.extra
        if x is not None and x.options and x.options.get("resources"):
            for name, amount in x.options["resources"].items():
                self.available[name] = self.available.get(name, 0) - amount
        if self.index is not None:
            self.index.update(self)

    def done(self, ts: TaskState, duration: float) -> None:
        if self.started:
            self.started.discard(ts)
        if self.long_running:
            self.long_running.discard(ts)
        if self.processing.pop(ts.key, None) is None:
            return
        x = ts.extra
        if x is not None and x.options and x.options.get("resources"):
            for name, amount in x.options["resources"].items():
                self.available[name] = self.available.get(name, 0) + amount
        if duration > 0:
            avg = self.avg_duration
            avg = duration if avg is None else avg * 0.9 + duration * 0.1
            self.avg_duration = avg
            self.finished += 1
            index = self.index
            if index is not None:  # the window follows every worker's tasks alike
                avg = index.learn(duration)  # changes only when the average moved by a quarter
                if (avg != self.window_avg or self.finished & 15 == 1) and not self.retiring:
                    self.window_avg = avg
                    extra = int(DEFAULT.PREFETCH_TARGET_S * self.nthreads / max(avg, 1e-6))
                    self.limit = self.nthreads + min(DEFAULT.PREFETCH_MAX, max(1, extra))
            elif self.finished & 15 == 1 and not self.retiring:
                extra = int(DEFAULT.PREFETCH_TARGET_S * self.nthreads / max(avg, 1e-6))
                self.limit = self.nthreads + min(DEFAULT.PREFETCH_MAX, max(1, extra))
        if self.index is not None:
            self.index.update(self)

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
            "in_memory": self.nheld,
            "nbytes": self.nbytes,
            "avg_duration": self.avg_duration,
            "status": "closing_gracefully" if self.retiring else self.status,
            "status_reason": self.status_reason,
            "memory": {"process": self.metrics.get("memory", 0),
                       "managed": self.metrics.get("managed", 0),
                       "spilled": self.metrics.get("spilled", 0)},
            "local_directory": self.local_directory,
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
