"""The Client's questions to the cluster and commands for it: who is there, who holds what,
``run`` on every worker, ``restart``, versions, the scheduler file; ``replicate``,
``retire_workers``, ``restart_workers`` and ``get_executor``.

:class:`ClusterAdmin` is the part of a :class:`~zfabric.client.Client` that holds these
methods. Each is one or a few requests to the scheduler (``ClientCore.request``), answered
once; the work happens in the scheduler (:mod:`zfabric.scheduler.retire` for retiring) and
here the answers become dask.distributed's return values and errors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import defaultdict
from typing import Any

from . import protocol, serialize
from .client_core import ClientCore
from .config import parse_timedelta
from .errors import CommTimeoutError, ZFabricError
from .executor import ClientExecutor
from .futures import Future, futures_of, until_done
from .keys import from_wire, to_wire

logger = logging.getLogger("zfabric.client")

_RUN_ON_ERROR = ("raise", "return", "ignore")


#: What registering a scheduler plugin raises: what to use instead, and why.
SCHEDULER_PLUGINS = (
    "scheduler plugins: zfabric's scheduler never runs user code (it never unpickles"
    " anything). To follow task transitions, subclass zfabric.TransitionListener (its"
    " transition(key, start, finish) runs in this process); for events of your own, use"
    " client.log_event() and client.subscribe_topic(); for code on the workers, a"
    " WorkerPlugin (client.register_plugin) or client.run()")


def _versions() -> dict:
    return protocol.versions()


#: How long ``retire_workers`` waits for retired workers to be gone after they were told.
RETIRE_GONE_TIMEOUT_S = 30.0

def _names(workers) -> list[str] | None:
    if workers is None:
        return None
    if isinstance(workers, str):
        return [workers]
    return [str(w) for w in workers]


class ClusterAdmin:
    """The Client's requests about the cluster and commands for it (see the module
    docstring); ``client`` is the Client they run for (its ``sync`` and ``scheduler_address``)."""

    def __init__(self, client: Any, core: ClientCore):
        self.client = client
        self.core = core
        self.sync = client.sync
        self.request = core.request

    # ------------------------------------------------------------------ who is there

    def scheduler_info(self, n_workers: int = -1, **kwargs):
        """The scheduler's address, id, totals and workers: ``{"workers": {address: {...}}}``.

        ``n_workers`` bounds how many workers are listed (-1, the default as in dask 2026:
        all); the totals (``n_workers``, ``total_threads``, ``total_memory``) count every
        worker. Each worker's ``services`` names the HTTP services it serves (none: zfabric's
        dashboard is the scheduler's).
        """
        _no_kwargs("scheduler_info", kwargs)
        if not isinstance(n_workers, int) or isinstance(n_workers, bool):
            raise TypeError(f"n_workers must be an int (-1 for all), got {n_workers!r}")
        return self.sync(self._scheduler_info, n_workers)

    async def _scheduler_info(self, n_workers: int = -1):
        info = await self.request("info")
        if n_workers >= 0 and len(info["workers"]) > n_workers:
            info["workers"] = dict(list(info["workers"].items())[:n_workers])
        for w in info["workers"].values():
            w.setdefault("services", {})
        return info

    def who_has(self, futures=None, **kwargs):
        """``{key: [worker addresses]}`` for these futures (all keys without)."""
        _no_kwargs("who_has", kwargs)
        if futures is not None:
            futures = [futures] if isinstance(futures, Future) else futures_of(futures)
        return self.sync(self._who_has, futures)

    async def _who_has(self, futures):
        keys = [f._wkey for f in futures] if futures is not None else None
        result = await self.request("who-has", keys=keys)
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
        info = await self.request("info")
        wanted = _selector(workers, info)
        return {a: w["nthreads"] for a, w in info["workers"].items() if wanted(a)}

    async def _by_worker(self, kind: str, workers):
        result = await self.request(kind)
        result = {a: [from_wire(k) for k in ks] for a, ks in result.items()}
        if workers is None:
            return result
        wanted = _selector(workers, await self.request("info"))
        return {a: v for a, v in result.items() if wanted(a)}

    def nbytes(self, keys=None, summary: bool = False, **kwargs):
        """Bytes of each result held on the cluster (``summary``: summed by key prefix)."""
        _no_kwargs("nbytes", kwargs)
        if keys is not None:
            keys = [f._wkey for f in futures_of(keys)] or [to_wire(k) for k in keys]
        return self.sync(self._nbytes, keys, summary)

    async def _nbytes(self, keys, summary):
        items = [(from_wire(k), n) for k, n in await self.request("nbytes", keys=keys)]
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
        return self.sync(self.run_on_workers, function, args, kwargs, workers, wait, on_error)

    async def run_on_workers(self, function, args, kwargs, workers, wait=True,
                             on_error="raise"):
        """``run`` on the loop: ``{address: result}`` (None without ``wait``)."""
        payload, _, _ = serialize.dumps_task(function, args, kwargs)
        if workers is not None:
            info = await self.request("info")
            wanted = _selector(workers, info)
            workers = [a for a in info["workers"] if wanted(a)]
        request = self.request("run", payload=payload, workers=workers)
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
        """Not in zfabric: its scheduler never runs user code (see the error)."""
        raise ZFabricError(SCHEDULER_PLUGINS)

    def unregister_scheduler_plugin(self, name):
        """Not in zfabric: its scheduler never runs user code (see the error)."""
        raise ZFabricError(SCHEDULER_PLUGINS)

    # ------------------------------------------------------------------ restart, shutdown

    def restart(self, timeout=60, wait_for_workers: bool = True, **kwargs):
        """Restart every worker process (through its Nanny). Every future is cancelled, as in
        dask.distributed. With ``wait_for_workers`` (the default), returns once as many
        workers as before are back."""
        _no_kwargs("restart", kwargs)
        return self.sync(self._restart, parse_timedelta(timeout), wait_for_workers)

    async def _restart(self, timeout=60, wait_for_workers=True):
        timeout = 60.0 if timeout is None else timeout
        self.core.cancel_all("the cluster was restarted")
        info = await self.request("info")
        n = len(info["workers"])
        try:
            await asyncio.wait_for(self.request("restart"), timeout)
        except TimeoutError:
            raise CommTimeoutError(f"the workers' nannies did not restart them within"
                                   f" {timeout:g} s") from None
        if not wait_for_workers:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = await self.request("info")
            if len(info["workers"]) >= n:
                return
            await asyncio.sleep(0.05)
        raise CommTimeoutError(f"workers did not come back within {timeout:g} s of a restart")

    def wait_for_workers(self, n_workers: int, timeout=None):
        """Block until at least ``n_workers`` workers are connected."""
        return self.sync(self._wait_for_workers, n_workers, parse_timedelta(timeout))

    async def _wait_for_workers(self, n_workers, timeout=None):
        deadline = time.monotonic() + (timeout or 1e9)
        while True:
            info = await self.request("info")
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

        info = await self.request("info")
        result = {
            "client": versions(),
            "scheduler": dict(info.get("versions") or {}),
            "workers": await self.run_on_workers(versions, (), {}, None),
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
            json.dump({"type": "Scheduler", "address": self.client.scheduler_address,
                       "id": self.core.epoch}, f)

    # ------------------------------------------------------------------ retry

    def retry(self, futures, asynchronous=None):
        """Run erred futures' tasks again (with the erred tasks they depend on)."""
        flat = futures_of(futures)

        def reset():
            for f in flat:
                f._state.retry()

        self.core.on_loop(reset)
        self.core.send({"op": "retry", "keys": [f._wkey for f in flat]})
        if self.client.asynchronous:
            return _done()
        return None

    def get_executor(self, **submit_options):
        """A ``concurrent.futures.Executor`` running calls on this cluster; the options
        (``workers=``, ``resources=``, ``retries=``, ``priority=``, ``pure=``...) apply to every
        call. See :mod:`zfabric.executor`."""
        return ClientExecutor(self.client, **submit_options)

    # ------------------------------------------------------------------ replicate

    def replicate(self, futures, n: int | None = None, workers=None):
        """Keep ``n`` copies (default: one on every worker) of these futures' values.

        The copies are the workers' own, recorded by the scheduler: ``who_has`` lists them and
        ``retire_workers`` and worker losses can rely on them. Copies beyond ``n`` are dropped.
        ``workers`` limits the workers that take part (addresses or names). Waits for the
        futures first; returns once the copies are made.
        """
        return self.sync(self._replicate, futures, n, workers)

    async def _replicate(self, futures, n, workers):
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ValueError(f"n must be a positive integer or None, got {n!r}")
        flat = [futures] if isinstance(futures, Future) else futures_of(futures)
        pending = [f._state for f in flat if not f._state.done()]
        if pending:
            await until_done(pending)
        keys = [f.key for f in flat if f._state.status == "finished"]
        if not keys:
            return None
        result = await self.request("replicate", keys=keys, n=n, workers=_names(workers))
        if result["failed"]:
            raise ZFabricError(f"could not copy {result['failed']} to the chosen workers (their"
                               " holders did not answer); try again")
        return None

    # ------------------------------------------------------------------ rebalance

    def rebalance(self, futures=None, workers=None, **kwargs):
        """Even out the bytes held by workers (``workers``: only among these) by moving
        results (``futures``: only these) from the fullest workers to the emptiest, as
        dask.distributed's. A move is a copy to the new holder, then the drop of the old
        copy (see :meth:`replicate`); a value a task still reads where it is stays."""
        _no_kwargs("rebalance", kwargs)
        return self.sync(self._rebalance, futures, _names(workers))

    async def _rebalance(self, futures, workers):
        keys = None
        if futures is not None:
            flat = [futures] if isinstance(futures, Future) else futures_of(futures)
            pending = [f._state for f in flat if not f._state.done()]
            if pending:
                await until_done(pending)
            keys = [f._wkey for f in flat if f._state.status == "finished"]
        info = await self.request("info")
        wanted = _selector(workers, info) if workers else (lambda a: True)
        pool = [a for a in info["workers"] if wanted(a)]
        if len(pool) < 2:
            return None
        sizes = dict(await self.request("nbytes", keys=None))
        holders = await self.request("who-has", keys=None)
        movable = set(keys) if keys is not None else set(holders)
        for (sender, recipient), moved in plan_moves(pool, holders, sizes, movable).items():
            await self.request("replicate", keys=moved, n=1, workers=[recipient])
            await self.request("replicate", keys=moved, n=1, workers=[sender, recipient])
        return None

    # ------------------------------------------------------------------ retire

    def retire_workers(self, workers=None, close_workers: bool = True, *, n: int | None = None,
                       names=None):
        """Move the data off these workers (addresses or names), then close them.

        Or pass ``n`` to let the scheduler pick the ``n`` least busy workers. Tasks they were
        given but had not started run elsewhere; those running finish first. Returns
        ``{address: worker info}`` of the workers retired, once they are gone. A worker whose
        data no other worker could take is kept (and a warning logged).
        """
        if not close_workers:
            raise ValueError("zfabric always closes the workers it retires"
                             " (close_workers=False is not supported)")
        return self.sync(self._retire_workers, _names(workers if workers is not None
                                                      else names), n)

    async def _retire_workers(self, workers, n=None):
        if workers is None and n is None:
            raise ValueError("retire_workers needs workers= (addresses or names) or n=")
        if workers is not None and not workers:
            return {}
        result = await self.request("retire-workers", workers=workers, n=n)
        for address, why in result["kept"].items():
            logger.warning("worker %s was not retired: %s", address, why)
        retired = result["retired"]
        deadline = time.monotonic() + RETIRE_GONE_TIMEOUT_S
        while retired:
            info = await self.request("info")
            if not set(retired) & set(info["workers"]):
                break
            if time.monotonic() > deadline:
                raise CommTimeoutError(f"retired workers {sorted(retired)} did not leave within"
                                       f" {RETIRE_GONE_TIMEOUT_S:g} s")
            await asyncio.sleep(0.02)
        return retired

    # ------------------------------------------------------------------ restart

    def restart_workers(self, workers, timeout=None, raise_for_error: bool = True):
        """Restart these worker processes (addresses or names) through their Nannies.

        Their data is lost and recomputed where still needed, as when a worker dies.
        Returns ``{worker: "OK"}`` (or, with ``raise_for_error=False``, the error text of those
        that did not come back within ``timeout``).
        """
        return self.sync(self._restart_workers, _names(workers), parse_timedelta(timeout),
                         raise_for_error)

    async def _restart_workers(self, workers, timeout, raise_for_error):
        if not workers:
            return {}
        info = await self.request("info")
        nanny_of = {}
        for address, w in info["workers"].items():
            for name in workers:
                if name in (address, w["name"]):
                    nanny_of[name] = w.get("nanny")
        try:
            request = self.request("restart-workers", workers=workers)
            result = await (asyncio.wait_for(request, timeout) if timeout else request)
        except TimeoutError:
            if raise_for_error:
                raise CommTimeoutError(f"workers {workers} did not restart within"
                                       f" {timeout:g} s") from None
            return {w: f"timed out after {timeout:g} s" for w in workers}
        out = {}
        for name in workers:
            _, error = result.get(nanny_of.get(name), [None, "its nanny did not answer"])
            out[name] = "OK" if error is None else str(error[2] if isinstance(error, list)
                                                       else error)
        bad = {w: e for w, e in out.items() if e != "OK"}
        if bad and raise_for_error:
            raise ZFabricError(f"workers did not restart: {bad}")
        return out


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


