"""WorkerCore, sans-IO: feed the scheduler's ops and the shell's completions with an explicit
``now``; compare the exact actions it returns and the exact ops it sends.

Payloads and values are opaque to the core, so these tests use short byte strings for them.
"""

from __future__ import annotations

import ast
import logging
import math
import pathlib
import subprocess
import sys

import pytest

import zfabric
from zfabric.worker.actions import (
    ACQUIRE_VALUES,
    CANCEL,
    DROP,
    END_FETCH,
    EXECUTE,
    FETCH,
    FORGET,
    KEEP,
    REJOIN,
    REPLACE_THREAD,
    STOP,
    STORE,
    STORE_INLINE,
    TRANSITION,
    UNCANCEL,
    WELCOMED,
)
from zfabric.worker.execute import Outcome
from zfabric.worker.state import (
    FETCH_BATCH_KEYS,
    FETCH_TIMEOUT_S,
    FETCHES_PER_PEER,
    WorkerCore,
)

ME, A2, A3 = "tcp://10.0.0.1:1001", "tcp://10.0.0.2:1002", "tcp://10.0.0.3:1003"
HELLO = {"op": "hello", "role": "worker", "id": "w1"}


PURE = ["state", "fetches", "actions"]  # modules of zfabric/worker that do no I/O


# ---------------------------------------------------------------------------- purity


