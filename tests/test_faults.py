"""Faults: workers that die, stall or hold the GIL; clients that vanish; a scheduler that goes
away; tasks that time out, crash their worker, eat memory or return too much.

Each test states a guarantee of docs/faults.md and checks it on real sockets, most of them with
real worker processes (``python -m zfabric worker``, or a Nanny) that it kills with signals.
Liveness settings are shrunk (``WORKER_TTL_S=1``, heartbeats every 0.2 s) so that every test
ends in seconds; every subprocess a test starts is killed when it ends.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time

import cloudpickle
import numpy as np
import psutil
import pytest

from zfabric import (
    Client,
    KilledWorker,
    LostDataError,
    Nanny,
    ResultTooLarge,
    Scheduler,
    SchedulerLost,
    TaskTimeout,
    Worker,
    protocol,
    serialize,
)
from zfabric import config as zconfig
from zfabric.testing import FakePeer, cluster, until

# Worker processes must not import this module (and pytest with it): ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.timeout(60)

#: Environment of the worker processes these tests start: heartbeats every 0.2 s.
FAST_ENV = {"ZFABRIC_HEARTBEAT_INTERVAL_S": "0.2"}


def fast(**overrides) -> zconfig.Config:
    """A Config with heartbeats every 0.2 s (and whatever a test overrides)."""
    return zconfig.from_env(HEARTBEAT_INTERVAL_S=0.2, **overrides)


# ---------------------------------------------------------------------------- task functions


def inc(x):
    return x + 1


def stall_on(pid, seconds):
    """Sleep ``seconds`` in process ``pid`` only; return the pid that ran it."""
    if os.getpid() == pid:
        time.sleep(seconds)
    return os.getpid()


def sleep_then_pid(seconds):
    time.sleep(seconds)
    return os.getpid()


def hold_gil(seconds):
    """Block for ``seconds`` with the GIL held: PyDLL calls into C do not release it, so not
    one other thread of the process (its heartbeat included) runs meanwhile."""
    ctypes.PyDLL(None).sleep(int(seconds))
    return seconds


def kill_own_process(delay):
    time.sleep(delay)
    os.kill(os.getpid(), signal.SIGKILL)


def echo_timeout(x, timeout=None):
    return (x, timeout)


def allocate_and_wait(nbytes):
    time.sleep(0.3)  # let the scheduler hear that the task started
    data = b"x" * nbytes  # touches every page
    time.sleep(30)
    return len(data)


# ---------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def task(s: Scheduler, future):
    return s.state.tasks.get(future.key)


def workers_of(s: Scheduler) -> list:
    return list(s.state.workers.values())


def events(s: Scheduler) -> list[str]:
    return [text for _, text in list(s.state.events)]


class Processes:
    """Subprocesses a test starts, each in a session of its own; all killed at the end."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, *args: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-m", "zfabric", *args], env={**os.environ, **FAST_ENV},
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def worker(self, address: str, nthreads: int = 1) -> subprocess.Popen:
        return self.start("worker", address, "--nthreads", str(nthreads), "--memory-limit", "0",
                          "--log-level", "error")

    def scheduler(self, port: int, scheduler_file) -> subprocess.Popen:
        return self.start("scheduler", "--host", "127.0.0.1", "--port", str(port),
                          "--scheduler-file", str(scheduler_file), "--log-level", "error")

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)


@pytest.fixture
def procs():
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    p = Processes()
    try:
        yield p
    finally:
        p.kill_all()
        left = [c for c in psutil.Process().children(recursive=True) if c.pid not in before]
        for c in left:  # a Nanny's workers, should its close have failed
            with contextlib.suppress(psutil.Error):
                c.kill()
        psutil.wait_procs(left, timeout=5)


def count_results(client: Client) -> collections.Counter:
    """Count, by key, every result the scheduler gives ``client`` from now on."""
    delivered: collections.Counter = collections.Counter()
    session = client._session  # the client's link to the scheduler (zfabric.session)
    on_op = session.on_op

    def spy(op):
        if op["op"] == "memory":
            delivered.update(item[0] for item in op["items"])
        on_op(op)

    session.on_op = spy
    return delivered


