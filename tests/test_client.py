"""The Client against a real in-process cluster: life cycle, submit, map, gather, scatter."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import itertools
import operator
import time

import numpy as np
import pytest

from zfabric import Client, Future, Scheduler, Worker, as_completed, wait
from zfabric.errors import ClosedError, CommTimeoutError, RemoteProtocolError, TaskCancelled
from zfabric.testing import check_leaks, cluster, gen_cluster, until


def inc(x):
    return x + 1


def div(x, y):
    return x / y


def add(x, y=0, *, z=0):
    return x + y + z


def state_of(s, future) -> str | None:
    ts = s.tasks.get(future.key)
    return ts.state if ts is not None else None


# ---------------------------------------------------------------------------- life cycle


async def test_seed_program_verbatim():
    async with check_leaks():
        # the seed of issue #2, as a user writes it
        async with Scheduler() as s:  # noqa: SIM117
            async with Worker(s.address) as w1, Worker(s.address) as w2:
                async with Client(s.address, asynchronous=True) as client:
                    result = await client.submit(lambda x: x + 1, 10)
        assert result == 11
        assert w1.status == w2.status == s.status == "closed"


async def test_await_start_close_twice_and_finished():
    async with check_leaks():
        s = Scheduler()
        assert await s is s
        assert s.status == "running"
        waiter = asyncio.ensure_future(s.finished())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        await s.close()
        await s.close()
        await asyncio.wait_for(waiter, 2)
        await asyncio.wait_for(s.finished(), 1)  # returns at once after close
        assert s.status == "closed"


async def test_worker_and_client_life_cycle_by_await():
    async with check_leaks():
        s = await Scheduler()
        w = await Worker(s.address, nthreads=1)
        c = await Client(s.address, asynchronous=True, set_as_default=False)
        assert w.status == "running" and c.status == "running"
        assert await c.submit(inc, 1) == 2
        await c.close()
        await c.close()
        await w.close()
        await w.close()
        await asyncio.wait_for(w.finished(), 1)
        await s.close()


async def test_scheduler_binds_where_asked():
    import socket

    with socket.socket() as probe:  # a free port (a plain socket's close is synchronous)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with Scheduler("127.0.0.1", port) as s:
        assert s.address == f"tcp://127.0.0.1:{port}"
        async with Worker(s.address, nthreads=1), Client(s.address, asynchronous=True) as c:
            assert await c.submit(inc, 1) == 2
    async with Scheduler(port=0) as s:
        assert s.address.startswith("tcp://127.0.0.1:") and not s.address.endswith(":0")


async def test_scheduler_port_in_use_is_a_clear_error():
    async with Scheduler() as s:
        port = int(s.address.rsplit(":", 1)[1])
        with pytest.raises(Exception, match=r"cannot listen on .*Choose another port"):
            await Scheduler("127.0.0.1", port)


async def test_client_without_scheduler_times_out_clearly():
    async with check_leaks():
        with pytest.raises(CommTimeoutError, match="is a scheduler running there"):
            await Client("tcp://127.0.0.1:1", asynchronous=True, timeout=0.3,
                         set_as_default=False)


async def test_closed_client_refuses_work():
    async with cluster(1) as (s, _):
        c = await Client(s.address, asynchronous=True, set_as_default=False)
        await c.close()
        with pytest.raises(ClosedError):
            c.submit(inc, 1)


async def test_many_schedulers_workers_clients_in_one_loop():
    async with cluster(2) as (s1, _), cluster(1) as (s2, _):
        clients = [Client(s.address, asynchronous=True, set_as_default=False)
                   for s in (s1, s1, s2)]
        await asyncio.gather(*clients)
        try:
            results = await asyncio.gather(*(c.submit(add, i, 100, pure=False)
                                             for i, c in enumerate(clients)))
            assert results == [100, 101, 102]
            assert len(s1.state.clients) - 2 == 2 and len(s2.state.clients) - 2 == 1  # 2 pseudo
        finally:
            await asyncio.gather(*(c.close() for c in clients))


def test_blocking_client_in_a_thread_of_its_own():
    async def start():
        s = await Scheduler()
        w = await Worker(s.address, nthreads=1)
        return s, w

    loop = asyncio.new_event_loop()
    try:
        with check_leaks():
            s, w = loop.run_until_complete(start())
            try:
                import threading

                runner = threading.Thread(target=loop.run_forever, name="test-loop")
                runner.start()
                with Client(s.address, set_as_default=False) as c:
                    f = c.submit(inc, 41)
                    assert f.result(timeout=5) == 42
                    assert c.gather([c.submit(inc, i) for i in range(3)]) == [1, 2, 3]
                    # the blocking forms of wait, as_completed and Future's methods
                    fs = c.map(inc, range(5))
                    done, not_done = wait(fs, timeout=5)
                    assert len(done) == 5 and not not_done
                    assert sorted(r for _, r in as_completed(fs, with_results=True)) == [
                        1, 2, 3, 4, 5]
                    bad = c.submit(operator.truediv, 1, 0)
                    assert isinstance(bad.exception(timeout=5), ZeroDivisionError)
                    assert bad.traceback() is not None
                    with pytest.raises(ZeroDivisionError):
                        bad.result()
                loop.call_soon_threadsafe(loop.stop)
                runner.join(5)
            finally:
                loop.run_until_complete(w.close())
                loop.run_until_complete(s.close())
    finally:
        loop.close()


# ---------------------------------------------------------------------------- scheduler views


@gen_cluster(nworkers=2, nthreads=2, resources={"slots": 1})
async def test_scheduler_info_and_tasks_mapping(c, s, a, b):
    info = await c.scheduler_info()
    assert info["address"] == s.address and info["id"] == s.id
    assert set(info["workers"]) == {a.address, b.address}
    wa = info["workers"][a.address]
    assert wa["name"] == a.name and wa["nthreads"] == 2
    assert "memory_limit" in wa and wa["resources"] == {"slots": 1}
    assert await c.nthreads() == {a.address: 2, b.address: 2}
    f = c.submit(inc, 1)
    await f
    assert f.key in s.tasks and s.tasks[f.key].state == "memory"


# ---------------------------------------------------------------------------- submit, map


@gen_cluster()
async def test_pure_keys_and_explicit_keys(c, s, a, b):
    f1, f2 = c.submit(inc, 1), c.submit(inc, 1)
    assert f1.key == f2.key and f1.key.startswith("inc-")
    assert len(f1.key) == len("inc-") + 32
    assert c.submit(inc, 2).key != f1.key
    assert c.submit(lambda x: x, 1).key.startswith("lambda-")
    g1, g2 = c.submit(inc, 1, pure=False), c.submit(inc, 1, pure=False)
    assert g1.key != g2.key != f1.key
    h = c.submit(inc, 1, key="my-key")
    assert h.key == "my-key"
    assert await asyncio.gather(f1, f2, g1, g2, h) == [2, 2, 2, 2, 2]
    with pytest.raises(TypeError, match="a key must be a str, int"):
        c.submit(inc, 1, key=[1, 2])
    with pytest.raises(ValueError, match="reserves"):
        c.submit(inc, 1, key="\x1fx")
    with pytest.raises(TypeError, match="callable"):
        c.submit(42)


@gen_cluster()
async def test_kwargs_reach_the_function(c, s, a, b):
    def f(x, timeout=None, key2=None, *, workers_=None):
        return (x, timeout, key2, workers_)

    assert await c.submit(add, 1, y=2, z=3) == 6
    assert await c.submit(f, 1, timeout=7, key2="k", workers_="w") == (1, 7, "k", "w")


@gen_cluster()
async def test_map_over_several_iterables(c, s, a, b):
    futures = c.map(add, range(5), range(10, 15), z=100)
    assert [f.key.startswith("add-") for f in futures] == [True] * 5
    assert await c.gather(futures) == [110 + 2 * i for i in range(5)]
    assert c.map(inc, []) == []
    assert [f.key for f in c.map(inc, [1, 2], key=["k1", "k2"])] == ["k1", "k2"]
    assert await c.gather(c.map(inc, range(3), pure=False)) == [1, 2, 3]
    with pytest.raises(TypeError, match="iterables"):
        c.map(inc, "abc")


@gen_cluster()
async def test_map_many_small_tasks(c, s, a, b):
    futures = c.map(inc, range(2000))
    assert sum(await c.gather(futures)) == sum(range(1, 2001))


@gen_cluster()
async def test_nested_futures_as_arguments(c, s, a, b):
    x, y = c.submit(inc, 1), c.submit(inc, 2)

    def combine(items, pair, mapping):
        return sum(items) + pair[0] * pair[1] + mapping["k"]["deep"]

    z = c.submit(combine, [x, y, 10], (x, y), {"k": {"deep": x}})
    assert await z == (2 + 3 + 10) + 6 + 2
    chained = c.submit(inc, c.submit(inc, c.submit(inc, 0)))
    assert await chained == 3


@gen_cluster()
async def test_gather_nested_and_errors_skip(c, s, a, b):
    x, y = c.submit(inc, 1), c.submit(inc, 2)
    bad = c.submit(operator.truediv, 1, 0)
    assert await c.gather({"a": [x, (y, 5)], "b": x}) == {"a": [2, (3, 5)], "b": 2}
    assert await c.gather(x) == 2
    with pytest.raises(ZeroDivisionError):
        await c.gather([x, bad])
    assert await c.gather([x, bad, y], errors="skip") == [2, 3]
    assert await c.gather({"x": x, "bad": bad}, errors="skip") == {"x": 2}
    with pytest.raises(ValueError, match="errors must be"):
        c.gather([x], errors="ignore")


# ---------------------------------------------------------------------------- scatter


@gen_cluster()
async def test_scatter_list_dict_single(c, s, a, b):
    futures = await c.scatter([1, 2, 3])
    assert isinstance(futures, list) and all(isinstance(f, Future) for f in futures)
    assert await c.gather(futures) == [1, 2, 3]
    named = await c.scatter({"x": 10, "y": 20})
    assert set(named) == {"x", "y"} and named["x"].key == "x"
    one = await c.scatter(5)
    assert await one == 5
    assert await c.submit(add, named["x"], named["y"]) == 30
    assert (await c.scatter([1]))[0].key == futures[0].key  # hashed keys are stable


@gen_cluster()
async def test_scatter_large_array_goes_straight_to_a_worker(c, s, a, b):
    arr = np.arange(100_000, dtype="f8")  # 800 kB > 64 KiB
    [fut] = await c.scatter([arr])
    who = await c.who_has([fut])
    assert len(who[fut.key]) == 1 and who[fut.key][0] in (a.address, b.address)
    holder = a if who[fut.key][0] == a.address else b
    assert fut.key in holder.data
    assert s.tasks[fut.key].value is None  # the scheduler never saw the bytes
    np.testing.assert_array_equal(await fut, arr)
    assert await c.submit(np.sum, fut) == arr.sum()


@gen_cluster()
async def test_scatter_broadcast(c, s, a, b):
    [fut] = await c.scatter([b"x" * 100], broadcast=True)
    who = await c.who_has([fut])
    assert sorted(who[fut.key]) == sorted([a.address, b.address])
    assert await fut == b"x" * 100


@gen_cluster()
async def test_scatter_to_named_workers(c, s, a, b):
    [fut] = await c.scatter([np.zeros(20_000)], workers=[b.address])
    assert (await c.who_has([fut]))[fut.key] == [b.address]


# ---------------------------------------------------------------------------- cancel, who_has


@gen_cluster()
async def test_cancel_pending_task(c, s, a, b):
    ev = c.submit(time.sleep, 0.5, pure=False)
    dep = c.submit(inc, c.submit(lambda _: 1, ev))
    await c.cancel([ev])
    assert ev.cancelled() and ev.status == "cancelled"
    with pytest.raises(TaskCancelled):
        await ev
    with pytest.raises(concurrent.futures.CancelledError):  # as dask.distributed raises
        await ev
    await until(lambda: dep.done())
    assert dep.status in ("cancelled", "error")
    await until(lambda: ev.key not in s.tasks)


@gen_cluster()
async def test_who_has_and_has_what(c, s, a, b):
    f = c.submit(np.ones, 100_000, workers=[a.address])
    await f
    assert await c.who_has([f]) == {f.key: [a.address]}
    has = await c.has_what()
    assert f.key in has[a.address] and f.key not in has[b.address]
    assert f.key in (await c.who_has())


@gen_cluster()
async def test_processing_view(c, s, a, b):
    slow = c.submit(time.sleep, 0.3, workers=[a.address], pure=False)
    await until(lambda: state_of(s, slow) == "processing")
    assert slow.key in (await c.processing())[a.address]
    await slow


# ---------------------------------------------------------------------------- refcounting


@gen_cluster()
async def test_dropped_futures_are_forgotten_by_the_scheduler(c, s, a, b):
    futures = c.map(inc, range(20))
    total = c.submit(sum, futures)
    big = c.submit(np.ones, 100_000)
    assert await total == sum(range(1, 21))
    await big
    assert s.tasks
    del futures, total, big
    gc.collect()
    await until(lambda: not s.tasks, timeout=5)
    await until(lambda: not a.data and not b.data, timeout=5)


@gen_cluster()
async def test_release_keeps_other_handles(c, s, a, b):
    f1 = c.submit(inc, 1)
    f2 = c.submit(inc, 1)
    await f1
    f1.release()
    f1.release()  # idempotent
    await asyncio.sleep(0.1)
    assert f2.key in s.tasks and await f2 == 2
    f2.release()
    await until(lambda: not s.tasks)


@gen_cluster()
async def test_resubmit_after_release_recomputes(c, s, a, b):
    f = c.submit(inc, 1)
    assert await f == 2
    key = f.key
    del f
    gc.collect()
    await until(lambda: key not in s.tasks)
    assert await c.submit(inc, 1) == 2


@gen_cluster()
async def test_resubmit_in_the_same_tick_as_the_release(c, s, a, b):
    # The release of the dropped future and the new submit of the same key leave in one
    # message: the release must come first, or it undoes the submit and the future hangs.
    f = c.submit(inc, 1)
    await f
    del f
    gc.collect()
    assert await asyncio.wait_for(c.submit(inc, 1), 5) == 2
    [g] = await c.scatter([5])
    del g
    gc.collect()
    [h] = await c.scatter([5])
    assert await asyncio.wait_for(h, 5) == 5


# ---------------------------------------------------------------------------- options


@gen_cluster()
async def test_retries_until_success(c, s, a, b, tmp_path):
    counter = tmp_path / "count"
    counter.write_text("0")

    def flaky(path):
        import pathlib

        p = pathlib.Path(path)
        n = int(p.read_text()) + 1
        p.write_text(str(n))
        if n < 3:
            raise RuntimeError(f"attempt {n} fails")
        return n

    assert await c.submit(flaky, str(counter), retries=2) == 3
    counter.write_text("0")
    with pytest.raises(RuntimeError, match="attempt 2 fails"):
        await c.submit(flaky, str(counter), retries=1, pure=False)


@gen_cluster(nworkers=2, nthreads=1, resources={})
async def test_workers_restriction(c, s, a, b):
    def where():
        import threading

        return threading.current_thread().name

    futures = [c.submit(where, pure=False, workers=[b.address]) for _ in range(5)]
    names = await c.gather(futures)
    assert all(b.name in n for n in names)
    f = c.submit(where, pure=False, workers=b.name)  # by name, as a string
    assert b.name in await f
    g = c.submit(inc, 1, workers=["nowhere"], allow_other_workers=True)
    assert await g == 2


async def test_worker_resources():
    async with cluster(1, nthreads=2, resources={"GPU": 1}) as (s, [gpu]):
        plain = await Worker(s.address, nthreads=2, memory_limit=0)
        try:
            async with Client(s.address, asynchronous=True, set_as_default=False) as c:
                def span(duration):
                    import threading

                    t0 = time.perf_counter()
                    time.sleep(duration)
                    return threading.current_thread().name, t0, time.perf_counter()

                fs = [c.submit(span, 0.05, resources={"GPU": 1}, pure=False)
                      for _ in range(4)]
                spans = sorted(await c.gather(fs), key=lambda x: x[1])
                # all on the GPU worker, and never two at once though it has two threads
                assert all(gpu.name in name for name, _, _ in spans)
                for (_, _, end), (_, start, _) in itertools.pairwise(spans):
                    assert start >= end
                need_two = c.submit(inc, 1, resources={"GPU": 2})
                await asyncio.sleep(0.2)
                assert not need_two.done() and s.tasks[need_two.key].state == "queued"
        finally:
            await plain.close()


@gen_cluster(nworkers=1, nthreads=1)
async def test_priority_orders_queued_work(c, s, a):
    def stamp(tag):
        return time.perf_counter()

    # Given a worker whose prefetch queue is full (4 slots before durations are known)
    blockers = [c.submit(time.sleep, 0.1, pure=False) for _ in range(4)]
    await until(lambda: all(state_of(s, f) == "processing" for f in blockers))
    # When low-priority work, then one high-priority task, queue at the scheduler
    low = c.map(stamp, [f"low{i}" for i in range(6)], priority=-10)
    high = c.submit(stamp, "high", priority=10)
    await until(lambda: state_of(s, high) == "queued")
    # Then the high-priority task runs before every low-priority one
    times = await c.gather([*low, high])
    assert times[-1] < min(times[:-1])


@gen_cluster()
async def test_large_argument_goes_to_a_worker_not_through_the_scheduler(c, s, a, b):
    arr = np.arange(200_000, dtype="f8")  # 1.6 MB
    f = c.submit(np.sum, arr)
    assert await f == arr.sum()
    assert len(s.tasks[f.key].payload) < 10_000  # the scheduler saw a reference, not the data
    g = c.submit(np.sum, arr, workers=[b.address])  # restricted elsewhere: still correct
    assert await g == arr.sum()
    assert c.submit(np.sum, arr).key == f.key  # pure keys hash the out-of-band data too
    assert c.submit(np.sum, arr + 1).key != f.key
    del f, g
    gc.collect()
    await until(lambda: not s.tasks)


async def test_client_accepts_a_scheduler_object_and_shutdown_closes_it():
    async with cluster(1) as (s, _):
        c = await Client(s, asynchronous=True, set_as_default=False)
        assert c.scheduler_address == s.address
        assert await c.submit(inc, 1) == 2
        await c.shutdown()
        await asyncio.wait_for(s.finished(), 5)
        assert s.status == "closed" and c.status == "closed"


@gen_cluster()
async def test_dask_style_keys_round_trip(c, s, a, b):
    # Given keys of every kind dask uses
    keys = [("sum-aggregate-3f2a", 0, 1), 42, ("x", ("nested", 2)), "plain", 1.5]
    # When submitted one by one and through map
    f1 = c.submit(inc, 1, key=("single", 0))
    fs = c.map(inc, range(len(keys)), key=keys)
    # Then each future carries the very key it was given, and the results arrive
    assert f1.key == ("single", 0)
    assert [f.key for f in fs] == keys
    assert await c.gather(fs) == [1, 2, 3, 4, 5]
    assert await f1 == 2
    # a dependent task of a tuple-keyed future
    g = c.submit(add, fs[0], f1, key=("dep", 1))
    assert await g == 3
    who = await c.who_has(fs)
    assert set(who) == set(keys)
    held = await c.has_what()
    assert ("sum-aggregate-3f2a", 0, 1) in [k for ks in held.values() for k in ks]
    # errors name the user's key, not its wire form
    bad = c.submit(div, 1, 0, key=("bad", 7))
    with pytest.raises(ZeroDivisionError):
        await bad
    slow = c.submit(time.sleep, 5, key=("slow", 42))
    await c.cancel([slow])
    with pytest.raises(TaskCancelled, match=r"\('slow', 42\)"):
        await slow


@gen_cluster()
async def test_refused_submission_fails_its_futures_at_once(c, s, a, b):
    # Given a submission the scheduler refuses (an option of the wrong type)
    fs = c.map(inc, range(3), key=[("k", i) for i in range(3)], priority=0, retries=None)
    assert await c.gather(fs) == [1, 2, 3]
    f = c.submit(inc, 1, key=("refused", 0), resources={"GPU": "many"})
    # Then its future fails promptly with the scheduler's reason
    with pytest.raises(RemoteProtocolError, match=r"refused \('refused', 0\).*resources"):
        await asyncio.wait_for(f, 5)
