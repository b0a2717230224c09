"""Cluster-side API on real worker processes: replicate, retire_workers, restart_workers, and
LocalCluster's options, scale, wait_for_workers, get_logs, get_client; Client.shutdown."""

from __future__ import annotations

import asyncio
import os
import socket
import time

import numpy as np
import pytest

from zfabric import Client, LocalCluster
from zfabric.adaptive import decide

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_leftover_processes")]


def new_cluster(n=3, **kw):
    return LocalCluster(n_workers=n, threads_per_worker=1, memory_limit=0, **kw)


# ---------------------------------------------------------------------- moving data


def test_replicate_then_retire_the_holders_without_losing_or_recomputing():
    with new_cluster(3) as cluster, Client(cluster, set_as_default=False) as c:
        big = c.submit(np.arange, 2_000_000)
        big.result(20)
        [first] = c.who_has([big])[big.key]
        # Given two recorded copies
        c.replicate([big], n=2)
        holders = c.who_has([big])[big.key]
        assert len(holders) == 2 and first in holders
        # When both original holders... one at a time, retire
        retired = c.retire_workers([first])
        assert list(retired) == [first]
        assert first not in c.scheduler_info()["workers"]
        left = c.who_has([big])[big.key]
        assert first not in left and len(left) == 1
        # And then the last holder: its copy moves to the worker that stays
        retired = c.retire_workers(left)
        assert list(retired) == left
        info = c.scheduler_info()
        assert len(info["workers"]) == 1
        [last] = c.who_has([big])[big.key]
        assert last in info["workers"]
        # Then the value is intact and was never recomputed (still the one task, in memory)
        assert big.result(20).sum() == np.arange(2_000_000).sum()
        assert c.run(lambda: 1) == {last: 1}
        # And the retired processes are gone, their LocalCluster entries too
        deadline = time.monotonic() + 10
        while len(cluster.workers) > 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(cluster.workers) == 1
        # Retiring the last worker that holds data is refused, and it stays
        assert c.retire_workers([last]) == {}
        assert list(c.scheduler_info()["workers"]) == [last]


def test_replicate_to_all_and_trim_and_bad_arguments():
    with new_cluster(3) as cluster, Client(cluster, set_as_default=False) as c:
        x = c.submit(np.ones, 300_000)
        small = c.submit(sum, [1, 2, 3])
        c.replicate([x, small])  # n=None: every worker
        who = c.who_has([x, small])
        assert len(who[x.key]) == 3 and len(who[small.key]) == 3
        c.replicate(x, n=1)
        assert len(c.who_has([x])[x.key]) == 1
        with pytest.raises(ValueError, match="positive integer"):
            c.replicate([x], n=0)
        with pytest.raises(ValueError, match="close_workers"):
            c.retire_workers(close_workers=False)
        with pytest.raises(ValueError, match="workers="):
            c.retire_workers()
        # retire n: the scheduler picks the idlest (the ones that hold nothing)
        assert len(c.retire_workers(n=2)) == 2
        assert len(c.scheduler_info()["workers"]) == 1
        assert x.result(10).sum() == 300_000 and small.result(10) == 6


def test_restart_workers_replaces_only_those_processes():
    with new_cluster(2) as cluster, Client(cluster, set_as_default=False) as c:
        pids = c.run(os.getpid)
        a, b = sorted(pids)
        x = c.submit(np.arange, 1000, workers=[a])
        assert x.result(10).sum() == 499500
        assert c.restart_workers([a], timeout="20s") == {a: "OK"}
        after = c.run(os.getpid)
        assert len(after) == 2 and after[b] == pids[b]
        assert pids[a] not in after.values()
        # the value lost with it is recomputed when asked for
        assert x.result(20).sum() == 499500
        with pytest.raises(ValueError, match="no such workers"):
            c.restart_workers(["tcp://127.0.0.1:1"])
        with pytest.raises(ValueError, match="timeout"):
            c.restart_workers([b], timeout="soon")


# ---------------------------------------------------------------------- LocalCluster


