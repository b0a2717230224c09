"""The wire protocol: message framing, op schemas, and validation at one door.

A message is a multipart ZeroMQ message. Frame 0 is a msgpack-encoded list of *ops*; the
frames after it are raw binary buffers that ops refer to by index (out-of-band pickle buffers
of large values). One send carries every op one tick produced for one peer.

Each op is a map with an ``"op"`` name. :data:`SCHEMAS` lists, for every op, the fields it must
carry and their types; :func:`decode` checks them before anything else looks at a message, so
the rest of the code can trust what it gets. Nothing in here touches a socket or a clock.

The first op a peer sends is ``hello`` (role, protocol version, library versions); anything else
from a peer that has not said hello is answered with ``reregister``.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Callable, Sequence
from typing import NamedTuple

import msgpack

from ._version import __version__
from .config import PROTOCOL_VERSION
from .errors import LocalProtocolError, RemoteProtocolError

__all__ = ["PROTOCOL_VERSION", "SCHEMAS", "decode", "encode", "hello", "versions"]

_B = (bytes,)
_S = (str,)
_I = (int,)
_N = (int, float)
_L = (list,)
_D = (dict,)
_O = (bytes, type(None))

#: Required fields of each op and their types. Extra fields are allowed (newer peers).
SCHEMAS: dict[str, dict[str, tuple[type, ...]]] = {
    # any role <-> scheduler
    "hello": {"role": _S, "protocol": _I, "versions": _D, "id": _S},
    "welcome": {"epoch": _S, "address": _S},
    "reregister": {"reason": _S},
    "error": {"message": _S},
    "heartbeat": {},
    "heartbeat-interval": {"heartbeat_s": _N},  # scheduler -> workers, nannies: beat so often
    "goodbye": {},
    "announce": {"bytes": _I, "frames": _I},  # the next message's size (any server port)
    "piece": {"stream": _I, "off": _I, "total": _I},  # part of a large buffer (streams.py)
    "request": {"id": _I, "kind": _S, "args": _D},
    "reply": {"id": _I},
    # client -> scheduler
    "submit": {"tasks": _L},
    "release": {"keys": _L},
    "want": {"keys": _L},
    "cancel": {"keys": _L},
    "retry": {"keys": _L},
    "scatter": {"items": _L},
    "coord": {"id": _I, "kind": _S, "name": _S},  # shared state: see COORD_KINDS
    "events-ack": {"id": _I},  # a batch of a subscription's events was taken
    # scheduler -> client
    "memory": {"items": _L},
    "erred": {"items": _L},
    "cancelled": {"keys": _L},
    "retried": {"keys": _L},
    "lost": {"keys": _L},
    "events": {"id": _I, "items": _L},  # a subscription's events; optional "missed": int
    # scheduler <-> worker
    "compute": {"tasks": _L},
    "free": {"keys": _L},
    "finished": {"tasks": _L},
    "long-running": {"items": _L},
    "started": {"keys": _L},
    "thread-free": {"keys": _L},  # tasks released while they ran have ended
    "give-back": {"keys": _L},  # tasks to hand back if they have not started
    "given-back": {"keys": _L},  # ... these had not: they are dropped here
    "missing": {"key": _S, "dep": _S, "address": _S},
    "run": {"id": _I, "payload": _B},
    "functions": {"items": _L},
    "forget-functions": {"keys": _L},
    "run-result": {"id": _I},
    "worker-status": {"status": _S, "reason": _S},
    "plugin-add": {"id": _I, "name": _S, "payload": _B},  # also scheduler -> nanny
    "plugin-remove": {"id": _I, "name": _S},
    "acquire": {"items": _L},  # keep copies of these keys (replicate, retire_workers)
    "acquired": {"keys": _L},  # ... now held; optional "failed": keys it could not get
    "close": {},
    "worker-keys": {"keys": _D},  # data address -> its port's public key (also -> client)
    # what a worker holds and runs, told a new scheduler incarnation after its hello
    "holding": {"items": _L, "running": _L},
    # nanny <-> scheduler
    "worker-died": {"worker": _S, "reason": _S},
    "restart": {"id": _I},
    # data plane (worker ROUTER <-> any DEALER)
    "get-data": {"id": _I, "keys": _L},
    "data": {"id": _I, "items": _L},
    "put-data": {"id": _I, "items": _L},
    "lease": {"id": _I, "sizes": _L},
    "leases": {"id": _I, "items": _L},
    "actor-call": {"id": _I, "key": _S, "name": _S},  # args: pickle of (args, kwargs)
    "actor-ping": {"id": _I, "key": _S},
    "actor-result": {"id": _I},  # value (pickle, nframes buffers after) or error
    # direct replies (zfabric/replies.py): a client names its token on a worker's data port;
    # the worker sends the small results of the tasks that carry it as ``results``
    "reply-to": {"token": _S},
    "results": {"items": _L},  # [key, pickled value, nbytes] each
    # the bulk channel (zfabric/bulk.py): a session opened over CurveZMQ (route, token and
    # keys: bytes), then on the worker's plain bulk port
    "bulk-open": {"id": _I, "route": _B, "token": _B, "up": _B, "down": _B},
    "bulk-port": {"id": _I, "port": _I},
    "bulk-hello": {"t": _B},
    "bulk-ready": {},
}

_packer = msgpack.Packer(use_bin_type=True)

#: A message larger than this is announced: an ``announce`` op in a message of its own, just
#: before it, gives its bytes and frames. A server shuts down a connection that runs further
#: ahead of its complete messages than it announced plus ``INCOMPLETE_MESSAGE_BYTES``
#: (see :mod:`zfabric.intake`), so this must stay well below that setting.
ANNOUNCE_ABOVE = 2**18


def announcement(frames: Sequence) -> list | None:
    """The message to send just before ``frames`` (one message) when it is large, else None."""
    n = 0
    for f in frames:
        n += len(f) if type(f) is bytes else memoryview(f).nbytes
    if n <= ANNOUNCE_ABOVE:
        return None
    return [_packer.pack([{"op": "announce", "bytes": n, "frames": len(frames)}])]


def encode(ops: Sequence[dict], buffers: Sequence = ()) -> list:
    """Frames for one message: the packed ops, then the raw buffers."""
    try:
        head = _packer.pack(list(ops))
    except (TypeError, ValueError) as exc:
        raise LocalProtocolError(f"cannot encode ops {[o.get('op') for o in ops]}: {exc}") from exc
    if not buffers:
        return [head]
    return [head, *buffers]


def decode(frames: Sequence, max_frames: int = 10_000,
           errors: list | None = None) -> tuple[list[dict], list]:
    """Check and unpack one message. Raises RemoteProtocolError when anything is off.

    Given ``errors``, an op that fails its schema is left out and its error appended there
    instead, so that one bad op does not drop the good ones beside it.
    """
    if not frames:
        raise RemoteProtocolError("empty message")
    if len(frames) > max_frames:
        raise RemoteProtocolError(f"message has {len(frames)} frames; the limit is {max_frames}")
    try:
        ops = msgpack.unpackb(frames[0], raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:
        raise RemoteProtocolError(f"frame 0 is not msgpack: {exc}") from None
    if type(ops) is not list:
        raise RemoteProtocolError(f"frame 0 must be a list of ops, got {type(ops).__name__}")
    if errors is None:
        for op in ops:
            check(op)
        return ops, list(frames[1:])
    good = []
    for op in ops:
        try:
            check(op)
        except RemoteProtocolError as exc:
            errors.append(exc)
            continue
        good.append(op)
    return good, list(frames[1:])


def check(op) -> None:
    """Validate one op against its schema."""
    if type(op) is not dict:
        raise RemoteProtocolError(f"an op must be a map, got {type(op).__name__}")
    name = op.get("op")
    schema = SCHEMAS.get(name) if type(name) is str else None
    if schema is None:
        raise RemoteProtocolError(f"unknown op {short(name)}")
    for field, types in schema.items():
        value = op.get(field, _MISSING)
        if value is _MISSING:
            raise RemoteProtocolError(f"op {name!r} lacks field {field!r}")
        if not isinstance(value, types) or (types is _I and isinstance(value, bool)):
            raise RemoteProtocolError(
                f"op {name!r} field {field!r} must be {'/'.join(t.__name__ for t in types)},"
                f" got {type(value).__name__}"
            )
    if name == "coord":
        check_coord(op)
    elif name == "heartbeat-interval" or (name == "welcome" and "heartbeat_s" in op):
        value = op["heartbeat_s"]
        if not (finite(value) and 0 < value <= MAX_HEARTBEAT_S):
            raise RemoteProtocolError(f"op {name!r}: heartbeat_s must be a number of seconds"
                                      f" above 0 and at most {MAX_HEARTBEAT_S}, got"
                                      f" {short(value)}")


_MISSING = object()

#: The longest heartbeat interval a scheduler may ask for (an hour: a bad value must not make
#: a peer fall silent for ever).
MAX_HEARTBEAT_S = 3600


# ---------------------------------------------------------------------- nested items
# The items inside the scheduler's incoming ops, checked (and, where a handler reads them by
# field, made typed records) here, so that no handler checks them by hand.


class TaskSpec(NamedTuple):
    """One task of a ``submit``: its key, its payload (the whole call pickled, or the
    arguments when ``func`` names a function sent in the op's ``functions``), the keys it
    depends on, its options."""

    key: str
    payload: bytes
    deps: list[str]
    options: dict | None
    func: str | None = None


class ScatterItem(NamedTuple):
    """One value a client placed: inline bytes or None (held by ``addresses``)."""

    key: str
    value: bytes | None
    nbytes: int
    addresses: list[str]


class FinishedItem(NamedTuple):
    """A task a worker finished: its result's size, the result when small, how long it ran,
    when (worker clock) and on which thread."""

    key: str
    nbytes: int
    value: bytes | None
    duration: float
    start: float | None = None
    stop: float | None = None
    thread: int | None = None


_new = tuple.__new__  # a record from a list of the right length, without the per-field call


def _bad(what: str, item) -> RemoteProtocolError:
    return RemoteProtocolError(f"malformed {what} {short(item, 200)}")


def _strings(op: dict, field: str) -> None:
    for key in op[field]:
        if type(key) is not str:
            raise _bad(f"{op['op']} {field}", key)


def _optional_strings(field: str):
    def check_field(op: dict) -> None:
        value = op.get(field)
        if value is not None and (type(value) is not list
                                  or any(type(k) is not str for k in value)):
            raise _bad(f"{op['op']} {field}", value)
    return check_field


def _keys(op: dict) -> None:
    _strings(op, "keys")


def submitted_keys(op: dict) -> list[str]:
    """The keys a ``submit`` op names, however malformed the rest of it."""
    tasks = op.get("tasks")
    if type(tasks) is not list:
        return []
    return [t[0] for t in tasks if type(t) in (list, TaskSpec) and t and type(t[0]) is str]


def _submit(op: dict) -> None:
    functions = op.get("functions")
    if functions is not None and (type(functions) is not dict or any(
            type(f) is not str or type(b) is not bytes for f, b in functions.items())):
        raise RemoteProtocolError("submit's functions must map string ids to bytes")
    tasks = op["tasks"]
    for i, t in enumerate(tasks):
        if type(t) is not list or not 4 <= len(t) <= 5:
            raise _bad("task", t)
        key, payload, deps, opts = t[0], t[1], t[2], t[3]
        full = len(t) == 5
        if (type(key) is not str or type(payload) is not bytes or type(deps) is not list
                or not (not full or t[4] is None or type(t[4]) is str)):
            raise _bad("task", t)
        for d in deps:
            if type(d) is not str:
                raise _bad("task", t)
        if opts is not None:
            check_task_options(key, opts)
        tasks[i] = _new(TaskSpec, t) if full else TaskSpec(key, payload, deps, opts)


def _scatter(op: dict) -> None:
    items = op["items"]
    for i, t in enumerate(items):
        if (type(t) is not list or len(t) != 4 or type(t[0]) is not str
                or not (t[1] is None or type(t[1]) is bytes) or type(t[2]) is not int
                or type(t[3]) is not list):
            raise _bad("scatter item", t)
        items[i] = ScatterItem(t[0], t[1], t[2], [a for a in t[3] if type(a) is str])


def _finished(op: dict) -> None:
    tasks = op["tasks"]
    for i, t in enumerate(tasks):
        if (type(t) is not list or not 4 <= len(t) <= 7 or type(t[0]) is not str
                or type(t[1]) is not int or not (t[2] is None or type(t[2]) is bytes)
                or not finite(t[3])):
            raise _bad("finished item", t)
        tasks[i] = _new(FinishedItem, t) if len(t) == 7 else FinishedItem(*t)


def _erred(op: dict) -> None:
    # [key, exception, traceback, text, kind, ...]: from a worker (then start, stop, thread)
    # and to a client (then extra); both share the first five.
    for t in op["items"]:
        if (type(t) is not list or not 4 <= len(t) <= 8 or type(t[0]) is not str
                or not (t[1] is None or type(t[1]) is bytes)
                or not (t[2] is None or type(t[2]) is bytes) or type(t[3]) is not str
                or not (len(t) < 5 or t[4] is None or type(t[4]) is str)):
            raise _bad("erred item", t)


def _results(op: dict) -> None:
    for t in op["items"]:
        if (type(t) is not list or len(t) != 3 or type(t[0]) is not str
                or type(t[1]) is not bytes or type(t[2]) is not int):
            raise _bad("results item", t)


def _long_running(op: dict) -> None:
    for t in op["items"]:
        if type(t) is not list or len(t) != 2 or type(t[0]) is not str:
            raise _bad("long-running item", t)


def _acquired(op: dict) -> None:
    _strings(op, "keys")
    _optional_strings("failed")(op)


_REQUEST_NUMBERS = ("since", "start", "stop", "count", "n", "transfers")
_TIMES = ("start", "stop", "transfers")


def _request(op: dict) -> None:
    """The request arguments the scheduler reads (each kind's own rules are its handler's)."""
    args = op["args"]
    keys = args.get("keys") if op["kind"] in ("who-has", "nbytes", "task-states") else None
    if keys is not None and (type(keys) is not list or any(type(k) is not str for k in keys)):
        raise _bad(f"{op['kind']} request keys", keys)
    value = args.get("workers")
    if value is not None and (type(value) is not list or any(type(v) is not str for v in value)):
        raise _bad(f"{op['kind']} request workers", value)
    for name in _REQUEST_NUMBERS:
        value = args.get(name)
        if value is not None and not (finite(value) if name in _TIMES else type(value) is int):
            raise _bad(f"{op['kind']} request {name}", value)
    topic = args.get("topic")
    if op["kind"] == "log-event" and not (type(topic) is str or (
            type(topic) is list and all(type(t) is str for t in topic))):
        raise _bad("log-event request topic", topic)
    if op["kind"] == "events" and not (topic is None or type(topic) is str):
        raise _bad("events request topic", topic)
    if op["kind"] in ("subscribe", "unsubscribe"):
        check_subscribe(op["kind"], args)
    elif op["kind"] == "story":
        keys = args.get("keys")
        if type(keys) is not list or len(keys) > MAX_STORY_KEYS or any(
                type(k) is not str for k in keys):
            raise _bad("story request keys (a list of at most"
                       f" {MAX_STORY_KEYS} keys or stimulus ids)", keys)


#: Keys or key prefixes one subscription may name, and keys or stimulus ids one story request.
MAX_SUBSCRIBE_NAMES = 100_000
MAX_STORY_KEYS = 100_000


def check_subscribe(kind: str, args: dict) -> None:
    """A ``subscribe`` request: ``id`` (the client's, an int), ``what`` ("topic", with a
    ``topic`` string, or "transitions", with optional ``keys`` and ``prefixes``: lists of
    strings), an optional ``queue`` (events kept for it at most, a positive int) and, for a
    topic, an optional ``after`` (a wall-clock time: the answer holds the events since). An
    ``unsubscribe`` request: its ``id``."""
    sid = args.get("id")
    if type(sid) is not int or sid < 0:
        raise _bad(f"{kind} request id (a non-negative int)", sid)
    if kind == "unsubscribe":
        return
    what = args.get("what")
    if what == "topic":
        if type(args.get("topic")) is not str:
            raise _bad("subscribe request topic (a string)", args.get("topic"))
    elif what == "transitions":
        for name in ("keys", "prefixes"):
            value = args.get(name)
            if value is not None and (type(value) is not list
                                      or len(value) > MAX_SUBSCRIBE_NAMES
                                      or any(type(k) is not str for k in value)):
                raise _bad(f"subscribe request {name} (a list of at most"
                           f" {MAX_SUBSCRIBE_NAMES} strings)", value)
    else:
        raise _bad("subscribe request what (\"topic\" or \"transitions\")", what)
    queue = args.get("queue")
    if queue is not None and (type(queue) is not int or queue <= 0):
        raise _bad("subscribe request queue (a positive int)", queue)
    after = args.get("after")
    if after is not None and not finite(after):
        raise _bad("subscribe request after (a wall-clock time)", after)


def _holding(op: dict) -> None:
    for t in op["items"]:
        if (type(t) is not list or len(t) != 2 or type(t[0]) is not str
                or type(t[1]) is not int or t[1] < 0):
            raise _bad("holding item", t)
    _strings(op, "running")


def _heartbeat(op: dict) -> None:
    _optional_strings("workers")(op)  # a Nanny's: the workers it vouches for


#: The checks of each op's nested items (the schema checked the op's own fields first).
ITEMS: dict[str, Callable[[dict], None]] = {
    "submit": _submit,
    "scatter": _scatter,
    "finished": _finished,
    "erred": _erred,
    "long-running": _long_running,
    "release": _keys,
    "want": _keys,
    "cancel": _keys,
    "retry": _keys,
    "started": _keys,
    "thread-free": _keys,
    "given-back": _keys,
    "acquired": _acquired,
    "results": _results,
    "heartbeat": _heartbeat,
    "request": _request,
    "holding": _holding,
}


def check_items(op: dict) -> None:
    """Check the nested items of an op :func:`check` passed, making the ones handlers read by
    field typed records (:class:`TaskSpec`, :class:`ScatterItem`, :class:`FinishedItem`), in
    place. The scheduler calls it for each op it applies; raises RemoteProtocolError."""
    items = ITEMS.get(op["op"])
    if items is not None:
        items(op)


def finite(value) -> bool:
    """A finite float, or an int of at most 2**62 either way."""
    if type(value) is float:
        return math.isfinite(value)
    return type(value) is int and abs(value) <= 1 << 62


def short(value, limit: int = 80) -> str:
    """``repr`` of a peer-given value, cut to ``limit`` characters: safe to log (one line,
    bounded, whatever the peer sent)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def safe_name(value, limit: int = 200) -> str:
    """A peer-given name made safe to log and show: printable characters only, one line,
    at most ``limit`` characters."""
    text = str(value)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else "?" for c in text)
    return text[:limit]


