"""The worker's memory thresholds: when to spill values to disk, when to pause, when to resume.

Fractions of the worker's ``memory_limit`` (dask.distributed's defaults and meanings):

- *target* (0.6), compared with **managed memory** (the sizes of the values the worker holds,
  :class:`~zfabric.worker.spill.SpillStore`): above it, least recently used values spill to
  disk until managed memory is below it again. Checked whenever values are added.
- *spill* (0.7), compared with the process's **RSS**: above it, idle shared-memory segments
  are released and values spill until RSS is below the target (or the spill threshold, when
  the target is off). RSS holds memory that is not in values (libraries, buffers being sent,
  a task's own allocations), so spilling can run out of values to spill; that is logged once.
- *pause* (0.8), compared with RSS: above it the worker starts no new task (it still serves
  data, accepts results of running tasks and answers heartbeats) and tells the scheduler,
  which sends its work elsewhere; it resumes once RSS is below the threshold again. A disk
  that cannot take spilled values (full, unwritable) pauses the worker too: memory would only
  grow. Spilling is tried again after ``DISK_RETRY_S``.
- *terminate* (0.95) belongs to the Nanny (:mod:`zfabric.supervision`).

Memory that tasks freed may stay in the C heap, counted in RSS (a worker process keeps blocks
of up to 16 MiB there: :func:`tune_heap`): above the spill or the pause threshold,
at most once every ``TRIM_INTERVAL_S``, the heap's free memory goes back to the system
(glibc's ``malloc_trim``) before anything is spilled or the worker pauses.

Python's cycle collector: a worker that imported pandas and dask holds some 100,000 objects
that live as long as the process (modules, classes, functions). A full collection walks them
all, 80-250 ms on a loaded machine, about once per graph of a thousand DataFrame tasks: a pause
of the worker's loop and its task threads alike. :meth:`MemoryManager.freeze_long_lived` moves
what exists after each wave of imports out of the collector's way (``gc.freeze``): a full
collection then walks only the objects made since (a few ms). Frozen objects are still freed
when their last reference goes; only a reference cycle among them that dies would stay.

``0`` turns one threshold off; spilling is off when target and spill both are; a
``memory_limit`` of 0 turns them all off. RSS is checked every ``MEMORY_MONITOR_INTERVAL_S``
by the worker's loop thread, which owns this object (no locks here).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import sys
import time
from typing import Any

from ..config import Config
from .spill import SpillFailed, SpillStore

logger = logging.getLogger(__name__)

__all__ = ["MemoryManager", "memory_fractions"]

#: After the disk refused a value, wait this long before spilling again.
DISK_RETRY_S = 5.0
#: Longest one spill round may keep the loop thread (it goes on at the next turn).
SPILL_ROUND_S = 0.2
#: Above a threshold, free heap memory goes back to the system at most this often (it costs
#: about 40 ms per GiB given back, 0.2 ms when there is none).
TRIM_INTERVAL_S = 1.0

#: A worker process's C heap (glibc): blocks up to this size are carved from the heap and
#: reused, not mapped afresh for each value (a chunk of 2 MB in fresh pages costs 0.8 ms of
#: page faults, against 0.05 ms reusing the heap)...
HEAP_MMAP_THRESHOLD = 16 << 20
#: ...and more than this free at the top of the heap goes back to the system.
HEAP_TRIM_THRESHOLD = 4 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters

_libc: Any = None
try:  # glibc only; elsewhere the allocator keeps its own ways
    _libc = ctypes.CDLL("libc.so.6")
    _libc.malloc_trim, _libc.mallopt  # noqa: B018 - both exist, or neither is used
except (OSError, AttributeError):
    _libc = None


def tune_heap(environ: dict | None = None) -> bool:
    """Set a worker process's heap thresholds (:data:`HEAP_MMAP_THRESHOLD`,
    :data:`HEAP_TRIM_THRESHOLD`) unless the user set glibc's own (``MALLOC_MMAP_THRESHOLD_``,
    ``MALLOC_TRIM_THRESHOLD_``). Done in the process (not through its environment) so that
    every worker gets it, however started, and the processes its tasks start do not.
    True if set."""
    env = os.environ if environ is None else environ
    if _libc is None or "MALLOC_MMAP_THRESHOLD_" in env or "MALLOC_TRIM_THRESHOLD_" in env:
        return False
    return bool(_libc.mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)
                and _libc.mallopt(_M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD))


def trim_heap() -> bool:
    """Give the C heap's free memory back to the system; True if some was given back."""
    return bool(_libc is not None and _libc.malloc_trim(0))


def memory_fractions(config: Config, *, target=None, spill=None, pause=None,
                     terminate=None) -> dict[str, float]:
    """The four thresholds from keywords (None: the setting), checked: ``{"target": ...}``.
    ``False`` means off, as 0 does."""
    out = {}
    for name, given, default in (
        ("target", target, config.MEMORY_TARGET_FRACTION),
        ("spill", spill, config.MEMORY_SPILL_FRACTION),
        ("pause", pause, config.MEMORY_PAUSE_FRACTION),
        ("terminate", terminate, config.MEMORY_TERMINATE_FRACTION),
    ):
        value = default if given is None else (0.0 if given is False else given)
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"memory_{name}_fraction must be a number between 0 and 1 (0 turns"
                             f" it off), got {given!r}") from None
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"memory_{name}_fraction must be between 0 and 1 (0 turns it off),"
                             f" got {value!r}")
        out[name] = value
    return out


