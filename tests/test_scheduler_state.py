"""SchedulerState, sans-IO: feed ops with an explicit ``now``, compare the exact ops it sends.

Payloads, values and exceptions are opaque bytes to the scheduler, so these tests use short
byte strings for them. Every scenario ends with ``state.validate()``.
"""

from __future__ import annotations

import pytest

from zfabric import protocol
from zfabric.config import PROTOCOL_VERSION, Config
from zfabric.scheduler.state import FIRE_AND_FORGET, SchedulerState

W1, W2, W3 = b"w1", b"w2", b"w3"
A1, A2, A3 = "tcp://10.0.0.1:1001", "tcp://10.0.0.2:1002", "tcp://10.0.0.3:1003"
C, C2 = b"client-1", b"client-2"
MB = 2**20


# ---------------------------------------------------------------------------- helpers


def new_state(**config) -> SchedulerState:
    return SchedulerState(address="tcp://sched:8786", config=Config(**config))


def welcome(state: SchedulerState) -> dict:
    return {"op": "welcome", "epoch": state.epoch, "address": "tcp://sched:8786",
            "warnings": [], "heartbeat_s": state.config.HEARTBEAT_INTERVAL_S}


def join_worker(state, ident, address, now=0.0, nthreads=1, **extra) -> None:
    state.handle(ident, [protocol.hello("worker", ident.decode(), address=address,
                                        nthreads=nthreads, **extra)], now)


def join_client(state, ident=C, now=0.0) -> None:
    state.handle(ident, [protocol.hello("client", ident.decode())], now)


def given(*workers, clients=(C,), nthreads=1, **config) -> SchedulerState:
    """A state with these (ident, address) workers and clients joined; outbox flushed."""
    state = new_state(**config)
    for ident, address in workers:
        join_worker(state, ident, address, nthreads=nthreads)
    for c in clients:
        join_client(state, c)
    state.flush()
    return state


def task(key, deps=(), **opts) -> list:
    return [key, b"payload-" + key.encode(), list(deps), opts or None]


def compute(key, inline=None, who_has=None, options=None) -> list:
    return [key, b"payload-" + key.encode(), inline, who_has, options]


def submit(state, *tasks, client=C, now=1.0) -> dict:
    state.handle(client, [{"op": "submit", "tasks": list(tasks)}], now)
    return state.flush()


def finish(state, worker, key, value=b"v", nbytes=10, duration=0.001, now=2.0) -> dict:
    state.handle(worker, [{"op": "finished", "tasks": [[key, nbytes, value, duration]]}], now)
    return state.flush()


def err(state, worker, key, exc=b"exc", tb=b"tb", text="ValueError: bad", now=2.0) -> dict:
    state.handle(worker, [{"op": "erred", "items": [[key, exc, tb, text, None]]}], now)
    return state.flush()


def memory(*items) -> dict:
    return {"op": "memory", "items": list(items)}


def erred_item(key, exc=b"exc", tb=b"tb", text="ValueError: bad", kind=None, extra=None):
    return [key, exc, tb, text, kind, extra]


# ---------------------------------------------------------------------------- hello


def test_worker_and_client_hello_get_welcome():
    state = new_state()
    # When a worker and a client say hello
    join_worker(state, W1, A1, nthreads=4, name="alice", memory_limit=MB,
                resources={"GPU": 1})
    join_client(state, C)
    # Then each gets a welcome with the scheduler's epoch
    assert state.flush() == {W1: [welcome(state)], C: [welcome(state)]}
    ws = state.workers[W1]
    assert (ws.name, ws.nthreads, ws.memory_limit, ws.resources) == ("alice", 4, MB, {"GPU": 1})
    assert state.info()["workers"][A1]["name"] == "alice"
    state.validate()


def test_protocol_version_mismatch_is_refused_naming_both_versions():
    state = new_state()
    hello = protocol.hello("client", "old")
    hello["protocol"] = PROTOCOL_VERSION + 98
    # When a peer with another protocol version says hello
    state.handle(C, [hello], 0.0)
    # Then it gets one fatal error naming both versions, and is not registered
    out = state.flush()
    assert list(out) == [C] and len(out[C]) == 1
    error = out[C][0]
    assert error["op"] == "error" and error["fatal"] is True
    assert f"protocol version {PROTOCOL_VERSION + 98} is not supported" in error["message"]
    assert f"speaks version {PROTOCOL_VERSION}" in error["message"]
    assert C not in state.clients
    state.validate()


def test_library_version_mismatch_is_a_warning_in_welcome():
    state = SchedulerState(versions={"python": "3.12.1", "cloudpickle": "3.0.0",
                                     "zfabric": "0.1.0"})
    hello = protocol.hello("client", "c")
    hello["versions"] = {"python": "3.11.9", "cloudpickle": "3.0.0", "zfabric": "0.1.0"}
    state.handle(C, [hello], 0.0)
    [op] = state.flush()[C]
    assert op["op"] == "welcome" and op["warnings"] == ["python 3.12 here vs 3.11 there"]


def test_unknown_peer_is_asked_to_reregister():
    state = new_state()
    # When a peer that never said hello submits work
    state.handle(b"stranger", [{"op": "submit", "tasks": [task("a")]}], 0.0)
    # Then it is told to register again, and nothing else happens
    assert state.flush() == {
        b"stranger": [{"op": "reregister", "reason": "unknown peer sent 'submit'"}]}
    assert state.tasks == {}
    # And an unknown peer's goodbye needs no answer
    state.handle(b"stranger", [{"op": "goodbye"}], 0.0)
    assert state.flush() == {}
    state.validate()


