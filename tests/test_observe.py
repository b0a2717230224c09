"""The scheduler's observation records, sans-IO: groups, the task stream, transfers, topics,
snapshots and their Prometheus rendering, fed through SchedulerState with an explicit ``now``."""

from __future__ import annotations

import pytest

from zfabric import protocol
from zfabric.config import Config
from zfabric.scheduler.observe import DURATION_BUCKETS_S, Observer, StreamRing, key_group
from zfabric.scheduler.state import SchedulerState

W1, W2 = b"w1", b"w2"
A1, A2 = "tcp://10.0.0.1:1001", "tcp://10.0.0.2:1002"
C = b"client-1"


def given() -> SchedulerState:
    state = SchedulerState(address="tcp://sched:8786", config=Config())
    for ident, address in ((W1, A1), (W2, A2)):
        state.handle(ident, [protocol.hello("worker", ident.decode(), address=address,
                                            nthreads=1)], 0.0)
    state.handle(C, [protocol.hello("client", "c")], 0.0)
    state.flush()
    return state


def submit(state, *keys, deps=(), now=1.0) -> dict:
    tasks = [[k, b"p", list(deps), None] for k in keys]
    state.handle(C, [{"op": "submit", "tasks": tasks}], now)
    return state.flush()


def sent_to(out: dict) -> dict[bytes, list[str]]:
    return {peer: [t[0] for op in ops if op["op"] == "compute" for t in op["tasks"]]
            for peer, ops in out.items()}


@pytest.mark.parametrize("key, group", [
    ("inc-3f2a9b0c1d", "inc"),
    ("inc-3f2a9b0c1d2e3f4a5b6c7d8e9f0a1b2c", "inc"),
    ("hello-world-1", "hello-world"),
    ("x-1-2-3", "x"),
    (("x-2", 1), "x"),
    ("('x-2', 1)", "x"),
    ("ae05086432ca935f6eba409a8ecd4896", "data"),
    ("<module.submodule.myclass object at 0xdaf372>", "myclass"),
    ("x-abcdefab", "x"),  # an 8-digit hex word is a token, not a name
    ("lambda-c1e4", "lambda"),
    (None, "Other"),
])
def test_key_group_follows_dask_key_split(key, group):
    assert key_group(key) == group


def test_group_counts_follow_every_state_move():
    # Given two groups of tasks, one depending on the other
    state = given()
    out = submit(state, "inc-1", "inc-2", "inc-3")
    submit(state, "total-1", deps=["inc-1", "inc-2", "inc-3"])
    inc, total = state.observe.groups["inc"], state.observe.groups["total"]
    assert inc.row()["processing"] == 3 and inc.row()["waiting"] == 0  # prefetch slots
    assert total.row()["waiting"] == 1 and total.row()["total"] == 1
    # When the workers finish what they were sent, with start/stop/thread times
    now = 2.0
    for peer, keys in sent_to(out).items():
        for k in keys:
            state.handle(peer, [{"op": "finished", "tasks": [
                [k, 8, b"v", 0.5, 100.0, 100.5, 7]]}], now)
    out = state.flush()
    peer, keys = next((p, k) for p, k in sent_to(out).items() if k)
    state.handle(peer, [{"op": "finished", "tasks": [[keys[0], 8, b"v", 0.5, 101.0, 101.25,
                                                      7]]}], 3.0)
    state.flush()
    # Then the counts say so, with durations and the histogram
    row = inc.row()
    assert (row["done"], row["processing"], row["waiting"], row["total"]) == (3, 0, 0, 3)
    assert inc.ndone == 3 and inc.duration_s == pytest.approx(1.5)
    assert inc.hist[DURATION_BUCKETS_S.index(1.0)] == 3  # 0.5 s <= 1 s bucket
    assert total.row()["done"] == 1
    # When the client releases everything, the tasks are forgotten as done
    state.handle(C, [{"op": "release", "keys": ["inc-1", "inc-2", "inc-3", "total-1"]}], 4.0)
    state.flush()
    assert not state.tasks
    assert inc.row()["forgotten"] == 3 and inc.live() == 0
    assert inc.row()["done"] == 3
    state.validate()


