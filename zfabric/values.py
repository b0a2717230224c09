"""Values to and from workers, for the Client: results, gather, scatter, large arguments.

Values never pass through the scheduler: small results arrive inline with its notices, large
ones are fetched from the workers that hold them, and large task arguments and scattered data
are put on a worker directly (through :class:`~zfabric.transfer.DataPool`). :class:`Values` is
the part of a :class:`~zfabric.client.Client` that does this, on the client's records
(:class:`~zfabric.client_core.ClientCore`).
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import time
import uuid
from typing import Any

from . import serialize
from .client_core import ClientCore
from .config import parse_timedelta
from .errors import SchedulerLost
from .futures import Future, FutureState, futures_of, until_done
from .keys import to_wire
from .security import SecurityError
from .session import Session

logger = logging.getLogger(__name__)


class Values:
    """The Client's methods that move values (see the module docstring): ``client`` is the
    Client whose Futures these are; the session's ``data`` its connections to the workers'
    data ports."""

    def __init__(self, client: Any, core: ClientCore, session: Session, timeout: float):
        self.client = client
        self.core = core
        self.config = core.config
        self.session = session
        self.timeout = timeout
        self._worker_list: list[str] = []
        self._workers_seen = 0.0
        self._next_worker = -1

    async def ship_args(self, key, fid, fbytes, abytes, deps, buffers, opts) -> list[dict]:
        """Put a task's large arguments on a worker, then submit the task referring to them.

        Runs inside the writer, so ops queued after this task wait for it (order is kept).
        The scheduler only sees a small payload; the task runs where its arguments are.
        """
        functions = {fid: fbytes}
        args_key = f"args-{key}"
        address = await self.pick_worker()
        if address is None:  # no worker yet: the scheduler carries it all, in band
            body = serialize.inband(abytes, buffers)
            return [{"op": "submit", "tasks": [[key, body, deps, opts, fid]],
                     "functions": functions}]
        await self.session.data.put(address, [(args_key, abytes, buffers)], raw=True)
        size = serialize.nbytes(abytes, buffers)
        return [
            {"op": "scatter", "items": [[args_key, None, size, [address]]]},
            {"op": "submit", "tasks": [[key, _pickle_ref(args_key), [*deps, args_key], opts, fid]],
             "functions": functions},
            {"op": "release", "keys": [args_key]},
        ]

    async def pick_worker(self) -> str | None:
        """A worker to hold large arguments: round robin over a recently fetched list."""
        now = time.monotonic()
        if now - self._workers_seen > 2.0 or not self._worker_list:
            rid, fut = self.core.new_request()
            # Sent directly: this runs inside the writer, which would not see the outbox.
            self.session.send_now([{"op": "request", "id": rid, "kind": "info", "args": {}}])
            reply = await asyncio.wait_for(fut, self.timeout)
            self._worker_list = list(reply.get("result", {}).get("workers", {}))
            self._workers_seen = now
        if not self._worker_list:
            return None
        self._next_worker = (self._next_worker + 1) % len(self._worker_list)
        return self._worker_list[self._next_worker]

    async def result(self, future: Future, timeout=None):
        """The value; ``timeout`` bounds the whole call, the fetch of a large value included."""
        timeout = parse_timedelta(timeout)
        if timeout is None:
            return await self._value_of(future)
        try:
            async with asyncio.timeout(timeout) as scope:
                return await self._value_of(future)
        except TimeoutError:
            if not scope.expired():
                raise  # the task's own TimeoutError (or TaskTimeout)
            raise TimeoutError(f"no result for {future.key!r} within {timeout:g} s (it is"
                               f" {future.status})") from None

    async def _value_of(self, future: Future):
        # Futures and Actors inside the value bind to this client, not the default one
        with self.client.as_current():
            return await self._value_of_current(future)

    async def _value_of_current(self, future: Future):
        st = future._state
        for _attempt in range(5):
            if st.status == "error":
                raise st.exception()
            if st.status == "cancelled":
                raise st.cancelled_error()
            if st.status != "finished":
                await st.wait()
                continue
            if st.value is not None:
                return serialize.loads_value(st.value)
            values = await self._fetch({future._wkey: st.who_has or []})
            if future._wkey in values:
                return _checked(values[future._wkey])
            await asyncio.sleep(0.05 * (_attempt + 1))
        raise SchedulerLost(f"could not get the value of {future.key!r} from any worker")

    async def _fetch(self, who_has: dict[str, list[str]]) -> dict:
        """Values of large results, fetched from the workers that hold them, batched."""
        by_worker: dict[str, list[str]] = {}
        for key, addresses in who_has.items():
            if addresses:
                by_worker.setdefault(addresses[0], []).append(key)
        out: dict = {}
        results = await asyncio.gather(
            *(self._get_from(addr, keys) for addr, keys in by_worker.items()),
            return_exceptions=True,
        )
        for (addr, _), res in zip(by_worker.items(), results, strict=True):
            if isinstance(res, SecurityError):
                raise res  # its keys refused us: asking again would not help
            if isinstance(res, BaseException):
                logger.info("fetch from %s failed: %s", addr, res)
                self.session.data.drop(addr)
            else:
                out.update(res)
        return out

    async def _get_from(self, address: str, keys: list[str]) -> dict:
        # Checked when the fetch really starts (gather starts it a loop turn later): a holder
        # found gone in between would otherwise be asked anyway and never answer.
        if address in self.session.gone_holders:
            raise ConnectionError(f"{address} no longer holds {keys[0]!r}")
        return await self.session.data.get(address, keys)

    async def exception(self, future: Future, timeout=None):
        st = future._state
        timeout = parse_timedelta(timeout)
        if not st.done():
            try:
                await asyncio.wait_for(st.wait(), timeout) if timeout else await st.wait()
            except TimeoutError:
                raise TimeoutError(f"{future.key!r} was not done within {timeout:g} s") from None
        if st.status == "error":
            return st.exception()
        if st.status == "cancelled":
            return st.cancelled_error()
        return None

    async def traceback(self, future: Future, timeout=None):
        exc = await self.exception(future, timeout)
        return exc.__traceback__ if exc is not None else None

    def gather(self, futures, errors: str = "raise", direct=None, asynchronous=None):
        """Results of futures, in the same nested structure (lists, tuples, dicts, sets); of a
        persisted dask collection, its computed value (from the results it holds)."""
        if errors not in ("raise", "skip"):
            raise ValueError(f"errors must be 'raise' or 'skip', not {errors!r}")
        _check_direct_and_mode(self.client, direct, asynchronous)
        if hasattr(futures, "__dask_graph__") and not isinstance(futures, type):
            return self.client.compute(futures, sync=True)
        return self.client.sync(self.gather_async, futures, errors=errors)

    async def gather_async(self, futures, errors: str = "raise"):
        """The values of ``futures`` in their nested structure (``gather`` on the loop)."""
        self.core.check_session()
        flat = futures_of(futures)
        pending = [f._state for f in flat if not f._state.done()]
        if pending:
            await until_done(pending)
        values: dict[str, object] = {}
        bad = set()
        need: dict[str, list[str]] = {}
        for f in flat:
            st = f._state
            if st.status == "finished":
                if st.value is not None:
                    values[f._wkey] = serialize.loads_value(st.value)
                else:
                    need[f._wkey] = st.who_has or []
            elif errors == "raise":
                if st.status == "cancelled":
                    raise st.cancelled_error()
                raise st.exception()
            else:
                bad.add(f._wkey)
        if need:
            values.update({k: _checked(v) for k, v in (await self._fetch(need)).items()})
            for f in flat:
                if f._wkey in need and f._wkey not in values:
                    values[f._wkey] = await self._value_of(f)
        return _rebuild(futures, values, bad)

    def scatter(self, data, workers=None, broadcast: bool = False, direct=None, hash=True,
                timeout=None, asynchronous=None):
        """Place local data on the cluster; Futures in the same shape (list, dict, or one).

        ``timeout`` bounds the whole placement (seconds or a string like "10s")."""
        _check_direct_and_mode(self.client, direct, asynchronous)
        timeout = parse_timedelta(timeout)
        return self.client.sync(_bounded, lambda: self.scatter_async(
            data, workers=workers, broadcast=broadcast, hash=hash), timeout, "scatter")

    async def scatter_async(self, data, workers=None, broadcast=False, hash=True):
        """Futures of ``data`` placed on the cluster (``scatter`` on the loop)."""
        core = self.core
        core.check_open()
        single = False
        if isinstance(data, dict):
            items = list(data.items())
        elif isinstance(data, list | tuple | set | frozenset):
            items = [(None, v) for v in data]
        else:
            items, single = [(None, data)], True
        large, inline, keys, user_keys = [], [], [], {}
        for k, v in items:
            header, bufs = serialize.dumps_value(v, self.config.INLINE_BYTES)
            size = serialize.nbytes(header, bufs)
            if k is None:
                digest = (serialize.task_hash(header + b"".join(bytes(b) for b in bufs))
                          if hash else uuid.uuid4().hex)
                k = f"{type(v).__name__}-{digest}"
            wk = to_wire(k)
            user_keys[wk] = k
            k = wk
            keys.append(k)
            if not bufs and size < self.config.INLINE_BYTES and not broadcast and not workers:
                inline.append([k, header, size, []])
            else:
                large.append((k, header, bufs, size))
        if large:
            info = await core.request("info")
            addresses = list(info["workers"])
            if workers:
                names = {workers} if isinstance(workers, str) else set(workers)
                addresses = [a for a, w in info["workers"].items()
                             if a in names or w["name"] in names or w["host"] in names]
            if not addresses:
                raise ValueError("no workers to scatter to; start workers first")
            placements: dict[str, list] = {}
            for i, (k, header, bufs, size) in enumerate(large):
                targets = addresses if broadcast else [addresses[i % len(addresses)]]
                for a in targets:
                    placements.setdefault(a, []).append((k, header, bufs))
                inline.append([k, None, size, targets])
            await asyncio.gather(*(self.session.data.put(a, its) for a, its in placements.items()))
        client = self.client
        with core.lock:
            futs = {}
            states = core.states
            for k in keys:
                st = states.get(k)
                if st is None:
                    st = states[k] = FutureState(k)
                futs[k] = Future(user_keys[k], client, st)
            core.queue_releases()
            core.outbox.append({"op": "scatter", "items": inline})
        core.send()
        if single:
            return futs[keys[0]]
        if isinstance(data, dict):
            return {k: futs[to_wire(k)] for k, _ in items}
        return type(data)(futs[k] for k in keys) if not isinstance(data, set | frozenset) else [
            futs[k] for k in keys]


def _pickle_ref(key: str) -> bytes:
    return pickle.dumps(serialize.ArgsRef(key), protocol=5)


def _rebuild(obj, values: dict, bad: set):
    if isinstance(obj, Future):
        return values[obj._wkey]
    if isinstance(obj, list | tuple | set | frozenset):
        out = [_rebuild(x, values, bad) for x in obj
               if not (isinstance(x, Future) and x._wkey in bad)]
        return out if isinstance(obj, list) else type(obj)(out)
    if isinstance(obj, dict):
        return {k: _rebuild(v, values, bad) for k, v in obj.items()
                if not (isinstance(v, Future) and v._wkey in bad)}
    return obj


def _check_direct_and_mode(client, direct, asynchronous) -> None:
    if direct is False:
        raise ValueError("direct=False: zfabric's scheduler never carries values; data always"
                         " moves directly between the client and the workers")
    if asynchronous is not None and bool(asynchronous) != client.asynchronous:
        raise ValueError(f"asynchronous={asynchronous!r} on a client created with"
                         f" asynchronous={client.asynchronous}; create the client in the mode"
                         " you want")


async def _bounded(make, timeout: float | None, what: str):
    if timeout is None:
        return await make()
    try:
        return await asyncio.wait_for(make(), timeout)
    except TimeoutError:
        raise TimeoutError(f"{what} did not finish within {timeout:g} s") from None


def _checked(value):
    """A fetched value, or the error it stands for: a worker serves an
    :class:`~zfabric.serialize.Undecodable` for a result it could not pickle."""
    if type(value) is serialize.Undecodable:
        raise value.error()
    return value