def test_ops_after_hello_in_the_same_message_are_handled():
    state = given((W1, A1), clients=())
    state.handle(C, [protocol.hello("client", "c"), {"op": "submit", "tasks": [task("a")]}], 0.0)
    assert state.flush() == {C: [welcome(state)], W1: [{"op": "compute",
                                                           "tasks": [compute("a")]}]}
    state.validate()


def test_worker_hello_without_data_address_is_an_error():
    state = new_state()
    state.handle(W1, [protocol.hello("worker", "w", address="nowhere")], 0.0)
    [op] = state.flush()[W1]
    assert op["op"] == "error" and "needs a data address" in op["message"]
    assert state.workers == {}
    state.handle(W1, [protocol.hello("spaceship", "x")], 0.0)
    [op] = state.flush()[W1]
    assert op["op"] == "error" and "unknown role 'spaceship'" in op["message"]


def test_new_incarnation_at_same_address_replaces_the_old_worker():
    state = given((W1, A1))
    submit(state, task("a"))
    # When another process registers with W1's data address
    join_worker(state, b"w1-reborn", A1, now=3.0)
    # Then W1 is removed (told to reregister) and its task goes to the new one
    out = state.flush()
    assert out[W1] == [{"op": "reregister", "reason": "removed: replaced by a new incarnation"}]
    assert out[b"w1-reborn"] == [welcome(state), {"op": "compute", "tasks": [compute("a")]}]
    assert list(state.workers) == [b"w1-reborn"]
    state.validate()


# ---------------------------------------------------------------------------- dispatch


def test_tasks_spread_over_least_loaded_workers():
    state = given((W1, A1), (W2, A2))
    # When a client submits two independent tasks
    out = submit(state, task("a"), task("b"))
    # Then each worker gets one
    assert out == {W1: [{"op": "compute", "tasks": [compute("a")]}],
                   W2: [{"op": "compute", "tasks": [compute("b")]}]}
    assert state.tasks["a"].state == state.tasks["b"].state == "processing"
    state.validate()


def test_task_before_any_worker_waits_in_queue_then_runs():
    state = given()
    assert submit(state, task("a")) == {}
    assert state.tasks["a"].state == "queued"
    join_worker(state, W1, A1, now=2.0)
    assert state.flush() == {W1: [welcome(state), {"op": "compute", "tasks": [compute("a")]}]}
    state.validate()


def test_prefetch_limit_then_refill_on_finish():
    state = given((W1, A1))
    keys = [f"t{i}" for i in range(7)]
    # When 7 tasks go to one single-threaded worker with no duration known yet
    out = submit(state, *(task(k) for k in keys))
    # Then it gets nthreads * 2 + 2 = 4 of them in one compute op; 3 wait in the queue
    assert out == {W1: [{"op": "compute", "tasks": [compute(k) for k in keys[:4]]}]}
    assert [state.tasks[k].state for k in keys[4:]] == ["queued"] * 3
    # When a fast task (0.1 ms) finishes, 20 ms of work may queue: the backlog drains in order
    out = finish(state, W1, "t0", duration=1e-4)
    assert out == {C: [memory(["t0", b"v", None, 10])],
                   W1: [{"op": "compute", "tasks": [compute(k) for k in keys[4:]]}]}
    assert state.workers[W1].limit == 1 + 200
    state.validate()


def test_prefetch_shrinks_for_slow_tasks():
    state = given((W1, A1))
    submit(state, *(task(f"t{i}") for i in range(6)))
    # When a slow task finishes (1 s: the 20 ms prefetch target needs just one extra)
    out = finish(state, W1, "t0", duration=1.0)
    # Then the worker's limit is nthreads + 1 = 2, and with 3 still there it gets no more
    assert out == {C: [memory(["t0", b"v", None, 10])]}
    assert state.workers[W1].limit == 2
    assert finish(state, W1, "t1", duration=1.0) == {C: [memory(["t1", b"v", None, 10])]}
    out = finish(state, W1, "t2", duration=1.0)
    assert out[W1] == [{"op": "compute", "tasks": [compute("t4")]}]
    state.validate()


def test_priority_decides_queue_order():
    state = given()
    submit(state, task("low"), task("high", priority=10), task("mid", priority=5))
    join_worker(state, W1, A1)
    out = state.flush()
    keys = [t[0] for t in out[W1][1]["tasks"]]
    assert keys == ["high", "mid", "low"]
    # a user priority is shipped, so the worker's queue honours it too; none costs nothing
    assert out[W1][1]["tasks"][0][4] == {"priority": 10}
    assert out[W1][1]["tasks"][2][4] is None
    state.validate()


def test_same_key_twice_is_one_task():
    state = given((W1, A1), (W2, A2), clients=(C, C2))
    submit(state, task("a"))
    # When another client submits the same key, it just wants it too
    assert submit(state, task("a"), client=C2) == {}
    out = finish(state, W1, "a")
    assert out == {C: [memory(["a", b"v", None, 10])], C2: [memory(["a", b"v", None, 10])]}
    # And a third submit of a finished key gets the result at once
    state.handle(C2, [{"op": "release", "keys": ["a"]}], 3.0)
    assert submit(state, task("a"), client=C2) == {C2: [memory(["a", b"v", None, 10])]}
    state.validate()


# ---------------------------------------------------------------------------- dependencies