def _count(value, name: str, low: int, high: int) -> int:
    if value is None:
        return low
    if type(value) is not int or not low <= value <= high:
        raise RemoteProtocolError(f"worker hello: {name} must be an integer from {low} to"
                                  f" {high}, got {short(value)}")
    return value


def amount(value) -> bool:
    """Whether ``value`` is a finite, non-negative number (a resource amount)."""
    return (type(value) is int or type(value) is float) and math.isfinite(value) and value >= 0


def check_worker_hello(op: dict) -> dict:
    """The fields of a worker's hello, checked and made safe, as WorkerState's arguments."""
    address = op.get("address")
    if type(address) is not str or not address.startswith(("tcp://", "ipc://")) \
            or len(address) > 300 or not address.isprintable():
        raise RemoteProtocolError(f"worker hello needs a data address, got {short(address)}")
    resources = op.get("resources") or {}
    if type(resources) is not dict or len(resources) > 1000 or any(
            type(k) is not str or not amount(v) for k, v in resources.items()):
        raise RemoteProtocolError("worker hello: resources must map names to finite,"
                                  f" non-negative amounts, got {short(resources)}")
    nanny = op.get("nanny") or ""
    if type(nanny) is not str or len(nanny) > 200:
        raise RemoteProtocolError(f"worker hello: bad nanny {short(nanny)}")
    return {
        "address": address,
        "name": safe_name(op.get("name") or address),
        "nthreads": _count(op.get("nthreads") or 1, "nthreads", 1, 1 << 20),
        "memory_limit": _count(op.get("memory_limit") or 0, "memory_limit", 0, 1 << 62),
        "resources": dict(resources),
        "nanny": nanny.encode() or None,
        "pid": _count(op.get("pid") or 0, "pid", 0, 1 << 31),
        "host": safe_name(op.get("host") or ""),
    }


