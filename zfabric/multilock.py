"""``MultiLock``: hold several named locks at once, as dask.distributed's.

Built on :class:`~zfabric.coordination.Lock` (one lock per name, shared with plain ``Lock``
handles of the same names). Taking every lock goes in sorted name order, so two MultiLocks
over overlapping names cannot deadlock; taking ``num_locks`` of them tries each in turn
until enough are held. What was taken is given back when the whole set cannot be had in time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from . import current
from .coordination import Lock, _timeout, call

__all__ = ["MultiLock"]

#: How long a MultiLock waiting for ``num_locks`` of its locks waits between tries.
RETRY_S = 0.05


class MultiLock:
    """Several :class:`~zfabric.coordination.Lock` names taken together.

    ``acquire(blocking=True, timeout=None, num_locks=None)`` returns True once ``num_locks``
    (default: all) of the locks are held, False when ``blocking=False`` and they are not
    free, or when ``timeout`` passes (then none is kept). ``release()`` gives back all held.
    """

    def __init__(self, names: Iterable[str] = (), client=None, lease_timeout="30s"):
        self.names = sorted({str(n) for n in names})
        self._client = client if client is not None else current.client()
        self.locks = {n: Lock(n, client=self._client, lease_timeout=lease_timeout)
                      for n in self.names}
        self.held: list[str] = []

    def __repr__(self) -> str:
        return f"<MultiLock: {self.names}>"

    def acquire(self, blocking: bool = True, timeout=None, num_locks: int | None = None):
        if not blocking:
            if timeout is not None:
                raise ValueError("can't specify a timeout for a non-blocking call")
            timeout = 0
        n = len(self.names) if num_locks is None else num_locks
        if not isinstance(n, int) or not 0 <= n <= len(self.names):
            raise ValueError(f"num_locks must be between 0 and {len(self.names)}, got"
                             f" {num_locks!r}")
        if self.held:
            raise RuntimeError("this MultiLock holds its locks already; release() first")
        return self._client.sync(self._acquire, _timeout(timeout), n)

    async def _acquire(self, timeout: float | None, n: int) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            if n == len(self.names):  # all of them: in sorted order, each waited for
                for name in self.names:
                    left = None if deadline is None else max(0.0, deadline - time.monotonic())
                    if not await self.locks[name]._acquire(left):
                        await self._release()
                        return False
                    self.held.append(name)
                return True
            while True:  # some of them: whichever are free
                for name in self.names:
                    if len(self.held) >= n:
                        return True
                    if name not in self.held and await self.locks[name]._acquire(0):
                        self.held.append(name)
                if len(self.held) >= n:
                    return True
                if deadline is not None and time.monotonic() >= deadline:
                    await self._release()
                    return False
                await asyncio.sleep(RETRY_S)
        except BaseException:
            await self._release()
            raise

    def release(self):
        """Give back every lock this MultiLock holds; RuntimeError if it holds none."""
        if not self.held:
            raise RuntimeError("this MultiLock holds no lock")
        return self._client.sync(self._release)

    async def _release(self) -> None:
        held, self.held = self.held, []
        for name in held:
            lock = self.locks[name]
            lease = lock._leases.pop(0)
            await call(self._client, "sem-release", name, lease=lease)

    def locked(self) -> bool:
        """Whether this MultiLock holds its locks."""
        return bool(self.held)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
