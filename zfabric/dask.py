"""Dask graphs in and out: ``Client.get``, ``Client.compute`` and ``Client.persist``.

dask is optional: this module imports it only inside the functions that take a graph, and a
worker imports it only when a chunk of a dask graph arrives.

How a graph becomes tasks (:func:`plan`, on the caller's thread):

- whatever dask hands a scheduler (an expression with ``__dask_graph__()``, a HighLevelGraph,
  a mapping of task-spec nodes, legacy tuples, aliases or literals) is turned into task-spec
  nodes by dask's own ``convert_legacy_graph``;
- aliases cost nothing: a dependency on an alias is a dependency on its target, and a requested
  alias is answered by its target's result;
- literals (``DataNode``) cost no task: a requested one is answered on the client, one that
  tasks need is placed with the scatter path (small ones ride with the op to the scheduler,
  large ones go straight to a worker);
- every other node becomes one task. Tasks go out in ``dask.order``'s order (the scheduler
  numbers tasks as they arrive, so that order is their priority below the user's
  ``priority=``), in submit ops of ``SUBMIT_BATCH`` tasks. The nodes of one op are pickled
  together once, as one "function" that the scheduler keeps once and each worker loads once;
  a task's own payload is a few bytes naming its node in the chunk (:mod:`zfabric.dask_wire`,
  which also sends nodes that carry much data straight to a worker).
- no cyclic garbage collection runs while the ops are made and sent (it runs right after,
  while the cluster works): a full collection of a client with pandas loaded took 60 ms;
- the client holds Futures only for the requested keys. It wants every key while the ops
  go out (so that nothing finished is forgotten before its dependents arrive) and releases
  the internal ones right after, in the same ordered stream.

On a worker a node runs through dask's own task-spec call (``node(values)``).
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import logging
import pickle
from collections.abc import Iterator

from . import serialize
from .dask_wire import LARGE_CHUNK_BYTES, args_bytes, pickle_chunk, split
from .futures import Future, FutureState
from .keys import to_wire
from .session import Deferred
from .submission import options

logger = logging.getLogger(__name__)

__all__ = ["compute", "get", "materialize", "persist", "plan"]

#: Annotation names dask hands over that become task options.
ANNOTATIONS = ("priority", "retries", "workers", "allow_other_workers", "resources")


# ---------------------------------------------------------------------------- graph in


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection while a graph is turned into ops and sent.

    Turning a graph of a thousand tasks into ops makes tens of thousands of objects, enough to
    start a full collection of the client's heap (60 ms measured with pandas and dask loaded)
    in the middle of it, before any task can start; paused, it runs right after, while the
    cluster works and the client waits."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def materialize(dsk):
    """``(mapping of task-spec nodes, annotations, {key: Future})`` from what dask hands a
    scheduler."""
    from dask._task_spec import convert_legacy_graph

    annotations = {}
    if hasattr(dsk, "__dask_graph__"):
        get_ann = getattr(dsk, "__dask_annotations__", None)
        if get_ann is not None:
            annotations = get_ann() or {}
        dsk = dsk.__dask_graph__()
    if hasattr(dsk, "layers") and hasattr(dsk, "to_dict"):  # a HighLevelGraph
        for layer in dsk.layers.values():
            ann = getattr(layer, "annotations", None)
            if ann:
                for name, value in ann.items():
                    per_key = annotations.setdefault(name, {})
                    for k in layer:
                        per_key[k] = value(k) if callable(value) else value
        dsk = dsk.to_dict()
    dsk = dict(dsk)
    # Keys whose value is a Future (a persisted collection's graph): their data is on the
    # cluster already, under the Future's own wire key.
    held = {k: v for k, v in dsk.items() if type(v) is Future}
    for k in held:
        del dsk[k]
    return convert_legacy_graph(dsk), annotations, held


class Plan:
    """What one graph turns into: literals, tasks in order, and where each key's value is."""

    __slots__ = ("external", "literals", "order", "resolved", "tasks", "wire")

    def __init__(self):
        self.literals: dict = {}  # key -> value (DataNodes)
        self.tasks: list = []  # [(key, node, [dep names], [dep wire keys])] in submit order
        self.resolved: dict = {}  # alias key -> key holding its value
        self.external: set = set()  # keys the graph refers to but does not define (Futures)
        self.order: dict | None = None
        self.wire: dict = {}  # key -> wire key, where computed