def versions() -> dict[str, str]:
    """The library versions a peer announces in its hello."""
    import cloudpickle
    import msgpack as _m

    return {
        "python": platform.python_version(),
        "cloudpickle": cloudpickle.__version__,
        "msgpack": ".".join(map(str, _m.version)),
        "zfabric": __version__,
    }


def hello(role: str, ident: str, **extra) -> dict:
    """The first op every peer sends to the scheduler."""
    return {
        "op": "hello",
        "role": role,
        "protocol": PROTOCOL_VERSION,
        "versions": versions(),
        "id": ident,
        **extra,
    }


def version_mismatches(mine: dict, theirs: dict) -> list[str]:
    """Human-readable differences between two versions maps (python, cloudpickle, ...)."""
    out = []
    for name in ("python", "cloudpickle", "zfabric"):
        a, b = mine.get(name), theirs.get(name)
        if name == "python" and a and b:
            a, b = ".".join(a.split(".")[:2]), ".".join(str(b).split(".")[:2])
        if a != b:
            out.append(f"{name} {a} here vs {b} there")
    return out


#: The longest ``reply`` token (a task option and ``reply-to``'s field; zfabric/replies.py).
MAX_REPLY_TOKEN = 64


def check_task_options(key: str, opts) -> None:
    """Refuse task options of the wrong shape before they reach the records or the policy
    (where a bad type would fail later, outside the op that brought it)."""
    if type(opts) is not dict:
        raise RemoteProtocolError(f"options of task {short(key)} must be a map, got {opts!r:.100}")
    for name in ("priority", "retries"):
        if not isinstance(opts.get(name) or 0, int):
            raise RemoteProtocolError(f"option {name!r} of task {short(key)} must be an integer")
    if not isinstance(opts.get("task_timeout") or 0, int | float):
        raise RemoteProtocolError(f"option 'task_timeout' of task {short(key)} must be a number")
    reply = opts.get("reply")
    if reply is not None and (type(reply) is not str or not 0 < len(reply) <= MAX_REPLY_TOKEN):
        raise RemoteProtocolError(f"option 'reply' of task {short(key)} must be a token of at"
                                  f" most {MAX_REPLY_TOKEN} characters")
    workers = opts.get("workers")
    if workers and (type(workers) is not list or any(type(w) is not str for w in workers)):
        raise RemoteProtocolError(f"option 'workers' of task {short(key)} must be a list of names")
    resources = opts.get("resources")
    if resources and (type(resources) is not dict or any(
            type(k) is not str or not amount(v) for k, v in resources.items())):
        raise RemoteProtocolError(
            f"option 'resources' of task {short(key)} must map names to amounts")


