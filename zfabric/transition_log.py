"""The transition log: the last transitions of tasks, found by key or stimulus (``story``);
the scheduler's (:mod:`zfabric.scheduler.state`) and each worker's
(:mod:`zfabric.worker.plugins`).

Theory of operation
-------------------
:class:`StoryLog` keeps the last ``length`` task transitions in a ring (a list of fixed size,
one tuple per record): ``(key, start, finish, worker, time, stimulus, previous)``. Records are
numbered in the order they came (:attr:`StoryLog.seq` is the next number); ``previous`` is the
number of the same key's record before it (-1: none). :attr:`StoryLog.index` maps a key to the
number of its newest record, so a key's story follows that chain back while the numbers are
still in the ring: it costs the key's own records, never a scan of the ring
(:attr:`StoryLog.visited` counts the records a lookup touched; tests hold it to that).

The index is bounded with the ring: keys whose records have all left the ring are dropped in
one pass when the index holds twice as many keys as the ring has places, so that pass costs
O(1) per transition over time.

A stimulus is what caused a transition: the op being applied (``"finished-1234"``: the name of
the op and the number the scheduler gave it, increasing) and the worker that sent it, if one
did. The owner sets :attr:`StoryLog.stimulus` before it applies each op; records keep a
reference to it, so one op's records share it. Numbers only grow, so the records of one
stimulus are found by bisection over the ring, again without a scan.

Appending is the hot path: a dictionary lookup and store and one tuple. Reading is rare and
pays for the formatting. The worker's transitions (:mod:`zfabric.worker.plugins`) use the same
log without stimuli: a worker names what moved a task by the move itself
(:data:`WORKER_STIMULI`).

Pure: no clock and no I/O; times are what the owner passes.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["StoryLog", "WORKER_STIMULI"]

#: What moved a task on a worker, by (start, finish): the worker's stimulus names.
WORKER_STIMULI = {
    ("released", "waiting"): "compute", ("released", "ready"): "compute",
    ("waiting", "ready"): "fetched", ("ready", "executing"): "execute",
    ("executing", "memory"): "task-finished", ("executing", "error"): "task-erred",
    ("memory", "released"): "free",
}


class StoryLog:
    """The last ``length`` transitions, by key and by stimulus (see the module docstring)."""

    __slots__ = ("index", "length", "ring", "seq", "stimulus", "visited")

    # The scheduler appends inline (zfabric/scheduler/state.py, its hot path), as add does:
    # the record in place ``seq % length``, the index, ``seq``, and compact at each wrap.

    def __init__(self, length: int):
        self.length = max(1, int(length))
        self.ring: list = [None] * self.length
        self.seq = 0
        self.index: dict = {}  # key -> number of its newest record
        #: (op name, number, address of the worker that sent it or None) of the op being
        #: applied, or None
        self.stimulus: tuple | None = None
        self.visited = 0  # records the last lookup touched

    def __len__(self) -> int:
        return min(self.seq, self.length)

    def add(self, key, start: str, finish: str, worker: str | None, now: float) -> None:
        """Log one transition (``worker``: the address of the worker it concerns beyond the
        stimulus's sender, such as the worker a task was sent to)."""
        seq = self.seq
        index = self.index
        i = seq % self.length
        self.ring[i] = (key, start, finish, worker, now, self.stimulus, index.get(key, -1))
        index[key] = seq
        self.seq = seq + 1
        if not i:
            self.compact()

    def compact(self) -> None:
        """Drop the index entries of keys whose records all left the ring (called at each
        wrap of the ring: the index holds at most twice as many keys as the ring)."""
        first = self.seq - len(self)
        if first > 0:
            self.index = {k: s for k, s in self.index.items() if s >= first}

    # ------------------------------------------------------------------ reading

    def of_key(self, key) -> list[int]:
        """The numbers of the kept records of ``key``, newest first."""
        first = self.seq - len(self)
        ring, n = self.ring, self.length
        out = []
        s = self.index.get(key, -1)
        while s >= first:
            out.append(s)
            s = ring[s % n][6]
        self.visited = len(out)
        return out

    def of_stimulus(self, stimulus_id: str) -> list[int]:
        """The numbers of the kept records of the stimulus ``"name-number"``, oldest first."""
        name, _, number = stimulus_id.rpartition("-")
        try:
            n = int(number)
        except ValueError:
            return []
        ring, size = self.ring, self.length
        lo, hi = self.seq - len(self), self.seq
        visited = 0
        while lo < hi:  # the first record whose stimulus number is n or more
            mid = (lo + hi) // 2
            stim = ring[mid % size][5]
            visited += 1
            if stim is None or stim[1] < n:
                lo = mid + 1
            else:
                hi = mid
        out = []
        while lo < self.seq:
            stim = ring[lo % size][5]
            visited += 1
            if stim is None or stim[1] != n:
                break
            if stim[0] == name:
                out.append(lo)
            lo += 1
        self.visited = visited
        return out

    def story(self, keys_or_stimuli: Iterable, wall_offset: float = 0.0,
              worker_stimuli: bool = False) -> list[list]:
        """The records of the given keys and stimulus ids, in the order they came, each as
        ``[key, start, finish, stimulus_id, wall time, worker]`` (``wall_offset`` turns the
        logged times into wall-clock seconds). A worker's log (``worker_stimuli``) names its
        stimuli by the move (:data:`WORKER_STIMULI`)."""
        found: set[int] = set()
        visited = 0
        for item in keys_or_stimuli:
            seqs = self.of_key(item)
            visited += self.visited
            if not seqs and type(item) is str and "-" in item:
                seqs = self.of_stimulus(item)
                visited += self.visited
            found.update(seqs)
        self.visited = visited
        out = []
        ring, n = self.ring, self.length
        for s in sorted(found):
            key, start, finish, worker, t, stim, _ = ring[s % n]
            if stim is None:
                sid = WORKER_STIMULI.get((start, finish), "worker") if worker_stimuli else ""
            else:
                sid = f"{stim[0]}-{stim[1]}"
                if worker is None:
                    worker = stim[2]
            out.append([key, start, finish, sid, t + wall_offset, worker])
        return out
