"""The Nanny: its pure policy, then real worker processes on real sockets.

Every test checks that no process it started is left behind.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from zfabric import Client, KilledWorker, Scheduler
from zfabric.config import Config, from_env
from zfabric.errors import CommTimeoutError, ZFabricError
from zfabric.nanny import Nanny, RestartPolicy, assess
from zfabric.process import (
    is_nanny_worker_argv,
    parse_worker_argv,
    worker_command,
    worker_environ,
)
from zfabric.reprs import format_bytes
from zfabric.supervision import EXIT_RESTART, after_exit
from zfabric.testing import until, wait_gone

pytestmark = [pytest.mark.timeout(40), pytest.mark.usefixtures("no_leftover_processes")]


# ---------------------------------------------------------------------- pure parts


def test_assess_running_process():
    kw = dict(memory_limit_bytes=1000, terminate_fraction=0.95, now=10.0, kill_at=0.0)
    # Given a running worker below its limit, nothing happens
    assert assess(phase="running", alive=True, rss_bytes=900, **kw) == "ok"
    # When it passes 95 % of the limit, it is terminated
    assert assess(phase="running", alive=True, rss_bytes=951, **kw) == "terminate-memory"
    assert assess(phase="starting", alive=True, rss_bytes=951, **kw) == "terminate-memory"
    # When it is gone, it has exited
    assert assess(phase="running", alive=False, rss_bytes=0, **kw) == "exited"
    # No limit: memory is not checked
    kw["memory_limit_bytes"] = 0
    assert assess(phase="running", alive=True, rss_bytes=10**12, **kw) == "ok"


def test_assess_stopping_process():
    kw = dict(rss_bytes=10**12, memory_limit_bytes=1000, terminate_fraction=0.95)
    assert assess(phase="stopping", alive=True, now=1.0, kill_at=2.0, **kw) == "ok"
    assert assess(phase="stopping", alive=True, now=2.0, kill_at=2.0, **kw) == "kill"
    assert assess(phase="stopping", alive=False, now=2.0, kill_at=2.0, **kw) == "exited"
    assert assess(phase="closed", alive=False, now=2.0, kill_at=2.0, **kw) == "ok"


def test_restart_policy_backs_off():
    policy = RestartPolicy(window_s=30, base_s=0.25, max_s=2.0)
    assert policy.delay([100.0], 100.0) == 0.0  # first death: at once
    assert policy.delay([99.0, 100.0], 100.0) == 0.25
    assert policy.delay([98.0, 99.0, 100.0], 100.0) == 0.5
    assert policy.delay([float(t) for t in range(90, 101)], 100.0) == 2.0  # capped
    assert policy.delay([10.0, 20.0, 100.0], 100.0) == 0.0  # old deaths are forgiven


def test_worker_command_round_trip():
    cmd = worker_command("tcp://10.0.0.5:8786", identity="worker-abc", nthreads=3,
                         memory_limit=2**30, nanny="nanny-1", parent_pid=42, ready_fd=7,
                         name="w 1", resources={"GPU": 2}, death_timeout_s=5)
    # -P: the current directory cannot shadow installed packages in the worker process
    assert cmd[:5] == [sys.executable, "-P", "-m", "zfabric", "worker"]
    argv = cmd[4:]
    assert is_nanny_worker_argv(argv)
    assert not is_nanny_worker_argv(["worker", "tcp://x:1"])
    args = parse_worker_argv(argv[1:])
    assert args["address"] == "tcp://10.0.0.5:8786"
    assert args["identity"] == "worker-abc"
    assert args["nthreads"] == 3
    assert args["memory_limit"] == str(2**30)
    assert args["parent_pid"] == 42 and args["ready_fd"] == 7
    assert args["name"] == "w 1" and args["resources"] == "GPU=2"
    assert args["death_timeout"] == 5.0


def test_worker_environ():
    env = worker_environ({"OMP_NUM_THREADS": "4", "EXTRA": 1}, base={"PATH": "/bin"})
    assert env["MKL_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == "1"
    # (the heap is tuned in the worker process, not through what its tasks' processes inherit)
    assert "MALLOC_TRIM_THRESHOLD_" not in env and "MALLOC_MMAP_THRESHOLD_" not in env
    assert env["OMP_NUM_THREADS"] == "4"  # the caller's choice wins
    assert env["EXTRA"] == "1" and env["PATH"] == "/bin"
    # this test's directory is importable in the worker too
    assert os.path.dirname(os.path.abspath(__file__)) in env["PYTHONPATH"].split(os.pathsep)


def test_after_exit_decides_restart_report_and_backoff():
    def ex(**kw):
        base = dict(phase="running", then="restart", pid=7, rc=1, ready=True,
                    closing_reason=None, restart_reason=None)
        return after_exit(**{**base, **kw})

    crash = ex(rc=-9)
    assert (crash.then, crash.expected, crash.counted) == ("restart", False, False)
    assert crash.report == crash.log == "worker process 7 was killed by SIGKILL"
    assert ex(rc=1, ready=False).counted  # died before it registered: backs off
    fresh = ex(rc=EXIT_RESTART)
    assert (fresh.then, fresh.expected, fresh.counted) == ("restart", True, False)
    assert fresh.report == "worker process 7 exited with code 75"
    assert ex(rc=0, restart_reason="memory").report is None  # it told the scheduler itself
    closed = ex(rc=0, closing_reason="retired")
    assert (closed.then, closed.report) == ("close", "worker closed: retired")
    stopped = ex(phase="stopping", then="close", rc=-15)
    assert (stopped.then, stopped.expected) == ("close", True)
    assert stopped.report == "worker process 7 was killed by SIGTERM while its nanny stopped it"
    assert ex(phase="stopping", rc=0, closing_reason="told to").report is None
    assert ex(rc=-200).report == "worker process 7 was killed by signal 200"


def test_format_bytes():
    assert format_bytes(0) == "0 B"
    assert format_bytes(1536) == "1.50 kiB"
    assert format_bytes(200 * 2**20) == "200.00 MiB"


# ---------------------------------------------------------------------- real processes


# Task functions are lambdas or builtins, so that workers unpickle them by value and do not
# import this test module (and pytest with it) in every fresh process.
async def test_nanny_starts_registers_and_vouches():
    async with Scheduler() as s, Nanny(s.address, nworkers=2, nthreads=1, memory_limit=0,
                                       name="n") as nanny:
        assert nanny.status == "running"
        assert len(nanny.pids) == 2 and len(nanny.worker_addresses) == 2
        assert sorted(ws.name for ws in s.state.workers.values()) == ["n-0", "n-1"]
        # The scheduler knows the nanny, each worker names it, and heartbeats vouch for them
        ns = s.state.nannies[nanny.identity.encode()]
        assert all(ws.nanny == ns.ident for ws in s.state.workers.values())
        await until(lambda: ns.vouched == {w.encode() for w in nanny.worker_identities})
        async with Client(s.address, asynchronous=True) as client:
            pids = await client.run(os.getpid)
            assert sorted(pids.values()) == sorted(nanny.pids)
            env = await client.run(lambda: os.environ.get("OMP_NUM_THREADS"))
            assert set(env.values()) == {"1"}
        pids = nanny.pids
    assert nanny.status == "closed"
    assert wait_gone(pids, 0) == []  # close() reaped them


async def test_nanny_restarts_a_killed_worker_and_tells_the_scheduler_at_once():
    async with Scheduler() as s, Nanny(s.address, nthreads=1, memory_limit=0) as nanny:
        old_pid, old_id = nanny.pids[0], nanny.worker_identities[0]
        assert old_id.encode() in s.state.workers
        # When the worker process is killed
        os.kill(old_pid, signal.SIGKILL)
        # Then the scheduler drops it at once (not after the heartbeat timeout)
        took = await until(lambda: old_id.encode() not in s.state.workers, timeout=3)
        assert took < 1.0
        assert any("SIGKILL" in text for _, text in s.state.events)
        # And a new process takes its place and registers
        await until(lambda: len(s.state.workers) == 1 and nanny.worker_address, timeout=10)
        assert nanny.pids[0] != old_pid and nanny.worker_identities[0] != old_id
        async with Client(s.address, asynchronous=True) as client:
            assert await client.submit(lambda x: x * 2, 21) == 42


async def test_memory_limit_terminates_and_restarts_the_worker():
    config = from_env(ALLOWED_FAILURES=1)
    async with Scheduler(config=config) as s, \
            Nanny(s.address, nthreads=1, memory_limit="200MB", config=config) as nanny, \
            Client(s.address, asynchronous=True) as client:
        first_pid = nanny.pids[0]
        # When a task allocates far past the limit (after a pause, so that the scheduler has
        # heard it started: only started tasks are blamed for their worker's death)
        fut = client.submit(lambda n: time.sleep(0.2) or len(b"x" * n) + time.sleep(30),
                            400_000_000)
        # Then its worker is terminated (twice, with ALLOWED_FAILURES=1) and it fails
        with pytest.raises(KilledWorker):
            await asyncio.wait_for(fut, 30)
        events = [text for _, text in s.state.events]
        assert sum("memory limit" in text for text in events) >= 2, events
        # And a fresh worker serves the next task
        await until(lambda: len(s.state.workers) == 1 and nanny.worker_address, timeout=10)
        assert first_pid not in nanny.pids
        assert await client.submit(lambda: 7, pure=False) == 7


async def test_client_restart_replaces_every_worker_process():
    async with Scheduler() as s, Nanny(s.address, nworkers=2, nthreads=1, memory_limit=0), \
            Client(s.address, asynchronous=True) as client:
        before = set((await client.run(os.getpid)).values())
        busy = client.submit(time.sleep, 10, pure=False)
        await until(lambda: busy.key in s.state.tasks and s.state.tasks[busy.key].started)
        await asyncio.wait_for(client.restart(), 20)
        # A restart is no death: nothing that was running is blamed for it
        ts = s.state.tasks.get(busy.key)
        assert ts is None or ts.suspicious == 0
        info = await client.scheduler_info()
        assert len(info["workers"]) == 2
        after = set((await client.run(os.getpid)).values())
        assert not before & after
        assert await client.submit(lambda: 3, pure=False) == 3


async def test_nanny_whose_worker_cannot_start_fails_at_once():
    async with Scheduler() as s:
        start = time.monotonic()
        # A worker interpreter that cannot even start (its standard library is missing)
        with pytest.raises(ZFabricError, match="failed to start"):
            await Nanny(s.address, nthreads=1, memory_limit=0,
                        env={"PYTHONHOME": "/nonexistent"})
        assert time.monotonic() - start < 10
        assert not s.state.workers


async def test_nanny_without_scheduler_fails_with_the_address():
    with pytest.raises(CommTimeoutError, match=re.escape("tcp://127.0.0.1:9")):
        await Nanny("tcp://127.0.0.1:9", nthreads=1, memory_limit=0, death_timeout=0.5)


def test_nanny_killed_with_sigkill_takes_its_workers_along(tmp_path):
    async def main():
        async with Scheduler() as s:
            proc = subprocess.Popen(
                [sys.executable, "-m", "zfabric", "nanny", s.address, "--nworkers", "2",
                 "--nthreads", "1", "--memory-limit", "0", "--log-level", "warning"],
            )
            try:
                await until(lambda: len(s.state.workers) == 2, timeout=20)
                pids = [ws.pid for ws in s.state.workers.values()]
                assert all(psutil.Process(p).ppid() == proc.pid for p in pids)
                # When the nanny is killed outright
                proc.send_signal(signal.SIGKILL)
                proc.wait(5)
                # Then its workers go too, and the scheduler learns of it
                assert await asyncio.to_thread(wait_gone, pids, 5) == []
                await until(lambda: not s.state.workers, timeout=5)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()

    asyncio.run(main())


def test_nanny_command_stops_cleanly_on_sigterm():
    async def main():
        async with Scheduler() as s:
            proc = subprocess.Popen(
                [sys.executable, "-m", "zfabric", "nanny", s.address, "--nthreads", "1",
                 "--memory-limit", "0", "--log-level", "warning"],
                stdout=subprocess.PIPE, text=True,
            )
            try:
                line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20)
                assert line.startswith("Nanny started 1 worker(s) for " + s.address)
                await until(lambda: len(s.state.workers) == 1, timeout=5)
                pid = next(iter(s.state.workers.values())).pid
                proc.send_signal(signal.SIGTERM)
                assert await asyncio.to_thread(proc.wait, 10) == 0
                assert await asyncio.to_thread(wait_gone, [pid], 2) == []
                await until(lambda: not s.state.workers and not s.state.nannies, timeout=5)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()

    asyncio.run(main())


async def test_nanny_and_its_worker_heartbeat_at_the_schedulers_interval():
    # Given a scheduler that asks for a beat every 0.05 s and a Nanny whose own setting is 5 s
    fast, slow = Config(HEARTBEAT_INTERVAL_S=0.05), Config(HEARTBEAT_INTERVAL_S=5.0)
    async with Scheduler(config=fast) as s, \
            Nanny(s.address, nthreads=1, memory_limit=0, config=slow) as nanny:
        ns = s.state.nannies[nanny.identity.encode()]
        ws = s.state.workers[nanny.worker_identities[0].encode()]
        # When they run idle for a second
        nanny_seen, worker_seen = set(), set()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            nanny_seen.add(ns.last_seen)
            worker_seen.add(ws.last_seen)
            await asyncio.sleep(0.01)
        # Then both beat at the scheduler's pace (about 20 beats; the Nanny's setting: none)
        assert nanny.heartbeat_s == 0.05
        assert len(nanny_seen) >= 6, sorted(nanny_seen)
        assert len(worker_seen) >= 6, sorted(worker_seen)
