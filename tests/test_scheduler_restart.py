"""A scheduler that dies loses nothing: killed with SIGKILL and started again at the same
address, it rebuilds its state from its workers and clients (docs/faults.md, "The scheduler
restarts"). Real processes: ``zfabric scheduler``, ``zfabric nanny`` / ``zfabric worker``, and
a client program (tests/restart_client.py) run as ``python restart_client.py``, whose tasks
leave a side-effect file per run. A scheduler that does not come back within the clients'
SCHEDULER_LOST_TIMEOUT_S fails their futures with SchedulerLost, as before: tests/test_faults.py
(test_killed_scheduler_fails_futures_then_everyone_comes_back) covers it."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from zfabric import Client, Event, Lock, Queue, Variable
from zfabric import config as zconfig
from zfabric.security import Security, keygen
from zfabric.testing import until

HERE = Path(__file__).resolve().parent
CLIENT = HERE / "restart_client.py"
# (the settle time must pass the peers' reconnection backoff, at most 2 s)
ENV = {"ZFABRIC_HEARTBEAT_INTERVAL_S": "0.2", "ZFABRIC_RESTART_SETTLE_S": "2.5",
       "ZFABRIC_SCHEDULER_LOST_TIMEOUT_S": "20"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """A ``zfabric scheduler`` at a fixed port that the test kills and starts again, its
    workers, and client programs; every process killed at the end."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.sched: subprocess.Popen | None = None
        # (the workers import this module's task functions by name)
        path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
        self.env = {**os.environ, **ENV, "PYTHONPATH": path}
        self.kills: list[float] = []
        self.security: list[str] = []  # ["--security", DIR] for every process

    def start(self, *args: str, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL):
        proc = subprocess.Popen([sys.executable, *args], env=self.env, stdin=stdin,
                                stdout=stdout, start_new_session=True)
        self.procs.append(proc)
        return proc

    async def scheduler(self) -> None:
        sfile = self.tmp / "scheduler.json"
        sfile.unlink(missing_ok=True)
        self.sched = self.start("-m", "zfabric", "scheduler", "--host", "127.0.0.1", "--port",
                                str(self.port), "--no-dashboard", "--scheduler-file",
                                str(sfile), "--log-level", "error", *self.security)
        await until(sfile.exists, 20, "the scheduler's address file")

    async def kill_scheduler(self, down_s: float) -> None:
        """SIGKILL the scheduler, and start it again ``down_s`` seconds later."""
        assert self.sched is not None
        self.kills.append(time.time())
        self.sched.send_signal(signal.SIGKILL)
        self.sched.wait(5)
        await asyncio.sleep(down_s)
        await self.scheduler()

    def nanny(self) -> subprocess.Popen:
        return self.start("-m", "zfabric", "nanny", self.address, "--nthreads", "2",
                          "--memory-limit", "0", "--log-level", "error")

    def worker(self) -> subprocess.Popen:
        return self.start("-m", "zfabric", "worker", self.address, "--nthreads", "2",
                          "--memory-limit", "0", "--log-level", "error", *self.security)

    def client(self, mode: str, effects: Path, *extra: str) -> subprocess.Popen:
        return self.start(str(CLIENT), mode, self.address, str(effects), *extra,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)


@pytest.fixture
def cluster(tmp_path):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()
        left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(left, timeout=5)


def count(effects: Path, what: str = "done") -> int:
    return sum(1 for name in os.listdir(effects) if f"~{what}~" in name)


def runs(effects: Path) -> dict[str, dict[str, list[float]]]:
    """key -> {"start": [times], "done": [times]} from the side-effect files."""
    out: dict = collections.defaultdict(lambda: {"start": [], "done": []})
    for name in os.listdir(effects):
        key, what, t, _ = name.split("~")
        out[key][what].append(float(t))
    return out


def reruns(effects: Path, kills: list[float]) -> tuple[list[str], list[str]]:
    """Keys that ran more than once: those whose result existed at a kill (held on a worker:
    the design says none), and the others (running or queued at a kill)."""
    held, running = [], []
    for key, marks in runs(effects).items():
        if len(marks["start"]) > 1:
            first = min(marks["done"], default=float("inf"))
            (held if any(first < k for k in kills) else running).append(key)
    return held, running


