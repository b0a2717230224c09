"""The Client's questions to the cluster and commands for it: who is there, who holds what,
``run`` on every worker, ``restart``, ``shutdown``, versions, the scheduler file.

:class:`ClusterRequests` holds these methods of :class:`~zfabric.client.Client`, which mixes it
in. Each is one request to the scheduler (``_request``), answered once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import defaultdict

from . import protocol, serialize
from .config import parse_timedelta
from .errors import CommTimeoutError, ZFabricError
from .futures import Future, futures_of
from .keys import from_wire, to_wire

logger = logging.getLogger("zfabric.client")

_RUN_ON_ERROR = ("raise", "return", "ignore")


def _versions() -> dict:
    return protocol.versions()


class ClusterRequests:
    """The Client's requests about the cluster (see the module docstring)."""

    # ------------------------------------------------------------------ who is there

    def scheduler_info(self, n_workers: int = 5, **kwargs):
        """The scheduler's address, id, totals and workers: ``{"workers": {address: {...}}}``.

        ``n_workers`` bounds how many workers are listed (dask's default 5; -1 for all); the
        totals (``n_workers``, ``total_threads``, ``total_memory``) count every worker.
        """
        _no_kwargs("scheduler_info", kwargs)
        if not isinstance(n_workers, int) or isinstance(n_workers, bool):
            raise TypeError(f"n_workers must be an int (-1 for all), got {n_workers!r}")
        return self.sync(self._scheduler_info, n_workers)

    async def _scheduler_info(self, n_workers: int = -1):
        info = await self._request("info")
        if n_workers >= 0 and len(info["workers"]) > n_workers:
            info["workers"] = dict(list(info["workers"].items())[:n_workers])
        return info

    def who_has(self, futures=None, **kwargs):
        """``{key: [worker addresses]}`` for these futures (all keys without)."""
        _no_kwargs("who_has", kwargs)
        if futures is not None:
            futures = [futures] if isinstance(futures, Future) else futures_of(futures)
        return self.sync(self._who_has, futures)

    async def _who_has(self, futures):
        keys = [f._wkey for f in futures] if futures is not None else None
        result = await self._request("who-has", keys=keys)
        return {from_wire(k): v for k, v in result.items()}

    def has_what(self, workers=None, **kwargs):
        """``{worker address: [keys it holds]}``, for these workers (names or addresses)."""
        _no_kwargs("has_what", kwargs)
        return self.sync(self._by_worker, "has-what", workers)

    def processing(self, workers=None):
        """``{worker address: [keys it runs or will run]}``."""
        return self.sync(self._by_worker, "processing", workers)

    def nthreads(self, workers=None, **kwargs):
        """``{worker address: threads}``."""
        _no_kwargs("nthreads", kwargs)
        return self.sync(self._nthreads, workers)

    ncores = nthreads

    async def _nthreads(self, workers=None):
        info = await self._request("info")
        wanted = _selector(workers, info)
        return {a: w["nthreads"] for a, w in info["workers"].items() if wanted(a)}

    async def _by_worker(self, kind: str, workers):
        result = await self._request(kind)
        result = {a: [from_wire(k) for k in ks] for a, ks in result.items()}
        if workers is None:
            return result
        wanted = _selector(workers, await self._request("info"))
        return {a: v for a, v in result.items() if wanted(a)}

    def nbytes(self, keys=None, summary: bool = False, **kwargs):
        """Bytes of each result held on the cluster (``summary``: summed by key prefix)."""
        _no_kwargs("nbytes", kwargs)
        if keys is not None:
            keys = [f._wkey for f in futures_of(keys)] or [to_wire(k) for k in keys]
        return self.sync(self._nbytes, keys, summary)

    async def _nbytes(self, keys, summary):
        items = [(from_wire(k), n) for k, n in await self._request("nbytes", keys=keys)]
        if not summary:
            return dict(items)
        out: dict[str, int] = defaultdict(int)
        for key, n in items:
            out[_prefix(key)] += n
        return dict(out)

    # ------------------------------------------------------------------ run

    def run(self, function, *args, workers=None, wait: bool = True, nanny: bool = False,
            on_error: str = "raise", **kwargs):
        """Run ``function(*args, **kwargs)`` once on every worker (outside the task slots):
        ``{address: result}``.

        A ``dask_worker`` parameter receives the Worker. ``on_error``: "raise" the first
        error, "return" errors as results, or "ignore" (leave those workers out).
        ``wait=False`` starts it and returns None.
        """
        if on_error not in _RUN_ON_ERROR:
            raise ValueError(f"on_error must be one of {', '.join(_RUN_ON_ERROR)}, not"
                             f" {on_error!r}")
        if nanny:
            raise ValueError("run(nanny=True): zfabric's Nannies run no user code; run it on"
                             " the workers (nanny=False)")
        return self.sync(self._run, function, args, kwargs, workers, wait, on_error)

    async def _run(self, function, args, kwargs, workers, wait=True, on_error="raise"):
        payload, _, _ = serialize.dumps_task(function, args, kwargs)
        if workers is not None:
            info = await self._request("info")
            wanted = _selector(workers, info)
            workers = [a for a in info["workers"] if wanted(a)]
        request = self._request("run", payload=payload, workers=workers)
        if not wait:
            task = asyncio.ensure_future(request)
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            return None
        results = await request
        out = {}
        for address, (value, error) in results.items():
            if error is not None:
                exc = serialize.rebuild_exception(*error)
                if on_error == "raise":
                    raise exc
                if on_error == "return":
                    out[address] = exc
                continue
            out[address] = serialize.loads_value(value)
        return out

    def run_on_scheduler(self, function, *args, **kwargs):
        """Not in zfabric: its scheduler never runs (or unpickles) user code."""
        raise ZFabricError("run_on_scheduler: zfabric's scheduler never runs user code (it never"
                           " unpickles anything); use client.run() to run on the workers, or"
                           " client.scheduler_info() to inspect the scheduler")

    def register_scheduler_plugin(self, plugin, name=None, idempotent=None):
        """Not in zfabric: its scheduler never runs user code."""
        raise ZFabricError("scheduler plugins: zfabric's scheduler never runs user code (it"
                           " never unpickles anything); use worker plugins or client.run()")

    # ------------------------------------------------------------------ restart, shutdown

    def restart(self, timeout=60, wait_for_workers: bool = True, **kwargs):
        """Restart every worker process (through its Nanny). Every future is cancelled, as in
        dask.distributed. With ``wait_for_workers`` (the default), returns once as many
        workers as before are back."""
        _no_kwargs("restart", kwargs)
        return self.sync(self._restart, parse_timedelta(timeout), wait_for_workers)

    async def _restart(self, timeout=60, wait_for_workers=True):
        timeout = 60.0 if timeout is None else timeout
        with self._lock:
            for st in list(self._states.values()):
                st.cancel("the cluster was restarted", force=True)
        info = await self._request("info")
        n = len(info["workers"])
        try:
            await asyncio.wait_for(self._request("restart"), timeout)
        except TimeoutError:
            raise CommTimeoutError(f"the workers' nannies did not restart them within"
                                   f" {timeout:g} s") from None
        if not wait_for_workers:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = await self._request("info")
            if len(info["workers"]) >= n:
                return
            await asyncio.sleep(0.05)
        raise CommTimeoutError(f"workers did not come back within {timeout:g} s of a restart")

    def shutdown(self):
        """Close the scheduler, its workers and this client (and the LocalCluster)."""
        if self.asynchronous:
            return self._shutdown()
        self.sync(self._shutdown)
        self.close()  # and the client's loop thread
        return None

    async def _shutdown(self):
        try:
            await asyncio.wait_for(self._request("shutdown"), 5)
        except Exception:
            pass
        await self._close()
        cluster = self.cluster
        if cluster is not None and not self._own_cluster and \
                getattr(cluster, "status", "") != "closed":
            # As dask.distributed: the cluster closes too, and says so. A blocking cluster
            # runs on a loop thread of its own: close it through its public close().
            try:
                if getattr(cluster, "asynchronous", False):
                    await cluster.close()
                else:
                    await asyncio.to_thread(cluster.close)
            except Exception:
                logger.warning("closing %r after shutdown failed", cluster, exc_info=True)

    def wait_for_workers(self, n_workers: int, timeout=None):
        """Block until at least ``n_workers`` workers are connected."""
        return self.sync(self._wait_for_workers, n_workers, parse_timedelta(timeout))

    async def _wait_for_workers(self, n_workers, timeout=None):
        deadline = time.monotonic() + (timeout or 1e9)
        while True:
            info = await self._request("info")
            if len(info["workers"]) >= n_workers:
                return
            if time.monotonic() > deadline:
                raise CommTimeoutError(f"only {len(info['workers'])} of {n_workers} workers"
                                       f" arrived within {timeout} s")
            await asyncio.sleep(0.05)

    # ------------------------------------------------------------------ versions, files

    def get_versions(self, check: bool = False, packages=None):
        """Versions of Python and zfabric's libraries on the client, scheduler and workers.

        ``check=True`` raises if they differ; ``packages`` adds modules to compare.
        """
        return self.sync(self._get_versions, check, list(packages or ()))

    async def _get_versions(self, check, packages):
        def versions(names=packages):
            import importlib

            out = _versions()
            for name in names:
                try:
                    out[name] = getattr(importlib.import_module(name), "__version__", None)
                except ImportError:
                    out[name] = None
            return out

        info = await self._request("info")
        result = {
            "client": versions(),
            "scheduler": dict(info.get("versions") or {}),
            "workers": await self._run(versions, (), {}, None),
        }
        if check:
            mismatched = _mismatches(result)
            if mismatched:
                raise ZFabricError("version mismatch between client, scheduler and workers: "
                                   + "; ".join(mismatched)
                                   + ". Install the same versions everywhere")
        return result

    def write_scheduler_file(self, scheduler_file) -> None:
        """Write the scheduler's address to a JSON file that ``Client(scheduler_file=...)`` and
        ``zfabric worker --scheduler-file`` read."""
        path = os.fspath(scheduler_file)
        if os.path.exists(path):
            raise ValueError(f"{path} exists already; remove it or choose another path")
        with open(path, "w") as f:
            json.dump({"type": "Scheduler", "address": self.scheduler_address,
                       "id": self.epoch}, f)

    # ------------------------------------------------------------------ retry

    def retry(self, futures, asynchronous=None):
        """Run erred futures' tasks again (with the erred tasks they depend on)."""
        flat = futures_of(futures)

        def reset():
            for f in flat:
                f._state.retry()

        self._on_loop(reset)
        self._send({"op": "retry", "keys": [f._wkey for f in flat]})
        if self.asynchronous:
            return _done()
        return None


