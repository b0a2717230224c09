"""Dask collections on zfabric: Client.get/compute/persist, the default scheduler, dask keys.

Answers are checked against dask's local threaded scheduler. One LocalCluster (two worker
processes) serves the synchronous tests of this module; the asynchronous ones run an
in-process cluster of their own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import gc
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
db = pytest.importorskip("dask.bag")
dd = pytest.importorskip("dask.dataframe")
pd = pytest.importorskip("pandas")

from zfabric import (  # noqa: E402
    Client,
    Future,
    LocalCluster,
    as_completed,
    futures_of,
    progress,
    wait,
)
from zfabric.errors import TaskCancelled  # noqa: E402
from zfabric.testing import gen_cluster  # noqa: E402

pytestmark = pytest.mark.timeout(120) if hasattr(pytest.mark, "timeout") else []


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1) as cluster, Client(cluster) as c:
        yield c


def threaded(x):
    # dask.threaded.get itself: a scheduler *name* makes dask import dask.distributed, which
    # installs tblib's exception pickling process-wide (and changes what other tests see)
    import dask.threaded

    return dask.compute(x, scheduler=dask.threaded.get)[0]


def inc(x):
    return x + 1


def boom(x):
    raise ValueError(f"boom {x}")


# ---------------------------------------------------------------------------- collections


def test_array_through_the_default_client(client):
    # Given dask arrays, computed with a zfabric client as the default scheduler
    assert dask.config.get("scheduler").__module__ == "zfabric.dask_scheduler"
    x = da.random.RandomState(0).random((300, 200), chunks=(50, 40))
    y = da.random.RandomState(1).random((200, 300), chunks=(40, 50))
    cases = {
        "elementwise": (x * 2 + 1) ** 2,
        "sum": x.sum(),
        "mean-axis": x.mean(axis=0),
        "x+x.T": (x[:200, :200] + x[:200, :200].T).mean(),
        "rechunk": x.rechunk((100, 100)) + 1,
        "slicing": x[::3, 10:150:2],
        "matmul": x.dot(y).sum(axis=1),
        "std": x.std(),
    }
    # numpy data inside the graph (2 MB per node: shipped to workers, not through the
    # scheduler), and a chunk of small nodes beside it
    data = np.random.default_rng(3).random((1000, 1000))
    cases["from_array"] = (da.from_array(data, chunks=(500, 500)) + 1).T.sum(axis=0)
    cases["from_array_small"] = da.from_array(data[:40, :40], chunks=(10, 10)).sum(axis=1)
    # Then each gives the threaded scheduler's answer
    for name, expr in cases.items():
        np.testing.assert_allclose(expr.compute(), threaded(expr), err_msg=name)


def test_bag_and_delayed(client):
    b = db.from_sequence(range(100), npartitions=7)
    out = b.map(inc).filter(lambda v: v % 3 == 0)
    assert out.compute() == threaded(out)
    folded = b.foldby(lambda v: v % 5, lambda acc, v: acc + v, 0)
    assert sorted(folded.compute()) == sorted(threaded(folded))

    @dask.delayed
    def add(*xs):
        return sum(xs)

    parts = [add(i, add(i, 1)) for i in range(10)]
    total = add(*parts)
    assert total.compute() == threaded(total) == sum(2 * i + 1 for i in range(10))
    assert dask.compute({"a": parts[:2], "b": (total, 5)}) == (
        {"a": [1, 3], "b": (100, 5)},)


def test_delayed_with_futures_inside(client):
    # Given futures held on the cluster, passed into delayed calls and nested lists
    f = client.submit(inc, 10)
    g = client.scatter(5)

    @dask.delayed
    def add(a, b):
        return a + b

    d = add(f, add(g, 1))
    assert d.compute() == 17
    assert dask.delayed(sum)([f, g, 3]).compute() == 19
    assert client.compute(dask.delayed(inc)(f)).result() == 12


def test_work_runs_on_the_cluster(client):
    pids = dask.compute(*[dask.delayed(os.getpid)(dask_key_name=f"pid-{i}")
                          for i in range(8)])
    assert os.getpid() not in pids
    workers = client.run(os.getpid)
    assert set(pids) <= set(workers.values())


def test_dataframe(client):
    pdf = pd.DataFrame({"k": np.arange(400) % 7, "v": np.arange(400.0),
                        "w": np.arange(400) % 11})
    other = pd.DataFrame({"k": np.arange(7), "name": [f"n{i}" for i in range(7)]})
    df = dd.from_pandas(pdf, npartitions=5)
    odf = dd.from_pandas(other, npartitions=2)
    assert dask.config.get("dataframe.shuffle.method") == "tasks"
    assert dask.config.get("array.rechunk.method") == "tasks"
    cases = {
        "groupby": df.groupby("k").v.mean(),
        "agg": df.groupby("w").agg({"v": "sum", "k": "max"}),
        "merge": df.merge(odf, on="k").groupby("name").v.sum(),
        "set_index": df.set_index("w").v.sum(),
        "shuffle": df.shuffle("k").map_partitions(len).sum(),
    }
    # a persisted dataframe (its graph holds Futures, which dask must be able to tokenize)
    held = client.persist(df)
    assert len(futures_of(held)) == 5
    cases["persisted"] = (held.groupby("k").v.sum(), df.groupby("k").v.sum())
    for name, expr in cases.items():
        expr, plain = expr if isinstance(expr, tuple) else (expr, expr)
        got, want = expr.compute(), threaded(plain)
        if isinstance(got, pd.Series):
            pd.testing.assert_series_equal(got.sort_index(), want.sort_index(), obj=name)
        elif isinstance(got, pd.DataFrame):
            pd.testing.assert_frame_equal(got.sort_index(), want.sort_index(), obj=name)
        else:
            assert got == want, name


# ---------------------------------------------------------------------------- compute/persist/get


def test_compute_persist_get_sync(client):
    x = da.arange(100, chunks=10)
    f = client.compute(x.sum())
    assert isinstance(f, Future) and f.result() == 4950
    fs = client.compute([x.sum(), x.max(), 7])
    assert [fs[0].result(), fs[1].result(), fs[2]] == [4950, 99, 7]
    assert client.compute(x.sum(), sync=True) == 4950
    assert client.compute([x.min(), x + 1], sync=True)[1].tolist() == list(range(1, 101))

    xp = client.persist(x * 2)
    assert type(xp) is type(x) and xp.chunks == x.chunks
    held = futures_of(xp)
    assert len(held) == 10 and all(isinstance(h, Future) for h in held)
    wait(xp)
    assert all(h.done() for h in held)
    assert {h.key for h in held} == set(xp.__dask_keys__())
    assert (xp + 1).sum().compute() == 2 * 4950 + 100
    assert client.who_has(xp)  # accepted as futures
    assert len(list(as_completed(xp))) == 10
    progress(xp)  # persisted collections are accepted, as by wait and as_completed
    assert client.gather(xp).tolist() == list(range(0, 200, 2))
    xp2, yp = dask.persist(x + 1, db.from_sequence([1, 2, 3]))
    assert len(futures_of(xp2)) == 10 and yp.compute() == [1, 2, 3]

    # get: mappings of legacy tuples, literals, aliases; int and tuple keys as given
    dsk = {"a": 1, 5: (inc, "a"), ("t", 0): (sum, [5, "a"]), "alias": ("t", 0)}
    assert client.get(dsk, [("t", 0), [5, "alias"], "a"]) == [3, [2, 3], 1]
    assert client.get(dsk, 5) == 2
    # a HighLevelGraph and nested keys, as a collection hands them over
    y = da.arange(6, chunks=2) * 3
    hlg = y.__dask_graph__()
    assert type(hlg).__name__ == "HighLevelGraph"
    blocks = client.get(hlg, y.__dask_keys__())
    assert [b.tolist() for b in blocks] == [[0, 3], [6, 9], [12, 15]]
    # every keyword is either understood or refused
    assert client.get(dsk, 5, retries=1, priority=3, workers=None) == 2
    with pytest.raises(TypeError, match="unexpected keyword"):
        client.get(dsk, 5, no_such_option=1)
    with pytest.raises(NotImplementedError, match="actors"):
        client.compute(x.sum(), actors=True)


def test_graph_error_reraises_with_remote_traceback(client):
    d = dask.delayed(boom)(dask.delayed(inc)(1))
    with pytest.raises(ValueError, match="boom 2") as info:
        d.compute()
    assert any(fr.name == "boom" for fr in _frames(info.value.__traceback__))
    f = client.compute(d)
    with pytest.raises(ValueError, match="boom 2"):
        f.result()


def _frames(tb):
    import traceback

    return traceback.extract_tb(tb)


def test_cancel_a_compute_future(client):
    slow = dask.delayed(time.sleep)(2)
    f = client.compute(slow)
    time.sleep(0.2)
    client.cancel(f)
    with pytest.raises((TaskCancelled, concurrent.futures.CancelledError)):
        f.result(timeout=5)
    # the cluster is free again
    assert client.compute(dask.delayed(inc)(1), sync=True) == 2


def test_dask_hook_ignores_other_schedulers_keywords(client):
    # dask hands every keyword of dask.compute/x.compute to the scheduler: the hook zfabric
    # installs ignores those meant for other schedulers, as dask's own schedulers do
    x = dask.delayed(sum)([1, 2, 3])
    assert dask.compute(x, bogus_keyword=1) == (6,)
    assert da.ones(4, chunks=2).sum().compute(bogus_keyword=1) == 4
    # zfabric's own methods keep raising on unknown keywords
    with pytest.raises(TypeError, match="bogus"):
        client.compute(x, bogus_keyword=1)
    with pytest.raises(TypeError, match="bogus"):
        client.get({"a": 1}, "a", bogus_keyword=1)


def test_normalize_collection_takes_held_futures(client):
    x = dask.delayed(sum)([1, 2, 3], dask_key_name="norm-sum")
    assert client.normalize_collection(x) is x  # nothing held
    held = client.persist(x)
    normal = client.normalize_collection(x)
    assert any(isinstance(v, Future) for v in dict(normal.__dask_graph__()).values())
    assert normal.compute() == 6
    del held


def test_dask_keys_shown_as_given(client, tmp_path):
    from zfabric.report import render_report

    assert da.ones(8, chunks=2).sum().compute() == 8
    raw = client.sync(client.core.request, "task-stream", count=20)["records"]  # wire keys
    assert any(r["key"].startswith("\x1f") for r in raw)
    text = render_report(raw, [], {}, {}, time.time() - 60, time.time())
    assert "\x1f" not in text and "sum-aggregate" in text
    records = client.get_task_stream(count=20)
    tuples = [r for r in records if isinstance(r["key"], tuple)]
    assert tuples and all(not r["group"].startswith("\x1f") for r in records)
    assert {"ones_like", "sum", "sum-aggregate"} & {r["group"] for r in tuples}


def test_progress_of_a_persisted_collection_shows_every_group(client, capsys):
    x = da.random.random((40,), chunks=10).sum()
    held = client.persist(x)
    progress(held)
    out = capsys.readouterr().out
    lines = out.splitlines()
    last = max(i for i, line in enumerate(lines) if "Completed" in line)
    head, *groups = lines[last:]  # the final frame
    # every task of the graph is counted (not only the one output), group by group
    assert "100%" in head and "5/5" in head, out
    names = {line.split()[0] for line in groups}
    assert "sum-aggregate" in names and any(n.startswith("random_sample") for n in names), out
    del held


def test_released_after_get(client):
    # Given the scheduler's task count before a graph runs
    gc.collect()
    before = sum(client.scheduler_info()["tasks"].values())
    # When a graph of ~200 tasks is computed through the default client
    x = da.ones(1000, chunks=10)
    assert (x + 1).sum().compute() == 2000
    # Then nothing of it stays on the scheduler
    deadline = time.time() + 5
    while time.time() < deadline:
        after = sum(client.scheduler_info()["tasks"].values())
        if after <= before:
            break
        time.sleep(0.05)
    assert after <= before


def test_annotations_and_priorities(client):
    with dask.annotate(retries=2):
        flaky = dask.delayed(_flaky)(os.urandom(4).hex())
    assert flaky.compute(optimize_graph=False) == "ok"
    with dask.annotate(workers=["no-such-worker"], allow_other_workers=False):
        stuck = dask.delayed(inc)(1)
    f = client.compute(stuck, optimize_graph=False)
    time.sleep(0.3)
    assert not f.done()  # held back: no worker has that name
    client.cancel(f)


def _flaky(tag):
    path = f"/tmp/zfabric-flaky-{tag}"
    if not os.path.exists(path):
        open(path, "w").close()
        raise RuntimeError("first try fails")
    os.unlink(path)
    return "ok"


# ---------------------------------------------------------------------------- asynchronous


@gen_cluster()
async def test_async_client_compute_persist_get(c, s, a, b):
    x = da.arange(50, chunks=5)
    assert await c.compute(x.sum()) == 1225
    assert await c.compute([x.sum(), x.max()], sync=True) == [1225, 49]
    xp = c.persist(x + 1)
    await wait(xp)
    assert await c.compute(xp.sum()) == 1275
    assert await c.get({("k", 1): (inc, 1), 2: (inc, ("k", 1))}, [2, ("k", 1)]) == [3, 2]


def test_async_default_client_refuses_dask_compute():
    async def main():
        async with LocalCluster(n_workers=1, processes=False, asynchronous=True) as cl, \
                Client(cl, asynchronous=True) as c:
            with pytest.raises(RuntimeError, match="asynchronous Client"):
                da.ones(4, chunks=2).sum().compute()
            assert await c.compute(da.ones(4, chunks=2).sum()) == 4

    asyncio.run(asyncio.wait_for(main(), 60))


# ---------------------------------------------------------------------------- default client


def test_default_client_stack_and_deepcopy(client):
    from zfabric import default_client

    assert default_client() is client
    copy.deepcopy(dask.config.config)  # what some libraries do; the value must survive
    assert copy.deepcopy(dask.config.config)["scheduler"] is dask.config.get("scheduler")
    with Client(client.scheduler_address) as second:
        assert default_client() is second
        pid = dask.delayed(os.getpid)(dask_key_name="stack-pid").compute()
        assert pid != os.getpid()
    assert default_client() is client
    assert da.ones(10, chunks=5).sum().compute() == 10
    with Client(client.scheduler_address, set_as_default=False) as third:
        assert default_client() is client
        assert dask.compute(da.ones(6, chunks=3).sum(), scheduler=third) == (6,)
        assert da.ones(6, chunks=3).sum().compute(scheduler=third) == 6


SCRIPT = textwrap.dedent('''
    import os, sys
    from dataclasses import dataclass

    from zfabric import Client, LocalCluster


    @dataclass
    class Point:
        x: float
        y: float


    def norm(p):
        return (p.x ** 2 + p.y ** 2) ** 0.5


    if __name__ == "__main__":
        with LocalCluster(n_workers=2, threads_per_worker=1) as cluster, Client(cluster) as c:
            assert "dask" not in sys.modules, "Client() imported dask"
            import dask
            import dask.array as da
            import dask.bag as db

            assert dask.config.get("scheduler").__module__ == "zfabric.dask_scheduler"
            x = da.ones((1000, 1000), chunks=(100, 100))
            print("sum", (x + x.T).sum().compute())
            b = db.from_sequence([Point(3, 4), Point(6, 8)], npartitions=2).map(norm)
            print("bag", b.compute())
            pids = dask.compute(*[dask.delayed(os.getpid)(dask_key_name=f"p{i}")
                                  for i in range(4)])
            print("remote", os.getpid() not in pids)
        assert dask.config.get("scheduler", None) is None, "config not restored"
        assert dask.config.get("dataframe.shuffle.method", None) is None
        assert "distributed" not in sys.modules, "dask.distributed was imported"
        print("restored")
        dask.config.set(scheduler="sync")
        with LocalCluster(n_workers=1, processes=False) as cluster, Client(cluster):
            assert dask.config.get("scheduler").__module__ == "zfabric.dask_scheduler"
        assert dask.config.get("scheduler") == "sync", dask.config.get("scheduler")
        print("handed back")
''')


def test_user_script_subprocess(tmp_path):
    path = tmp_path / "script.py"
    path.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                          timeout=90, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sum 2000000.0" in proc.stdout
    assert "bag [5.0, 10.0]" in proc.stdout
    assert "remote True" in proc.stdout
    assert "restored" in proc.stdout and "handed back" in proc.stdout


def slow_block(block, delay):
    time.sleep(delay)
    return block * 2


def test_worker_killed_mid_reduction(client):
    # Given a reduction whose blocks take a while, running on both worker processes
    import signal

    x = da.arange(4000, chunks=100).map_blocks(slow_block, 0.05, dtype=int)
    total = x.sum()
    want = threaded(total)
    f = client.compute(total)
    pids = client.run(os.getpid)
    time.sleep(0.6)
    assert not f.done()
    # When one worker process is killed with SIGKILL in the middle
    os.kill(next(iter(pids.values())), signal.SIGKILL)
    # Then the lost blocks are recomputed (lineage) and the answer is still right
    assert f.result(timeout=60) == want
    client.wait_for_workers(2, timeout=30)


def test_plan_orders_by_dask_order_and_resolves_aliases_and_literals():
    # Given a reduction graph with an alias and a literal
    from dask.core import flatten
    from dask.order import order

    from zfabric.dask import materialize, plan

    x = da.ones(64, chunks=4).sum(split_every=2)
    (top,) = flatten(x.__dask_keys__())
    graph, _, _ = materialize({**x.__dask_graph__(), "alias": top, "lit": 5})
    p = plan(graph)
    # Then tasks go out in dask.order's order, dependencies first
    prio = order(graph)
    keys = [t[0] for t in p.tasks]
    assert keys == sorted(keys, key=prio.__getitem__)
    seen = set()
    for k, node, _, _ in p.tasks:
        assert all(d in seen for d in node.dependencies if d in graph), k
        seen.add(k)
    # and the alias and the literal cost no task
    assert "alias" not in keys and "lit" not in keys
    assert p.literals == {"lit": 5} and p.resolved["alias"] in keys


def test_dask_distributed_was_not_imported():
    # zfabric as dask's scheduler never needs dask.distributed (see threaded() above)
    assert "distributed" not in sys.modules