def plan_moves(pool: list[str], holders: dict[str, list[str]], sizes: dict[str, int],
               movable: set[str]) -> dict[tuple[str, str], list[str]]:
    """``{(sender, recipient): [keys]}`` that bring each worker of ``pool`` near the mean of
    bytes held: the largest movable values of the fullest worker go to the emptiest, while
    a move narrows the gap. Only values with one holder in the pool move."""
    load = dict.fromkeys(pool, 0)
    own: dict[str, list[str]] = {a: [] for a in pool}
    for key, where in holders.items():
        inside = [a for a in where if a in load]
        for a in inside:
            load[a] += sizes.get(key, 0)
        if len(inside) == 1 and key in movable and sizes.get(key, 0) > 0:
            own[inside[0]].append(key)
    for keys in own.values():
        keys.sort(key=lambda k: sizes[k])
    moves: dict[tuple[str, str], list[str]] = {}
    while True:
        sender = max(pool, key=lambda a: load[a])
        recipient = min(pool, key=lambda a: load[a])
        if not own[sender]:
            return moves
        key = own[sender][-1]
        size = sizes[key]
        if load[sender] - load[recipient] <= size:  # moving it would not narrow the gap
            own[sender].pop()
            if not any(own[a] and load[a] - load[recipient] > sizes[own[a][-1]] for a in pool):
                return moves
            continue
        own[sender].pop()
        load[sender] -= size
        load[recipient] += size
        moves.setdefault((sender, recipient), []).append(key)
