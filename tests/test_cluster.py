"""LocalCluster, and the blocking Client against it: real processes, real sockets.

Every test checks that no process it started is left behind.
"""

from __future__ import annotations

import os
import re
import socket
import time
from operator import add

import pytest

from zfabric import Client, CommTimeoutError, LocalCluster, as_completed, wait
from zfabric.cluster import _sizing, nprocesses_nthreads
from zfabric.nanny import Nanny
from zfabric.testing import process_gone
from zfabric.worker import Worker

pytestmark = [pytest.mark.timeout(40), pytest.mark.usefixtures("no_leftover_processes")]




@pytest.fixture(scope="module")
def cluster():
    """One cluster of two worker processes for the blocking-client tests (they only read)."""
    with LocalCluster(n_workers=2, threads_per_worker=2, memory_limit=0) as c:
        yield c


# ---------------------------------------------------------------------- sizing


def test_sizing_follows_dask():
    assert nprocesses_nthreads(1) == (1, 1)
    assert nprocesses_nthreads(4) == (4, 1)
    assert nprocesses_nthreads(8) == (4, 2)
    assert nprocesses_nthreads(12) == (4, 3)
    assert nprocesses_nthreads(16) == (4, 4)
    assert nprocesses_nthreads(7) == (7, 1)  # a prime: single-threaded processes
    cores = os.cpu_count() or 1
    assert _sizing(None, None, False) == (1, cores)
    assert _sizing(3, None, True) == (3, max(1, -(-cores // 3)))
    assert _sizing(None, 1, True) == (cores, 1)
    assert _sizing(2, 5, True) == (2, 5)


def test_bad_arguments():
    with pytest.raises(TypeError, match="no_such_option"):
        LocalCluster(no_such_option=1)


# ---------------------------------------------------------------------- life cycle


def test_blocking_cluster_processes(cluster):
    assert cluster.status == "running"
    assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
    assert cluster.scheduler.address == cluster.scheduler_address
    assert sorted(cluster.workers) == [0, 1]
    assert all(isinstance(n, Nanny) for n in cluster.workers.values())
    pids = [pid for n in cluster.workers.values() for pid in n.pids]
    assert len(set(pids)) == 2 and os.getpid() not in pids
    text = repr(cluster)
    assert cluster.scheduler_address in text and "workers=2" in text and "threads=4" in text


def test_blocking_cluster_closes_its_processes():
    c = LocalCluster(n_workers=1, threads_per_worker=1, memory_limit=0)
    pids = c.workers[0].pids
    with Client(c) as client:
        assert client.submit(add, 1, 2).result(timeout=10) == 3
    c.close()
    c.close()  # again: nothing happens
    assert c.status == "closed"
    assert all(process_gone(p) for p in pids)


async def test_async_cluster_in_threads():
    async with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                            asynchronous=True) as c:
        assert all(isinstance(w, Worker) for w in c.workers.values())
        async with Client(c, asynchronous=True) as client:
            assert await client.submit(add, 1, 2) == 3
            info = await client.scheduler_info()
            assert sorted(w["name"] for w in info["workers"].values()) == ["0", "1"]
            assert {w["pid"] for w in info["workers"].values()} == {os.getpid()}
    assert c.status == "closed"


async def test_await_async_cluster_with_processes():
    c = await LocalCluster(n_workers=1, threads_per_worker=1, memory_limit="1GiB",
                           asynchronous=True)
    try:
        async with Client(c, asynchronous=True) as client:
            info = await client.scheduler_info()
            (w,) = info["workers"].values()
            assert w["memory_limit"] == 2**30
            assert w["pid"] != os.getpid()
    finally:
        await c.close()
    await c.finished()


def test_client_without_address_starts_and_closes_a_cluster():
    with Client(n_workers=1, threads_per_worker=1, processes=False) as client:
        cluster = client.cluster
        assert isinstance(cluster, LocalCluster)
        assert client.submit(add, 2, 3).result(timeout=10) == 5
    assert cluster.status == "closed"


def test_client_without_address_with_processes():
    with Client(n_workers=1, threads_per_worker=1, memory_limit=0) as client:
        pid = client.submit(os.getpid, pure=False).result(timeout=10)
        assert pid != os.getpid()
        cluster = client.cluster
    assert cluster.status == "closed"
    assert process_gone(pid)


# ---------------------------------------------------------------------- blocking client


def test_blocking_submit_result_map_gather(cluster):
    with Client(cluster) as client:
        f = client.submit(add, 1, 2)
        assert f.result(timeout=10) == 3
        futures = client.map(add, range(20), range(20))
        assert client.gather(futures) == [2 * i for i in range(20)]
        total = client.submit(sum, futures)
        assert total.result(timeout=10) == sum(2 * i for i in range(20))
        with pytest.raises(ZeroDivisionError):
            client.submit(lambda: 1 / 0, pure=False).result(timeout=10)


def test_blocking_result_timeout(cluster):
    with Client(cluster) as client:
        f = client.submit(time.sleep, 2, pure=False)
        with pytest.raises(TimeoutError):
            f.result(timeout=0.05)
        f.cancel()


def test_blocking_wait_and_as_completed(cluster):
    with Client(cluster) as client:
        futures = client.map(lambda x: time.sleep(0.01 * x) or x, range(6), pure=False)
        done, not_done = wait(futures, timeout=10)
        assert len(done) == 6 and not not_done
        futures = client.map(lambda x: x * 10, range(6), pure=False)
        seen = sorted(f.result() for f in as_completed(futures))
        assert seen == [0, 10, 20, 30, 40, 50]
        pairs = list(as_completed(client.map(str, range(3)), with_results=True))
        assert sorted(r for _, r in pairs) == ["0", "1", "2"]


def test_blocking_run_reaches_every_worker_process(cluster):
    with Client(cluster) as client:
        pids = client.run(os.getpid)
        assert len(pids) == 2
        assert set(pids) == set(client.scheduler_info()["workers"])
        assert set(pids.values()) == {p for n in cluster.workers.values() for p in n.pids}


def test_client_timeout_names_the_address():
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    start = time.monotonic()
    with pytest.raises(CommTimeoutError, match=re.escape(address)):
        Client(address, timeout=0.3)
    assert time.monotonic() - start < 3