def finished(key: str, value) -> dict:
    """A worker's ``finished`` op for a small ``value``."""
    header, _ = serialize.dumps_value(value)
    return {"op": "finished", "tasks": [[key, len(header), header, 0.01]]}


async def registered(s: Scheduler, proc: subprocess.Popen, timeout: float = 20.0):
    """The scheduler's record of the worker running in ``proc``, once it has registered."""

    def find():
        return next((ws for ws in workers_of(s) if ws.pid == proc.pid), None)

    await until(lambda: find() is not None, timeout, f"worker process {proc.pid} registered")
    return find()


# ---------------------------------------------------------------------------- liveness


async def test_silent_worker_is_dead_after_ttl_its_running_task_suspicious_queued_not(procs):
    config = fast(WORKER_TTL_S=1.0)
    async with Scheduler(config=config) as s, \
            Client(s.address, asynchronous=True, config=config, set_as_default=False) as c:
        w = procs.worker(s.address)
        ws = await registered(s, w)
        # Given a one-thread worker process running one task with three more queued behind it
        running = c.submit(stall_on, w.pid, 30, pure=False)
        queued = [c.submit(stall_on, w.pid, 30, pure=False) for _ in range(3)]
        await until(lambda: task(s, running) is not None and task(s, running).started
                    and all(task(s, f) is not None and task(s, f).processing_on is ws
                            for f in queued), what="four tasks on the worker, one started")
        assert not any(task(s, f).started for f in queued)
        async with Worker(s.address, nthreads=2, memory_limit=0, config=config):
            # When the process dies without a word (no Nanny to report it)
            killed = time.monotonic()
            os.kill(w.pid, signal.SIGKILL)
            # Then the scheduler declares it dead after WORKER_TTL_S of silence
            await until(lambda: ws.ident not in s.state.workers, 5, "the worker removed")
            took = time.monotonic() - killed
            assert 0.6 < took < 3.0, took
            assert any("silent for" in e for e in events(s)), events(s)
            # And every task runs on the other worker (in this process)
            results = await asyncio.wait_for(c.gather([running, *queued]), 10)
            assert results == [os.getpid()] * 4
            # The task that had started is suspicious; the ones only queued are not
            assert task(s, running).suspicious == 1
            assert [task(s, f).suspicious for f in queued] == [0, 0, 0]


async def test_stopped_worker_declared_dead_comes_back_as_a_new_incarnation(procs):
    config = fast(WORKER_TTL_S=1.0)
    async with Scheduler(config=config) as s, \
            Client(s.address, asynchronous=True, config=config, set_as_default=False) as c:
        delivered = count_results(c)
        w = procs.worker(s.address)
        ws = await registered(s, w)
        async with Worker(s.address, nthreads=1, memory_limit=0, config=config):
            # Given a task running on the worker process
            f = c.submit(sleep_then_pid, 0.5, workers=[ws.address], allow_other_workers=True,
                         pure=False)
            await until(lambda: task(s, f) is not None and task(s, f).started)
            finished = s.state.counts["finished"]
            # When the process is stopped (SIGSTOP) for longer than WORKER_TTL_S
            os.kill(w.pid, signal.SIGSTOP)
            await until(lambda: ws.ident not in s.state.workers, 5, "the stopped worker removed")
            # Then its task runs again on the other worker
            assert await asyncio.wait_for(f, 10) == os.getpid()
            # When the process continues, its stale result is dropped and it registers again
            os.kill(w.pid, signal.SIGCONT)
            again = await registered(s, w, 10)
            assert again is not ws and again.address == ws.address
            await asyncio.sleep(0.3)
            assert s.state.counts["finished"] - finished == 1
            assert delivered[f.key] == 1
            assert await f == os.getpid()
            assert again not in (task(s, f).who_has or ())
            # And it takes new work as the new incarnation
            g = c.submit(os.getpid, workers=[again.address], pure=False)
            assert await asyncio.wait_for(g, 10) == w.pid