async def line(proc: subprocess.Popen, timeout: float) -> dict:
    """The next JSON line the client program prints."""
    assert proc.stdout is not None
    text = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout)
    assert text, f"the client program exited ({proc.poll()}) without a result"
    return json.loads(text)


async def test_a_graph_survives_two_scheduler_kills_and_a_late_client_sees_it(cluster,
                                                                              tmp_path):
    effects = tmp_path / "effects"
    effects.mkdir()
    await cluster.scheduler()
    cluster.nanny()
    cluster.nanny()
    # A client computes 2,000 tasks: 1,000 leaves (every 100th a 10 MB array kept on its
    # worker) and a task per pair of neighbouring leaves; it holds every future
    client = cluster.client("graph", effects, "1000", "--hold")
    assert (await line(client, 60))["submitted"] == 2000
    # When the scheduler is killed at 30 % and started again 2 s later
    await until(lambda: count(effects) >= 600, 60, "30 % of the tasks done")
    await cluster.kill_scheduler(2.0)
    # and killed again at 60 %, and started again at once
    await until(lambda: count(effects) >= 1200, 60, "60 % of the tasks done")
    await cluster.kill_scheduler(0.3)
    # Then every future completes with the right value
    result = await line(client, 90)
    assert result["ok"], result
    # and no task whose result a worker held at a kill ran again (those running at a kill
    # finish where they run and their results are kept: counted, expected none)
    held, running = reruns(effects, cluster.kills)
    assert held == []
    print(f"tasks running at a kill that ran again: {len(running)} {running[:5]}")
    assert len(running) == 0
    # When a client starts after the restarts, it sees the first client's futures by key
    late = cluster.client("late", effects, "1000")
    seen = await line(late, 60)
    assert seen == {"mode": "late", "ok": True, "workers": 2, "held": 10}
    assert late.wait(30) == 0
    client.stdin.close()
    assert client.wait(30) == 0


async def test_dask_compute_and_persist_carry_on_across_a_restart(cluster, tmp_path):
    pytest.importorskip("dask.array")
    effects = tmp_path / "effects"
    effects.mkdir()
    await cluster.scheduler()
    cluster.nanny()
    cluster.nanny()
    cluster.env["RESTART_STEP_S"] = "0.02"
    # A dask.array reduction through compute() runs, and a persist() that is not done yet
    client = cluster.client("dask", effects)
    assert (await line(client, 60))["submitted"]
    # When the scheduler is killed with 30 % of the blocks started, and back 2 s later
    await until(lambda: count(effects, "start") >= 80, 60, "30 % of the blocks started")
    await cluster.kill_scheduler(2.0)
    # Then compute() returns the right sum and the persisted collection is right
    result = await line(client, 90)
    assert result == {"mode": "dask", "ok": True, "compute": 4e6, "persist": 8e6}, result
    assert client.wait(30) == 0


def total(x):
    return float(np.sum(x))


def big(i):
    return np.full(2**17, i, dtype=np.float64)  # 1 MiB: held on its worker


async def test_scatter_coordination_and_a_killed_worker_across_a_restart(cluster):
    await cluster.scheduler()
    cluster.worker()
    doomed = cluster.worker()
    config = zconfig.from_env(HEARTBEAT_INTERVAL_S=0.2, SCHEDULER_LOST_TIMEOUT_S=20)
    async with Client(cluster.address, asynchronous=True, config=config,
                      set_as_default=False) as c:
        await asyncio.wait_for(c.wait_for_workers(2), 30)
        # Values held on both workers (results) and scattered, small ones on the scheduler
        bigs = c.map(big, range(20))
        sums = [c.submit(total, b) for b in bigs]
        await c.gather(sums)
        placed = await c.scatter(list(range(100)))
        var, ev, q, lock = (Variable("v", client=c), Event("e", client=c),
                            Queue("q", client=c), Lock("l", client=c))
        await var.set({"answer": 42})
        fvar = Variable("fv", client=c)
        await fvar.set(bigs[3])
        await ev.set()
        await q.put(1)
        assert await lock.acquire()
        await c.publish_dataset(sums=sums[:5])
        # When the scheduler and a worker are killed together while the client scatters
        scattering = asyncio.ensure_future(c.scatter(list(range(1000, 1200))))
        doomed.send_signal(signal.SIGKILL)
        await cluster.kill_scheduler(1.0)
        more = await asyncio.wait_for(scattering, 30)
        # Then every value is right: those only the scheduler held were sent again by this
        # client; those lost with the worker are recomputed through lineage
        assert await asyncio.wait_for(c.gather(placed), 30) == list(range(100))
        assert await asyncio.wait_for(c.gather(more), 30) == list(range(1000, 1200))
        assert await asyncio.wait_for(c.gather(sums), 30) == [i * 2.0**17 for i in range(20)]
        again = await asyncio.wait_for(c.gather(bigs), 30)
        assert [v[0] for v in again] == list(range(20))
        # the Variables, the Event and the dataset survive
        assert await var.get(timeout=5) == {"answer": 42}
        assert (await (await fvar.get(timeout=5)))[0] == 3
        assert await ev.is_set()
        assert await c.get_dataset("sums") is not None
        # a Lock's lease does not: releasing it says it lapsed; a Queue's items are lost
        assert await lock.release() is False
        with pytest.raises(TimeoutError):
            await q.get(timeout=0.5)
        # and new work runs
        assert await asyncio.wait_for(c.submit(total, bigs[5]), 30) == 5 * 2.0**17


