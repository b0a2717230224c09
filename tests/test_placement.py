"""Where the scheduler places tasks that move data: equal prefetch windows for equal workers,
the worker that would start a task first (its queue, then the bytes it would receive), and a
full worker that holds most of a task's inputs taking it when moving them would cost more
than the wait (zfabric.scheduler.policy / .candidates, pure: no processes)."""

from __future__ import annotations

from test_scheduler_state import A1, A2, W1, W2, finish, given, submit, task

from zfabric.config import DEFAULT
from zfabric.scheduler import policy
from zfabric.scheduler.candidates import Candidates
from zfabric.scheduler.observe import Group
from zfabric.scheduler.records import TaskState, WorkerState

MB = 2**20


def worker(n: int, index: Candidates | None = None) -> WorkerState:
    ws = WorkerState(ident=f"w{n}".encode(), id=f"w{n}",
                     address=f"tcp://10.0.{n // 250}.{n % 250}:1", name=f"w{n}",
                     nthreads=1, memory_limit=0, resources={}, nanny=None, pid=0,
                     host=f"host{n}", now=0.0)
    if index is not None:
        index.add(ws)
    return ws


def held(key: str, nbytes: int, *holders: WorkerState) -> TaskState:
    ts = TaskState(key, b"p")
    ts.state, ts.nbytes = "memory", nbytes
    for ws in holders:
        ts.add_holder(ws)
    return ts


def reader(deps: tuple, seconds: float | None) -> TaskState:
    """A task of a group whose tasks took ``seconds`` each so far (None: none finished)."""
    ts = TaskState("split-1", b"p")
    ts.deps = deps
    ts.group = Group("split")
    if seconds is not None:
        ts.group.duration_s, ts.group.ndone = 10 * seconds, 10
    return ts


def fill(ws: WorkerState, n: int | None = None) -> None:
    """Give ``ws`` tasks until it has no free slot (or ``n`` of them)."""
    i = 0
    while (ws.has_slot() if n is None else i < n):
        ws.assign(TaskState(f"busy-{ws.name}-{i}", b"p"))
        i += 1


def both(ts: TaskState, index: Candidates, workers: list[WorkerState]) -> WorkerState | None:
    """The choice of the candidate index, checked against the reference over all workers."""
    got = index.choose(ts)
    assert got is policy.choose_worker(ts, workers, index.avg_duration)
    return got


def test_equal_workers_get_equal_windows_after_one_slow_task():
    state = given((W1, A1), (W2, A2))
    submit(state, task("a"), task("b"))
    # Given one slow task (1 s) on one worker and a fast one (0.1 ms) on the other
    finish(state, W1, "a", duration=1.0)
    finish(state, W2, "b", duration=1e-4)
    # Then both queue the same number of tasks beyond their threads
    assert state.workers[W1].limit == state.workers[W2].limit
    # and 40 ready tasks go to them alike (each worker's own average gave 2 and 201 slots:
    # the fast one took 38 of 40 and ran them while the other had nothing to do)
    out = submit(state, *(task(f"t{i}") for i in range(40)))
    given_to = {w: sum(len(op["tasks"]) for op in ops if op["op"] == "compute")
                for w, ops in out.items()}
    assert given_to[W1] == given_to[W2] > 0
    state.validate()


def test_a_full_worker_holding_the_inputs_takes_a_short_task():
    index = Candidates()
    a, b = worker(1, index), worker(2, index)
    fill(a)
    group = held("group-1", 10 * MB, a)  # a shuffle group's whole partition
    # When a task of 0.1 ms reads it (the queue beyond a's slots: 0.1 ms against 0.1 s to
    # move 10 MB at 100 MB/s)
    ts = reader((group,), 1e-4)
    # Then a takes it though it has no free slot, and b, idle, does not
    assert not a.has_slot() and b.has_slot()
    assert both(ts, index, [a, b]) is a


def test_a_full_worker_does_not_take_a_long_task_or_one_of_unknown_length():
    index = Candidates()
    a, b = worker(1, index), worker(2, index)
    fill(a)
    group = held("group-1", 10 * MB, a)
    # a task of 1 s: waiting for a costs more than moving 10 MB
    assert both(reader((group,), 1.0), index, [a, b]) is b
    # nothing known of how long tasks take: no overflow
    assert index.avg_duration is None
    assert both(reader((group,), None), index, [a, b]) is b