def test_small_dependency_rides_inline_in_compute():
    state = given((W1, A1), (W2, A2))
    # Given a on W1 and b(a) that may only run on W2
    submit(state, task("a"), task("b", deps=["a"], workers=[A2]))
    assert state.tasks["b"].state == "waiting"
    # When a finishes with a small value
    out = finish(state, W1, "a", value=b"value-a")
    # Then the client hears of a, and W2 gets b with a's bytes inside the compute op
    assert out == {
        C: [memory(["a", b"value-a", None, 10])],
        W2: [{"op": "compute", "tasks": [compute("b", inline={"a": b"value-a"},
                                                  options={"workers": [A2]})]}],
    }
    state.validate()


def test_dependency_already_on_the_worker_is_not_sent_again():
    state = given((W1, A1))
    submit(state, task("a"), task("b", deps=["a"]))
    out = finish(state, W1, "a")
    assert out[W1] == [{"op": "compute", "tasks": [compute("b")]}]
    state.validate()


def test_large_dependency_goes_by_who_has():
    state = given((W1, A1), (W2, A2))
    submit(state, task("a"), task("b", deps=["a"], workers=[A2]))
    # When a finishes with a large value that stays on W1
    out = finish(state, W1, "a", value=None, nbytes=10 * MB)
    # Then the client learns where a is, and W2 is told to fetch it from W1
    assert out == {
        C: [memory(["a", None, [A1], 10 * MB])],
        W2: [{"op": "compute", "tasks": [compute("b", who_has={"a": [A1]},
                                                  options={"workers": [A2]})]}],
    }
    state.validate()


def test_task_prefers_the_worker_holding_its_large_dependency():
    state = given((W1, A1), (W2, A2))
    submit(state, task("a"), task("other"))  # a on W1, other on W2
    finish(state, W2, "other")
    out = finish(state, W1, "a", value=None, nbytes=10 * MB)
    out = submit(state, task("b", deps=["a"]))
    assert out == {W1: [{"op": "compute", "tasks": [compute("b")]}]}
    state.validate()


def test_dependency_on_unknown_key_fails_with_lost_data():
    state = given((W1, A1))
    out = submit(state, task("b", deps=["ghost"]))
    [op] = out[C]
    assert op["op"] == "erred"
    [item] = op["items"]
    assert item[0] == "b" and item[4] == "LostDataError" and "'ghost'" in item[3]
    state.validate()


def test_worker_missing_a_dependency_reroutes():
    state = given((W1, A1), (W2, A2))
    submit(state, task("a"), task("b", deps=["a"], workers=[A2]))
    finish(state, W1, "a", value=None, nbytes=10 * MB)
    # When W2 reports it could not fetch a from W1 (W1 lost it), a is recomputed first
    state.handle(W2, [{"op": "missing", "key": "b", "dep": "a", "address": A1}], 3.0)
    out = state.flush()
    assert out[C] == [{"op": "lost", "keys": ["a"]}]
    assert state.tasks["b"].state == "waiting"
    assert state.tasks["a"].state == "processing"
    state.validate()


# ---------------------------------------------------------------------------- errors, retries


def test_error_propagates_to_dependents_with_the_same_error():
    state = given((W1, A1))
    submit(state, task("a"), task("b", deps=["a"]), task("c", deps=["b"]))
    # When a fails
    out = err(state, W1, "a")
    # Then a, b and c are erred with a's exception, in one message to the client
    assert out == {C: [{"op": "erred", "items": [erred_item("a"), erred_item("b"),
                                                   erred_item("c")]}]}
    assert {state.tasks[k].state for k in "abc"} == {"erred"}
    # And a task submitted later on top of a fails at once with the same error
    out = submit(state, task("d", deps=["c"]))
    assert out == {C: [{"op": "erred", "items": [erred_item("d")]}]}
    state.validate()


def test_retries_then_error():
    state = given((W1, A1))
    submit(state, task("a", retries=2))
    # When a fails twice, it is sent again each time
    for _ in range(2):
        assert err(state, W1, "a") == {W1: [{"op": "compute", "tasks": [compute("a")]}]}
    # When it fails a third time, the client gets the error
    assert err(state, W1, "a", text="ValueError: third") == {
        C: [{"op": "erred", "items": [erred_item("a", text="ValueError: third")]}]}
    state.validate()


def test_retry_then_success():
    state = given((W1, A1))
    submit(state, task("a", retries=1))
    err(state, W1, "a")
    assert finish(state, W1, "a") == {C: [memory(["a", b"v", None, 10])]}
    state.validate()


def test_stale_finished_from_wrong_worker_is_freed():
    state = given((W1, A1), (W2, A2))
    submit(state, task("a"))
    # When W2 claims a result for a task it never had
    out = finish(state, W2, "a")
    # Then W2 is told to drop it and a still waits for W1
    assert out == {W2: [{"op": "free", "keys": ["a"]}]}
    assert state.tasks["a"].processing_on is state.workers[W1]
    out = err(state, W2, "a")
    assert out == {} and state.tasks["a"].state == "processing"
    state.validate()


# ---------------------------------------------------------------------------- release, cancel


def test_release_frees_on_worker_and_forgets():
    state = given((W1, A1))
    submit(state, task("a"))
    finish(state, W1, "a")
    # When the client releases its last future for a
    state.handle(C, [{"op": "release", "keys": ["a"]}], 3.0)
    # Then the worker frees it and the scheduler forgets it
    assert state.flush() == {W1: [{"op": "free", "keys": ["a"]}]}
    assert state.tasks == {}
    state.validate()


