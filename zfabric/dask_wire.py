"""Dask task-spec nodes on the wire and on workers: the chunks a graph travels in.

The nodes of one submit op are pickled together, once, as one task "function"
(:class:`GraphChunk`) that the scheduler keeps once and each worker unpickles once; a task's
own payload only names its node (``chunk(i, values)``). A node that carries much data (a
``from_array`` or ``from_pandas`` block) travels on its own instead, straight to a worker, as a
submitted task's large arguments do (:func:`split`, :func:`run_node`). On a worker a node runs
through dask's own task-spec call, ``node(values)``, with its dependencies' values under the
keys the node names them by.

Importing this module does not import dask; unpickling a chunk does (on a worker, only when a
dask graph arrives).
"""

from __future__ import annotations

import pickle

from . import serialize
from .futures import FutureState, futures_of
from .keys import to_wire
from .session import Deferred

__all__ = ["LARGE_CHUNK_BYTES", "GraphChunk", "args_bytes", "pickle_chunk", "run_node", "split"]

#: A chunk of graph nodes pickled larger than this is split (see :func:`split`).
LARGE_CHUNK_BYTES = 1 << 20





def _current_values():
    return serialize.task_values()


class _AllValues:
    """Unpickles, inside a task's arguments on a worker, as the worker's values mapping."""

    __slots__ = ()

    def __reduce__(self):
        return (_current_values, ())


_ALL = _AllValues()
_ARGS: list[bytes] = []  # the arguments pickle of node i of a chunk, the same in every chunk


def args_bytes(i: int) -> bytes:
    while len(_ARGS) <= i:
        _ARGS.append(pickle.dumps(((len(_ARGS), _ALL), None), protocol=5))
    return _ARGS[i]


class GraphChunk:
    """Task-spec nodes of one submit op, with the wire keys of their dependencies.

    Travels as a task "function": the scheduler keeps one copy, each worker unpickles it once;
    ``chunk(i, values)`` runs node ``i``.
    """

    __slots__ = ("entries",)

    def __init__(self, entries: list):
        self.entries = entries  # [(node, [dependency key as the node names it], [wire keys])]

    def __call__(self, i: int, values):
        node, names, wires = self.entries[i]
        if names:
            return node({n: values[w] for n, w in zip(names, wires, strict=True)})
        return node({})

    def __reduce__(self):
        return (GraphChunk, (self.entries,))


def pickle_chunk(entries: list, items: list, resolved: dict, wire: dict,
                  client) -> tuple[str, bytes]:
    """``(function id, pickle)`` of the nodes of one submit op.

    A zfabric Future that dask left inside a task's arguments (``delayed(f)(future)``) turns
    that task into one whose argument is a reference to the future's key, through dask's own
    ``parse_input``; its key becomes a dependency of the task.
    """
    collected: list = []
    data = _dumps_collecting(GraphChunk(entries), collected)
    if collected:
        for i, (node, _, _) in enumerate(entries):
            futures: dict = {}
            new = _with_refs(node, futures)
            if new is not node:
                names = list(new.dependencies)
                targets = [resolved.get(n, n) for n in names]
                wires = [futures.get(t) or wire.get(t) or to_wire(t) for t in targets]
                entries[i] = (new, names, wires)
                items[i][2] = wires
        del collected[:]
        data = _dumps_collecting(GraphChunk(entries), collected)
        if collected:
            raise TypeError(
                "a zfabric Future is inside a dask task where dask cannot see it as a"
                " dependency; pass it as an argument of dask.delayed or as a graph value")
    return f"dask-{client.core.new_id()}", data


def _dumps_collecting(obj, collected: list) -> bytes:
    # plain pickle where it is safe; functions of a script's __main__ (and of modules beside
    # it) travel by value, through cloudpickle
    with serialize.collect_keys(collected):
        try:
            return serialize.dumps_object(obj, reset=collected.clear)
        except Exception as exc:
            raise serialize.SerializationError(
                f"cannot pickle a task of the graph: {type(exc).__name__}: {exc}") from exc


def _with_refs(node, futures: dict):
    """``node`` with Futures among its arguments turned into references (dask's way);
    ``futures`` gets the wire key of each such Future's key."""
    from dask._task_spec import Task, parse_input

    if type(node) is not Task:
        return node
    for f in futures_of((node.args, node.kwargs)):
        futures[f.key] = f._wkey
    args = tuple(parse_input(a) for a in node.args)
    kwargs = {k: parse_input(v) for k, v in node.kwargs.items()}
    new = Task(node.key, node.func, *args, _data_producer=node.data_producer, **kwargs)
    return new if new.dependencies != node.dependencies else node


def split(client, entries: list, items: list, inline_bytes: int, ops: list) -> None:
    """Add to ``ops`` a chunk whose nodes carry much data (``from_array``, ``from_pandas``): a node
    with large buffers goes straight to a worker, as a submitted task's large arguments do
    (the scheduler and the other workers never see it); the small ones travel in chunks."""
    run_fid, run_fbytes = serialize.dumps_function(run_node)
    group_entries: list = []
    group_items: list = []

    def flush():
        if not group_entries:
            return
        fid, fbytes = pickle_chunk(group_entries, group_items, {}, {}, client)
        for i, item in enumerate(group_items):
            item[1] = args_bytes(i)
            item.append(fid)
        ops.append({"op": "submit", "tasks": list(group_items), "functions": {fid: fbytes}})
        group_entries.clear()
        group_items.clear()

    for entry, item in zip(entries, items, strict=True):
        header, buffers = _dumps_node(entry, inline_bytes)
        if serialize.nbytes(header, buffers) < inline_bytes:
            group_entries.append(entry)
            group_items.append(item)
            continue
        flush()
        wk, _, wires, opts = item
        ops.append(Deferred(
            client.values.ship_args(wk, run_fid, run_fbytes, header, wires, buffers, opts),
            FutureState(wk)))
    flush()


def run_node(node, names, wires, values):
    """Run one task-spec node shipped on its own (see :func:`split`)."""
    if names:
        return node({n: values[w] for n, w in zip(names, wires, strict=True)})
    return node({})


def _dumps_node(entry, inline_bytes: int):
    """A node's call arguments, with its large buffers out of band."""
    import cloudpickle

    node, names, wires = entry
    buffers: list = []
    header = cloudpickle.dumps(((node, names, wires, _ALL), None), protocol=5,
                               buffer_callback=serialize.buffer_keeper(buffers, inline_bytes))
    return header, buffers
