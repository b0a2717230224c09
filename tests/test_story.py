"""The transition log (zfabric.transition_log) and the scheduler's use of it, sans-IO: a key's
story costs its own records, never a scan of the ring, at 1,000 workers and a million
transitions; the index stays bounded with the ring."""

from __future__ import annotations

from zfabric import protocol
from zfabric.config import Config
from zfabric.scheduler.state import SchedulerState
from zfabric.transition_log import StoryLog

C = b"client-1"


def test_a_keys_story_touches_only_its_records_at_a_million_transitions():
    # Given a ring of 100,000 places fed a million transitions of 250,000 keys, the tasks
    # spread over 1,000 workers
    log = StoryLog(100_000)
    workers = [f"tcp://10.0.{i // 250}.{i % 250}:9000" for i in range(1000)]
    moves = (("new", "waiting"), ("waiting", "processing"), ("processing", "memory"),
             ("memory", "forgotten"))
    for i in range(250_000):
        log.stimulus = ("submit", i, None)
        key = f"inc-{i}"
        for j, (start, finish) in enumerate(moves):
            log.add(key, start, finish, workers[i % 1000] if j == 1 else None, float(i))
    assert log.seq == 1_000_000 and len(log) == 100_000
    # Then the index holds at most twice the ring's keys (the old ones were dropped)
    assert len(log.index) <= 2 * 100_000
    # When the story of a recent key is read, it touches its 4 records and nothing else
    records = log.story(["inc-249990"])
    assert [(r[1], r[2]) for r in records] == list(moves)
    assert log.visited == 4
    assert records[1][5] == workers[249_990 % 1000]  # the worker it was sent to
    # A key whose records left the ring has no story, found without a scan either (its
    # name could be a stimulus id: that costs a bisection of the ring)
    assert log.story(["inc-5"]) == [] and log.visited <= 1 + 18
    # A stimulus is found by bisection: its records plus about log2(ring) looks
    records = log.story(["submit-249000"])
    assert [r[0] for r in records] == ["inc-249000"] * 4
    assert records[0][3] == "submit-249000"
    assert log.visited <= 4 + 1 + 17 + 1
    assert log.story(["submit-3"]) == []  # gone with the ring


def test_the_index_stays_bounded_as_keys_come_and_go():
    log = StoryLog(1000)
    for i in range(50_000):
        log.add(f"k-{i}", "new", "memory", None, 0.0)
        assert len(log.index) <= 2000
    assert [r[0] for r in log.story([f"k-{i}" for i in range(48_990, 49_010)])] == \
        [f"k-{i}" for i in range(49_000, 49_010)]


def given(nworkers: int) -> SchedulerState:
    state = SchedulerState(address="tcp://sched:8786",
                           config=Config(TRANSITION_LOG_LENGTH=100_000))
    for i in range(nworkers):
        ident = f"w{i}".encode()
        state.handle(ident, [protocol.hello("worker", ident.decode(),
                                            address=f"tcp://10.1.{i // 250}.{i % 250}:1",
                                            nthreads=1)], 0.0)
    state.handle(C, [protocol.hello("client", "c")], 0.0)
    state.flush()
    return state


def request(state, kind, rid=7, now=9.0, **args):
    state.handle(C, [{"op": "request", "id": rid, "kind": kind, "args": args}], now)
    return state.flush()[C]


def test_the_scheduler_logs_each_move_with_its_stimulus_and_worker():
    # Given a scheduler with 1,000 workers that ran 5,000 tasks
    state = given(1000)
    n = 5000
    state.handle(C, [{"op": "submit", "tasks": [[f"t-{i}", b"p", [], None]
                                                for i in range(n)]}], 1.0)
    where: dict = {}
    sent = {item[0]: ws for ws, ops in state.flush().items() if ws != C for op in ops
            if op["op"] == "compute" for item in op["tasks"]}
    while sent:  # the workers finish what they were sent; queued tasks follow
        where.update(sent)
        for key, ws in sent.items():
            state.handle(ws, [{"op": "finished", "tasks": [[key, 8, b"v", 0.001]]}], 2.0)
        sent = {item[0]: ws for ws, ops in state.flush().items() if ws != C for op in ops
                if op["op"] == "compute" for item in op["tasks"]}
    assert len(where) == n
    state.handle(C, [{"op": "release", "keys": ["t-42"]}], 3.0)
    state.flush()
    assert state.story.seq >= 2 * n
    # When the client asks for the story of one key
    [reply] = request(state, "story", keys=["t-42"])
    # Then it gets that key's three moves, each with its stimulus and worker, and the lookup
    # touched those three records only
    records = reply["result"]
    address = state.workers[where["t-42"]].address
    assert [(r[1], r[2], r[5]) for r in records] == [
        ("new", "processing", address), ("processing", "memory", address),
        ("memory", "forgotten", None)]
    assert records[0][3].startswith("submit-") and records[1][3].startswith("finished-")
    assert [r[4] for r in records] == [1.0, 2.0, 3.0]  # (wall offset 0 in this test)
    assert state.story.visited == 3
    # And the stimulus of the finish names exactly what that op did
    # (and dispatched a queued task to the worker it freed)
    [reply] = request(state, "story", rid=8, keys=[records[1][3]])
    moves = [(r[0], r[2]) for r in reply["result"]]
    assert moves[0] == ("t-42", "memory")
    assert {r[2] for r in reply["result"][1:]} <= {"processing"}
    state.validate()


def test_failed_and_forgotten_tasks_are_logged_too():
    state = given(1)
    state.handle(C, [{"op": "submit", "tasks": [["a-1", b"p", [], None],
                                                ["b-1", b"p", ["a-1"], None]]}], 1.0)
    state.flush()
    state.handle(b"w0", [{"op": "erred", "items": [["a-1", None, None, "boom", "ValueError"]]}],
                 2.0)
    state.flush()
    [reply] = request(state, "story", keys=["a-1", "b-1"])
    moves = [(r[0], r[1], r[2]) for r in reply["result"]]
    assert ("a-1", "processing", "erred") in moves and ("b-1", "waiting", "erred") in moves


def test_a_malformed_story_request_is_answered_and_the_loop_goes_on():
    state = given(1)
    [out] = request(state, "story", keys="t-1")  # not a list
    assert out["op"] == "error" and "story request keys" in out["message"]
    assert out["request"] == 7  # the requester's wait ends with it
    [reply] = request(state, "story", rid=8, keys=["t-1"])
    assert reply == {"op": "reply", "id": 8, "result": []}


def test_the_log_is_off_by_default_and_says_so():
    state = SchedulerState(config=Config())
    state.handle(C, [protocol.hello("client", "c")], 0.0)
    state.handle(C, [{"op": "submit", "tasks": [["t-1", b"p", [], None]]}], 1.0)
    state.flush()
    assert state.story is None
    [reply] = request(state, "story", keys=["t-1"])
    assert reply["result"] is None  # (not an empty story: the client says why)