async def _done():
    return None


def _no_kwargs(method: str, kwargs: dict) -> None:
    if kwargs:
        raise TypeError(f"{method}() got unexpected keyword arguments"
                        f" {', '.join(sorted(kwargs))}; zfabric does not support them")


def _selector(workers, info: dict):
    """A test for worker addresses named by ``workers`` (addresses, names or hosts)."""
    if workers is None:
        return lambda address: True
    names = {workers} if isinstance(workers, str | int) else set(workers)
    names = {str(n) for n in names}
    chosen = {a for a, w in info["workers"].items()
              if a in names or str(w.get("name")) in names or w.get("host") in names}
    return chosen.__contains__


def _prefix(key) -> str:
    if isinstance(key, tuple | list):
        key = key[0] if key else ""
    key = str(key)
    head, _, tail = key.rpartition("-")
    return head if head and len(tail) >= 8 else key


def _mismatches(result: dict) -> list[str]:
    out = []
    client = result["client"]
    peers = [("scheduler", result["scheduler"])]
    peers += [(f"worker {a}", v) for a, v in result["workers"].items()]
    for name, value in client.items():
        for who, theirs in peers:
            if name in theirs and theirs[name] != value:
                out.append(f"{name}: client {value}, {who} {theirs[name]}")
    return out
