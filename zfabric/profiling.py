"""Where the cluster's time goes, as dask.distributed's ``Client.profile`` and
``Client.call_stack`` show it.

:class:`Profiling` is the part of a :class:`~zfabric.client.Client` with these methods.
``profile`` reads what the workers' statistical profilers sampled
(:mod:`zfabric.worker.profiler`), merged per task group by the scheduler, and returns it in
dask's tree shape; ``call_stack`` asks each worker for the stacks of the tasks it runs now.
"""

from __future__ import annotations

import sys
import traceback
from typing import Any

from .client_core import ClientCore
from .futures import Future, futures_of
from .keys import from_wire, group_label, to_wire

__all__ = ["Profiling", "as_dask_profile"]


def _node(label: str, count: int, children: dict) -> dict:
    name, _, rest = label.partition(";")
    filename, _, line = rest.rpartition(";")
    return {"count": count, "identifier": label, "children": children,
            "description": {"filename": filename, "name": name,
                            "line_number": int(line) if line.isdigit() else 0, "line": ""}}


def _tree(wire: list) -> dict:
    label, count, children = wire
    return _node(label, count, {c[0]: _tree(c) for c in children})


def as_dask_profile(groups: dict) -> dict:
    """``{group: [label, count, [children]]}`` (the scheduler's merged profiles) as one tree in
    dask.distributed's shape: ``{"count", "identifier", "description", "children"}``, one child
    per task group under the root."""
    children = {}
    for group, wire in groups.items():
        node = _tree(wire)
        node["identifier"] = group_label(group)
        node["description"] = {"filename": "", "name": group_label(group), "line_number": 0,
                               "line": ""}
        children[node["identifier"]] = node
    return {"count": sum(c["count"] for c in children.values()), "identifier": "root",
            "description": {"filename": "", "name": "root", "line_number": 0, "line": ""},
            "children": children}


def _running_stacks(keys=None, dask_worker=None) -> dict:
    """On a worker: ``{key: [stack lines]}`` of the tasks its threads run now."""
    core = getattr(dask_worker, "_core", None)
    executor = getattr(core, "executor", None)
    running = dict(getattr(executor, "running", None) or {})
    frames = sys._current_frames()
    out = {}
    for ident, (key, _start) in running.items():
        if keys is not None and key not in keys:
            continue
        frame = frames.get(ident)
        if frame is not None:
            out[key] = traceback.format_stack(frame)
    return out


class Profiling:
    """The Client's profiling methods (see the module docstring), for ``client``."""

    def __init__(self, client: Any, core: ClientCore, run):
        self.client = client
        self.sync = client.sync
        self.request = core.request
        self.run = run

    def profile(self, key=None, start=None, stop=None, workers=None, merge_workers=True,
                plot=False, filename=None, server=False, scheduler=False):
        """The sampled profile of the tasks of group ``key`` (a key prefix such as ``"inc"``;
        None: every group) as dask's tree. zfabric's scheduler keeps one merged profile per
        group since it started: ``start``/``stop``, ``workers`` and ``merge_workers=False``
        raise, as do ``server``/``scheduler`` (only task threads are sampled)."""
        for name, value, default in (("start", start, None), ("stop", stop, None),
                                     ("workers", workers, None),
                                     ("merge_workers", merge_workers, True),
                                     ("server", server, False), ("scheduler", scheduler, False)):
            if value != default:
                raise ValueError(f"profile({name}=...): zfabric's scheduler keeps one profile"
                                 " per task group, merged over every worker since it started,"
                                 " of the threads that run tasks; leave it out")
        if plot or filename is not None:
            raise ImportError("profile(plot=/filename=) draws with bokeh, which zfabric does"
                              " not use: see the profile on the dashboard's Profile page")
        if key is not None and not isinstance(key, str):
            raise TypeError(f"key is a task prefix (a string such as 'inc'), got {key!r}")
        return self.sync(self._profile, key)

    async def _profile(self, key):
        groups = await self.request("profile", group=key)
        return as_dask_profile(groups)

    def call_stack(self, futures=None, keys=None):
        """``{worker: {key: [stack lines]}}`` of the tasks that run now (only those of
        ``futures`` or ``keys`` when given)."""
        wanted = None
        if futures is not None:
            flat = [futures] if isinstance(futures, Future) else futures_of(futures)
            wanted = [f._wkey for f in flat]
        if keys is not None:
            wanted = (wanted or []) + [to_wire(k) for k in keys]
        return self.sync(self._call_stack, wanted)

    async def _call_stack(self, wanted):
        got = await self.run(_running_stacks, (wanted,), {}, None)
        return {w: {from_wire(k): v for k, v in stacks.items()}
                for w, stacks in got.items() if stacks}
