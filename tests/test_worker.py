"""Workers over real sockets: threads, the data plane, faults, timeouts, reconnection."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import numpy as np
import pytest

from zfabric import Client, Scheduler, Worker, wait
from zfabric.config import Config
from zfabric.errors import CommTimeoutError, LostDataError, TaskTimeout
from zfabric.testing import check_leaks, cluster, gen_cluster, until


def inc(x):
    return x + 1


def big(n=200_000):
    return np.arange(n, dtype="f8")  # 1.6 MB: stays on the worker


# ---------------------------------------------------------------------------- data plane


@gen_cluster()
async def test_large_result_stays_on_worker_and_is_fetched_directly(c, s, a, b):
    f = c.submit(big, workers=[a.address])
    arr = await f
    np.testing.assert_array_equal(arr, big())
    ts = s.tasks[f.key]
    assert ts.value is None and ts.nbytes >= arr.nbytes  # never inline at the scheduler
    assert f._state.value is None and f._state.who_has == [a.address]
    assert f.key in a.data and f.key not in b.data


@gen_cluster()
async def test_small_result_rides_inline(c, s, a, b):
    f = c.submit(inc, 1)
    assert await f == 2
    assert s.tasks[f.key].value is not None and f._state.value is not None


@gen_cluster()
async def test_large_dependency_fetched_peer_to_peer(c, s, a, b):
    x = c.submit(big, workers=[a.address])
    y = c.submit(np.sum, x, workers=[b.address])
    assert await y == big().sum()
    assert s.tasks[x.key].value is None  # the scheduler never carried it
    # b fetched its own copy for y, and let it go once y was done; a still holds x
    await until(lambda: x.key not in b.data)
    np.testing.assert_array_equal(a.data[x.key], big())


@gen_cluster(timeout=30)
async def test_dependencies_are_fetched_in_batches_with_few_requests_in_flight(c, s, a, b):
    from zfabric.worker.data import FETCH_BATCH_KEYS, FETCHES_PER_PEER

    # Given 150 values of 160 kB (too large to ride inline) on a
    xs = c.map(big, [20_000 + i for i in range(150)], workers=[a.address], pure=False)
    await wait(xs)
    before = dict(b._core.fetch_stats)
    # When one task on b needs them all
    total = c.submit(lambda *arrs: sum(float(x.sum()) for x in arrs), *xs, workers=[b.address])
    assert await total == sum(float(big(20_000 + i).sum()) for i in range(150))
    # Then b asked a for them in a few batched requests, never many at once
    stats = b._core.fetch_stats
    assert stats["requests"] - before["requests"] == -(-150 // FETCH_BATCH_KEYS)
    assert 1 <= stats["most_in_flight"] <= FETCHES_PER_PEER


@gen_cluster()
async def test_fetched_copies_live_while_their_tasks_need_them(c, s, a, b):
    # Given a large value on a, and several tasks on b that use it
    x = c.submit(big, workers=[a.address])
    ys = [c.submit(lambda v, i: float(v[i]), x, i, workers=[b.address]) for i in range(5)]
    assert await c.gather(ys) == [float(i) for i in range(5)]
    # Then b holds no copy of x afterwards (the scheduler does not count copies on b)
    await until(lambda: x.key not in b.data)
    assert not b._core.borrowed and not b._core.borrows
    # and a later task on b fetches it again.
    z = c.submit(np.sum, x, workers=[b.address])
    assert await z == big().sum()
    await until(lambda: x.key not in b.data)


@gen_cluster()
async def test_small_dependency_delivered_inline(c, s, a, b):
    x = c.submit(inc, 1, workers=[a.address])
    y = c.submit(inc, x, workers=[b.address])
    assert await y == 3


@gen_cluster(nworkers=1, nthreads=2)
async def test_threads_run_tasks_concurrently(c, s, a):
    barrier = c.submit(time.sleep, 0, pure=False)
    await barrier

    def meet(path):
        import pathlib

        # two tasks on two threads: each waits for the other's file
        pathlib.Path(path).touch()
        deadline = time.monotonic() + 5
        while len(list(pathlib.Path(path).parent.iterdir())) < 2:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        fs = [c.submit(meet, os.path.join(d, str(i))) for i in range(2)]
        assert await c.gather(fs) == [True, True]


@gen_cluster()
async def test_run_on_every_worker(c, s, a, b):
    result = await c.run(os.getpid)
    assert result == {a.address: os.getpid(), b.address: os.getpid()}
    assert await c.run(lambda: 1, workers=[a.address]) == {a.address: 1}

    def fail():
        raise ValueError("nope")

    with pytest.raises(ValueError, match="nope"):
        await c.run(fail)


# ---------------------------------------------------------------------------- faults


@gen_cluster()
async def test_closing_a_worker_reroutes_its_tasks(c, s, a, b):
    f = c.submit(time.sleep, 0.3, workers=[a.address], allow_other_workers=True, pure=False)
    await until(lambda: f.key in s.tasks and s.tasks[f.key].state == "processing")
    on = s.tasks[f.key].processing_on.address
    victim = a if on == a.address else b
    await victim.close()
    await asyncio.wait_for(f, 5)
    assert len(s.workers) == 1


@gen_cluster()
async def test_lost_large_result_is_recomputed(c, s, a, b):
    f = c.submit(big, workers=[a.address], allow_other_workers=True)
    await f
    assert f._state.who_has == [a.address]
    await a.close()
    np.testing.assert_array_equal(await asyncio.wait_for(f, 5), big())
    assert f._state.who_has == [b.address]


@gen_cluster()
async def test_dependent_of_lost_data_recomputes_through_lineage(c, s, a, b):
    x = c.submit(big, workers=[a.address], allow_other_workers=True)
    y = c.submit(lambda v: v * 2, x, workers=[a.address], allow_other_workers=True)
    await y
    del x
    await until(lambda: s.tasks[y.key].deps[0].state == "released")  # x's data is dropped
    await a.close()
    np.testing.assert_array_equal(await asyncio.wait_for(y, 5), big() * 2)


@gen_cluster(nworkers=1, timeout=20)
async def test_result_awaited_as_its_worker_closes_does_not_stall(c, s, b):
    # The client may start fetching from the closing worker before it hears the value was
    # lost; that fetch must fail fast and the recomputed value be awaited. Repeat: it races.
    for _ in range(6):
        a = await Worker(s.address, nthreads=1, memory_limit=0)
        f = c.submit(big, workers=[a.address], allow_other_workers=True, pure=False)
        await f
        await a.close()
        np.testing.assert_array_equal(await asyncio.wait_for(f, 5), big())
        assert f._state.who_has == [b.address]


@gen_cluster()
async def test_scattered_data_lost_with_its_worker(c, s, a, b):
    [f] = await c.scatter([big()], workers=[a.address])
    await a.close()
    with pytest.raises(LostDataError, match="scatter it again"):
        await asyncio.wait_for(f.result(), 5)


async def test_task_timeout_abandons_the_thread():
    config = Config(HEARTBEAT_INTERVAL_S=0.05)
    async with cluster(1, config=config) as (s, _), \
            Client(s.address, asynchronous=True, set_as_default=False) as c:
        f = c.submit(time.sleep, 1.0, task_timeout=0.1)
        with pytest.raises(TaskTimeout, match="ran longer than its task_timeout"):
            await asyncio.wait_for(f, 3)
        # the worker has a fresh thread and keeps working
        assert await asyncio.wait_for(c.submit(inc, 1), 3) == 2


async def test_worker_without_scheduler_gives_up_clearly():
    async with check_leaks():
        with pytest.raises(CommTimeoutError, match="could not register with a scheduler"):
            await Worker("tcp://127.0.0.1:1", death_timeout=0.3, memory_limit=0)


async def test_worker_rejects_bad_arguments():
    with pytest.raises(ValueError, match="needs the scheduler's address"):
        Worker(None)
    with pytest.raises(ValueError, match="nthreads must be at least 1"):
        Worker("tcp://127.0.0.1:1", nthreads=-1)


async def rebind(port: int, config: Config, timeout: float = 3.0) -> Scheduler:
    """A new scheduler on ``port``. ZeroMQ releases a closed socket's port in its I/O thread,
    shortly after ``close()`` returns, so the first attempts may find it still in use."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await Scheduler("127.0.0.1", port, config=config)
        except Exception as exc:
            if "already in use" not in str(exc) or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.02)