async def test_worker_holding_the_gil_under_a_nanny_is_not_declared_dead():
    config = fast(WORKER_TTL_S=1.0)
    async with Scheduler(config=config) as s, \
            Nanny(s.address, nthreads=1, memory_limit=0, config=config, env=FAST_ENV), \
            Client(s.address, asynchronous=True, config=config, set_as_default=False) as c:
        [ws] = workers_of(s)
        # When a task holds the GIL three times as long as WORKER_TTL_S
        f = c.submit(hold_gil, 3, pure=False)
        longest = 0.0
        deadline = time.monotonic() + 20
        while not f.done() and time.monotonic() < deadline:
            longest = max(longest, time.monotonic() - ws.last_seen)
            await asyncio.sleep(0.05)
        assert await asyncio.wait_for(f, 5) == 3
        # Then the worker was silent past the TTL, but its Nanny vouched for it
        assert longest > config.WORKER_TTL_S, longest
        assert workers_of(s) == [ws]
        assert not any("removed" in e for e in events(s)), events(s)


async def test_vanished_client_is_released_after_client_ttl():
    config = fast(CLIENT_TTL_S=1.0)
    async with cluster(1, config=config) as (s, _), \
            Client(s.address, asynchronous=True, config=config, set_as_default=False) as live:
        kept = live.submit(inc, 1)
        assert await kept == 2
        # Given a client that submitted a task and then vanished without a goodbye
        async with FakePeer(s.address) as ghost:
            assert (await ghost.hello())["op"] == "welcome"
            payload, _, _ = serialize.dumps_task(time.sleep, (2.5,), {})
            await ghost.send({"op": "submit", "tasks": [["ghost-task", payload, [], None]]})
            await until(lambda: "ghost-task" in s.state.tasks
                        and s.state.tasks["ghost-task"].state == "processing")
        gone = time.monotonic()
        # Then its task is released once it has been silent for CLIENT_TTL_S
        await until(lambda: "ghost-task" not in s.state.tasks, 5, "the ghost's task released")
        assert 0.5 < time.monotonic() - gone < 2.5
        assert any("silent" in e and "releasing" in e for e in events(s)), events(s)
        # And a client that heartbeats keeps its futures however idle it is
        assert kept.key in s.state.tasks
        assert await kept == 2


# ---------------------------------------------------------------------------- dead workers


async def test_results_lost_with_a_killed_worker_are_recomputed_through_lineage(procs):
    config = fast(WORKER_TTL_S=1.0)
    async with Scheduler(config=config) as s, \
            Client(s.address, asynchronous=True, config=config, set_as_default=False) as c:
        w = procs.worker(s.address)
        ws = await registered(s, w)
        async with Worker(s.address, nthreads=1, memory_limit=0, config=config) as b:
            # Given large results (kept on the worker, not the scheduler) held only by the process
            x = c.submit(np.arange, 200_000, workers=[ws.address], allow_other_workers=True)
            y = c.submit(np.negative, x, workers=[ws.address], allow_other_workers=True)
            await asyncio.wait_for(c.gather([x, y]), 10)
            assert y._state.who_has == [ws.address]
            xkey = x.key
            del x  # x's value is dropped; its record stays as y's lineage
            await until(lambda: s.state.tasks[xkey].state == "released")
            # When the process is killed
            os.kill(w.pid, signal.SIGKILL)
            # Then y, still wanted, is recomputed elsewhere, and x with it
            np.testing.assert_array_equal(await asyncio.wait_for(y, 10), -np.arange(200_000))
            assert y._state.who_has == [b.address]
            z = c.submit(np.sum, y)
            assert await asyncio.wait_for(z, 10) == -np.arange(200_000).sum()


async def test_result_awaited_while_its_only_holder_leaves_never_stalls():
    # The client may be about to fetch from the holder when it hears the value was lost; that
    # fetch must not be sent to the gone holder (which would never answer). It races: repeat.
    async with cluster(1, config=fast()) as (s, [b]), \
            Client(s.address, asynchronous=True, set_as_default=False) as c:
        for _ in range(25):
            a = await Worker(s.address, nthreads=1, memory_limit=0, config=fast())
            f = c.submit(np.arange, 100_000, workers=[a.address], allow_other_workers=True,
                         pure=False)
            await asyncio.wait_for(f, 5)
            await a.close()
            np.testing.assert_array_equal(await asyncio.wait_for(f, 5), np.arange(100_000))
            assert f._state.who_has == [b.address]


