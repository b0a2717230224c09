"""SchedulerState's data moves (replicate, retire-workers, restart-workers), sans-IO: feed ops
with an explicit ``now``, compare the exact ops it sends. Every scenario ends with
``state.validate()``."""

from __future__ import annotations

from zfabric import protocol
from zfabric.config import Config
from zfabric.scheduler.state import SchedulerState

W1, W2, W3 = b"w1", b"w2", b"w3"
A1, A2, A3 = "tcp://10.0.0.1:1001", "tcp://10.0.0.2:1002", "tcp://10.0.0.3:1003"
C = b"client-1"
N1 = b"nanny-1"
MB = 2**20


def given(*workers, nannies=()) -> SchedulerState:
    state = SchedulerState(address="tcp://sched:8786", config=Config())
    for ident in nannies:
        state.handle(ident, [protocol.hello("nanny", ident.decode())], 0.0)
    for ident, address, *nanny in workers:
        extra = {"nanny": nanny[0].decode()} if nanny else {}
        state.handle(ident, [protocol.hello("worker", ident.decode(), address=address,
                                            nthreads=1, **extra)], 0.0)
    state.handle(C, [protocol.hello("client", "c")], 0.0)
    state.flush()
    return state


def computed(state, key, worker, nbytes=2 * MB, value=None) -> None:
    """A task ``key`` that ``worker`` ran; a large result stays there (value None)."""
    state.handle(C, [{"op": "submit", "tasks": [[key, b"p", [], {"workers": [
        state.workers[worker].address]}]]}], 1.0)
    out = state.flush()
    assert out[worker][0]["op"] == "compute", out
    state.handle(worker, [{"op": "finished", "tasks": [[key, nbytes, value, 0.01]]}], 1.0)
    state.flush()


def request(state, kind, rid=7, now=2.0, **args) -> dict:
    state.handle(C, [{"op": "request", "id": rid, "kind": kind, "args": args}], now)
    return state.flush()


def holders(state, key) -> set[str]:
    return {ws.address for ws in state.tasks[key].who_has}


# ---------------------------------------------------------------------------- replicate


def test_replicate_copies_to_the_emptiest_workers_and_answers_once_held():
    state = given((W1, A1), (W2, A2), (W3, A3))
    computed(state, "x", W1)
    computed(state, "y", W2)  # W2 holds more: W3 is the emptier target
    # When the client asks for two copies of x
    out = request(state, "replicate", keys=["x"], n=2)
    # Then the emptiest other worker is told to fetch it from its holder; no answer yet
    assert out == {W3: [{"op": "acquire", "items": [["x", None, [A1]]]}]}
    assert holders(state, "x") == {A1}
    # When it has it
    state.handle(W3, [{"op": "acquired", "keys": ["x"], "failed": []}], 3.0)
    # Then it counts as a holder, and the client gets its answer
    assert holders(state, "x") == {A1, A3}
    assert state.flush() == {C: [{"op": "reply", "id": 7,
                                  "result": {"missing": [], "failed": []}}]}
    state.validate()


def test_replicate_inline_value_rides_with_the_acquire_and_extra_copies_go():
    state = given((W1, A1), (W2, A2))
    computed(state, "s", W1, nbytes=5, value=b"small")
    out = request(state, "replicate", keys=["s", "nope"])  # n=None: every worker
    assert out == {W2: [{"op": "acquire", "items": [["s", b"small", None]]}]}
    state.handle(W2, [{"op": "acquired", "keys": ["s"], "failed": []}], 3.0)
    assert state.flush()[C][0]["result"] == {"missing": ["nope"], "failed": []}
    # When one copy is enough, the extra one is dropped (as dask's replicate does)
    out = request(state, "replicate", rid=8, keys=["s"], n=1)
    assert len(state.tasks["s"].who_has) == 1
    [(dropped, ops)] = [(w, o) for w, o in out.items() if w != C]
    assert ops == [{"op": "free", "keys": ["s"]}]
    assert state.workers[dropped].address not in holders(state, "s")
    assert out[C] == [{"op": "reply", "id": 8, "result": {"missing": [], "failed": []}}]
    state.validate()


def test_replicate_failed_fetch_is_reported_not_counted():
    state = given((W1, A1), (W2, A2))
    computed(state, "x", W1)
    request(state, "replicate", keys=["x"], n=2)
    state.handle(W2, [{"op": "acquired", "keys": [], "failed": ["x"]}], 3.0)
    assert state.flush() == {C: [{"op": "reply", "id": 7,
                                  "result": {"missing": [], "failed": ["x"]}}]}
    assert holders(state, "x") == {A1}
    state.validate()


