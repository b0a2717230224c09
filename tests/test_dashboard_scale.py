"""The dashboard's feed at scale, sans-IO: 1,000 fake workers (hello ops into a real
SchedulerState), 10,000 then 100,000 tasks. What one delta touches is counted (no timing): the
same at both sizes when nothing changed, and what changed when something did. Also the
profiler (worker side), its checks at the protocol door and the merged tree (scheduler side),
and the dashboard's merged picture against the scheduler's whole snapshot."""

from __future__ import annotations

import asyncio
import json
import threading
import time

from zfabric import Client, protocol, reports
from zfabric.config import Config
from zfabric.dashboard.view import View
from zfabric.scheduler.feed import PROFILE_GROUP_NODES, SCAN_WORKERS, merge_profile
from zfabric.scheduler.state import SchedulerState
from zfabric.testing import cluster
from zfabric.worker.profiler import Profiler

C = b"client-1"
NWORKERS = 1000


def given_workers(n: int) -> SchedulerState:
    state = SchedulerState(address="tcp://sched:8786", config=Config())
    for i in range(n):
        ident = f"w{i}".encode()
        state.handle(ident, [protocol.hello("worker", ident.decode(),
                                            address=f"tcp://10.0.{i // 250}.{i % 250}:{1000 + i}",
                                            nthreads=2)], 0.0)
    state.handle(C, [protocol.hello("client", "c")], 0.0)
    state.flush()
    return state


def submit(state, first: int, count: int, now: float) -> dict:
    tasks = [[f"load-{i}", b"p", [], None] for i in range(first, first + count)]
    state.handle(C, [{"op": "submit", "tasks": tasks}], now)
    return state.flush()


def finish_some(state, out: dict, n: int, now: float) -> set:
    done: set = set()
    for peer, ops in out.items():
        keys = [t[0] for op in ops if op["op"] == "compute" for t in op["tasks"]][:n - len(done)]
        if keys:
            state.handle(peer, [{"op": "finished", "tasks": [
                [k, 8, None, 0.01, 1000.0, 1000.01, 7] for k in keys]}], now)
            done.update(keys)
        if len(done) >= n:
            break
    state.flush()
    return done