def test_release_keeps_lineage_until_dependents_are_gone():
    state = given((W1, A1))
    submit(state, task("a"), task("b", deps=["a"]))
    finish(state, W1, "a")
    finish(state, W1, "b")
    # When a is released while b is held: a's data goes, its record stays for lineage
    state.handle(C, [{"op": "release", "keys": ["a"]}], 3.0)
    assert state.flush() == {W1: [{"op": "free", "keys": ["a"]}]}
    assert state.tasks["a"].state == "released"
    # When b is released, both are forgotten
    state.handle(C, [{"op": "release", "keys": ["b"]}], 3.0)
    assert state.flush() == {W1: [{"op": "free", "keys": ["b"]}]}
    assert state.tasks == {}
    state.validate()


def test_intermediate_result_is_freed_once_dependents_finish():
    state = given((W1, A1))
    submit(state, task("a"), task("b", deps=["a"]))
    state.handle(C, [{"op": "release", "keys": ["a"]}], 1.5)
    assert state.flush() == {}  # b still needs a
    finish(state, W1, "a")
    out = finish(state, W1, "b")
    assert out == {C: [memory(["b", b"v", None, 10])], W1: [{"op": "free", "keys": ["a"]}]}
    assert state.tasks["a"].state == "released"
    state.validate()


def test_release_of_processing_task_frees_it_on_the_worker():
    state = given((W1, A1))
    submit(state, task("a"))
    state.handle(C, [{"op": "release", "keys": ["a"]}], 3.0)
    assert state.flush() == {W1: [{"op": "free", "keys": ["a"]}]}
    assert state.tasks == {} and state.workers[W1].processing == {}
    # And the late result is refused
    assert finish(state, W1, "a") == {W1: [{"op": "free", "keys": ["a"]}]}
    state.validate()


def test_cancel_stops_task_and_dependents():
    state = given((W1, A1))
    submit(state, task("a"), task("b", deps=["a"]))
    # When the client cancels a
    state.handle(C, [{"op": "cancel", "keys": ["a"]}], 3.0)
    # Then it hears both are cancelled, the worker drops a, and both are forgotten
    out = state.flush()
    assert out[W1] == [{"op": "free", "keys": ["a"]}]
    [op] = out[C]
    assert op["op"] == "cancelled" and sorted(op["keys"]) == ["a", "b"]
    assert state.tasks == {}
    state.validate()


def test_a_task_cancelled_while_it_runs_holds_its_thread_until_the_worker_says_it_ended():
    # Given two one-thread workers, w1 running "slow" (it said it started)
    state = given((W1, A1), (W2, A2), PREFETCH_MAX=0)
    submit(state, task("slow"))
    [ws1] = [ws for ws in state.workers.values() if "slow" in ws.processing]
    state.handle(ws1.ident, [{"op": "started", "keys": ["slow"]}], 2.0)
    # When the client cancels it (a thread cannot be stopped: it runs on)
    state.handle(C, [{"op": "cancel", "keys": ["slow"]}], 3.0)
    state.flush()
    # Then a new task goes to the other worker, not behind the busy thread
    out = submit(state, task("x"), now=4.0)
    other = W2 if ws1.ident == W1 else W1
    assert list(out) == [other] and [t[0] for t in out[other][0]["tasks"]] == ["x"]
    assert ws1.occupancy == 1
    state.validate()
    # and once w1 says the cancelled task ended, its thread counts as free again
    state.handle(ws1.ident, [{"op": "thread-free", "keys": ["slow"]}], 5.0)
    assert ws1.occupancy == 0
    out = submit(state, task("y"), now=6.0)
    assert list(out) == [ws1.ident]
    state.validate()


def test_want_unknown_key_is_cancelled():
    state = given((W1, A1))
    state.handle(C, [{"op": "want", "keys": ["nope"]}], 1.0)
    assert state.flush() == {C: [{"op": "cancelled", "keys": ["nope"]}]}


def test_client_goodbye_releases_everything():
    state = given((W1, A1))
    submit(state, task("a"), task("b"))
    finish(state, W1, "a")
    state.handle(C, [{"op": "goodbye"}], 3.0)
    out = state.flush()
    assert sorted(op["op"] for op in out[W1]) == ["free"]
    assert sorted(out[W1][0]["keys"]) == ["a", "b"]
    assert state.tasks == {} and C not in state.clients
    state.validate()


def test_silent_client_is_dropped_after_its_ttl():
    state = given((W1, A1), CLIENT_TTL_S=30.0)
    submit(state, task("a"), now=0.0)
    state.handle(W1, [{"op": "heartbeat"}], 29.0)
    state.tick(29.0)
    assert C in state.clients
    state.handle(W1, [{"op": "heartbeat"}], 30.5)
    state.tick(30.5)
    assert C not in state.clients and state.tasks == {}
    assert state.flush() == {W1: [{"op": "free", "keys": ["a"]}]}
    state.validate()


def test_fire_and_forget_runs_to_the_end_then_forgets():
    state = given((W1, A1))
    submit(state, task("a"))
    # When the client marks a fire-and-forget and drops its future
    state.handle(C, [{"op": "want", "keys": ["a"], "fire_and_forget": True},
                     {"op": "release", "keys": ["a"]}], 1.5)
    # Then nothing is cancelled
    assert state.flush() == {}
    assert state.tasks["a"].state == "processing"
    # When it finishes, its value is freed and the key forgotten; nobody is told
    assert finish(state, W1, "a") == {W1: [{"op": "free", "keys": ["a"]}]}
    assert state.tasks == {} and not state.wanted_keys(state.clients[FIRE_AND_FORGET])
    state.validate()