async def test_scattered_data_lost_with_a_killed_worker_fails_with_lost_data_error(procs):
    config = fast(WORKER_TTL_S=1.0)
    async with Scheduler(config=config) as s, \
            Client(s.address, asynchronous=True, config=config, set_as_default=False) as c:
        w = procs.worker(s.address)
        ws = await registered(s, w)
        async with Worker(s.address, nthreads=1, memory_limit=0, config=config):
            [data] = await c.scatter([np.arange(200_000)], workers=[ws.address])
            total = c.submit(np.sum, data, workers=[ws.address])
            assert await asyncio.wait_for(total, 10) == np.arange(200_000).sum()
            os.kill(w.pid, signal.SIGKILL)
            # Scattered data cannot be recomputed: its future fails, and so does new work on it
            with pytest.raises(LostDataError, match="scatter it again"):
                await asyncio.wait_for(data, 10)
            with pytest.raises(LostDataError):
                await asyncio.wait_for(c.submit(np.negative, data), 10)
            # What was computed from it before is still there
            assert await total == np.arange(200_000).sum()


async def test_task_that_keeps_killing_its_worker_fails_with_killed_worker():
    config = fast()
    assert config.ALLOWED_FAILURES == 3  # the default
    async with Scheduler(config=config) as s, \
            Nanny(s.address, nthreads=1, memory_limit=0, config=config, env=FAST_ENV) as nanny, \
            Client(s.address, asynchronous=True, config=config, set_as_default=False) as c:
        f = c.submit(kill_own_process, 0.3, key="crasher")
        with pytest.raises(KilledWorker) as info:
            await asyncio.wait_for(f, 40)
        err = info.value
        # It names the task, the last worker and the count: ALLOWED_FAILURES + 1 dead workers
        assert err.task == "crasher" and err.count == 4
        assert err.last_worker.startswith("tcp://")
        assert "'crasher'" in str(err) and "4 workers" in str(err) and err.last_worker in str(err)
        # And the fabric carries on
        await until(lambda: len(s.state.workers) == 1 and nanny.worker_address, 10)
        assert await asyncio.wait_for(c.submit(inc, 1), 10) == 2


async def test_task_that_kills_its_worker_at_once_still_ends_in_killed_worker():
    # A task that crashes its process before the worker could report that it started
    config = fast(ALLOWED_FAILURES=1)
    async with Scheduler(config=config) as s, \
            Nanny(s.address, nthreads=1, memory_limit=0, config=config, env=FAST_ENV), \
            Client(s.address, asynchronous=True, config=config, set_as_default=False) as c:
        f = c.submit(kill_own_process, 0, key="instant-crasher")
        with pytest.raises(KilledWorker) as info:
            await asyncio.wait_for(f, 30)
        assert info.value.task == "instant-crasher" and info.value.count == 2


async def test_late_and_duplicate_results_are_ignored():
    config = fast(WORKER_TTL_S=1.0)
    async with Scheduler(config=config) as s, FakePeer(s.address, role="worker") as worker, \
            Client(s.address, asynchronous=True, config=config, set_as_default=False) as c:
        delivered = count_results(c)
        hello = dict(address="tcp://127.0.0.1:9", nthreads=2, pid=1, name="fake")
        assert (await worker.hello(**hello))["op"] == "welcome"
        f1, f2 = c.submit(inc, 1, key="k1"), c.submit(inc, 2, key="k2")
        given = set()
        while given != {"k1", "k2"}:
            given.update(t[0] for t in (await worker.expect("compute"))["tasks"])
        # When a result comes twice
        await worker.send({"op": "started", "keys": ["k1", "k2"]})
        await worker.send(finished("k1", 2), finished("k1", 2))
        # Then the client is given it once
        assert await asyncio.wait_for(f1, 5) == 2
        # When the worker then goes silent past WORKER_TTL_S, it is dead; k2 waits for a worker
        await until(lambda: not s.state.workers, 5, "the silent worker removed")
        assert s.state.tasks["k2"].state == "queued" and s.state.tasks["k2"].suspicious == 1
        # When its late result comes, it is refused and the worker told to register again
        await worker.send(finished("k2", -1))
        assert "unknown peer" in (await worker.expect("reregister"))["reason"]
        assert s.state.tasks["k2"].state == "queued" and not f2.done()
        # When it registers again, it is a new incarnation and is given the task anew
        assert (await worker.hello(**hello))["op"] == "welcome"
        assert [t[0] for t in (await worker.expect("compute"))["tasks"]] == ["k2"]
        await worker.send(finished("k2", 3))
        assert await asyncio.wait_for(f2, 5) == 3
        await asyncio.sleep(0.2)
        assert delivered == {"k1": 1, "k2": 1}


