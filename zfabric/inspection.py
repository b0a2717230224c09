"""A whole-cluster look for bug reports and sizing: ``dump_cluster_state`` and
``benchmark_hardware``.

:class:`Inspection` is the part of a :class:`~zfabric.client.Client` with these methods.
The dump gathers what the scheduler and the workers can tell (``scheduler_info``, the
dashboard's snapshot, the task stream, events, logs, versions) into one file; the benchmark
times memory and disk on each worker and the network between client and workers.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import tempfile
import time
from typing import Any

import msgpack

from .client_core import ClientCore
from .logs import recent

__all__ = ["Inspection"]

#: How long ``dump_cluster_state`` waits for each part before writing why it is missing.
DUMP_PART_TIMEOUT_S = 10.0
#: The sizes ``benchmark_hardware`` times, in bytes, with dask.distributed's labels.
SIZES = {"1 kiB": 2**10, "100 kiB": 100 * 2**10, "1 MiB": 2**20, "10 MiB": 10 * 2**20,
         "100 MiB": 100 * 2**20}


def _worker_benchmark(sizes: dict, budget_s: float = 1.0) -> dict:
    """Bytes per second of memory copies and of disk writes and reads, per size."""
    out: dict = {"memory": {}, "disk": {}}
    for label, size in sizes.items():
        data = os.urandom(min(size, 2**20)) * max(1, size // 2**20)
        n, start = 0, time.perf_counter()
        while n == 0 or time.perf_counter() - start < budget_s / len(sizes) / 2:
            bytes(memoryview(data))
            n += 1
        out["memory"][label] = n * len(data) / (time.perf_counter() - start)
        with tempfile.TemporaryDirectory(prefix="zfabric-bench-") as d:
            path = os.path.join(d, "data")
            n, start = 0, time.perf_counter()
            while n == 0 or time.perf_counter() - start < budget_s / len(sizes) / 2:
                with open(path, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                with open(path, "rb") as f:
                    f.read()
                n += 1
            out["disk"][label] = 2 * n * len(data) / (time.perf_counter() - start)
    return out


class Inspection:
    """The Client's whole-cluster look (see the module docstring), for ``client``."""

    def __init__(self, client: Any, core: ClientCore, run):
        self.client = client
        self.sync = client.sync
        self.request = core.request
        self.run = run

    def dump_cluster_state(self, filename: str = "cluster_dump", write_from_scheduler=None,
                           exclude=(), format: str = "msgpack", **storage_options) -> str:
        """Write what the scheduler and workers can tell into ``filename`` plus
        ``.msgpack.gz`` (or ``.yaml``); returns the path. ``exclude`` leaves out top-level
        parts (``"workers"``, ``"scheduler"``, ``"versions"``)."""
        if write_from_scheduler:
            raise ValueError("dump_cluster_state(write_from_scheduler=True): zfabric's"
                             " scheduler writes no files for clients; the client writes it")
        if storage_options:
            raise ValueError(f"dump_cluster_state: storage options {sorted(storage_options)}"
                             " are not supported; give a local filename")
        if format not in ("msgpack", "yaml"):
            raise ValueError(f"format must be 'msgpack' or 'yaml', not {format!r}")
        state = self.sync(self._state, set(exclude))
        path = f"{os.fspath(filename)}.{'msgpack.gz' if format == 'msgpack' else 'yaml'}"
        if format == "msgpack":
            with gzip.open(path, "wb") as f:
                f.write(msgpack.packb(state, default=repr))
        else:
            try:
                import yaml  # an optional dependency
            except ImportError:
                raise ImportError("dump_cluster_state(format='yaml') needs PyYAML"
                                  " (pip install pyyaml); or use format='msgpack'") from None
            with open(path, "w") as f:
                yaml.safe_dump(state, f)
        return path

    async def _state(self, exclude: set) -> dict:
        state: dict = {}
        ask = self._part
        if "scheduler" not in exclude:
            state["scheduler"] = {
                "info": await ask(self.request("info")),
                "snapshot": await ask(self.request("snapshot")),
                "task_stream": await ask(self._records()),
                "events": await ask(self.request("events", topic=None)),
                "logs": await ask(self._logs()),
                "task_states": await ask(self.request("task-states")),
            }
        if "workers" not in exclude:
            logs = await ask(self.run(recent, (None,), {}, None, True, "return"))
            state["workers"] = ({a: {"logs": [list(r) for r in v] if isinstance(v, list)
                                     else repr(v)} for a, v in logs.items()}
                                if isinstance(logs, dict) else logs)
        if "versions" not in exclude:
            state["versions"] = await ask(self.client._admin._get_versions(False, []))
        return state

    @staticmethod
    async def _part(awaitable):
        """One part of the dump, or the text of why it is missing: a dump is most wanted when
        something is wrong, so no part may hold up (or fail) the others."""
        try:
            return await asyncio.wait_for(awaitable, DUMP_PART_TIMEOUT_S)
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}

    async def _records(self) -> list:
        return (await self.request("task-stream"))["records"]

    async def _logs(self) -> list:
        return [list(r) for r in await self.request("logs", n=None)]

    def benchmark_hardware(self) -> dict:
        """Bytes per second, per size, as dask.distributed's: ``{"memory": {...}, "disk":
        {...}, "network": {...}}``; memory and disk are the workers' averages, network the
        client's transfers to and from the workers."""
        return self.sync(self._benchmark)

    async def _benchmark(self) -> dict:
        per_worker = await self.run(_worker_benchmark, (SIZES,), {}, None)
        out: dict = {"memory": {}, "disk": {}, "network": {}}
        for kind in ("memory", "disk"):
            for label in SIZES:
                values = [r[kind][label] for r in per_worker.values()]
                out[kind][label] = sum(values) / len(values) if values else 0.0
        values = self.client.values
        for label, size in SIZES.items():
            data = os.urandom(size)
            start = time.perf_counter()
            [future] = await values.scatter_async([data], hash=False)
            await values.result(future)
            out["network"][label] = 2 * size / (time.perf_counter() - start)
            future.release()
        return out