def plan(graph: dict, held: dict | None = None, renamed: dict | None = None) -> Plan:
    """Turn task-spec nodes into literals and ordered tasks (see the module docstring).

    ``held`` maps keys whose data a Future holds to that Future; ``renamed`` maps the wire
    keys of Futures named after an alias (persist's) to the wire keys holding their data.
    """
    from dask._task_spec import Alias, DataNode

    p = Plan()
    held = held or {}
    renamed = renamed or {}
    aliases = {}
    tasks = {}
    for k, node in graph.items():
        if type(node) is Alias or isinstance(node, Alias):
            aliases[k] = node.target
        elif isinstance(node, DataNode):
            p.literals[k] = node.value
        else:
            tasks[k] = node
    for k in aliases:
        seen = {k}
        t = aliases[k]
        while t in aliases:
            if t in seen:
                raise ValueError(f"the graph's aliases form a cycle through {t!r}")
            seen.add(t)
            t = aliases[t]
        p.resolved[k] = t
        if t not in graph:
            p.external.add(t)
    resolved = p.resolved
    wire = {k: f._wkey for k, f in held.items()}

    def wire_of(k):
        w = wire.get(k)
        if w is None:
            w = to_wire(k)
            if renamed and k in p.external:
                w = renamed.get(w, w)
            wire[k] = w
        return w

    deps_of: dict = {}
    has_edges = False
    for k, node in tasks.items():
        names = list(node.dependencies)
        if names:
            targets = [resolved.get(n, n) for n in names]
            for t in targets:
                if t not in graph:
                    p.external.add(t)
            has_edges = has_edges or any(t in tasks for t in targets)
            deps_of[k] = (names, targets)
        else:
            deps_of[k] = ((), ())
    keys = list(tasks)
    if has_edges:
        keys = _ordered(graph, tasks, deps_of)
    p.tasks = [(k, tasks[k], deps_of[k][0], [wire_of(t) for t in deps_of[k][1]]) for k in keys]
    p.wire = wire
    return p


def _ordered(graph: dict, tasks: dict, deps_of: dict) -> list:
    """Task keys in ``dask.order``'s order, dependencies always first."""
    try:
        from dask.order import order

        prio = order(graph)
    except Exception as exc:  # e.g. references to keys held as Futures
        logger.debug("dask.order failed (%s); submitting in topological order", exc)
        prio = {}
    seq = {k: i for i, k in enumerate(tasks)}
    rank = {k: (prio.get(k, 0), seq[k]) for k in tasks}
    keys = sorted(tasks, key=rank.__getitem__)
    done = set()
    for k in keys:
        if any(t in tasks and t not in done for t in deps_of[k][1]):
            break
        done.add(k)
    else:
        return keys
    # not a topological order: Kahn's algorithm, most urgent ready task first
    waiting = {}
    dependents: dict = {}
    heap = []
    for k in tasks:
        n = 0
        for t in set(deps_of[k][1]):
            if t in tasks:
                n += 1
                dependents.setdefault(t, []).append(k)
        waiting[k] = n
        if not n:
            heap.append((rank[k], k))
    heapq.heapify(heap)
    out = []
    while heap:
        _, k = heapq.heappop(heap)
        out.append(k)
        for d in dependents.get(k, ()):
            waiting[d] -= 1
            if not waiting[d]:
                heapq.heappush(heap, (rank[d], d))
    if len(out) != len(tasks):
        raise ValueError("the graph has a cycle; dask graphs must be acyclic")
    return out


# ---------------------------------------------------------------------------- graph out


def task_options(base: dict | None, annotations: dict, key) -> dict | None:
    """A task's options: the call's, overridden by its own dask annotations."""
    if not annotations:
        return base
    opts = None
    for name in ANNOTATIONS:
        per_key = annotations.get(name)
        if per_key and key in per_key:
            if opts is None:
                opts = dict(base or {})
            value = per_key[key]
            if name == "workers":
                value = [value] if isinstance(value, str) else list(value)
            elif name in ("priority", "retries"):
                value = int(value or 0)
            elif name == "resources":
                value = dict(value)
            else:
                value = bool(value)
            opts[name] = value
    return opts if opts is not None else base