async def test_worker_its_nanny_reported_dead_cannot_register_again():
    # A Nanny reports a worker dead as it terminates it (memory); until the kill lands, the
    # process may still talk, be told to register again, and say hello.
    async with Scheduler(config=fast()) as s, FakePeer(s.address, role="nanny") as nanny, \
            FakePeer(s.address, role="worker") as worker:
        assert (await nanny.hello())["op"] == "welcome"
        hello = dict(address="tcp://127.0.0.1:9", nthreads=1, pid=1,
                     nanny=nanny.identity.decode())
        assert (await worker.hello(**hello))["op"] == "welcome"
        await nanny.send({"op": "worker-died", "worker": worker.identity.decode(),
                          "reason": "terminated: memory"})
        await until(lambda: not s.state.workers, 5, "the reported worker removed")
        await worker.send({"op": "heartbeat"})
        await worker.expect("reregister")
        # Then its hello is answered with close, and it is not a worker again
        await worker.send(protocol.hello("worker", worker.identity.decode(), **hello))
        await worker.expect("close")
        assert not s.state.workers


async def test_task_freed_while_running_runs_again_when_given_again():
    async with cluster(1, config=fast()) as (s, _), \
            Client(s.address, asynchronous=True, set_as_default=False) as c:
        f = c.submit(sleep_then_pid, 0.4, key="again")
        await until(lambda: "again" in s.state.tasks and s.state.tasks["again"].started)
        await c.cancel(f)  # the worker is told to free it while it runs
        await asyncio.sleep(0.6)  # and that run ends, unwanted
        g = c.submit(sleep_then_pid, 0, key="again")
        assert await asyncio.wait_for(g, 5) == os.getpid()


# ---------------------------------------------------------------------------- task timeouts


async def test_task_timeout_without_a_nanny_abandons_the_thread_and_keeps_working():
    config = fast()
    async with cluster(1, nthreads=2, config=config) as (s, [w]), \
            Client(s.address, asynchronous=True, config=config, set_as_default=False) as c:
        stuck = c.submit(time.sleep, 2, task_timeout=0.3)
        # the function's own ``timeout=`` keyword is its own
        mine = c.submit(echo_timeout, 1, timeout=7)
        with pytest.raises(TaskTimeout, match=r"task_timeout of 0\.3 s") as info:
            await asyncio.wait_for(stuck, 5)
        assert isinstance(info.value, TimeoutError)
        assert await mine == (1, 7)
        # both threads keep serving while the abandoned one sleeps on
        assert await asyncio.wait_for(c.gather(c.map(inc, range(20))), 5) == list(range(1, 21))
        assert w.exit_code is None and w.status == "running"
        assert w._core.executor.nthreads == 2


async def test_task_timeout_under_a_nanny_restarts_the_worker_without_blaming_others():
    config = fast()
    async with Scheduler(config=config) as s, \
            Nanny(s.address, nthreads=2, memory_limit=0, config=config, env=FAST_ENV) as nanny, \
            Client(s.address, asynchronous=True, config=config, set_as_default=False) as c:
        old = nanny.processes[0]
        # Given a task that will time out, one running beside it and one queued
        stuck = c.submit(time.sleep, 30, task_timeout=0.5)
        beside = c.submit(sleep_then_pid, 1.5, pure=False)
        await until(lambda: task(s, stuck) is not None and task(s, stuck).started
                    and task(s, beside) is not None and task(s, beside).started)
        queued = c.submit(sleep_then_pid, 0, pure=False)
        # When the timeout passes, it fails with TaskTimeout
        with pytest.raises(TaskTimeout, match="the worker restarts"):
            await asyncio.wait_for(stuck, 10)
        # Then the worker process exits with code 75 and the Nanny starts a fresh one
        await until(lambda: old.proc.poll() is not None, 10, "the old worker exited")
        assert old.proc.returncode == 75
        await until(lambda: nanny.pids and nanny.pids[0] != old.pid and nanny.worker_address,
                    15, "a new worker process")
        # And the other tasks ran there, without being blamed for the restart
        pid = nanny.pids[0]
        assert await asyncio.wait_for(c.gather([beside, queued]), 15) == [pid, pid]
        assert task(s, beside).suspicious == 0 and task(s, queued).suspicious == 0