#: The kinds of ``coord`` op and the extra fields each must carry (with their types).
_T = (int, float, type(None))
COORD_KINDS: dict[str, dict[str, tuple]] = {
    "sem-acquire": {"max_leases": (int,), "lease": _S, "timeout": _T, "lease_timeout": _T},
    "sem-release": {"lease": _S},
    "sem-value": {},
    "sem-close": {},
    "abandon": {"lease": _S},
    "event-set": {},
    "event-clear": {},
    "event-is-set": {},
    "event-wait": {"timeout": _T},
    "var-set": {"item": _L},
    "var-get": {"timeout": _T},
    "var-delete": {},
    "queue-put": {"maxsize": (int,), "item": _L, "timeout": _T},
    "queue-get": {"maxsize": (int,), "timeout": _T, "batch": (bool, int)},
    "queue-qsize": {"maxsize": (int,)},
    "queue-close": {},
    "ds-publish": {"item": _L, "override": (bool,)},
    "ds-get": {},
    "ds-list": {},
    "ds-unpublish": {},
}


def check_coord(op: dict) -> None:
    """Validate a ``coord`` op's kind and fields (raises RemoteProtocolError)."""
    kind = op["kind"]
    fields = COORD_KINDS.get(kind)
    if fields is None:
        raise RemoteProtocolError(f"unknown coordination kind {kind!r}")
    for field, types in fields.items():
        if field not in op:
            raise RemoteProtocolError(f"coordination op {kind!r} lacks field {field!r}")
        value = op[field]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise RemoteProtocolError(f"coordination op {kind!r}: field {field!r} has the wrong"
                                      f" type {type(value).__name__}")
        if field in ("timeout", "lease_timeout") and value is not None and value < 0:
            raise RemoteProtocolError(f"coordination op {kind!r}: {field} must be >= 0")
    if "item" in fields:
        coord_item_keys(op["item"])
    if kind == "sem-acquire" and op["max_leases"] < 1:
        raise RemoteProtocolError("max_leases must be at least 1")
    if kind.startswith("queue-") and "maxsize" in fields and op["maxsize"] < 0:
        raise RemoteProtocolError("a queue's maxsize must be >= 0")


def coord_item_keys(item) -> list[str]:
    """The keys an item holds (and a check of its shape)."""
    if type(item) is list and len(item) == 3 and item[0] == "v" and type(item[1]) is bytes \
            and type(item[2]) is list and all(type(k) is str for k in item[2]):
        return item[2]
    if type(item) is list and len(item) == 2 and item[0] in ("f", "s") and type(item[1]) is str:
        return [item[1]]
    raise RemoteProtocolError(f"malformed coordination value {str(item)[:100]}")