def test_fire_and_forget_option_in_submit():
    state = given((W1, A1))
    submit(state, task("a", fire_and_forget=True))
    state.handle(C, [{"op": "release", "keys": ["a"]}], 1.5)
    assert state.tasks["a"].state == "processing"
    finish(state, W1, "a")
    assert state.tasks == {}
    state.validate()


# ---------------------------------------------------------------------------- scatter


def test_scatter_inline_and_on_worker():
    state = given((W1, A1))
    state.handle(C, [{"op": "scatter", "items": [["x", b"small", 5, []],
                                                  ["y", None, 10 * MB, [A1]]]}], 1.0)
    assert state.flush() == {C: [memory(["x", b"small", None, 5], ["y", None, [A1], 10 * MB])]}
    # And a task using both gets x inline and y locally
    out = submit(state, task("z", deps=["x", "y"]))
    assert out == {W1: [{"op": "compute", "tasks": [compute("z", inline={"x": b"small"})]}]}
    state.validate()


def test_scattered_data_lost_with_its_worker_is_lost_data_error():
    state = given((W1, A1), (W2, A2), WORKER_TTL_S=5.0)
    state.handle(C, [{"op": "scatter", "items": [["y", None, MB, [A1]]]}], 1.0)
    state.flush()
    # When W1 goes silent (W2 keeps beating)
    state.handle(W2, [{"op": "heartbeat"}], 6.0)
    state.tick(6.0)
    # Then y cannot be recomputed: the client gets LostDataError
    out = state.flush()
    [op] = out[C]
    assert op["op"] == "erred"
    [item] = op["items"]
    assert item[0] == "y" and item[4] == "LostDataError" and "scatter it again" in item[3]
    state.validate()


def test_scatter_to_unknown_worker_fails_at_once():
    state = given((W1, A1))
    state.handle(C, [{"op": "scatter", "items": [["y", None, MB, ["tcp://gone:1"]]]}], 1.0)
    [op] = state.flush()[C]
    assert op["op"] == "erred" and op["items"][0][4] == "LostDataError"
    state.validate()


# ---------------------------------------------------------------------------- worker loss


def test_silent_worker_is_removed_and_its_task_rescheduled():
    state = given((W1, A1), (W2, A2), WORKER_TTL_S=5.0)
    submit(state, task("a"), now=0.0)
    state.handle(W1, [{"op": "started", "keys": ["a"]}], 0.5)
    # When W1 stays silent past its ttl while W2 beats
    state.handle(W2, [{"op": "heartbeat"}], 5.0)
    state.tick(5.0)
    assert W1 in state.workers  # not yet: silent 4.5 s
    state.handle(W2, [{"op": "heartbeat"}], 5.6)
    state.tick(5.6)
    # Then W1 is gone and a runs on W2, counted as suspicious once
    assert W1 not in state.workers and A1 not in state.workers_by_address
    assert state.flush() == {W2: [{"op": "compute", "tasks": [compute("a")]}]}
    assert state.tasks["a"].suspicious == 1
    state.validate()


def test_task_on_too_many_dead_workers_fails_with_killed_worker():
    state = given(WORKER_TTL_S=1.0, ALLOWED_FAILURES=3)
    submit(state, task("a"), now=0.0)
    now = 0.0
    for i in range(4):
        ident, address = f"w{i}".encode(), f"tcp://10.0.1.{i}:1"
        # Given a fresh worker that starts a, then dies
        join_worker(state, ident, address, now=now)
        out = state.flush()
        assert out == {ident: [welcome(state), {"op": "compute", "tasks": [compute("a")]}]}
        state.handle(ident, [{"op": "started", "keys": ["a"]}], now)
        now += 2.0
        state.tick(now)
    # Then after allowed_failures + 1 = 4 deaths the client gets KilledWorker
    out = state.flush()
    [op] = out[C]
    [item] = op["items"]
    assert op["op"] == "erred" and item[0] == "a" and item[4] == "KilledWorker"
    assert item[5] == {"task": "a", "last_worker": "tcp://10.0.1.3:1", "count": 4}
    assert "Allowed failures: 3" in item[3]
    state.validate()


def test_task_not_started_is_not_suspicious():
    state = given((W1, A1), (W2, A2))
    submit(state, task("a"))
    state.handle(W1, [{"op": "goodbye", "reason": "closing"}], 1.0)
    assert state.flush()[W2] == [{"op": "compute", "tasks": [compute("a")]}]
    assert state.tasks["a"].suspicious == 0
    state.validate()


def test_nanny_vouches_for_a_busy_worker():
    state = new_state(WORKER_TTL_S=1.0)
    state.handle(b"nanny", [protocol.hello("nanny", "n")], 0.0)
    join_worker(state, W1, A1, nanny="nanny")
    state.flush()
    state.handle(b"nanny", [{"op": "heartbeat", "workers": ["w1"]}], 5.0)
    state.tick(5.0)
    assert W1 in state.workers
    # When the nanny reports the process died, the worker goes at once
    state.handle(b"nanny", [{"op": "worker-died", "worker": "w1", "reason": "killed -9"}], 5.1)
    assert W1 not in state.workers
    state.validate()


def test_lost_large_result_is_recomputed():
    state = given((W1, A1), (W2, A2), WORKER_TTL_S=5.0)
    submit(state, task("a"), now=0.0)
    finish(state, W1, "a", value=None, nbytes=MB, now=0.5)
    # When W1, the only holder of a, dies
    state.handle(W2, [{"op": "heartbeat"}], 6.0)
    state.tick(6.0)
    # Then the client is told a is lost, and a runs again on W2
    assert state.flush() == {C: [{"op": "lost", "keys": ["a"]}],
                             W2: [{"op": "compute", "tasks": [compute("a")]}]}
    assert finish(state, W2, "a", value=None, nbytes=MB, now=6.5) == {
        C: [memory(["a", None, [A2], MB])]}
    state.validate()


