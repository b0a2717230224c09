"""The Client's calls that shape the cluster: ``replicate``, ``retire_workers``,
``restart_workers``, and ``get_executor``.

A mixin of :class:`~zfabric.client.Client` (like :class:`~zfabric.values.Values`). The work
happens in the scheduler (:mod:`zfabric.scheduler.retire`); these methods ask, wait for the
answer, and turn it into dask.distributed's return values and errors.
"""

from __future__ import annotations

import asyncio
import logging
import time

from .config import parse_timedelta
from .errors import CommTimeoutError, ZFabricError
from .executor import ClientExecutor
from .futures import Future, futures_of, until_done

logger = logging.getLogger("zfabric.client")

#: How long ``retire_workers`` waits for retired workers to be gone after they were told.
RETIRE_GONE_TIMEOUT_S = 30.0

def _names(workers) -> list[str] | None:
    if workers is None:
        return None
    if isinstance(workers, str):
        return [workers]
    return [str(w) for w in workers]


class ClusterControl:
    """The Client's methods that move data between workers or change the set of workers."""

    def get_executor(self, **submit_options):
        """A ``concurrent.futures.Executor`` running calls on this cluster; the options
        (``workers=``, ``resources=``, ``retries=``, ``priority=``, ``pure=``...) apply to every
        call. See :mod:`zfabric.executor`."""
        return ClientExecutor(self, **submit_options)

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
        result = await self._request("replicate", keys=keys, n=n, workers=_names(workers))
        if result["failed"]:
            raise ZFabricError(f"could not copy {result['failed']} to the chosen workers (their"
                               " holders did not answer); try again")
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
        result = await self._request("retire-workers", workers=workers, n=n)
        for address, why in result["kept"].items():
            logger.warning("worker %s was not retired: %s", address, why)
        retired = result["retired"]
        deadline = time.monotonic() + RETIRE_GONE_TIMEOUT_S
        while retired:
            info = await self._request("info")
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
        info = await self._request("info")
        nanny_of = {}
        for address, w in info["workers"].items():
            for name in workers:
                if name in (address, w["name"]):
                    nanny_of[name] = w.get("nanny")
        try:
            request = self._request("restart-workers", workers=workers)
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