def submit_graph(client, graph: dict, annotations: dict, held: dict, want: list,
                 opts: dict | None, place: bool = False):
    """Send a graph's tasks; ``{key: Future}`` for each key of ``want`` that is computed on
    the cluster, and ``{key: value}`` for those answered here (literals, unless ``place``:
    persist puts requested literals on the cluster too)."""
    core = client.core
    renamed = core.forget_renamed()
    p = plan(graph, held, renamed)
    p.external.update(held)
    batch = client.config.SUBMIT_BATCH
    inline_bytes = client.config.INLINE_BYTES
    resolved = p.resolved
    wanted = {}
    for k in want:
        t = resolved.get(k, k)
        if t not in graph and t not in p.external and t not in held:
            raise KeyError(f"{k!r} is not a key of the graph")
        wanted[k] = t
    # literals: answered here when only requested, placed on the cluster when tasks need them
    needed = set()
    for _, _, _, wires in p.tasks:
        needed.update(wires)
    if place:
        needed.update(to_wire(t) for t in wanted.values() if t in p.literals)
    local: dict = {}
    scatter_inline, scatter_large = [], []
    for k, value in p.literals.items():
        wk = to_wire(k)
        if wk in needed:
            header, bufs = serialize.dumps_value(value, inline_bytes)
            size = serialize.nbytes(header, bufs)
            if bufs or size >= inline_bytes:
                scatter_large.append((wk, header, bufs, size))
            else:
                scatter_inline.append([wk, header, size, []])
        local[k] = value
    internal = [item[0] for item in scatter_inline] + [item[0] for item in scatter_large]
    # The ops are built (and the nodes pickled) before taking the client's lock, which its
    # I/O loop needs for every op it receives.
    ops: list = []
    if scatter_inline:
        ops.append({"op": "scatter", "items": scatter_inline})
    if scatter_large:
        ops.append(Deferred(_ship_literals(client, scatter_large), FutureState("literals")))
    wire = p.wire
    for start in range(0, len(p.tasks), batch):
        entries = []
        items = []
        for i, (k, node, names, wires) in enumerate(p.tasks[start : start + batch]):
            wk = wire.get(k) or to_wire(k)
            entries.append((node, names, wires))
            items.append([wk, args_bytes(i), wires, task_options(opts, annotations, k)])
            internal.append(wk)
        fid, fbytes = pickle_chunk(entries, items, resolved, wire, client)
        if len(fbytes) > LARGE_CHUNK_BYTES:
            split(client, entries, items, inline_bytes, ops)
            continue
        for item in items:
            item.append(fid)
        ops.append({"op": "submit", "tasks": items, "functions": {fid: fbytes}})
    futures: dict = {}
    values: dict = {}
    revive = core.revive
    with core.lock:
        core.queue_releases()
        states = core.states
        for k, t in wanted.items():
            if t in local and to_wire(t) not in needed:
                values[k] = local[t]
                continue
            if t in held:
                futures[k] = Future(k, client, held[t]._state)
                continue
            wt = wire.get(t) or to_wire(t)
            st, new = revive(wt)
            if new and t in p.external:
                core.send({"op": "want", "keys": [wt]})
            # named by the requested key; an alias's Future follows its target's record
            futures[k] = Future(k, client, st)
            if k != t:
                renamed[to_wire(k)] = wt
        for op in ops:
            if type(op) is Deferred and op.state.key in states:
                op.state = states[op.state.key]  # a requested key shipped on its own
        core.outbox.extend(ops)
        submitted = _submitted_keys(ops)
        core.note_submitted(submitted)
        core.note_graph([f._wkey for f in futures.values()], submitted)
        # Keys this client holds Futures for (the requested ones, or earlier ones that the
        # graph shares) stay wanted; the rest were wanted only while the ops went out.
        held_keys = core.refcount
        internal = [k for k in internal if k not in held_keys]
        if internal:
            core.outbox.append({"op": "release", "keys": internal})
    core.send()
    return futures, values


