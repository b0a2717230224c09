"""``client.get_executor()``: the standard library's Executor semantics on real worker
processes (blocking client, as users write it)."""

from __future__ import annotations

import concurrent.futures as cf
import os
import threading
import time
from operator import add

import numpy as np
import pytest

from zfabric import Client, LocalCluster

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_leftover_processes")]


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, memory_limit=0) as cluster, \
            Client(cluster, set_as_default=False) as c:
        yield c


def test_submit_works_with_the_standard_wait_and_as_completed(client):
    ex = client.get_executor()
    futures = [ex.submit(add, i, 1) for i in range(10)]
    assert all(isinstance(f, cf.Future) for f in futures)
    done, not_done = cf.wait(futures, timeout=20)
    assert len(done) == 10 and not not_done
    assert sorted(f.result() for f in cf.as_completed(futures, timeout=20)) == list(range(1, 11))
    # each submit is a call of its own (not deduplicated like pure tasks)
    a, b = ex.submit(time.time), ex.submit(time.time)
    assert a.zfuture.key != b.zfuture.key
    # keyword arguments reach the function, even ones named like submit's options
    assert ex.submit(dict, priority=3, workers="w").result(10) == {"priority": 3, "workers": "w"}
    # the work ran in the worker processes
    assert ex.submit(os.getpid).result(10) != os.getpid()


def test_done_callbacks_run_off_the_io_loop_and_may_call_result(client):
    ex = client.get_executor()
    seen = []
    done = threading.Event()

    def callback(fut):
        seen.append((threading.current_thread().name, fut.result()))
        done.set()

    fut = ex.submit(time.sleep, 0.2)
    fut.add_done_callback(callback)
    assert done.wait(10)
    assert seen == [(seen[0][0], None)] and seen[0][0].startswith("zfabric-callbacks")
    fut.add_done_callback(callback)  # already done: called at once, as the standard's
    assert seen[1] == (threading.current_thread().name, None)


def test_errors_and_large_results(client):
    ex = client.get_executor()
    bad = ex.submit(int, "not a number")
    with pytest.raises(ValueError, match="not a number"):
        bad.result(10)
    assert isinstance(bad.exception(10), ValueError)
    big = ex.submit(np.arange, 1_000_000)  # stays on its worker; fetched for result()
    assert big.result(20).sum() == np.arange(1_000_000).sum()
    cf.wait([ex.submit(np.ones, 500_000)], return_when=cf.FIRST_COMPLETED, timeout=20)


def test_map_keeps_order_with_chunks_and_times_out(client):
    ex = client.get_executor()
    assert list(ex.map(pow, range(7), [2] * 7)) == [i**2 for i in range(7)]
    assert list(ex.map(pow, range(7), [2] * 7, chunksize=3)) == [i**2 for i in range(7)]
    with pytest.raises(ValueError, match="chunksize"):
        ex.map(pow, [1], [1], chunksize=0)
    results = ex.map(time.sleep, [0.01, 1.5], timeout=0.5)
    assert next(results) is None
    t = time.monotonic()
    with pytest.raises(TimeoutError):
        next(results)
    assert time.monotonic() - t < 1.2


def test_shutdown_cancels_pending_work_on_the_cluster_and_refuses_more(client):
    ex = client.get_executor()
    running = [ex.submit(time.sleep, 0.5) for _ in range(2)]
    time.sleep(0.2)
    queued = [ex.submit(time.sleep, 5) for _ in range(6)]
    t = time.monotonic()
    ex.shutdown(wait=True, cancel_futures=True)
    # the queued calls were cancelled, not run (they would take 15 s on 2 workers)
    assert time.monotonic() - t < 4
    assert all(f.cancelled() for f in queued)
    assert all(f.done() for f in running)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(add, 1, 2)
    deadline = time.monotonic() + 5
    while any(client.processing().values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(client.processing().values())
    assert all(f.zfuture.cancelled() for f in queued)


def test_with_block_waits_and_options_apply(client):
    workers = list(client.scheduler_info()["workers"])
    with client.get_executor(workers=[workers[0]], retries=1) as ex:
        futures = [ex.submit(os.getpid) for _ in range(4)]
    assert all(f.done() for f in futures)  # shutdown(wait=True) on exit
    assert len({f.result() for f in futures}) == 1  # all on the one worker allowed
    with pytest.raises(TypeError, match="unsupported options"):
        client.get_executor(nonsense=1)