def test_replicate_target_that_leaves_ends_the_move():
    state = given((W1, A1), (W2, A2))
    computed(state, "x", W1)
    request(state, "replicate", keys=["x"], n=2)
    state.handle(W2, [{"op": "goodbye"}], 3.0)
    state.flush()
    state.tick(3.1)
    assert state.flush()[C] == [{"op": "reply", "id": 7,
                                 "result": {"missing": [], "failed": ["x"]}}]
    assert not state.moves and not state.jobs
    state.validate()


def test_bad_replicate_arguments_get_an_error_reply():
    state = given((W1, A1))
    out = request(state, "replicate", keys=["x"], n=0)
    assert out[C][0]["id"] == 7 and "n must be a positive integer" in out[C][0]["error"]
    out = request(state, "replicate", keys="x")
    assert out[C][0]["id"] == 7 and "'keys' must be a list" in out[C][0]["error"]
    assert not state.jobs
    state.validate()


def test_acquired_key_nobody_needs_is_freed():
    state = given((W1, A1))
    state.handle(W1, [{"op": "acquired", "keys": ["gone"], "failed": []}], 1.0)
    assert state.flush() == {W1: [{"op": "free", "keys": ["gone"]}]}
    state.validate()


# ---------------------------------------------------------------------------- retire


def test_retire_moves_unique_data_then_closes_the_worker():
    state = given((W1, A1), (W2, A2))
    computed(state, "x", W1)
    computed(state, "s", W1, nbytes=5, value=b"small")  # the scheduler has its bytes
    # When W1 is retired
    out = request(state, "retire-workers", workers=[A1])
    # Then only its large unique value moves, to the worker that stays
    assert out == {W2: [{"op": "acquire", "items": [["x", None, [A1]]]}]}
    assert state.workers[W1].retiring and not state.workers[W1].has_slot()
    # And a new task does not go to it
    state.handle(C, [{"op": "submit", "tasks": [["t", b"p", [], None]]}], 2.5)
    assert state.flush()[W2][0]["op"] == "compute"
    # When the copy is made, W1 is told to close and the client is answered
    state.handle(W2, [{"op": "acquired", "keys": ["x"], "failed": []}], 3.0)
    out = state.flush()
    assert out[W1] == [{"op": "close", "reason": "retired"}]
    # and the client, which holds x, learns its new holders before the answer
    memory, reply = out[C]
    assert memory == {"op": "memory", "items": [["x", None, [A2], 2 * MB]]}
    assert list(reply["result"]["retired"]) == [A1] and reply["result"]["kept"] == {}
    assert holders(state, "x") == {A2}
    assert state.tasks["s"].state == "memory"
    # When it says goodbye, nothing is lost or recomputed
    state.handle(W1, [{"op": "goodbye"}], 3.5)
    out = state.flush()
    assert "lost" not in str(out.get(C)) and state.tasks["x"].state == "memory"
    state.validate()


def test_retire_waits_for_started_tasks_and_takes_back_the_others():
    state = given((W1, A1), (W2, A2))
    state.handle(C, [{"op": "submit", "tasks": [["a", b"p", [], {"workers": [A1],
                                                                  "allow_other_workers": True}],
                                                 ["b", b"p", [], {"workers": [A1],
                                                                  "allow_other_workers": True}]]}],
                 1.0)
    state.flush()
    state.handle(W1, [{"op": "started", "keys": ["a"]}], 1.1)
    # When W1 is retired while it runs a and has b queued
    out = request(state, "retire-workers", workers=[A1])
    # Then W1 is asked for b back, and a runs on
    assert out[W1] == [{"op": "give-back", "keys": ["b"]}]
    assert W2 not in out and C not in out
    # When W1 gives b back (it had not started it), b goes to W2
    state.handle(W1, [{"op": "given-back", "keys": ["b"]}], 2.1)
    out = state.flush()
    assert out[W2][0]["op"] == "compute" and out[W2][0]["tasks"][0][0] == "b"
    # When a finishes there, its result moves off before the worker closes
    state.handle(W1, [{"op": "finished", "tasks": [["a", 2 * MB, None, 0.1]]}], 3.0)
    state.flush()
    state.tick(3.1)
    assert state.flush()[W2] == [{"op": "acquire", "items": [["a", None, [A1]]]}]
    state.handle(W2, [{"op": "acquired", "keys": ["a"], "failed": []}], 3.2)
    out = state.flush()
    assert out[W1] == [{"op": "close", "reason": "retired"}]
    assert out[C][0] == {"op": "memory", "items": [["a", None, [A2], 2 * MB]]}
    assert list(out[C][1]["result"]["retired"]) == [A1]
    state.validate()