async def _ship_literals(client, items: list) -> list[dict]:
    """Put large literal values of a graph on workers, then register them (in order)."""
    address = await client.values.pick_worker()
    if address is None:  # no worker yet: they ride with the scheduler
        return [{"op": "scatter", "items": [
            [wk, pickle.dumps(serialize.loads_value(h, b), protocol=5), size, []]
            for wk, h, b, size in items]}]
    await client.data.put(address, [(wk, h, b) for wk, h, b, _ in items])
    return [{"op": "scatter", "items": [[wk, None, size, [address]] for wk, _, _, size in items]}]


# ---------------------------------------------------------------------------- API


def _flat(keys) -> list:
    if isinstance(keys, list):
        out = []
        for k in keys:
            out.extend(_flat(k))
        return out
    return [keys]


def _pack(keys, values: dict):
    if isinstance(keys, list):
        return [_pack(k, values) for k in keys]
    return values[keys]


def base_options(workers=None, allow_other_workers=False, resources=None, retries=None,
                 priority=0, fifo_timeout=None, actors=None) -> dict | None:
    """Task options from the keywords dask.distributed's compute/persist/get take."""
    if actors:
        raise NotImplementedError("zfabric has no actors")
    if workers is not None and not isinstance(workers, str | list | tuple | set):
        raise TypeError("workers must be a worker address or name, or a list of them")
    # zfabric orders graphs strictly by submission (dask.distributed's fifo_timeout=0); the
    # keyword is taken for compatibility, but must still be a duration.
    if fifo_timeout is not None and not isinstance(fifo_timeout, str | int | float):
        raise TypeError(f"fifo_timeout must be a duration such as '60s', got {fifo_timeout!r}")
    return options(workers, resources, retries, priority, allow_other_workers, None)


def get(client, dsk, keys, *, workers=None, allow_other_workers=False, resources=None,
        retries=None, priority=0, fifo_timeout="60s", actors=None, sync=True,
        asynchronous=None, direct=None, **kwargs):
    """Run a dask graph on the cluster; the values of ``keys`` in the same nested lists."""
    _check_kwargs(kwargs)
    if asynchronous is not None and bool(asynchronous) != bool(client.asynchronous):
        raise ValueError(f"this client is {'a' if client.asynchronous else ''}synchronous;"
                         f" get(asynchronous={asynchronous}) cannot change that")
    opts = base_options(workers, allow_other_workers, resources, retries, priority,
                        fifo_timeout, actors)
    flat = _flat(keys)
    with _collector_paused():
        graph, annotations, held = materialize(dsk)
        futures, values = submit_graph(client, graph, annotations, held, flat, opts)
    if not sync:
        return _pack(keys, {**values, **futures})
    if client.asynchronous:
        return _gather_packed(client, keys, futures, values)
    try:
        got = client.gather(futures)
    finally:
        futures = None
    return _pack(keys, {**values, **got})


def _submitted_keys(ops: list) -> list[str]:
    keys: list[str] = []
    for op in ops:
        if type(op) is Deferred:
            keys.append(op.state.key)
        else:
            keys.extend(t[0] for t in op.get("tasks", ()))
    return keys


async def _gather_packed(client, keys, futures, values):
    got = await client.values.gather_async(futures)
    return _pack(keys, {**values, **got})


#: dask's keywords for its own schedulers that ``get`` takes and ignores.
IGNORED_KEYWORDS = frozenset({"optimize_graph", "traverse", "num_workers", "pool",
                              "chunksize"})


def _check_kwargs(kwargs: dict) -> None:
    # dask.compute passes its own keywords through to the scheduler: these are understood
    # (and harmless) there; anything else is a mistake the caller should hear about.
    for name in list(kwargs):
        if name in IGNORED_KEYWORDS:
            kwargs.pop(name)
    if kwargs:
        raise TypeError(f"unexpected keyword arguments for a zfabric dask scheduler: "
                        f"{sorted(kwargs)}")


def _variables(collections, traverse: bool):
    import dask

    singleton = not isinstance(collections, list | tuple | set | frozenset)
    items = [collections] if singleton else list(collections)
    if traverse:
        from collections.abc import Iterator

        items = [dask.delayed(a) if isinstance(a, list | set | tuple | dict | Iterator)
                 and not dask.is_dask_collection(a) and _has_dask(a) else a for a in items]
    return items, singleton