def slow_inc(x):
    time.sleep(0.01)
    return x + 1


async def test_with_security_on_the_restart_is_the_same(cluster, tmp_path):
    keys = keygen(tmp_path / "keys")
    cluster.security = ["--security", str(keys)]
    await cluster.scheduler()
    cluster.worker()
    cluster.worker()
    config = zconfig.from_env(HEARTBEAT_INTERVAL_S=0.2, SCHEDULER_LOST_TIMEOUT_S=20)
    async with Client(cluster.address, asynchronous=True, config=config, security=Security(keys),
                      set_as_default=False) as c:
        await asyncio.wait_for(c.wait_for_workers(2), 30)
        bigs = c.map(big, range(10))
        await c.gather(c.map(total, bigs))
        chain = c.map(slow_inc, range(300))
        # When the scheduler is killed while work runs, and back with the same keys
        await cluster.kill_scheduler(1.0)
        # Then the work completes, and values held on the workers are fetched over CURVE
        assert await asyncio.wait_for(c.gather(chain), 60) == list(range(1, 301))
        again = await asyncio.wait_for(c.gather(bigs), 30)
        assert [v[0] for v in again] == list(range(10))


# ---------------------------------------------------------------------------- the pure state


def test_a_new_incarnation_keeps_reported_results_and_runs_only_the_rest():
    from zfabric import protocol
    from zfabric.config import Config
    from zfabric.scheduler.state import SchedulerState

    state = SchedulerState(address="tcp://sched:8786", config=Config(RESTART_SETTLE_S=1.0))
    w1, w2, c = b"w1", b"w2", b"client"
    # Given two workers of the old incarnation that hold and run work, and say so
    for ident, address, held, running in ((w1, "tcp://10.0.0.1:1", [["a", 100]], ["r"]),
                                          (w2, "tcp://10.0.0.2:2", [["b", 2**24]], [])):
        state.handle(ident, [protocol.hello("worker", ident.decode(), address=address),
                             {"op": "holding", "items": held, "running": running,
                              "epoch": "old"}], 0.0)
    state.flush()
    # When its client sends again, after its hello, what it still waits for
    state.handle(c, [protocol.hello("client", "client", rejoin=True, epoch="old")], 0.1)
    assert [op["op"] for op in state.flush()[c]] == ["welcome"]
    tasks = [["a", b"pa", [], None], ["b", b"pb", [], None], ["r", b"pr", ["a"], None],
             ["x", b"px", ["a", "b"], None]]
    state.handle(c, [{"op": "submit", "tasks": tasks}], 0.2)
    # Then its ops wait while the restart settles
    assert state.flush() == {} and "a" not in state.tasks
    # and once it has settled, what the workers hold is in memory, what runs stays where it
    # runs, and only the new task is sent to a worker
    state.tick(1.2)
    out = state.flush()
    assert out[c] == [{"op": "memory", "items": [["a", None, ["tcp://10.0.0.1:1"], 100],
                                                 ["b", None, ["tcp://10.0.0.2:2"], 2**24]]}]
    computes = [t[0] for ops in out.values() for op in ops if op["op"] == "compute"
                for t in op["tasks"]]
    assert computes == ["x"]
    assert state.tasks["r"].state == "processing"
    assert state.tasks["r"].processing_on.ident == w1
    state.validate()
    # When the task that ran across the restart ends, its result is the client's
    state.handle(w1, [{"op": "finished", "tasks": [["r", 5, b"R", 0.1]]}], 1.3)
    assert state.flush()[c] == [{"op": "memory", "items": [["r", b"R", None, 5]]}]
    events = [text for _, text in state.events]
    assert any("scheduler replaced" in e for e in events)
    assert any("2 results kept, 1 left running" in e for e in events)