def test_retire_a_task_started_while_asked_back_runs_once():
    state = given((W1, A1), (W2, A2))
    state.handle(C, [{"op": "submit", "tasks": [["b", b"p", [], {"workers": [A1],
                                                                  "allow_other_workers": True}]]}],
                 1.0)
    state.flush()
    # When W1 is retired while its ``started`` for b is on the wire
    out = request(state, "retire-workers", workers=[A1])
    assert out[W1] == [{"op": "give-back", "keys": ["b"]}]
    state.handle(W1, [{"op": "started", "keys": ["b"]}], 2.05)
    state.handle(W1, [{"op": "given-back", "keys": []}], 2.1)  # (a worker sends none empty)
    # Then b is not run anywhere else: it finishes on W1, which then retires
    assert W2 not in state.flush()
    assert state.tasks["b"].processing_on is state.workers[W1]
    state.handle(W1, [{"op": "finished", "tasks": [["b", 8, b"v", 0.1]]}], 3.0)
    state.flush()
    state.tick(3.1)
    assert state.flush()[W1] == [{"op": "close", "reason": "retired"}]
    state.validate()


def test_retire_the_last_worker_holding_data_is_refused():
    state = given((W1, A1))
    computed(state, "x", W1)
    out = request(state, "retire-workers", workers=[A1])
    [reply] = out[C]
    assert reply["result"]["retired"] == {}
    assert "no other worker would stay" in reply["result"]["kept"][A1]
    assert W1 not in out and not state.workers[W1].retiring and state.workers[W1].has_slot()
    state.validate()


def test_retire_n_picks_idle_workers_and_an_empty_one_closes_at_once():
    state = given((W1, A1), (W2, A2))
    computed(state, "x", W1)
    out = request(state, "retire-workers", n=1)
    assert out[W2] == [{"op": "close", "reason": "retired"}]
    assert list(out[C][0]["result"]["retired"]) == [A2]
    out = request(state, "retire-workers", rid=8)
    assert "needs workers=" in out[C][0]["error"]
    state.validate()


def test_retiring_worker_that_dies_counts_as_gone():
    state = given((W1, A1), (W2, A2))
    computed(state, "x", W1)
    request(state, "retire-workers", workers=[A1])
    state.handle(W2, [{"op": "goodbye"}], 3.0)  # the target leaves
    state.handle(W1, [{"op": "goodbye"}], 3.0)  # and so does the retiring worker
    state.flush()
    state.tick(3.1)
    out = state.flush()
    assert list(out[C][-1]["result"]["retired"]) == [A1]
    assert not state.jobs and not state.retiring
    state.validate()


# ---------------------------------------------------------------------------- restart


def test_restart_workers_asks_their_nanny_for_those_processes():
    state = given((W1, A1, N1), (W2, A2, N1), nannies=[N1])
    out = request(state, "restart-workers", workers=[A2])
    assert out == {N1: [{"op": "restart", "workers": ["w2"], "id": 1}]}
    state.handle(N1, [{"op": "reply", "id": 1, "value": True}], 3.0)
    assert state.flush() == {C: [{"op": "reply", "id": 7,
                                  "result": {"nanny-1": [True, None]}}]}
    out = request(state, "restart-workers", rid=8, workers=["tcp://nobody:1"])
    assert "no such workers" in out[C][0]["error"]
    state.validate()


def test_restart_workers_without_nanny_is_a_clear_error():
    state = given((W1, A1))
    out = request(state, "restart-workers", workers=[A1])
    assert "have no Nanny" in out[C][0]["error"] and out[C][0]["kind"] == "ValueError"


def test_retire_spreads_the_data_over_the_workers_that_stay():
    state = given((W1, A1), (W2, A2), (W3, A3))
    for key in "abcd":
        computed(state, key, W1)
    out = request(state, "retire-workers", workers=[A1])
    moved = {w: [item[0] for item in ops[0]["items"]] for w, ops in out.items()}
    assert sorted(moved) == [W2, W3] and len(moved[W2]) == len(moved[W3]) == 2
    state.validate()