def test_the_core_imports_neither_zmq_nor_asyncio_nor_the_clock():
    # Its source names none of the modules that do I/O or read the clock
    forbidden = {"zmq", "asyncio", "socket", "threading", "time", "selectors", "os"}
    root = pathlib.Path(zfabric.__file__).parent / "worker"
    for name in PURE:
        tree = ast.parse((root / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            assert not {n.split(".")[0] for n in names} & forbidden, (name, names)
    # and it loads with zmq and asyncio blocked (without the worker package's shell)
    code = f"""
import builtins, os, sys, types
sys.modules["zmq"] = None
sys.modules["zmq.asyncio"] = None
real_import = builtins.__import__
def guarded(name, globals=None, locals=None, fromlist=(), level=0):
    caller = (globals or {{}}).get("__name__", "")
    if name.split(".")[0] == "asyncio" and caller.startswith("zfabric"):
        raise ImportError(f"{{caller}} imported asyncio")
    return real_import(name, globals, locals, fromlist, level)
builtins.__import__ = guarded
import zfabric
package = types.ModuleType("zfabric.worker")
package.__path__ = [os.path.join(os.path.dirname(zfabric.__file__), "worker")]
sys.modules["zfabric.worker"] = package
import importlib
for name in {PURE!r}:
    importlib.import_module("zfabric.worker." + name)
from zfabric.worker.state import WorkerCore
core = WorkerCore(inline_bytes=10, heartbeat_s=1.0, death_timeout_s=5.0, put_data_confirm_s=1.0)
core.tick(1.0)
assert sys.modules.get("zmq") is None
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr


# ---------------------------------------------------------------------------- helpers


def given(*, nanny: bool = False, heartbeat_s: float = 0.5, **kw) -> WorkerCore:
    """A core that said hello and was welcomed at t=0; outbox flushed."""
    core = WorkerCore(name="w1", address=ME, nanny=nanny, inline_bytes=1000,
                      heartbeat_s=heartbeat_s, death_timeout_s=10.0, put_data_confirm_s=2.0,
                      **kw)
    core.hello_op = HELLO
    core.hello()
    assert core.flush() == [HELLO]
    assert core.handle([welcome()], 0.0) == [(WELCOMED,)]
    return core


def welcome(**extra) -> dict:
    return {"op": "welcome", "epoch": "e1", "address": "tcp://sched:8786", "warnings": [],
            **extra}


def compute(key, inline=None, who_has=None, options=None) -> list:
    return [key, b"payload-" + key.encode(), inline, who_has, options]


def ok(key, header=None, nbytes=10) -> Outcome:
    return Outcome(key, True, value=key.upper(), header=header or b"h-" + key.encode(),
                   buffers=[], nbytes=nbytes, duration=0.5, start=100.0, stop=100.5)


def run(core: WorkerCore, *keys, now: float = 0.0) -> None:
    """Hand every ready task to the executor (the actions must be exactly these EXECUTEs)."""
    acts = core.pump(now)
    assert [a[:2] for a in acts] == [(EXECUTE, k) for k in keys]


def finished(key, header=None, nbytes=10) -> list:
    return [key, nbytes, header or b"h-" + key.encode(), 0.5, 100.0, 100.5, 0]


# ---------------------------------------------------------------------------- tasks


def test_a_task_without_dependencies_runs_and_reports_inline():
    core = given()
    # When the scheduler sends a task
    assert core.handle([{"op": "compute", "tasks": [compute("x", options={"priority": 3})]}],
                       1.0) == []
    # Then the next turn hands it to the executor, with its options and no borrowed values
    assert core.pump(1.0) == [(EXECUTE, "x", b"payload-x", {"priority": 3}, None, None)]
    assert core.executing == {"x": 0.0}
    # When it finishes, its value is kept and reported inline (small) in one finished op
    out = ok("x")
    assert core.done([out]) == [(KEEP, out)]
    assert core.flush() == [{"op": "finished", "tasks": [finished("x")]}]
    assert "x" in core.held and not core.executing


def test_started_long_running_finished_and_status_leave_in_order():
    core = given()
    core.handle([{"op": "compute", "tasks": [compute("x")]}], 1.0)
    run(core, "x", now=1.0)
    core.send({"op": "run-result", "id": 1, "value": None})
    core.started(["x"])
    core.seceded([["x", True]])
    core.done([ok("x")])
    core.memory(True, "memory is high", tight=True)
    assert [op["op"] for op in core.flush()] == [
        "run-result", "started", "long-running", "finished", "worker-status"]


def test_a_task_that_started_and_ended_since_the_last_flush_is_reported_finished_only():
    core = given()
    core.handle([{"op": "compute", "tasks": [compute("x"), compute("y")]}], 1.0)
    run(core, "x", "y", now=1.0)
    core.started(["x", "y"])
    core.done([ok("x")])
    # y still runs: the scheduler hears it started; x's finished tells it all about x
    assert core.flush() == [{"op": "started", "keys": ["y"]},
                            {"op": "finished", "tasks": [finished("x")]}]
    core.done([ok("y")])
    assert core.flush() == [{"op": "finished", "tasks": [finished("y")]}]


def test_inline_dependencies_are_stored_once():
    core = given()
    ops = [{"op": "compute", "tasks": [compute("y", inline={"x": b"vx"}),
                                       compute("z", inline={"x": b"vx"})]}]
    assert core.handle(ops, 1.0) == [(STORE_INLINE, "x", b"vx")]
    run(core, "y", "z", now=1.0)


def test_an_erred_task_is_reported_with_its_traceback():
    core = given()
    core.handle([{"op": "compute", "tasks": [compute("x")]}], 1.0)
    run(core, "x", now=1.0)
    out = Outcome("x", False, error=(b"exc", b"tb", "ValueError: no", None), start=1.0,
                  stop=2.0, thread=7)
    assert core.done([out]) == []
    assert core.flush() == [{"op": "erred", "items": [
        ["x", b"exc", b"tb", "ValueError: no", None, 1.0, 2.0, 7]]}]


# ---------------------------------------------------------------------------- fetch and borrow


def test_a_missing_dependency_is_fetched_borrowed_and_dropped_after_its_task():
    core = given()
    # Given a task whose dependency lives on A2
    assert core.handle([{"op": "compute", "tasks": [compute("y", who_has={"x": [A2]})]}],
                       1.0) == []
    assert core.waiting["y"][1] == {"x"} and core.borrowed == {"x": 1}
    # When the turn ends, one fetch leaves for A2
    assert core.pump(1.0) == [(FETCH, 1, A2, ["x"], None)]
    # When A2 answers, the value is stored, the fetch ends and the task runs with its borrow
    acts = core.fetched(1, [("x", b"hx", [], False, None, 40)], 1.5)
    assert acts == [(STORE, "x", b"hx", [], False), (END_FETCH, 1)]
    assert core.pump(1.5) == [(EXECUTE, "y", b"payload-y", None, None, ["x"])]
    # When the task is done, the borrowed copy goes (nobody else needs it), then y is kept
    out = ok("y")
    assert core.done([out]) == [(DROP, "x"), (KEEP, out)]
    assert not core.borrowed and not core.borrows and core.held == {"y"}
    # and the fetch rides with the finished op for the task stream
    (op,) = core.flush()
    assert op["op"] == "finished" and [t[:2] for t in op["transfers"]] == [[A2, 1.0]]
    assert op["transfers"][0][3:] == [40, 1]


def test_a_dependency_two_tasks_borrow_goes_after_the_second():
    core = given()
    core.handle([{"op": "compute", "tasks": [compute("y", who_has={"x": [A2]}),
                                             compute("z", who_has={"x": [A2]})]}], 1.0)
    assert core.pump(1.0) == [(FETCH, 1, A2, ["x"], None)]  # fetched once for both
    core.fetched(1, [("x", b"hx", [], False, None, 40)], 1.5)
    run(core, "y", "z", now=1.5)
    out = ok("y")
    assert core.done([out]) == [(KEEP, out)]  # z still borrows x
    assert core.borrowed == {"x": 1}
    out = ok("z")
    assert core.done([out]) == [(DROP, "x"), (KEEP, out)]


def test_fetches_are_batched_with_few_requests_in_flight_per_peer():
    core = given()
    deps = {f"d{i}": [A2] for i in range(150)}
    core.handle([{"op": "compute", "tasks": [compute("y", who_has=deps)]}], 1.0)
    acts = core.pump(1.0)
    # two requests of 64 keys to A2 (FETCHES_PER_PEER), the rest waits
    assert [(a[0], a[1], len(a[3])) for a in acts] == [(FETCH, 1, FETCH_BATCH_KEYS),
                                                       (FETCH, 2, FETCH_BATCH_KEYS)]
    assert FETCHES_PER_PEER == 2 and core.fetches.per_peer == {A2: 2}
    # When the first answers, the last 22 keys leave at the next turn
    core.fetched(1, [(k, b"h", [], False, None, 1) for k in acts[0][3]], 2.0)
    (last,) = core.pump(2.0)
    assert last[:3] == (FETCH, 3, A2) and len(last[3]) == 150 - 2 * FETCH_BATCH_KEYS
    assert core.fetch_stats == {"requests": 3, "most_in_flight": 2}


def test_a_dependency_nobody_holds_any_more_reports_the_task_missing():
    core = given()
    core.handle([{"op": "compute", "tasks": [compute("y", who_has={"x": [A2]})]}], 1.0)
    core.pump(1.0)
    # When A2 answers that it does not hold x
    assert core.fetched(1, [("x", None, None, False, None, 0)], 1.5) == [(END_FETCH, 1)]
    # Then the task is released and the scheduler hears which dependency is missing where
    assert core.flush() == [{"op": "missing", "key": "y", "dep": "x", "address": A2}]
    assert not core.waiting and not core.borrowed and core.pump(1.5) == []


def test_a_fetch_with_no_holder_fails_at_once():
    core = given()
    assert core.handle([{"op": "compute", "tasks": [compute("y", who_has={"x": []})]}],
                       1.0) == []
    assert core.flush() == [{"op": "missing", "key": "y", "dep": "x", "address": ""}]


def test_an_unanswered_fetch_is_given_up_after_the_timeout():
    core = given()
    core.handle([{"op": "compute", "tasks": [compute("y", who_has={"x": [A2]})]}], 1.0)
    core.pump(1.0)
    core.flush()
    core.handle([{"op": "heartbeat"}], FETCH_TIMEOUT_S)  # the scheduler is there
    # Before the timeout nothing is given up
    assert core.tick(1.0 + FETCH_TIMEOUT_S - 1) == []
    core.flush()
    # After it, the fetch ends and the task is reported missing
    assert core.tick(1.0 + FETCH_TIMEOUT_S + 1) == [(END_FETCH, 1)]
    ops = core.flush()
    assert ops[1:] == [{"op": "missing", "key": "y", "dep": "x", "address": A2}]
    assert ops[0]["op"] == "heartbeat" and core.fetches.per_peer == {}


def test_a_refusing_data_port_fails_every_fetch_to_it():
    core = given()
    core.handle([{"op": "compute", "tasks": [compute("y", who_has={"x": [A2]}),
                                             compute("z", who_has={"u": [A3]})]}], 1.0)
    core.pump(1.0)
    assert core.fetch_refused(A2) == [(END_FETCH, 1)]
    assert core.flush() == [{"op": "missing", "key": "y", "dep": "x", "address": A2}]
    assert list(core.fetches.inflight) == [2]  # the fetch from A3 goes on


def test_values_too_large_for_a_frame_are_asked_again_with_segments():
    core = given()
    core.handle([{"op": "compute", "tasks": [compute("y", who_has={"x": [A2]})]}], 1.0)
    core.pump(1.0)
    acts = core.fetched(1, [("x", None, None, False, [1 << 30], 0)], 1.5)
    assert acts == [(FETCH, 2, A2, ["x"], [("x", [1 << 30])]), (END_FETCH, 1)]


def test_sizes_learned_for_a_group_name_segments_in_the_first_request():
    core = given()
    chunk = lambda i: f"\x1f('random-abc', {i}, 0)"  # noqa: E731 (dask's chunk keys)
    big, small = 2_000_000, 500
    core.handle([{"op": "compute", "tasks": [compute("y0", who_has={chunk(0): [A2]}),
                                             compute("s0", who_has={"f-1": [A2]})]}], 1.0)
    # Given a first fetch: nothing known of the group, so no guess
    assert core.pump(1.0) == [(FETCH, 1, A2, [chunk(0), "f-1"], None)]
    # When the peer answers with the chunk's sizes (too large for a frame) and a small value
    acts = core.fetched(1, [(chunk(0), None, None, False, [big], 0),
                            ("f-1", b"h", [], False, None, small)], 1.5)
    assert acts == [(STORE, "f-1", b"h", [], False),
                    (FETCH, 2, A2, [chunk(0)], [(chunk(0), [big])]), (END_FETCH, 1)]
    core.fetched(2, [(chunk(0), b"h", [b"x"], False, None, big + 100)], 1.6)
    run(core, "s0", "y0", now=1.6)
    # Then later chunks of the same array are fetched naming segments of the largest size seen
    core.handle([{"op": "compute", "tasks": [
        compute("y1", who_has={chunk(1): [A2], chunk(2): [A3], "f-2": [A2]})]}], 2.0)
    assert core.pump(2.0) == [
        (FETCH, 3, A2, [chunk(1), "f-2"], None, [(chunk(1), [big + 100])]),
        (FETCH, 4, A3, [chunk(2)], None, [(chunk(2), [big + 100])])]
    # and a value larger than its guess is asked for again by its sizes, as before
    acts = core.fetched(3, [(chunk(1), None, None, False, [big * 2], 0),
                            ("f-2", b"h", [], False, None, small)], 2.5)
    assert acts == [(STORE, "f-2", b"h", [], False),
                    (FETCH, 5, A2, [chunk(1)], [(chunk(1), [big * 2])]), (END_FETCH, 3)]
    assert core.fetches.sizes == {"\x1f('random-abc'": (big, big * 2), "f": (small, small)}
    # A group whose sizes differ widely gets no guess (a segment would be mostly wasted)
    core.fetches.learn(chunk(9), big * 3)
    assert core.fetches.guess([chunk(3)]) is None


def test_no_sizes_are_guessed_near_the_memory_thresholds():
    core = given()
    core.fetches.learn("x-1", 4 << 20)
    assert core.fetches.guess(["x-2"]) == [("x-2", [4 << 20])]
    core.memory(False, "", True)
    core.handle([{"op": "compute", "tasks": [compute("y", who_has={"x-2": [A2]})]}], 1.0)
    assert core.pump(1.0) == [(FETCH, 1, A2, ["x-2"], None)]


# ---------------------------------------------------------------------------- free and cancel


def test_free_drops_a_value_and_cancels_what_runs_or_waits():
    core = given()
    core.handle([{"op": "compute", "tasks": [compute("x"), compute("q")]}], 1.0)
    run(core, "x", "q", now=1.0)
    core.done([ok("q")])
    core.flush()
    core.handle([{"op": "compute", "tasks": [compute("r")]}], 2.0)  # ready, not yet handed
    # When the scheduler frees a held value, a running task and a ready one
    acts = core.handle([{"op": "free", "keys": ["q", "x", "r"]}], 2.0)
    # Then the value is dropped, the running task is cancelled, the ready one never runs
    assert acts == [(DROP, "q"), (DROP, "x"), (CANCEL, "x"), (DROP, "r")]
    assert core.pump(2.0) == [] and core.held == set()
    # When the cancelled task ends after it ran, its thread is free; nothing is reported
    assert core.done([ok("x")]) == [(UNCANCEL, "x")]
    assert core.flush() == [{"op": "thread-free", "keys": ["x"]}]
    assert not core.cancelled and not core.executing


def test_give_back_returns_only_tasks_not_started():
    core = given()
    core.handle([{"op": "compute", "tasks": [compute("x")]}], 1.0)
    run(core, "x", now=1.0)
    core.flush()
    core.handle([{"op": "compute", "tasks": [compute("r"), compute("w", who_has={"d": [A2]})]}],
                2.0)  # r ready, not yet handed; w waits for d
    # When the scheduler (retiring this worker) asks for x, r, w and a key it never had
    acts = core.handle([{"op": "give-back", "keys": ["x", "r", "w", "gone"]}], 2.0)
    # Then r and w are dropped and given back; x, which runs, runs on
    assert acts == [(DROP, "r"), (DROP, "w")]
    assert core.flush() == [{"op": "given-back", "keys": ["r", "w"]}]
    assert [a for a in core.pump(2.0) if a[0] == EXECUTE] == []
    assert set(core.executing) == {"x"} and not core.waiting and not core.ready


def test_a_key_computed_again_after_its_cancelled_run_ended_is_not_skipped():
    core = given()
    core.handle([{"op": "compute", "tasks": [compute("x")]}], 1.0)
    run(core, "x", now=1.0)
    core.handle([{"op": "free", "keys": ["x"]}], 1.0)
    # When the cancelled run ends, the executor forgets its note to skip x
    assert core.done([ok("x")]) == [(UNCANCEL, "x")]
    # so that x computed again runs
    assert core.handle([{"op": "compute", "tasks": [compute("x")]}], 1.5) == []
    assert core.pump(1.5)[0][:2] == (EXECUTE, "x")


def test_a_cancelled_key_computed_again_is_not_skipped():
    core = given()
    core.handle([{"op": "compute", "tasks": [compute("x")]}], 1.0)
    run(core, "x", now=1.0)
    core.handle([{"op": "free", "keys": ["x"]}], 1.0)
    # When the same key comes again while the old run is cancelled
    acts = core.handle([{"op": "compute", "tasks": [compute("x")]}], 1.5)
    # Then the executor is told not to skip it
    assert acts == [(UNCANCEL, "x")]
    assert core.pump(1.5)[0][:2] == (EXECUTE, "x")


def test_transitions_are_told_only_when_a_plugin_hears_them():
    core = given()
    core.hear_transitions = True
    assert core.handle([{"op": "compute", "tasks": [compute("x")]}], 1.0) == [
        (TRANSITION, "x", "released", "ready")]
    acts = core.pump(1.0)
    assert acts[0] == (TRANSITION, "x", "ready", "executing") and acts[1][0] == EXECUTE
    out = ok("x")
    assert core.done([out]) == [(TRANSITION, "x", "executing", "memory"), (KEEP, out)]


def test_a_plugin_added_hears_the_tasks_that_come_after_it_in_the_same_message():
    core = given()
    add = {"op": "plugin-add", "id": 3, "name": "p", "payload": b"plugin"}
    assert core.handle([add, {"op": "compute", "tasks": [compute("x")]}], 1.0) == [
        ("plugin", add), (TRANSITION, "x", "released", "ready")]


# ---------------------------------------------------------------------------- memory: pause


def test_a_pause_is_told_once_and_stops_new_fetches_until_resumed():
    core = given()
    # When memory passes the pause threshold
    core.memory(True, "process memory is above the pause threshold", tight=True)
    core.memory(True, "process memory is above the pause threshold", tight=True)
    assert core.flush() == [{"op": "worker-status", "status": "paused",
                             "reason": "process memory is above the pause threshold"}]
    # Then a task's dependency waits: no fetch leaves while paused
    core.handle([{"op": "compute", "tasks": [compute("y", who_has={"x": [A2], "u": [A2]})]}],
                1.0)
    assert core.pump(1.0) == []
    # When memory falls below the threshold but stays near it, fetches go one key at a time
    core.memory(False, "", tight=True)
    assert core.flush() == [{"op": "worker-status", "status": "running", "reason": ""}]
    assert core.pump(2.0) == [(FETCH, 1, A2, ["x"], None)]
    assert core.pump(2.0) == []  # one request in all while tight


def test_a_worker_that_says_hello_again_while_paused_says_so():
    core = given()
    core.memory(True, "cannot spill: disk full", tight=False)
    core.flush()
    core.handle([{"op": "reregister", "reason": "new scheduler"}], 1.0)
    assert core.flush() == [HELLO, {"op": "worker-status", "status": "paused",
                                    "reason": "cannot spill: disk full"}]


# ---------------------------------------------------------------------------- retire: acquire


def test_acquire_keeps_what_it_holds_loads_inline_values_and_fetches_the_rest():
    core = given()
    core.handle([{"op": "compute", "tasks": [compute("h")]}], 1.0)
    run(core, "h", now=1.0)
    core.done([ok("h")])
    core.flush()
    # When a retiring worker's values are to be copied here
    acts = core.handle([{"op": "acquire", "items": [["h", None, [A2]], ["v", b"pickled", []],
                                                    ["f", None, [A2]], ["bad"]]}], 2.0)
    # Then the inline value is handed to the shell to load, with what is already known
    assert acts == [(ACQUIRE_VALUES, [("v", b"pickled")], ["h"], [])]
    core.acquire_loaded(["v"], acts[0][2], acts[0][3])
    assert core.flush() == [{"op": "acquired", "keys": ["h", "v"], "failed": []}]
    # and the one held elsewhere is fetched, kept as this worker's own and reported
    assert core.pump(2.0) == [(FETCH, 1, A2, ["f"], None)]
    assert core.fetched(1, [("f", b"hf", [], False, None, 5)], 2.5) == [
        (STORE, "f", b"hf", [], False), (END_FETCH, 1)]
    assert core.flush() == [{"op": "acquired", "keys": ["f"], "failed": []}]
    assert not core.borrowed and {"h", "v", "f"} <= core.held


def test_an_acquire_that_cannot_be_fetched_reports_failed():
    core = given()
    core.handle([{"op": "acquire", "items": [["f", None, [A2]]]}], 2.0)
    core.pump(2.0)
    core.fetched(1, [("f", None, None, False, None, 0)], 2.5)
    assert core.flush() == [{"op": "acquired", "keys": [], "failed": ["f"]}]


def test_the_scheduler_closes_a_retired_worker():
    core = given()
    assert core.handle([{"op": "close", "reason": "retired"}], 3.0) == [
        (STOP, "closed by the scheduler: retired", None)]


# ---------------------------------------------------------------------------- placed values


def test_placed_values_the_scheduler_does_not_know_are_dropped():
    core = given()
    assert core.placed([("p", b"hp", [], False), ("q", b"hq", [], True)], 1.0) == [
        (STORE, "p", b"hp", [], False), (STORE, "q", b"hq", [], True)]
    core.flush()
    # After PUT_DATA_CONFIRM_S the worker asks who holds them
    core.tick(3.5)
    ops = core.flush()
    assert ops[1] == {"op": "request", "id": 1, "kind": "who-has",
                      "args": {"keys": ["p", "q"]}}
    # The scheduler lists this worker for p only: q goes
    assert core.handle([{"op": "reply", "id": 1, "result": {"p": [ME], "q": []}}], 4.0) == [
        (DROP, "q")]
    assert core.held == {"p"} and not core.unconfirmed


# ---------------------------------------------------------------------------- timeouts


def test_a_task_past_its_timeout_abandons_its_thread():
    core = given()
    core.handle([{"op": "compute", "tasks": [compute("x", options={"task_timeout": 2.0})]}],
                1.0)
    run(core, "x", now=1.0)
    core.flush()
    assert core.tick(2.0, running=[(77, "x", 1.0)]) == []
    core.flush()
    assert core.tick(3.5, running=[(77, "x", 1.0)]) == [(REPLACE_THREAD, 77)]
    _, erred = core.flush()
    assert erred["op"] == "erred" and erred["items"][0][0] == "x"
    assert erred["items"][0][4] == "TaskTimeout" and "task_timeout of 2 s" in erred["items"][0][3]


def test_a_task_past_its_timeout_under_a_nanny_restarts_the_worker():
    core = given(nanny=True)
    core.handle([{"op": "compute", "tasks": [compute("x", options={"task_timeout": 2.0})]}],
                1.0)
    run(core, "x", now=1.0)
    acts = core.tick(3.5, running=[(77, "x", 1.0)])
    assert acts == [(STOP, "task 'x' passed its task_timeout; restarting", 75)]


# ---------------------------------------------------------------------------- scheduler lost


def test_a_silent_scheduler_stops_the_worker_after_the_death_timeout():
    core = given()
    core.handle([{"op": "heartbeat"}], 5.0)
    assert core.tick(14.0) == []
    assert core.tick(15.5) == [(STOP, "scheduler unreachable", None)]


def test_a_new_scheduler_without_recovery_makes_the_worker_forget_everything():
    core = given(keep_on_rejoin=False)
    core.handle([{"op": "compute", "tasks": [compute("x"), compute("y", who_has={"d": [A2]}),
                                             compute("h")]}], 1.0)
    core.pump(1.0)
    core.done([ok("h")])
    core.flush()
    # When the (restarted) scheduler asks it to register again
    acts = core.handle([{"op": "reregister", "reason": "scheduler restarted"}], 2.0)
    # Then it drops its values and queued messages, cancels what runs, and says hello
    assert acts == [(FORGET,), (CANCEL, "x")]
    assert core.flush() == [HELLO]
    assert core.epoch is None and not core.held and not core.waiting and not core.fetching
    assert not core.borrowed and core.cancelled == {"x"}
    # and the result of the old run is not reported to the new scheduler
    assert core.done([ok("x")]) == [(UNCANCEL, "x")]
    assert core.flush() == [{"op": "thread-free", "keys": ["x"]}]


def test_a_new_scheduler_incarnation_finds_the_values_kept_and_the_runs_going_on():
    core = given()
    core.handle([{"op": "compute", "tasks": [compute("x"), compute("y", who_has={"d": [A2]}),
                                             compute("h"), compute("q")]}], 1.0)
    acts = core.pump(1.0)
    assert [a[1] for a in acts if a[0] == EXECUTE] == ["x", "h", "q"]
    core.done([ok("h")])
    core.flush()
    core.handle([{"op": "compute", "tasks": [compute("z")]}], 1.5)  # queued, not started
    # When a new scheduler incarnation asks it to register again
    acts = core.handle([{"op": "reregister", "reason": "unknown peer"}], 2.0)
    # Then it keeps its own value and what runs, drops the rest, reports both after its hello
    assert acts == [(REJOIN, ["h"], ["x", "q"], "e1")]
    assert core.flush() == [HELLO]
    assert core.epoch is None and core.held == {"h"} and not core.waiting
    assert not core.fetching and not core.ready and not core.cancelled
    # and a second refusal at once (another message of the outage) says nothing more
    assert core.handle([{"op": "reregister", "reason": "unknown peer"}], 2.1) == []
    assert core.flush() == []
    # When the new one welcomes it, a run that goes on finishes and is reported as usual
    assert core.handle([welcome(epoch="e2")], 2.2) == []
    assert core.done([ok("x")]) == [(KEEP, ok("x"))]
    assert core.flush() == [{"op": "finished", "tasks": [
        ["x", 10, b"h-x", 0.5, 100.0, 100.5, 0]]}]
    # and a compute for a task that still runs here does not run it a second time
    core.handle([{"op": "compute", "tasks": [compute("q")]}], 2.3)
    assert core.pump(2.3) == []
    assert core.held == {"h", "x"}


def test_a_refusal_that_says_retry_says_hello_again_later():
    core = WorkerCore(name="w1", address=ME, inline_bytes=1000, heartbeat_s=0.5,
                      death_timeout_s=10.0, put_data_confirm_s=2.0)
    core.hello_op = HELLO
    core.hello()
    core.flush()
    assert core.handle([{"op": "error", "message": "address in use", "retry_s": 1.0}],
                       0.5) == []
    core.tick(1.0)
    assert [op["op"] for op in core.flush()] == ["heartbeat"]
    core.tick(1.6)
    assert [op["op"] for op in core.flush()] == ["heartbeat", "hello"]
    assert core.handle([{"op": "error", "message": "bad key", "fatal": True}], 2.0) == [
        ("refused", "bad key")]


# ---------------------------------------------------------------------------- heartbeat interval


def test_the_heartbeat_follows_the_interval_the_scheduler_gives():
    core = WorkerCore(name="w1", address=ME, inline_bytes=1000, heartbeat_s=5.0,
                      death_timeout_s=60.0, put_data_confirm_s=2.0, now=0.0)
    assert core.next_beat == 5.0
    # The welcome's heartbeat_s replaces the setting, and the next beat comes sooner
    core.handle([welcome(heartbeat_s=0.25)], 1.0)
    assert core.heartbeat_s == 0.25 and core.next_beat == 1.25
    core.tick(1.25)
    assert core.next_beat == 1.5
    # A later heartbeat-interval op (the cluster grew) stretches it from the next beat on
    core.handle([{"op": "heartbeat-interval", "heartbeat_s": 2}], 1.3)
    assert core.heartbeat_s == 2.0 and core.next_beat == 1.5
    core.tick(1.5)
    assert core.next_beat == 3.5


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, "1", None, True, [1.0]])
def test_a_bad_heartbeat_interval_is_logged_and_ignored(bad, caplog):
    core = given()
    with caplog.at_level(logging.WARNING, logger="zfabric.worker.core"):
        assert core.handle([{"op": "heartbeat-interval", "heartbeat_s": bad},
                            {"op": "compute", "tasks": [compute("x")]}], 1.0) == []
    assert core.heartbeat_s == 0.5
    assert core.pump(1.0)[0][:2] == (EXECUTE, "x")  # the op beside it still counts
    if bad is not None:
        assert "ignoring heartbeat_s" in caplog.text