def test_the_client_record_sends_again_what_is_still_needed_in_order():
    from zfabric.futures import FutureState
    from zfabric.replay import Replay

    def state(key, status="pending", value=None):
        st = FutureState(key)
        st.status, st.value, st.nbytes = status, value, 7
        return st

    replay = Replay()
    # Given a graph sent as one message: inner tasks "i1", "i2" (no future here), and "out"
    states = {"out": state("out"), "done": state("done", "finished", b"V"),
              "big": state("big", "finished"), "gone": state("gone", "error")}
    graph = {"op": "submit", "functions": {"f": b"F"}, "tasks": [
        ["i1", b"p1", [], None, "f"], ["i2", b"p2", ["i1"], None, "f"],
        ["out", b"po", ["i2"], None, "f"]]}
    replay.sent([graph, {"op": "release", "keys": ["i1", "i2"]}], states)
    # and tasks that finished (small and large values), failed, and were released
    replay.sent([{"op": "submit", "functions": {"f": b"F"}, "tasks": [
        ["done", b"pd", [], None, "f"], ["big", b"pb", [], None, "f"],
        ["gone", b"pg", [], None, "f"], ["dropped", b"px", [], None, "f"]]}], states)
    replay.sent([{"op": "scatter", "items": [["s", b"S", 1, []]]},
                 {"op": "coord", "id": 3, "kind": "var-set", "name": "v", "item": ["v", b"x", []]},
                 {"op": "coord", "id": 4, "kind": "event-set", "name": "e"}], states)
    states["s"] = state("s", "finished", b"S")
    # When a new incarnation must hear it again
    ops = replay.ops(states, queued=set(), batch=1000, max_bytes=2**20)
    # Then it gets the graph in order (inner tasks too), a finished small value as a value,
    # a large one's task (its holder may be gone), nothing failed or released, the Variable
    # and Event, and a release of the inner keys
    assert ops == [
        {"op": "submit", "functions": {"f": b"F"}, "tasks": [
            ["i1", b"p1", [], None, "f"], ["i2", b"p2", ["i1"], None, "f"],
            ["out", b"po", ["i2"], None, "f"]]},
        {"op": "scatter", "items": [["done", b"V", 7, []]]},
        {"op": "submit", "functions": {"f": b"F"}, "tasks": [["big", b"pb", [], None, "f"]]},
        {"op": "scatter", "items": [["s", b"S", 7, []]]},
        {"op": "coord", "id": 0, "kind": "var-set", "name": "v", "item": ["v", b"x", []]},
        {"op": "coord", "id": 0, "kind": "event-set", "name": "e"},
        {"op": "release", "keys": ["i1", "i2"]},
    ]
    # When the futures finish with small values, a sweep drops every message
    states["out"] = state("out", "finished", b"O")
    states["big"] = state("big", "finished", b"B")
    replay.sweep(states)
    assert not replay.groups and replay.recorded == 0


def test_a_worker_this_scheduler_declared_dead_brings_back_nothing():
    from zfabric import protocol
    from zfabric.config import Config
    from zfabric.scheduler.state import SchedulerState

    state = SchedulerState(address="tcp://sched:8786", config=Config())
    w = b"w-again"
    # Given a worker that this very scheduler dropped (its report names this epoch)
    state.handle(w, [protocol.hello("worker", "w", address="tcp://10.0.0.1:1"),
                     {"op": "holding", "items": [["a", 100]], "running": ["r"],
                      "epoch": state.epoch}], 0.0)
    # Then what it holds and runs is stale here: it is told to free both, and nothing is
    # recorded or counted as a restart
    frees = [k for op in state.flush()[w] if op["op"] == "free" for k in op["keys"]]
    assert sorted(frees) == ["a", "r"]
    assert "a" not in state.tasks and "r" not in state.tasks
    assert not any("scheduler replaced" in text for _, text in state.events)