def test_lost_result_recomputed_through_its_lineage():
    state = given((W1, A1), WORKER_TTL_S=5.0)
    # Given b(a), both large, with only b wanted: a is released after b finished
    submit(state, task("a"), task("b", deps=["a"]), now=0.0)
    state.handle(C, [{"op": "release", "keys": ["a"]}], 0.1)
    finish(state, W1, "a", value=None, nbytes=MB, now=0.2)
    finish(state, W1, "b", value=None, nbytes=MB, now=0.3)
    assert state.tasks["a"].state == "released"
    # When W1 dies and W2 joins
    join_worker(state, W2, A2, now=6.0)
    state.tick(6.0)
    # Then a is recomputed on W2 first, and b waits for it
    out = state.flush()
    assert out[C] == [{"op": "lost", "keys": ["b"]}]
    assert out[W2][-1] == {"op": "compute", "tasks": [compute("a")]}
    assert state.tasks["b"].state == "waiting"
    finish(state, W2, "a", value=None, nbytes=MB, now=6.5)
    assert state.tasks["b"].state == "processing"
    state.validate()


def test_small_value_survives_its_worker():
    state = given((W1, A1), (W2, A2), WORKER_TTL_S=5.0)
    submit(state, task("a"), now=0.0)
    finish(state, W1, "a", value=b"small", now=0.5)
    state.handle(W2, [{"op": "heartbeat"}], 6.0)
    state.tick(6.0)
    # The scheduler holds small values itself: nothing is lost
    assert state.flush() == {}
    assert state.tasks["a"].state == "memory"
    out = submit(state, task("b", deps=["a"]), now=6.1)
    assert out == {W2: [{"op": "compute", "tasks": [compute("b", inline={"a": b"small"})]}]}
    state.validate()


# ---------------------------------------------------------------------------- compact records


def test_a_record_keeps_rare_fields_apart():
    state = given((W1, A1))
    submit(state, task("a"), task("b", retries=2, workers=[A1]))
    a, b = state.tasks["a"], state.tasks["b"]
    # Then a plain task has no side record; one with options has one
    assert a.extra is None and (a.options, a.retries, a.error, a.suspicious) == (None, 0, None, 0)
    assert b.options == {"workers": [A1]} and b.retries == 2 and b.restricted
    # And whether it started is its worker's business
    assert not a.started
    state.handle(W1, [{"op": "started", "keys": ["a"]}], 1.5)
    assert a.started and state.workers[W1].started == {a}
    finish(state, W1, "a")
    assert not a.started and not state.workers[W1].started
    state.validate()


def test_the_log_of_what_a_worker_holds_is_compacted():
    state = given((W1, A1), (W2, A2))
    keys = [f"t{i}" for i in range(400)]
    submit(state, *(task(k) for k in keys))
    for k in keys:
        finish(state, W1 if state.tasks[k].processing_on.ident == W1 else W2, k)
    ws = state.workers[W1]
    held = ws.nheld
    assert held == len(ws.has_what) > 100
    # When most keys are released, then submitted again (the log gets stale entries)
    state.handle(C, [{"op": "release", "keys": keys[:350]}], 3.0)
    state.flush()
    submit(state, *(task(k) for k in keys[:10]), now=4.0)
    state.validate()
    # Then the log stays within twice what it holds (plus a little)
    assert len(ws._held) <= 2 * ws.nheld + 64
    # And a worker that leaves drops out of every task it held; values kept inline survive
    state.handle(W1, [{"op": "goodbye"}], 5.0)
    state.flush()
    assert all(state.workers[W2] in t.who_has or not t.who_has for t in state.tasks.values())
    assert {t.state for t in state.tasks.values()} <= {"memory", "processing", "queued"}
    state.validate()


def test_many_dependents_of_one_task_come_and_go():
    state = given((W1, A1))
    submit(state, task("gate"))
    keys = [f"d{i}" for i in range(300)]
    submit(state, *(task(k, deps=["gate"]) for k in keys))
    gate = state.tasks["gate"]
    # When most of the dependents are released (forgotten: nobody needs them)
    state.handle(C, [{"op": "release", "keys": keys[:250]}], 2.0)
    state.flush()
    # Then only the others remain dependents, and each once
    assert sorted(t.key for t in gate.dependents) == sorted(keys[250:])
    assert len(gate.children) < 2 * 50 + 2  # the list was rebuilt along the way
    state.validate()
    # And the gate finishing releases exactly them
    out = finish(state, W1, "gate")
    ran = [t[0] for op in out[W1] if op["op"] == "compute" for t in op["tasks"]]
    assert ran and set(ran) <= set(keys[250:])
    state.validate()


def test_a_dependency_named_twice_is_waited_for_once():
    state = given((W1, A1))
    submit(state, task("a"))
    submit(state, task("b", deps=["a", "a"]))
    assert state.tasks["b"].deps == (state.tasks["a"],)
    finish(state, W1, "a", value=b"va")
    assert state.tasks["b"].state == "processing"
    state.validate()