def test_the_overflow_stays_within_prefetch_max_tasks():
    index = Candidates()
    a, b = worker(1, index), worker(2, index)
    fill(a, a.nthreads + DEFAULT.PREFETCH_MAX)  # as many queued as a worker may hold
    group = held("group-1", 10**12, a)  # so large that any wait would be shorter
    assert both(reader((group,), 1e-6), index, [a, b]) is b


def test_the_overflow_goes_to_the_worker_holding_most_of_the_bytes():
    index = Candidates()
    a, b, c = worker(1, index), worker(2, index), worker(3, index)
    fill(a)
    fill(b)
    d1, d2 = held("d-1", 10 * MB, a), held("d-2", 12 * MB, b)
    # b holds more than half of the bytes: it takes the task; a (less than half) never would
    assert both(reader((d1, d2), 1e-4), index, [a, b, c]) is b
    d3 = held("d-3", 1 * MB, c)  # c, free, holds some: b still holds more than half
    assert both(reader((d1, d2, d3), 1e-4), index, [a, b, c]) is b
    d3 = held("d-3", 5 * MB, c)  # b no longer holds more than half: c, free, holds some
    assert both(reader((d1, d2, d3), 1e-4), index, [a, b, c]) is c
    d4 = held("d-4", 30 * MB, c)  # now c, free, holds the most: c
    assert both(reader((d1, d2, d4), 1e-4), index, [a, b, c]) is c


def test_an_overflow_decision_looks_at_the_holders_only():
    index = Candidates()
    workers = [worker(i, index) for i in range(1000)]
    holders = workers[:3]
    for ws in holders:
        fill(ws)
    group = held("group-1", 10 * MB, *holders)
    index.examined = 0
    assert index.choose(reader((group,), 1e-4)) in holders
    # the three holders (each once by the overflow's look and once by the scan of holders)
    # and the least loaded worker of the heap: not the 1,000 workers
    assert index.examined <= 2 * len(holders) + 2, index.examined


def test_when_every_worker_is_full_the_holder_takes_a_short_task_rather_than_queue_it():
    index = Candidates()
    a, b = worker(1, index), worker(2, index)
    fill(a)
    fill(b)
    group = held("group-1", 10 * MB, a)
    # a queued task would wait about a window for the first free slot anywhere, then move
    # the 10 MB: a, which holds them, takes a short task at once
    assert both(reader((group,), 1e-4), index, [a, b]) is a
    # but not a task of a second: it waits in the scheduler's queue
    assert both(reader((group,), 1.0), index, [a, b]) is None


def test_of_two_workers_holding_nearly_the_same_bytes_the_idle_one_gets_the_task():
    index = Candidates()
    a, b = worker(1, index), worker(2, index)
    fill(a, 2)  # two tasks queued at a, which still has a free slot; b has none
    d1, d2 = held("d-1", 10 * MB, a), held("d-2", 9 * MB, b)  # a shuffle join's inputs
    assert a.has_slot() and b.occupancy == 0
    # tasks of 10 ms: a would start after 20 ms of work and 9 MB moved (114 ms), b at once
    # after 10 MB moved (105 ms): b, though a holds more bytes
    assert both(reader((d1, d2), 0.01), index, [a, b]) is b
    # nothing known of how long tasks take: the bytes held decide, as before
    assert both(reader((d1, d2), None), index, [a, b]) is a


def test_a_worker_holding_many_more_bytes_wins_over_a_slightly_less_loaded_one():
    index = Candidates()
    a, b = worker(1, index), worker(2, index)
    fill(a, 2)
    fill(b, 1)
    d1, d2 = held("d-1", 30 * MB, a), held("d-2", 1 * MB, b)
    # a: 20 ms of work, then 1 MB moved (31 ms); b: 10 ms, then 30 MB moved (325 ms)
    assert both(reader((d1, d2), 0.01), index, [a, b]) is a
    # b wins where the work queued at a outlasts moving the bytes (tasks of 0.4 s: a 0.81 s,
    # b 0.71 s)
    assert both(reader((d1, d2), 0.4), index, [a, b]) is b
    # a worker holding nothing, idle, never wins over a holder with a free slot (each fetch
    # costs a round trip the bandwidth does not count): only holders are compared
    c = worker(3, index)
    assert both(reader((d1, d2), 0.4), index, [a, b, c]) is b
    fill(a)
    fill(b)  # no holder has a free slot: the idle worker, c
    assert both(reader((d1, d2), 0.4), index, [a, b, c]) is c