def test_local_cluster_options():
    with pytest.raises(TypeError, match="security= takes a Security"):
        LocalCluster(n_workers=0, security=object())
    with pytest.raises(TypeError, match=r"worker_kwargs.*\['bogus'\]"):
        LocalCluster(n_workers=0, worker_kwargs={"bogus": 1})
    with pytest.raises(TypeError, match=r"scheduler_kwargs.*\['bogus'\]"):
        LocalCluster(n_workers=0, scheduler_kwargs={"bogus": 1})
    with pytest.raises(ValueError, match="no network interface 'nope0'"):
        LocalCluster(n_workers=0, interface="nope0")
    with pytest.raises(ValueError, match="give one"):
        LocalCluster(n_workers=0, host="127.0.0.2", ip="127.0.0.1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with LocalCluster(n_workers=1, threads_per_worker=1, name="alpha", interface="lo",
                      scheduler_kwargs={"port": port},
                      worker_kwargs={"nthreads": 2, "env": {"ZF_TEST_MARK": "yes"}}) as cluster:
        assert cluster.name == "alpha"
        assert cluster.scheduler_address == f"tcp://127.0.0.1:{port}"
        with cluster.get_client() as c:
            [w] = c.scheduler_info()["workers"].values()
            assert w["nthreads"] == 2
            assert set(c.run(os.getenv, "ZF_TEST_MARK").values()) == {"yes"}
    with LocalCluster(n_workers=1, processes=False, ip="127.0.0.1") as cluster:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")


def test_scale_wait_for_workers_logs_and_shutdown():
    with new_cluster(1) as cluster:
        c = cluster.get_client()
        assert cluster.get_client() is c  # the default client of this cluster
        cluster.scale(3)
        cluster.wait_for_workers(3, timeout=10)
        assert len(c.scheduler_info()["workers"]) == 3 and len(cluster.workers) == 3
        futures = c.map(np.ones, [100_000 + i for i in range(6)])
        c.gather(futures)
        cluster.scale(1)  # the values on the two retired workers move to the one left
        assert len(c.scheduler_info()["workers"]) == 1 and len(cluster.workers) == 1
        assert [f.result(10).sum() for f in futures] == [100_000 + i for i in range(6)]
        with pytest.raises(ValueError, match="scale needs"):
            cluster.scale(-1)
        cluster.scale(cores=2)
        assert len(cluster.workers) == 2
        logs = cluster.get_logs()
        assert "retired" in logs["Scheduler"]
        assert set(logs) == {"Cluster", "Scheduler", *c.scheduler_info()["workers"]}
        # When the client shuts the cluster down, the cluster says it is closed
        c.shutdown()
        assert c.status == "closed"
        deadline = time.monotonic() + 10
        while cluster.status != "closed" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cluster.status == "closed"


# ---------------------------------------------------------------------- adaptive policy


def test_adaptive_policy_grows_at_once_and_shrinks_after_wait_count():
    kw = dict(threads_per_worker=1, minimum=1, maximum=4, target_duration_s=1.0, wait_count=3)
    # 10 tasks of 0.5 s want 5 s of work in 1 s: as many workers as allowed
    assert decide(runnable=10, task_duration_s=0.5, workers=1, low_count=0, **kw) == (4, 0)
    # never more workers than tasks, at least one while there is work
    assert decide(runnable=2, task_duration_s=9, workers=1, low_count=0, **kw) == (2, 0)
    assert decide(runnable=1, task_duration_s=0.001, workers=0, low_count=0,
                  **{**kw, "minimum": 0}) == (1, 0)
    # idle: only the third check in a row shrinks, down to the minimum
    assert decide(runnable=0, task_duration_s=1, workers=4, low_count=0, **kw) == (4, 1)
    assert decide(runnable=0, task_duration_s=1, workers=4, low_count=1, **kw) == (4, 2)
    assert decide(runnable=0, task_duration_s=1, workers=4, low_count=2, **kw) == (1, 0)
    # work arriving resets the count
    assert decide(runnable=4, task_duration_s=1, workers=4, low_count=2, **kw) == (4, 0)


async def test_asynchronous_cluster_scales_from_and_to_zero():
    async with LocalCluster(n_workers=0, threads_per_worker=1, processes=False,
                            asynchronous=True) as cluster, \
            Client(cluster, asynchronous=True, set_as_default=False) as c:
        await cluster.scale(2)
        await cluster.wait_for_workers(2, timeout=5)
        x = c.submit(sum, [1, 2])
        assert await x == 3
        await cluster.scale(0)  # x is small: the scheduler holds its bytes
        assert cluster.workers == {} and (await c.scheduler_info())["workers"] == {}
        adaptive = cluster.adapt(minimum=0, maximum=2, interval=0.05, wait_count=2)
        y = c.submit(sum, [3, 4])
        assert await asyncio.wait_for(y, 10) == 7  # a worker was started for it
        deadline = time.monotonic() + 5
        while cluster.workers and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert cluster.workers == {}
        assert [kind for _, kind, _, _ in adaptive.log] == ["up", "down"]
        assert await x == 3 and await y == 7