def test_a_released_task_submitted_again_keeps_one_link_to_each_dependency():
    state = given((W1, A1))
    submit(state, task("a"), task("b", deps=["a"]), task("c", deps=["b"]))
    finish(state, W1, "a")
    finish(state, W1, "b")
    finish(state, W1, "c")
    # b is released (nobody wants it) but kept for c's lineage
    state.handle(C, [{"op": "release", "keys": ["b"]}], 3.0)
    state.flush()
    assert state.tasks["b"].state == "released"
    submit(state, task("b", deps=["a"]), now=4.0)
    assert list(state.tasks["a"].dependents) == [state.tasks["b"]]
    state.validate()


# ---------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    "peer, op, message",
    [
        (C, {"op": "submit", "tasks": [["k", "not bytes", [], None]]}, "malformed task"),
        (C, {"op": "submit", "tasks": [["k", b"p"]]}, "malformed task"),
        (C, {"op": "submit", "tasks": [42]}, "malformed task"),
        (C, {"op": "release", "keys": [["unhashable"]]}, "malformed release keys"),
        (C, {"op": "want", "keys": [{"a": 1}]}, "malformed want keys"),
        (C, {"op": "scatter", "items": [["k", None, "many", []]]}, "malformed scatter item"),
        (C, {"op": "scatter", "items": [[1, None, 1, []]]}, "malformed scatter item"),
        (C, {"op": "scatter", "items": [["k", 5, 1, []]]}, "malformed scatter item"),
        (C, {"op": "scatter", "items": [["k", None, 1, "tcp://x:1"]]}, "malformed scatter item"),
        (C, {"op": "scatter", "items": [["a", b"v", 1, []]]}, "cannot scatter 'a'"),
        (C, {"op": "finished", "tasks": []}, "a client may not send 'finished'"),
        (C, {"op": "request", "id": 1, "kind": "who-has", "args": {"keys": 5}},
         "malformed who-has request keys"),
        (W1, {"op": "finished", "tasks": [["a"]]}, "malformed finished item"),
        (W1, {"op": "finished", "tasks": [["a", "big", None, 0.1]]}, "malformed finished"),
        (W1, {"op": "finished", "tasks": [["a", 10, None, "slow"]]}, "malformed finished"),
        (W1, {"op": "finished", "tasks": [["a", 10, 99, 0.1]]}, "malformed finished"),
        (W1, {"op": "finished", "tasks": [[["a"], 10, None, 0.1]]}, "malformed finished"),
        (W1, {"op": "erred", "items": [None]}, "malformed erred item"),
        (W1, {"op": "erred", "items": [["a", "exc", None, "t", None]]}, "malformed erred"),
        (W1, {"op": "erred", "items": [["a", None, None, 5, None]]}, "malformed erred"),
        (W1, {"op": "submit", "tasks": []}, "a worker may not send 'submit'"),
    ],
)
def test_malformed_op_gets_an_error_reply_and_state_stays_valid(peer, op, message):
    state = given((W1, A1))
    submit(state, task("a"))
    # When a registered peer sends an op that passes the schema but makes no sense
    state.handle(peer, [op], 2.0)
    # Then it gets one error naming the problem; the scheduler state is intact
    out = state.flush()
    assert list(out) == [peer]
    [reply] = out[peer]
    assert reply["op"] == "error" and message in reply["message"]
    state.validate()
    # And the state keeps working
    assert finish(state, W1, "a", now=3.0) == {C: [memory(["a", b"v", None, 10])]}
    state.validate()


def test_requests_info_who_has_processing():
    state = given((W1, A1))
    submit(state, task("a"), task("b"))
    finish(state, W1, "a", value=None, nbytes=MB)
    state.handle(C, [{"op": "request", "id": 1, "kind": "who-has", "args": {"keys": None}},
                     {"op": "request", "id": 2, "kind": "processing", "args": {}},
                     {"op": "request", "id": 3, "kind": "nonsense", "args": {}}], 3.0)
    assert state.flush() == {C: [
        {"op": "reply", "id": 1, "result": {"a": [A1], "b": []}},
        {"op": "reply", "id": 2, "result": {A1: ["b"]}},
        {"op": "reply", "id": 3, "error": "unknown request 'nonsense'"},
    ]}
    state.validate()


# ---------------------------------------------------------------------------- fuzz


def _random_value(rng, depth=0):
    choices = [None, True, 0, 1, -1, 2.5, "a", "x", A1, b"v", [], {}]
    if depth < 2:
        choices.append([_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))])
        choices.append({rng.choice(["keys", "workers", "priority", "retries", "resources",
                                    "fire_and_forget", "task_timeout"]):
                        _random_value(rng, depth + 1)})
    return rng.choice(choices)


#: Ops each role sends, to aim most random ops at a peer that may send them.
_ROLE_OPS = {
    C: ["submit", "release", "want", "cancel", "scatter", "request", "goodbye", "heartbeat"],
    W1: ["finished", "erred", "started", "missing", "heartbeat", "goodbye", "run-result"],
    b"nanny": ["heartbeat", "worker-died", "reply", "goodbye"],
}