def _has_dask(obj) -> bool:
    import dask

    if dask.is_dask_collection(obj):
        return True
    if isinstance(obj, list | tuple | set | frozenset):
        return any(_has_dask(x) for x in obj)
    if isinstance(obj, dict):
        return any(_has_dask(x) for x in obj.values())
    return False


def compute(client, collections, *, sync=False, optimize_graph=True, workers=None,
            allow_other_workers=False, resources=None, retries=None, priority=0,
            fifo_timeout="60s", actors=None, traverse=True, **kwargs):
    """One Future per collection (the values with ``sync=True``), as dask.distributed's."""
    import dask
    from dask._expr import FinalizeCompute
    from dask.base import collections_to_expr

    opts = base_options(workers, allow_other_workers, resources, retries, priority,
                        fifo_timeout, actors)
    items, singleton = _variables(collections, traverse)
    variables = [a for a in items if dask.is_dask_collection(a)]
    by_name: dict = {}
    names: list = []
    if variables:
        with _collector_paused():
            expr = FinalizeCompute(collections_to_expr(variables, optimize_graph, **kwargs))
            expr = expr.optimize()
            names = _flat(expr.__dask_keys__())
            graph, annotations, held = materialize(expr)
            futures, values = submit_graph(client, graph, annotations, held, names, opts)
        by_name = {**values, **futures}
    out, i = [], 0
    for a in items:
        if dask.is_dask_collection(a):
            out.append(by_name[names[i]])
            i += 1
        else:
            out.append(a)
    if sync:
        result = client.gather(out)
        if client.asynchronous:
            return _first_async(result, singleton)
        return result[0] if singleton else result
    return out[0] if singleton else out


async def _first_async(awaitable, singleton):
    result = await awaitable
    return result[0] if singleton else result


def persist(client, collections, *, optimize_graph=True, workers=None,
            allow_other_workers=False, resources=None, retries=None, priority=0,
            fifo_timeout="60s", actors=None, **kwargs):
    """The same collections, whose graphs now point at Futures held on the cluster."""
    import dask
    from dask.base import collections_to_expr

    opts = base_options(workers, allow_other_workers, resources, retries, priority,
                        fifo_timeout, actors)
    singleton = not isinstance(collections, list | tuple | set | frozenset)
    colls = [collections] if singleton else list(collections)
    for c in colls:
        if not dask.is_dask_collection(c):
            raise TypeError(f"persist takes dask collections, got {type(c).__name__}")
    with _collector_paused():
        expr = collections_to_expr(colls, optimize_graph, **kwargs).optimize()
        keys = expr.__dask_keys__()
        if len(colls) == 1 and len(keys) != 1:
            keys = [keys]
        graph, annotations, held = materialize(expr)
        futures, values = submit_graph(client, graph, annotations, held, _flat(keys), opts,
                                       place=True)
    held = {**values, **futures}
    out = []
    for c, ks in zip(colls, keys, strict=True):
        rebuild, args = c.__dask_postpersist__()
        out.append(rebuild({k: held[k] for k in _flat(ks)}, *args))
    return out[0] if singleton else out


def normalize_collection(client, collection):
    """``collection`` with the parts this client holds Futures for taken from them, as
    dask.distributed's: when every output key is held, the collection rebuilt on those
    Futures; a ``Delayed`` whose graph has held keys, with those nodes replaced by their
    Futures; otherwise the collection itself (nothing held, or a graph zfabric cannot
    rewrite: computing it reuses held results by key anyway)."""
    import dask
    from dask.delayed import Delayed

    if not dask.is_dask_collection(collection):
        raise TypeError(f"normalize_collection takes a dask collection, got"
                        f" {type(collection).__name__}")
    core = client.core
    with core.lock:
        held = {k for k, st in core.states.items() if k in core.refcount
                and st.status in ("pending", "finished")}
    if not held:
        return collection
    out_keys = _flat(collection.__dask_keys__())
    if out_keys and all(to_wire(k) in held for k in out_keys):
        rebuild, args = collection.__dask_postpersist__()
        return rebuild({k: Future(k, client) for k in out_keys}, *args)
    if isinstance(collection, Delayed):
        graph = dict(collection.__dask_graph__())
        found = {k: Future(k, client) for k in graph if to_wire(k) in held}
        if found:
            return Delayed(collection.key, {**graph, **found})
    return collection
