"""The scheduler's work per decision does not grow with the cluster: counted, not timed.

Sans-IO, as tests/test_scheduler_state.py (a SchedulerState with 1,000 workers that said hello),
but for the limits a scheduler raises when it starts.
"""

from __future__ import annotations

import pytest
import zmq

from zfabric import protocol
from zfabric.scheduler.server import raise_limits
from zfabric.scheduler.state import SchedulerState

resource = pytest.importorskip("resource")

C = b"client-1"


def cluster(n: int) -> SchedulerState:
    state = SchedulerState(address="tcp://127.0.0.1:1")
    workers = [f"worker-{i}".encode() for i in range(n)]
    for i, w in enumerate(workers):
        state.handle(w, [protocol.hello("worker", f"w{i}", address=f"tcp://10.0.{i // 250}"
                                        f".{i % 250}:1", nthreads=1)], 0.0)
    state.handle(C, [protocol.hello("client", "c1")], 0.0)
    state.flush()
    return state


def given(out: dict, into: dict[bytes, list[str]]) -> None:
    for peer, ops in out.items():
        for op in ops:
            if op["op"] == "compute":
                into.setdefault(peer, []).extend(t[0] for t in op["tasks"])


def run_all(state: SchedulerState, tasks: list[list], batch: int = 1000) -> dict[str, int]:
    """Submit ``tasks`` in batches; every worker reports all it was given each round.
    Returns how many tasks each worker ran."""
    todo: dict[bytes, list[str]] = {}
    ran: dict[str, int] = {}
    for start in range(0, len(tasks), batch):
        state.handle(C, [{"op": "submit", "tasks": tasks[start:start + batch]}], 1.0)
        given(state.flush(), todo)
    done = 0
    while done < len(tasks):
        assert todo, "the scheduler stopped dispatching"
        rounds, todo = todo, {}
        for peer, keys in rounds.items():
            items = [[k, 8, b"v", 1e-5, 1.0, 1.0, 1] for k in keys]
            state.handle(peer, [{"op": "finished", "tasks": items}], 2.0)
            done += len(keys)
            ran[peer.decode()] = ran.get(peer.decode(), 0) + len(keys)
        given(state.flush(), todo)
    return ran


def test_dispatching_10000_tasks_on_1000_workers_examines_few_workers_per_decision():
    # Given 1,000 single-thread workers
    state = cluster(1000)
    # When 10,000 independent tasks run to the end
    tasks = [[f"t-{i}", b"p", [], None] for i in range(10_000)]
    ran = run_all(state, tasks)
    # Then all ran, every worker took some while they all had free slots, and choosing
    # looked at no more than 5 workers per task in total (a scan would look at ~4 million)
    assert sum(ran.values()) == 10_000 and len(ran) == 1000
    assert all(state.tasks[t[0]].state == "memory" for t in tasks)
    assert state.candidates.examined <= 5 * 10_000, state.candidates.examined
    state.validate()


def test_choices_with_dependencies_and_restrictions_stay_bounded_and_right():
    state = cluster(1000)
    # a large value held by one worker; tasks reading it go there while it has slots
    run_all(state, [["big", b"p", [], None]])
    [holder] = state.tasks["big"].who_has
    state.tasks["big"].value = None
    state.tasks["big"].nbytes = 10**8
    state.candidates.examined = 0
    readers = [[f"r-{i}", b"p", ["big"], None] for i in range(2)]
    pinned = [[f"p-{i}", b"p", [], {"workers": ["tcp://10.0.3.7:1"]}] for i in range(3)]
    state.handle(C, [{"op": "submit", "tasks": readers + pinned}], 4.0)
    out = state.flush()
    where = {t[0]: peer for peer, ops in out.items() for op in ops if op["op"] == "compute"
             for t in op["tasks"]}
    assert where["r-0"] == holder.ident and where["r-1"] == holder.ident
    assert {where[f"p-{i}"] for i in range(3)} == {state.workers_by_address[
        "tcp://10.0.3.7:1"].ident}
    # the holders and the pinned worker only, not the cluster
    assert state.candidates.examined <= 5 * 5, state.candidates.examined
    state.validate()


def test_the_scheduler_raises_its_open_file_and_socket_limits_for_thousands_of_peers():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if want <= 2048:
        pytest.skip(f"the hard open-file limit is {hard}")
    ctx = zmq.Context()
    try:
        # Given the usual soft limit of 1,024 open files
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        # When a scheduler starts, its limits are raised: the soft one to the hard one
        fit = raise_limits(ctx)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == want
        assert ctx.get(zmq.MAX_SOCKETS) >= 65536
        assert fit >= 1000
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        ctx.term()