def test_erred_and_cancelled_counts():
    state = given()
    out = submit(state, "f-1", "f-2")
    (p1, k1), (_, k2) = [(p, k[0]) for p, k in sent_to(out).items()]
    state.handle(p1, [{"op": "erred", "items": [[k1, b"e", b"t", "ValueError", None, 1.0, 1.1,
                                                  3]]}], 2.0)
    state.handle(C, [{"op": "cancel", "keys": [k2]}], 2.0)
    state.flush()
    row = state.observe.groups["f"].row()
    assert row["erred"] == 1 and row["processing"] == 0
    assert row["cancelled"] == 1
    rec = state.observe.stream_since(0)["records"]
    assert [(r["key"], r["status"]) for r in rec] == [(k1, "error")]


def test_task_stream_records_have_dask_shape_and_bounds():
    obs = Observer(stream_length=5)
    state = given()
    state.observe = obs
    for i in range(8):
        out = submit(state, f"g-{i}", now=1.0 + i)
        ((peer, keys),) = [(p, k) for p, k in sent_to(out).items() if k]
        state.handle(peer, [{"op": "finished", "tasks": [[keys[0], 3, b"v", 0.1, 10.0 + i,
                                                          10.1 + i, 42]]}], 1.5 + i)
        state.flush()
    got = obs.stream_since(0)
    assert got["next"] == 8 and got["dropped"] == 3  # 0, 1, 2 fell off the ring
    assert [r["key"] for r in got["records"]] == [f"g-{i}" for i in range(3, 8)]
    r = got["records"][-1]
    assert set(r) == {"key", "group", "worker", "thread", "status", "nbytes", "startstops"}
    assert r["startstops"] == [{"action": "compute", "start": 17.0, "stop": pytest.approx(17.1)}]
    assert r["worker"] in (A1, A2) and r["thread"] == 42 and r["nbytes"] == 3
    assert [x["key"] for x in obs.stream_since(6)["records"]] == ["g-6", "g-7"]
    assert [x["key"] for x in obs.stream_since(None, count=2)["records"]] == ["g-6", "g-7"]
    assert [x["key"] for x in obs.stream_since(None, start=15.05, stop=16.5)["records"]] == [
        "g-5", "g-6"]
    assert obs.stream_since(8)["records"] == []


def test_old_worker_reports_count_but_draw_nothing():
    state = given()
    out = submit(state, "h-1")
    ((peer, keys),) = [(p, k) for p, k in sent_to(out).items() if k]
    state.handle(peer, [{"op": "finished", "tasks": [[keys[0], 3, b"v", 0.1]]}], 2.0)
    (r,) = state.observe.stream_since(0)["records"]
    assert r["startstops"] == [] and state.observe.groups["h"].row()["done"] == 1


def test_transfers_are_validated_and_counted():
    state = given()
    good = [A2, 1.0, 1.5, 1000, 2]
    state.handle(W1, [{"op": "heartbeat", "metrics": {}, "transfers": [
        good, ["bad"], [A2, "x", 1, 2, 3], "junk"]}], 1.0)
    assert state.observe.transfer_bytes == 1000
    assert state.observe.transfers_since(None) == [[A1, A2, 1.0, 1.5, 1000, 2]]
    assert state.observe.transfers_since(2.0) == []


def test_topics_and_scheduler_events():
    state = given()
    state.handle(C, [{"op": "request", "id": 1, "kind": "log-event",
                      "args": {"topic": ["a", "b"], "msg": {"x": 1}}}], 5.0)
    state.handle(C, [{"op": "request", "id": 2, "kind": "events", "args": {"topic": "a"}}], 5.0)
    replies = [op for op in state.flush()[C] if op["op"] == "reply"]
    assert replies[1]["result"] == [[5.0, {"x": 1}]]
    events = state.observe.get_events(None)
    assert set(events) == {"scheduler", "a", "b"}
    assert [m["action"] for _, m in events["scheduler"]] == ["worker-joined", "worker-joined"]
    assert state.observe.event_counts == {"worker-joined": 2}


def test_held_bytes_per_worker():
    state = given()
    out = submit(state, "arr-1")
    ((peer, keys),) = [(p, k) for p, k in sent_to(out).items() if k]
    state.handle(peer, [{"op": "finished", "tasks": [[keys[0], 8_000_000, None, 0.1]]}], 2.0)
    ws = state.workers[peer]
    assert ws.nbytes == 8_000_000
    snap = state.observe.snapshot(state, 3.0)
    (row,) = [w for w in snap["workers"] if w["address"] == ws.address]
    assert row["nbytes"] == 8_000_000 and row["held"] == 1
    state.handle(C, [{"op": "release", "keys": ["arr-1"]}], 4.0)
    assert ws.nbytes == 0