def _random_op(rng, name: str) -> dict:
    keys = ["a", "b", "c", "x"]
    lists = [
        lambda: [rng.choice(keys)],
        lambda: [[rng.choice(keys), b"p", rng.sample(keys, rng.randint(0, 2)),
                  rng.choice([None, {"retries": 1}, {"workers": [A1]}, {"priority": 3},
                              {"resources": {"GPU": 1}}, _random_value(rng)])]],
        lambda: [[rng.choice(keys), rng.choice([1, 10 * MB]), rng.choice([None, b"v"]), 0.01]],
        lambda: [[rng.choice(keys), None, None, "ValueError: x", None]],
        lambda: [[rng.choice(keys), rng.choice([None, b"v"]), 5, [rng.choice([A1, A2])]]],
        lambda: [_random_value(rng) for _ in range(2)],
    ]
    by_type = {
        (int,): lambda: rng.choice([0, 1, 5]), (bytes,): lambda: b"x",
        (str,): lambda: rng.choice([*keys, A1, "w1"]), (list,): lambda: rng.choice(lists)(),
        (dict,): lambda: rng.choice([{}, {"keys": [rng.choice(keys)]}, _random_value(rng)]),
        (int, float): lambda: 1.0, (bytes, type(None)): lambda: None,
    }
    op = {"op": name, **{f: by_type[t]() for f, t in protocol.SCHEMAS[name].items()}}
    for extra in ("fire_and_forget", "reason", "metrics", "workers"):
        if rng.random() < 0.2:
            op[extra] = _random_value(rng)
    if name == "request":
        op["kind"] = rng.choice(["info", "who-has", "has-what", "processing", "task-states",
                                 "run", "restart", "nonsense"])
    return op


@pytest.mark.parametrize("seed", range(4))
def test_random_ops_never_crash_the_state_or_break_its_invariants(seed):
    import random

    rng = random.Random(seed)
    peers = [W1, W2, C, b"nanny", b"stranger"]
    everything = list(protocol.SCHEMAS)
    for _ in range(60):
        state = new_state(WORKER_TTL_S=5.0)
        join_worker(state, W1, A1)
        join_worker(state, W2, A2, nthreads=2, resources={"GPU": 1})
        join_client(state, C)
        state.handle(b"nanny", [protocol.hello("nanny", "nanny")], 0.0)
        now = 0.0
        for _ in range(40):
            now += rng.choice([0.0, 0.1, 1.0, 6.0])
            if rng.random() < 0.8:  # mostly ops the peer's role may send
                peer = rng.choice([C, W1, b"nanny"])
                name = rng.choice(_ROLE_OPS[peer])
                peer = W2 if peer == W1 and rng.random() < 0.5 else peer
            else:
                peer, name = rng.choice(peers), rng.choice(everything)
            try:  # only what passes the protocol's door reaches the state
                [op], _ = protocol.decode(protocol.encode([_random_op(rng, name)]))
            except Exception:
                continue
            state.handle(peer, [op], now)
            if rng.random() < 0.2:
                state.tick(now)
            state.flush()
            state.validate()


# ---------------------------------------------------------------------------- heartbeat interval


def test_heartbeat_interval_grows_with_the_cluster_and_bounds_heartbeats_per_second():
    state = new_state()
    told: dict[bytes, float] = {}  # what each peer was told last (welcome, then the op)
    broadcasts = 0
    for i in range(1000):
        ident = f"w{i}".encode()
        join_worker(state, ident, f"tcp://10.0.{i // 250}.{i % 250}:1")
        out = state.flush()
        for peer, ops in out.items():
            for op in ops:
                if op["op"] in ("welcome", "heartbeat-interval"):
                    told[peer] = op["heartbeat_s"]
        broadcasts += any(op["op"] == "heartbeat-interval" for ops in out.values() for op in ops)
        # Then at every size, the peers' heartbeats add up to at most 200 a second, and
        # everyone was told the same interval
        assert sum(1 / s for s in told.values()) <= 200 + 1e-6, i
        assert set(told.values()) == {state.liveness.interval_s}
    assert state.liveness.interval_s >= 1000 / 200
    assert broadcasts <= 15  # told again only each time the cluster grew by a quarter
    # And a small cluster beats at the configured interval
    assert new_state().liveness.interval_s == Config().HEARTBEAT_INTERVAL_S


def test_killed_worker_among_1000_is_detected_within_20_s():
    state = new_state()
    for i in range(1000):
        join_worker(state, f"w{i}".encode(), f"tcp://10.0.{i // 250}.{i % 250}:1")
    state.flush()
    interval = state.liveness.interval_s
    # When w0 is killed at t=0 and the others beat at the interval they were told
    now, gone_at = 0.0, None
    while now < 30.0 and gone_at is None:
        now += interval / 4
        for i in range(1, 1000):
            if (now + i * interval / 1000) % interval < interval / 4:  # spread, as peers do
                state.handle(f"w{i}".encode(), [{"op": "heartbeat"}], now)
        state.tick(now)
        if b"w0" not in state.workers:
            gone_at = now
    # Then it is removed within 20 s, and nobody else
    assert gone_at is not None and gone_at <= 20.0, gone_at
    assert len(state.workers) == 999
    state.validate()


def test_a_shrinking_cluster_is_told_a_shorter_interval_and_the_old_one_counts_a_while():
    state = new_state()
    for i in range(600):
        join_worker(state, f"w{i}".encode(), f"tcp://10.0.{i // 250}.{i % 250}:1")
    state.flush()
    long = state.liveness.interval_s
    for i in range(2, 600):
        state.handle(f"w{i}".encode(), [{"op": "goodbye"}], 1.0)
    out = state.flush()
    # Then the two left are told the configured interval again
    for peer in (b"w0", b"w1"):
        assert {"op": "heartbeat-interval", "heartbeat_s": Config().HEARTBEAT_INTERVAL_S} \
            in out[peer]
    # and a peer that beat at the old interval just before is not dropped meanwhile
    assert state.liveness.worker_ttl_s(1.0) >= 3 * long
    state.tick(1.0 + 2 * long)
    assert set(state.workers) == {b"w0", b"w1"}
    assert state.liveness.worker_ttl_s(1.0 + 4 * long) == Config().WORKER_TTL_S