# ---------------------------------------------------------------------------- memory and size


async def test_task_that_always_overruns_the_memory_limit_ends_in_killed_worker():
    config = fast(ALLOWED_FAILURES=1)
    async with Scheduler(config=config) as s, \
            Nanny(s.address, nthreads=1, memory_limit="150MB", config=config, env=FAST_ENV), \
            Client(s.address, asynchronous=True, config=config, set_as_default=False) as c:
        f = c.submit(allocate_and_wait, 300_000_000, key="hog")
        with pytest.raises(KilledWorker, match="'hog'") as info:
            await asyncio.wait_for(f, 40)
        assert info.value.count == 2
        texts = [text for _, text in (await c.scheduler_info())["events"]]
        assert sum("memory limit" in t for t in texts) == 2, texts
        await until(lambda: len(s.state.workers) == 1, 10)
        assert await asyncio.wait_for(c.submit(inc, 1), 10) == 2


async def test_result_larger_than_the_message_limit_fails_and_the_worker_carries_on():
    config = fast(MAX_MESSAGE_BYTES=1_000_000)
    async with cluster(1, config=config) as (s, [w]), \
            Client(s.address, asynchronous=True, config=config, set_as_default=False) as c:
        with pytest.raises(ResultTooLarge, match="MAX_MESSAGE_BYTES"):
            await asyncio.wait_for(c.submit(bytes, 2_000_000), 5)
        with pytest.raises(ResultTooLarge):
            await asyncio.wait_for(c.submit(np.zeros, 300_000), 5)  # 2.4 MB out of band
        assert await asyncio.wait_for(c.submit(np.zeros, 1000), 5) is not None
        assert await asyncio.wait_for(c.submit(inc, 1), 5) == 2
        assert w.status == "running"


# ---------------------------------------------------------------------------- scheduler loss


async def test_killed_scheduler_fails_futures_then_everyone_comes_back(procs, tmp_path):
    config = fast(SCHEDULER_LOST_TIMEOUT_S=1.5)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    sfile = tmp_path / "scheduler.json"
    sched = procs.scheduler(port, sfile)
    await until(sfile.exists, 20, "the scheduler file")
    assert json.loads(sfile.read_text())["address"] == address
    worker = procs.worker(address)
    async with Nanny(address, nthreads=1, memory_limit=0, config=config, env=FAST_ENV) as nanny, \
            Client(address, asynchronous=True, config=config, set_as_default=False) as c:
        await asyncio.wait_for(c.wait_for_workers(2), 20)
        pids = set((await c.run(os.getpid)).values())
        assert pids == {worker.pid, *nanny.pids}
        pending = [c.submit(time.sleep, 2, pure=False) for _ in range(3)]

        async def processing():
            return (await c.scheduler_info())["tasks"].get("processing", 0)

        while await processing() < 3:
            await asyncio.sleep(0.02)
        # When the scheduler process is killed outright (no goodbye to anyone)
        sched.kill()
        sched.wait(5)
        lost = time.monotonic()
        # Then every pending future fails with SchedulerLost within SCHEDULER_LOST_TIMEOUT_S
        with pytest.raises(SchedulerLost):
            await asyncio.wait_for(pending[0].result(), 10)
        assert time.monotonic() - lost < config.SCHEDULER_LOST_TIMEOUT_S + 2
        with pytest.raises(SchedulerLost):
            await asyncio.wait_for(c.gather(pending), 5)
        # And so does work submitted while it is gone
        during = c.submit(inc, 10)
        with pytest.raises(SchedulerLost):
            await asyncio.wait_for(during, config.SCHEDULER_LOST_TIMEOUT_S + 5)
        # When a new scheduler starts at the same address
        sfile.unlink(missing_ok=True)
        procs.scheduler(port, sfile)
        await until(sfile.exists, 20, "the new scheduler file")
        # Then the client reconnects, the same worker processes register again, and work runs
        await until(lambda: c.epoch is not None, 15, "the client reconnected")

        async def back():
            while True:
                with contextlib.suppress(SchedulerLost):
                    if len((await c.scheduler_info())["workers"]) == 2:
                        return
                await asyncio.sleep(0.1)

        await asyncio.wait_for(back(), 15)
        assert set((await c.run(os.getpid)).values()) == pids
        assert await asyncio.wait_for(c.submit(inc, 1, pure=False), 10) == 2
        assert await asyncio.wait_for(c.gather(c.map(inc, range(10))), 10) == list(range(1, 11))
        # The futures that failed stay failed; their work runs when submitted again
        assert during.status == "error"
        assert await asyncio.wait_for(c.submit(inc, 10), 10) == 11