def test_snapshot_renders_as_prometheus_text():
    parser = pytest.importorskip("prometheus_client.parser")
    from zfabric.dashboard.metrics import render

    state = given()
    out = submit(state, "inc-1", "inc-2")
    for peer, keys in sent_to(out).items():
        for k in keys:
            state.handle(peer, [{"op": "finished", "tasks": [[k, 8, b"v", 0.02, 1.0, 1.02, 1]]}],
                         2.0)
    text = render(state.observe.snapshot(state, 3.0)).decode()
    fams = {f.name: f for f in parser.text_string_to_metric_families(text)}
    assert {s.value for s in fams["zfabric_workers"].samples} == {2.0}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for s in fams["zfabric_task_duration_seconds"].samples}
    assert samples[("zfabric_task_duration_seconds_count", (("group", "inc"),))] == 2
    assert samples[("zfabric_task_duration_seconds_bucket", (("group", "inc"), ("le", "0.1")))] == 2
    tasks = {tuple(sorted(s.labels.items())): s.value for s in fams["zfabric_tasks"].samples}
    assert tasks[(("group", "inc"), ("state", "memory"))] == 2


@pytest.mark.parametrize("key", [
    "inc-3f2a9b0c1d", "hello-world-1", "hello-world", "hello-1", "x-abcdefab", "x-1-2-3",
    "('x-2', 1)", "a-b-c", "a-b-12", "lambda-c1e4", "-1", "x-", "ae05086432ca935f6eba409a8ecd4896",
])
def test_group_of_caches_without_changing_the_answer(key):
    obs = Observer()
    for k in ("hello-2", "hello-world-2", "x-9", "a-b-3", key):  # warm the cache with heads
        obs.group_of(k)
    assert obs.group_of(key).name == key_group(key)


def test_stream_ring_wraps_and_reads_back_what_was_written():
    ring = StreamRing(3)
    nan = float("nan")
    for i in range(5):
        ring.append(f"k-{i}", "k", "tcp://w:1", 2**63 + i, 10.0 + i if i != 3 else nan,
                    10.5 + i if i != 3 else nan, i != 4, 100 * i)
    assert len(ring) == 3 and ring.seq == 5
    assert ring.entries(0) == [
        ("k-2", "k", "tcp://w:1", 2**63 + 2, 12.0, 12.5, "OK", 200),
        ("k-3", "k", "tcp://w:1", 2**63 + 3, None, None, "OK", 300),
        ("k-4", "k", "tcp://w:1", 2**63 + 4, 14.0, 14.5, "error", 400),
    ]
    assert [e[0] for e in ring.entries(4)] == ["k-4"] and ring.entries(5) == []
    empty = StreamRing(0)
    empty.append("k", "k", "w", 0, 1.0, 2.0, True, 0)
    assert empty.seq == 1 and empty.entries(0) == []


def test_text_progress_bars_by_group():
    import io

    from zfabric.futures import FutureState
    from zfabric.progressbar import TextProgressBar

    states = {f"inc-{i}": FutureState(f"inc-{i}") for i in range(4)}
    states["total-x1"] = FutureState("total-x1")
    class F:  # what progress reads of a Future (no client: no dask graph behind it)
        def __init__(self, key, state):
            self.key, self._wkey, self._state, self.client = key, key, state, None

    futs = [F(k, st) for k, st in states.items()]
    out = io.StringIO()
    bar = TextProgressBar(futs, multi=True, complete=False, stream=out)
    for k in ("inc-0", "inc-1", "inc-2", "inc-3"):
        states[k].finish(None, None, 1)
    states["total-x1"].fail(None, ValueError("x"))
    assert bar.step()  # all done: the final frame is drawn even off a terminal
    head, *rows = out.getvalue().splitlines()
    assert head.startswith("[" + "#" * 40 + "] 100% Completed | 5/5") and "1 erred" in head
    assert rows == ["total [" + "#" * 40 + "] 100% 1/1 (1 erred)"]  # complete groups hidden
    single = TextProgressBar(futs, multi=False, stream=io.StringIO())
    single.step()
    assert len(single.lines()) == 1


def test_progress_stays_the_function_once_its_module_is_imported():
    # ``import zfabric.progressbar`` sets an attribute on the package: it must not be the
    # name users import (``from zfabric import progress``), or it shadows the function
    import zfabric.progressbar  # noqa: F401
    from zfabric import progress

    assert callable(progress) and progress.__module__ == "zfabric.progressbar"
