"""zfabric.testing itself: the helpers must catch what they promise to catch."""

from __future__ import annotations

import threading

import pytest
import zmq

from zfabric.errors import CommTimeoutError
from zfabric.testing import FakePeer, LeakError, check_leaks, cluster, gen_cluster


def test_check_leaks_catches_a_thread():
    stop = threading.Event()
    with pytest.raises(LeakError, match=r"threads still running: \['zfabric-test-leak'\]"), \
            check_leaks(grace_s=0.1):
        threading.Thread(target=stop.wait, name="zfabric-test-leak", daemon=True).start()
    stop.set()


def test_check_leaks_catches_a_socket():
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.close()  # sockets open before the block are not counted
    with pytest.raises(LeakError, match=r"1 ZeroMQ sockets still open: \['DEALER'\]"), \
            check_leaks(grace_s=0.1):
        sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.close(linger=0)


def test_check_leaks_waits_for_threads_that_are_ending():
    stop = threading.Event()
    with check_leaks(grace_s=2.0):
        t = threading.Thread(target=stop.wait, args=(0.2,), name="zfabric-short", daemon=True)
        t.start()


async def test_cluster_yields_running_objects_and_closes_them():
    async with cluster(3, nthreads=2, names=["x", "y", "z"]) as (s, workers):
        assert s.status == "running" and len(s.workers) == 3
        assert [w.name for w in workers] == ["x", "y", "z"]
        assert {w.nthreads for w in workers} == {2}
    assert s.status == "closed" and {w.status for w in workers} == {"closed"}


async def test_fab_fixture(fab):
    assert await fab.c.submit(lambda: 1) == 1
    assert {fab.a.address, fab.b.address} == set(fab.s.workers)


@gen_cluster(client=False, nworkers=1)
async def test_gen_cluster_without_client(s, a):
    assert list(s.workers) == [a.address]


@gen_cluster(nworkers=0)
async def test_gen_cluster_passes_fixtures_through(c, s, tmp_path):
    assert tmp_path.exists() and c.status == "running" and not s.workers


def test_gen_cluster_refuses_a_sync_function():
    with pytest.raises(TypeError, match="async"):
        gen_cluster()(lambda c, s, a, b: None)


def test_gen_cluster_timeout():
    import asyncio

    @gen_cluster(nworkers=0, timeout=0.2)
    async def slow(c, s):
        await asyncio.sleep(5)

    with pytest.raises(TimeoutError, match=r"did not finish in 0\.2 s"):
        slow()


async def test_fake_peer_times_out_without_losing_messages():
    async with cluster(0) as (s, _), FakePeer(s.address) as peer:
        with pytest.raises(CommTimeoutError):
            await peer.recv(timeout=0.05)
        welcome = await peer.hello()
        assert welcome["op"] == "welcome"
        await peer.send({"op": "heartbeat"})
        assert await peer.expect("heartbeat", skip=()) == {"op": "heartbeat"}