def settle(state, view: View, now: float) -> float:
    """Deltas until every worker was looked at (the round-robin went round)."""
    for _ in range(2 * NWORKERS // SCAN_WORKERS + 4):
        for ident in list(state.workers):  # a heartbeat without metrics: none is silent
            state.handle(ident, [{"op": "heartbeat"}], now)
        state.flush()
        state.tick(now)
        view.merge(state.observe.delta(state, now))
        now += 0.25
    return now


def quiet_delta(state, view: View, now: float) -> tuple[dict, int]:
    delta = state.observe.delta(state, now)
    view.merge(delta)
    body = json.dumps({k: v for k, v in delta.items() if k not in ("time", "counters", "totals")},
                      default=str)
    return dict(state.observe.feed.work), len(body)


def test_a_delta_costs_what_changed_not_the_size_of_the_cluster():
    # Given 1,000 workers and 10,000 tasks, some of them finished
    state = given_workers(NWORKERS)
    view = View()
    first = submit(state, 0, 10_000, 1.0)
    finished = finish_some(state, first, 500, 2.0)
    assert len(finished) == 500
    now = settle(state, view, 3.0)
    # When nothing changes, a delta touches a bounded number of things
    work_10k, size_10k = quiet_delta(state, view, now)
    assert work_10k["worker_rows"] == 0 and work_10k["group_rows"] == 0
    assert work_10k["stream"] == 0 and work_10k["tasks"] == 0
    assert work_10k["workers"] <= SCAN_WORKERS
    assert work_10k["groups"] == len(state.observe.groups)
    # Given 100,000 tasks (ten times as many)
    submit(state, 10_000, 90_000, now)
    now = settle(state, view, now + 1)
    # Then a quiet delta does the same work and is as large as before
    work_100k, size_100k = quiet_delta(state, view, now)
    assert work_100k == work_10k
    assert size_100k == size_10k
    # When one worker finishes its tasks, the delta carries that worker, its group, the entries
    running = {p: [t[0] for op in ops if op["op"] == "compute" for t in op["tasks"]
                   if t[0] not in finished] for p, ops in first.items()}
    busy = max(running, key=lambda p: len(running[p]))
    keys = running[busy]
    assert keys
    state.handle(busy, [{"op": "finished", "tasks": [
        [k, 8, None, 0.01, 1000.0, 1000.01, 7] for k in keys]}], now)
    state.flush()
    delta = state.observe.delta(state, now + 0.25)
    view.merge(delta)
    work = state.observe.feed.work
    assert [w["address"] for w in delta["workers"]] == [state.workers[busy].address]
    assert work["worker_rows"] == 1 and work["group_rows"] == 1
    assert work["stream"] == len(keys)
    assert work["workers"] <= SCAN_WORKERS + 1
    # And the dashboard's merged picture agrees with the scheduler's whole snapshot
    full = state.observe.snapshot(state, now + 0.5)
    merged = view.full()
    assert len(merged["workers"]) == NWORKERS
    strip = lambda rows: {r["address"]: {k: v for k, v in r.items() if k != "last_seen_s"}  # noqa: E731
                          for r in rows}
    mine = strip(merged["workers"])
    assert {a: {k: r[k] for k in ("processing", "nbytes", "held")} for a, r in mine.items()} == \
        {a: {k: r[k] for k in ("processing", "nbytes", "held")}
         for a, r in strip(full["workers"]).items()}
    assert {g["name"]: g["done"] for g in merged["groups"]} == \
        {g["name"]: g["done"] for g in full["groups"]}
    assert {g["name"]: g["done"] for g in merged["groups"]} == {"load": 500 + len(keys)}


def test_groups_edges_history_and_a_leaving_worker():
    state = given_workers(3)
    view = View()
    state.handle(C, [{"op": "submit", "tasks": [
        ["x-1", b"p", [], None], ["x-2", b"p", [], None],
        ["y-1", b"p", ["x-1", "x-2"], None]]}], 1.0)
    state.flush()
    for now in (1.5, 2.0, 3.0, 4.0):
        state.tick(now)
        view.merge(state.observe.delta(state, now))
    graph = view.full()["graph"]
    assert sorted(n[0] for n in graph["nodes"]) == ["x", "y"]
    assert graph["edges"] == [["x", "y", 2]]
    assert len(view.full()["history"]["fine"]) >= 2
    ident = next(iter(state.workers))
    address = state.workers[ident].address
    state.handle(ident, [{"op": "goodbye", "reason": "bye"}], 5.0)
    state.flush()
    delta = state.observe.delta(state, 5.0)
    assert delta["workers_gone"] == [address]
    view.merge(delta)
    assert address not in {w["address"] for w in view.full()["workers"]}


def spin_in_known_function(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sum(range(100))
    return seconds


async def test_the_profile_of_a_task_reaches_the_scheduler():
    # Given a task that spins in a known function on a real worker
    async with cluster(nworkers=1) as (s, _), \
            Client(s.address, asynchronous=True, set_as_default=False) as c:
        assert await c.submit(spin_in_known_function, 0.6, key="spin-1") == 0.6

        # Then the scheduler's merged profile of its group (a request, as Client.profile
        # will make) holds the function, with most of the samples
        async def profiled():
            for _ in range(50):
                tree = (await c.core.request("profile", group="spin")).get("spin")
                if tree and tree[1] >= 10:
                    return tree
                await asyncio.sleep(0.1)
            raise AssertionError("no profile of the spinning task reached the scheduler")

        tree = await profiled()
        (top,) = [n for n in tree[2] if n[0].startswith("spin_in_known_function;")]
        assert top[1] >= 0.8 * tree[1]
        assert (await c.core.request("profile", group="nothing")) == {}
        history = await c.core.request("history")
        assert set(history) == {"fine", "coarse"}


def test_profiler_takes_nothing_outside_tasks():
    stop = threading.Event()
    t = threading.Thread(target=lambda: stop.wait(10))
    t.start()
    try:
        running: dict = {}
        prof = Profiler(running, interval_s=0)
        prof.sample()
        assert prof.take() is None  # no task runs: nothing sampled
        running[t.ident] = ("spin-abc123", time.monotonic())
        prof.sample()
        assert prof.take() is None  # a thread not inside the executor's call is left out
    finally:
        stop.set()
        t.join()


def test_profile_reports_are_checked_and_bounded():
    good = {"spin": ["", 3, [["f;a.py;1", 3, [["g;a.py;5", 2, []]]]]]}
    assert reports.clean_profile(good) == good
    bad = {"spin": ["", -1, []], 3: ["", 1, []], "ok": ["", 1, "children"],
           "deep": ["", 1, [["x", 1, [["y", 1, [["z", "many", []]]]]]]]}
    assert reports.clean_profile(bad) == {}
    assert reports.clean_profile("nonsense") == {}
    wide = {"g": ["", 1, [[f"f{i};a.py;1", 1, []] for i in range(20_000)]]}
    assert reports.clean_profile(wide) == {}  # past MAX_PROFILE_NODES: dropped whole
    trees: dict = {}
    counts = [0]
    assert merge_profile(trees, good, counts) == {"spin"}
    merge_profile(trees, good, counts)
    assert trees["spin"][0] == 6 and trees["spin"][1]["f;a.py;1"][1]["g;a.py;5"][0] == 4
    many = {"spin": ["", 1, [[f"h{i};b.py;1", 1, []] for i in range(PROFILE_GROUP_NODES + 5)]]}
    merge_profile(trees, many, counts)
    assert trees["spin"][2] <= PROFILE_GROUP_NODES  # bounded per group


def test_erred_groups_stay_until_dismissed():
    view = View()
    row = {"name": "bad", "total": 1, "done": 0, "erred": 1, "nerred": 1, "processing": 0,
           "waiting": 0, "forgotten": 0}
    view.merge({"kind": "delta", "time": 1.0, "groups": [row]})
    # released and then forgotten by the scheduler: still shown, until dismissed
    view.merge({"kind": "delta", "time": 2.0, "groups_gone": ["bad"]})
    assert [g["name"] for g in view.full()["groups"]] == ["bad"]
    assert view.full()["erred_groups"] == ["bad"]
    assert view.dismiss("bad") and not view.dismiss("bad")
    assert view.full()["groups"] == [] and view.full()["erred_groups"] == []
    # the same failures again do not bring it back; a new one does
    view.merge({"kind": "delta", "time": 3.0, "groups": [row]})
    assert view.full()["erred_groups"] == []
    view.merge({"kind": "delta", "time": 4.0, "groups": [dict(row, nerred=2)]})
    assert view.full()["erred_groups"] == ["bad"]


def test_log_reports_are_checked_and_bounded():
    lines = [["WARNING", "x" * 5000], ["INFO", "ok"], ["bad"], [1, "x"], ["L" * 30, "x"]]
    assert reports.clean_logs(lines) == [("WARNING", "x" * 1000), ("INFO", "ok")]
    assert reports.clean_logs("nonsense") == []
    assert len(reports.clean_logs([["INFO", "a"]] * 500)) == reports.MAX_LOG_LINES