async def test_worker_registers_again_with_a_restarted_scheduler():
    config = Config(HEARTBEAT_INTERVAL_S=0.05)
    async with check_leaks():
        s = await Scheduler(config=config)
        port = int(s.address.rsplit(":", 1)[1])
        w = await Worker(s.address, nthreads=1, memory_limit=0, config=config)
        try:
            await s.close()
            s = await rebind(port, config)
            await until(lambda: len(s.workers) == 1, timeout=10)
            async with Client(s.address, asynchronous=True, set_as_default=False) as c:
                assert await asyncio.wait_for(c.submit(inc, 1), 5) == 2
        finally:
            await w.close()
            await s.close()


async def test_client_fails_pending_futures_when_the_scheduler_goes():
    from zfabric.errors import SchedulerLost

    async with check_leaks():
        s = await Scheduler()
        w = await Worker(s.address, nthreads=1, memory_limit=0)
        c = await Client(s.address, asynchronous=True, set_as_default=False)
        try:
            f = c.submit(time.sleep, 0.5, pure=False)
            await asyncio.sleep(0.05)
            await s.close()
            with pytest.raises(SchedulerLost, match="resubmit"):
                await asyncio.wait_for(f, 5)
        finally:
            await c.close()
            await w.close()


@gen_cluster(nworkers=1)
async def test_worker_name_and_repr(c, s, a):
    assert a.name == a.address and a.address in repr(a)
    assert a.id and a.status == "running"
    assert threading.active_count() > 1


async def test_heartbeats_follow_the_interval_the_scheduler_gives():
    # Given a scheduler that asks for a beat every 0.05 s and a worker whose own setting is 5 s
    fast, slow = Config(HEARTBEAT_INTERVAL_S=0.05), Config(HEARTBEAT_INTERVAL_S=5.0)
    async with check_leaks(), Scheduler("127.0.0.1", 0, config=fast) as s, \
            Worker(s.address, nthreads=1, memory_limit=0, config=slow) as w:
        # When the idle worker runs for a second
        ws = next(iter(s.state.workers.values()))
        seen = set()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            seen.add(ws.last_seen)
            await asyncio.sleep(0.01)
        # Then it took the scheduler's interval (the welcome's heartbeat_s) and beat by it:
        # about 20 beats, where its own setting would have sent none
        assert w._core.state.heartbeat_s == 0.05
        assert len(seen) >= 6, sorted(seen)