class MemoryManager:
    """Applies the thresholds to one worker's store (see the module docstring)."""

    def __init__(self, store: SpillStore, *, memory_limit: int, fractions: dict[str, float],
                 name: str = "worker", release_idle=None, before_evict=None):
        self.store = store
        self.name = name
        self.release_idle = release_idle  # frees idle shared-memory segments; returns bytes
        # Called before each value is written: the worker stops its task threads from making
        # more values while this thread spills (they would outrun the disk).
        self.before_evict = before_evict
        limit = memory_limit or 0

        def at(fraction: float) -> int:
            return int(limit * fraction) if limit and fraction else 0

        self.target_bytes = at(fractions["target"])
        self.spill_bytes = at(fractions["spill"])
        self.pause_bytes = at(fractions["pause"])
        self.paused = False
        self.near = False  # RSS was close to the spill or pause threshold at the last check
        self.reason = ""
        self.disk_error = ""
        self._disk_retry_at = 0.0
        self._said_nothing_left = False
        self._trim_at = 0.0
        self._modules_frozen = 0  # len(sys.modules) at the last gc.freeze()

    def freeze_long_lived(self) -> bool:
        """After modules were imported (the first graph's libraries, a task's), move every
        object the collector tracks now to its permanent generation (module docstring).
        Called on each heartbeat; True when it froze."""
        n = len(sys.modules)
        if n == self._modules_frozen:
            return False
        self._modules_frozen = n
        gc.freeze()
        return True

    @property
    def spilling(self) -> bool:
        return bool(self.target_bytes or self.spill_bytes)

    def over_target(self) -> bool:
        """Managed memory above the target: :meth:`spill_to_target` has work to do."""
        return bool(self.target_bytes) and self.store.managed > self.target_bytes

    def spill_to_target(self, now: float, skip=()) -> bool:
        """Spill until managed memory is below the target; True if it stopped early (the
        round's time ran out) and should go on at the next turn."""
        if not self.over_target() or now < self._disk_retry_at:
            return False
        give_up = time.monotonic() + SPILL_ROUND_S
        while self.store.managed > self.target_bytes:
            if not self._evict_one(now, skip):
                return False
            if time.monotonic() > give_up:
                return True
        return False

    def check(self, rss: int, now: float, measure_rss, skip=()) -> bool:
        """The periodic RSS check: spill above the spill threshold, pause or resume. Returns
        True when the pause state changed (the caller tells the scheduler)."""
        if (self.disk_error and now >= self._disk_retry_at and not self.over_target()
                and not (self.spill_bytes and rss > self.spill_bytes)):
            self.disk_error = ""  # nothing needs spilling now: no reason to stay paused
        lowest = min(b for b in (self.spill_bytes, self.pause_bytes, 1 << 62) if b)
        if rss > lowest and now >= self._trim_at:
            self._trim_at = now + TRIM_INTERVAL_S
            if trim_heap():
                rss = measure_rss()
        if self.spill_bytes and rss > self.spill_bytes and now >= self._disk_retry_at:
            if self.release_idle is not None and self.release_idle():
                rss = measure_rss()
            goal = self.target_bytes or self.spill_bytes
            give_up = time.monotonic() + SPILL_ROUND_S
            while rss > goal and time.monotonic() < give_up:
                if not self._evict_one(now, skip):
                    break
                rss = measure_rss()
        return self._update_pause(rss, now)

    def _evict_one(self, now: float, skip) -> bool:
        if self.before_evict is not None:
            self.before_evict()
        try:
            freed = self.store.evict(skip)
        except SpillFailed as exc:
            if not self.disk_error:
                logger.error("worker %s: %s; the worker pauses until values can be spilled"
                             " again (retrying every %g s)", self.name, exc, DISK_RETRY_S)
            self.disk_error = str(exc)
            self._disk_retry_at = now + DISK_RETRY_S
            return False
        if self.disk_error:
            logger.warning("worker %s: spilling to disk works again", self.name)
            self.disk_error = ""
        if not freed:
            if not self._said_nothing_left:
                self._said_nothing_left = True
                logger.warning(
                    "worker %s: memory is above the spill threshold but no value is left to"
                    " spill (%d bytes managed in memory); the rest of the memory is not in"
                    " values this worker holds", self.name, self.store.managed)
            return False
        self._said_nothing_left = False
        return True

    def _update_pause(self, rss: int, now: float) -> bool:
        lowest = min(b for b in (self.spill_bytes, self.pause_bytes, 1 << 62) if b)
        self.near = rss > 0.8 * lowest
        if self.disk_error:
            reason = f"cannot spill: {self.disk_error}"
        elif self.pause_bytes and rss > self.pause_bytes:
            reason = (f"process memory {rss / 2**20:.0f} MiB is above the pause threshold"
                      f" {self.pause_bytes / 2**20:.0f} MiB")
        else:
            reason = ""
        was = self.paused
        self.paused = bool(reason)
        if self.paused and not was:
            self.reason = reason
            logger.warning("worker %s paused: %s", self.name, reason)
        elif was and not self.paused:
            logger.warning("worker %s resumed: memory %d MiB", self.name, rss >> 20)
            self.reason = ""
        return was != self.paused