async def test_blocking_client_raises_scheduler_lost_and_reconnects():
    config = fast()
    s = await Scheduler(config=config)
    port = int(s.address.rsplit(":", 1)[1])
    w = await Worker(s.address, nthreads=1, memory_limit=0, config=config)
    client = await asyncio.to_thread(Client, s.address, config=config, set_as_default=False)
    try:
        pending = await asyncio.to_thread(client.submit, sleep_then_pid, 2)
        await until(lambda: any(ts.state == "processing" for ts in s.state.tasks.values()))
        # When the scheduler closes, result() and gather() raise SchedulerLost
        await s.close()
        with pytest.raises(SchedulerLost):
            await asyncio.to_thread(pending.result, 10)
        with pytest.raises(SchedulerLost):
            await asyncio.to_thread(client.gather, [pending])
        # When one is back at the same address, the same client computes again
        s = await Scheduler("127.0.0.1", port, config=config)
        await until(lambda: len(s.state.workers) == 1 and client.epoch is not None, 15)
        f = await asyncio.to_thread(client.submit, inc, 1, pure=False)
        assert await asyncio.to_thread(f.result, 10) == 2
        # The work that failed runs again when submitted again (same key)
        again = await asyncio.to_thread(client.submit, sleep_then_pid, 2)
        assert again.key == pending.key
        assert await asyncio.to_thread(again.result, 10) == os.getpid()
        assert pending.status == "error"
    finally:
        await asyncio.to_thread(client.close)
        await w.close()
        await s.close()


async def test_client_recovers_from_a_scheduler_that_was_only_paused(procs, tmp_path):
    config = fast(SCHEDULER_LOST_TIMEOUT_S=1.0)
    port = free_port()
    sfile = tmp_path / "scheduler.json"
    sched = procs.scheduler(port, sfile)
    await until(sfile.exists, 20, "the scheduler file")
    procs.worker(f"tcp://127.0.0.1:{port}")
    async with Client(f"tcp://127.0.0.1:{port}", asynchronous=True, config=config,
                      set_as_default=False) as c:
        await asyncio.wait_for(c.wait_for_workers(1), 20)
        pending = c.submit(sleep_then_pid, 3, pure=False)
        await until(lambda: pending.key in c.futures, 5)
        # When the scheduler process is paused past SCHEDULER_LOST_TIMEOUT_S
        os.kill(sched.pid, signal.SIGSTOP)
        try:
            with pytest.raises(SchedulerLost):
                await asyncio.wait_for(pending, 10)
        finally:
            os.kill(sched.pid, signal.SIGCONT)
        # Then, once it answers again, the same client works with it again
        async def usable():
            while True:
                with contextlib.suppress(SchedulerLost):
                    return await c.scheduler_info()
                await asyncio.sleep(0.05)

        info = await asyncio.wait_for(usable(), 10)
        assert len(info["workers"]) == 1
        assert await asyncio.wait_for(c.submit(inc, 5, pure=False), 10) == 6
