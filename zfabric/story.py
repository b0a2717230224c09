"""``Client.story``: what happened to some tasks, from the scheduler's and the workers'
transition logs.

The scheduler keeps its last ``TRANSITION_LOG_LENGTH`` task transitions
(:mod:`zfabric.transition_log`), each worker its last ``WORKER_TRANSITION_LOG_LENGTH``; both
are off (0) by default, for what they cost per task (docs/performance.md), and ``story``
says so rather than answer an empty story. :class:`Stories` asks the scheduler for
the records of the given keys or stimulus ids (a ``story`` request) and each worker (through
``run``, as dask.distributed broadcasts ``get_story``), and merges them, oldest first. A
record is a :class:`StoryRecord`: dask.distributed's ``(source, key, start, finish,
recommendations, stimulus_id, timestamp)`` in the same places, plus ``worker``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .client_core import ClientCore
from .errors import ZFabricError
from .keys import from_wire, to_wire

__all__ = ["StoryRecord", "Stories"]

_ON_ERROR = ("raise", "ignore")

#: What ``story`` raises when no process keeps a log.
NO_LOG = ("no transition log is kept: the scheduler's and the workers' are off by default"
          " (each costs CPU per task). Start the cluster with TRANSITION_LOG_LENGTH (the"
          " scheduler's; e.g. ZFABRIC_TRANSITION_LOG_LENGTH=100000) and"
          " WORKER_TRANSITION_LOG_LENGTH set, or dask's"
          " distributed.admin.low-level-log-length for both")


class StoryRecord(NamedTuple):
    """One transition: ``source`` ("scheduler" or a worker's address) logged that ``key``
    moved from ``start`` to ``finish`` at ``timestamp`` (wall clock of ``source``'s host),
    caused by ``stimulus_id``. ``recommendations`` is empty (zfabric's scheduler makes none:
    it moves the tasks at once, each with a record of its own). ``worker``: the worker the
    task was sent to (``processing``) or whose report moved it; None otherwise."""

    source: str
    key: Any
    start: str
    finish: str
    recommendations: dict
    stimulus_id: str
    timestamp: float
    worker: str | None


def _worker_story(keys: list, dask_worker=None) -> list | None:
    """Run on each worker: the records of its own log (None when it keeps none)."""
    loop = getattr(dask_worker, "_core", dask_worker)
    log = getattr(getattr(loop, "plugins", None), "story", None)
    if log is None:
        return None
    return log.story(keys, worker_stimuli=True)


def _wire(item) -> str:
    key = getattr(item, "key", item)  # a Future names its key
    return to_wire(key)


class Stories:
    """The Client's ``story`` (see the module docstring)."""

    def __init__(self, client: Any, core: ClientCore, run_on_workers):
        self.client = client
        self.core = core
        self.run_on_workers = run_on_workers

    def story(self, *keys_or_stimuli, on_error: str = "raise"):
        """The cluster's records (:class:`StoryRecord`) of these keys (or Futures) and
        stimulus ids, oldest first: the scheduler's, then each worker's.

        ``on_error``: "raise" when the scheduler or a worker cannot answer, or "ignore"
        (what could not answer is left out). Where no process keeps a transition log (the
        default: see ``TRANSITION_LOG_LENGTH``), "raise" raises ``ZFabricError`` saying how
        to keep one and "ignore" returns an empty story."""
        if on_error not in _ON_ERROR:
            raise ValueError(f"on_error must be 'raise' or 'ignore', not {on_error!r}")
        wire = [_wire(k) for k in keys_or_stimuli]
        return self.client.sync(self._story, wire, on_error)

    async def _story(self, wire: list[str], on_error: str) -> list[StoryRecord]:
        records: list[StoryRecord] = []
        logged = False  # whether anyone keeps a log
        try:
            mine = await self.core.request("story", keys=wire)
            if mine is not None:
                logged = True
                records.extend(_record("scheduler", rec) for rec in mine)
        except Exception:
            if on_error == "raise":
                raise
        answers = await self.run_on_workers(_worker_story, (wire,), {}, None,
                                            on_error=on_error)
        for address in sorted(answers):
            if answers[address] is not None:
                logged = True
                records.extend(_record(address, rec, address) for rec in answers[address])
        if not logged and on_error == "raise":
            raise ZFabricError(NO_LOG)
        records.sort(key=lambda r: r.timestamp)  # stable: the scheduler's first at a tie
        return records


def _record(source: str, rec: list, worker: str | None = None) -> StoryRecord:
    key, start, finish, stimulus, timestamp, by = rec
    return StoryRecord(source, from_wire(key), start, finish, {}, stimulus, timestamp,
                       by if by is not None else worker)
