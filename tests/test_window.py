"""The client's submit window (zfabric/window.py): at most SUBMIT_WINDOW_TASKS of a client's
tasks unfinished in the scheduler, the rest held in the client and released by priority."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading

from zfabric import Client
from zfabric.config import from_env
from zfabric.futures import FutureState
from zfabric.testing import cluster, until
from zfabric.window import SubmitWindow

# ---------------------------------------------------------------------------- pure


def _hold(w, states, key, deps=(), priority=0):
    st = states[key] = FutureState(key)
    w.hold(st, b"args-" + key.encode(), list(deps), {"priority": priority} if priority else None,
           "f1", b"func")
    return st


def test_window_releases_by_priority_then_order_and_dependencies_first():
    w = SubmitWindow(2)
    states = {}
    for k in ("a", "b"):
        st = states[k] = FutureState(k)
        w.sent(st)
    assert w.full() and w.inflight == 2
    _hold(w, states, "low1")
    _hold(w, states, "low2")
    _hold(w, states, "dep", priority=0)
    _hold(w, states, "high", deps=["dep"], priority=5)
    assert w.held == 4 and w.take(states) == ([], {})  # no room
    w.done(states["a"])
    tasks, functions = w.take(states)
    # "high" overtakes the older low-priority tasks and takes its held dependency first
    assert [t[0] for t in tasks] == ["dep", "high"] and functions == {"f1": b"func"}
    assert tasks[1][2] == ["dep"] and w.inflight == 3
    w.done(states["b"])
    w.done(states["dep"])
    w.done(states["high"])
    assert w.drop(states["low1"])  # released before it left: never sent
    tasks, _ = w.take(states)
    assert [t[0] for t in tasks] == ["low2"] and w.held == 0 and not w.functions


# ---------------------------------------------------------------------------- in-process

_gate = threading.Event()
_order: list = []


def _wait_gate(x=None):
    _gate.wait(30)
    return x


def _first(x, gate=None):
    return x


def _record(name):
    _order.append(name)
    return name


async def test_scheduler_holds_at_most_the_window():
    _gate.clear()
    cfg = from_env(SUBMIT_WINDOW_TASKS=10)
    async with cluster(nworkers=1, nthreads=2) as (s, _), \
            Client(s.address, asynchronous=True, set_as_default=False, config=cfg) as c:
        gate = c.submit(_wait_gate, pure=False)
        futures = c.map(_first, range(300), gate=gate, pure=False)
        await until(lambda: len(s.state.tasks) >= 10, what="window filled")
        await _until_quiet()
        assert len(s.state.tasks) <= 10 + 1, len(s.state.tasks)
        assert c.core.window.held == 300 + 1 - 10
        _gate.set()
        assert await c.gather(futures) == list(range(300))
        assert c.core.window.held == 0 and c.core.window.inflight == 0


async def _until_quiet():
    import asyncio

    await asyncio.sleep(0.3)


async def test_high_priority_overtakes_held_tasks():
    _gate.clear()
    _order.clear()
    cfg = from_env(SUBMIT_WINDOW_TASKS=1)
    async with cluster(nworkers=1, nthreads=1) as (s, _), \
            Client(s.address, asynchronous=True, set_as_default=False, config=cfg) as c:
        blocker = c.submit(_wait_gate, pure=False)
        lows = [c.submit(_record, f"low{i}", pure=False) for i in range(4)]
        high = c.submit(_record, "high", priority=10, pure=False)
        await _until_quiet()
        assert c.core.window.held == 5
        # a held future can be cancelled: it never reaches the scheduler
        await c.cancel(lows[3])
        _gate.set()
        await blocker
        assert await high == "high"
        assert await c.gather(lows[:3]) == ["low0", "low1", "low2"]
        assert _order == ["high", "low0", "low1", "low2"]


# ---------------------------------------------------------------------------- processes


FLOOD_SCRIPT = textwrap.dedent('''
    import json, os, subprocess, sys, time
    import psutil
    from zfabric import Client
    from zfabric.config import from_env

    def first(x, gate=None):
        return x

    def nap(path):
        while not os.path.exists(path):
            time.sleep(0.05)
        return 0

    if __name__ == "__main__":
        n, window, here = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
        sf = os.path.join(here, "scheduler.json")
        cmd = [sys.executable, "-m", "zfabric"]
        out = subprocess.DEVNULL
        sched = subprocess.Popen([*cmd, "scheduler", "--port", "0", "--host", "127.0.0.1",
                                  "--scheduler-file", sf], stdout=out, stderr=out)
        worker = None
        try:
            deadline = time.time() + 20
            while not (os.path.exists(sf) and open(sf).read().strip()):
                assert time.time() < deadline and sched.poll() is None, "no scheduler"
                time.sleep(0.05)
            addr = json.load(open(sf))["address"]
            worker = subprocess.Popen([*cmd, "worker", addr, "--nthreads", "1",
                                       "--memory-limit", "0"], stdout=out, stderr=out)
            with Client(addr, config=from_env(SUBMIT_WINDOW_TASKS=window)) as c:
                c.wait_for_workers(1, timeout=20)
                assert c.submit(first, 1).result(timeout=20) == 1
                proc = psutil.Process(sched.pid)
                time.sleep(0.3)
                before = proc.memory_info().rss
                flag = os.path.join(here, "flag")
                gate = c.submit(nap, flag, pure=False)
                futures = c.map(first, range(n), gate=gate, pure=False)
                # (a probe task would wait behind the held ones: ask the scheduler instead)
                deadline = time.time() + 30
                while sum(c.scheduler_info()["tasks"].values()) < window:
                    assert time.time() < deadline, "the window never filled"
                    time.sleep(0.1)
                time.sleep(0.5)
                grown = proc.memory_info().rss - before
                held = sum(c.scheduler_info()["tasks"].values())
                open(flag, "w").close()
                ok = c.gather(futures[-5:]) == list(range(n - 5, n))
                print(json.dumps({"grown": grown, "held": held, "ok": ok}))
        finally:
            # SIGKILL: stopping by SIGTERM takes ~10 s after this flood (main too; noted)
            for p in (worker, sched):
                if p is not None:
                    p.kill()
                    p.wait(10)
''')


def test_flood_of_submissions_keeps_the_scheduler_small(tmp_path):
    """50,000 tasks waiting on one gate: with a window of 1,000 the scheduler process grows
    by far less than the ~22 MB it takes to hold them all (about 455 B a task)."""
    script = tmp_path / "flood.py"
    script.write_text(FLOOD_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), "50000", "1000", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ok"]
    assert out["held"] <= 1000 + 2, out  # the first probe, the gate, at most the window
    assert out["grown"] < 8 * 2**20, f"scheduler grew by {out['grown'] / 2**20:.1f} MiB"


async def test_map_in_chunks_keeps_keys_and_order(monkeypatch):
    import zfabric.submission

    monkeypatch.setattr(zfabric.submission, "_MAP_CHUNK", 7)  # 20 items: chunks of 7, 7, 6
    async with cluster(nworkers=1, nthreads=1) as (s, _), \
            Client(s.address, asynchronous=True, set_as_default=False,
                   config=from_env(SUBMIT_WINDOW_TASKS=5)) as c:
        keys = [f"k-{i}" for i in range(20)]
        futures = c.map(_first, range(20), key=keys)
        assert [f.key for f in futures] == keys
        assert await c.gather(futures) == list(range(20))
        named = c.map(_first, range(20), key="p")
        assert len({f.key for f in named}) == 20
        assert await c.gather(named) == list(range(20))
