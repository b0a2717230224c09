"""dask collections whose chunks move between workers (``move_*`` rows), each against dask's
threaded scheduler (2 threads) in the same child process, and the 100 MB echo over TCP
(``echo_tcp_mb_per_s``: the same-host shared-memory path off, for every implementation).

A ``move_*`` row's value is the cluster's time; its extras hold the threaded scheduler's time
for the same graph (``threads_s``) and the ratio of the two (``vs_threads``: the target is at
most 1.2). The ``threads_*`` rows (a 1,000-chunk array sum, a groupby-mean) are measured the
same way: graphs where the fabric already beats threads, watched so that it stays so. Each
repetition runs the graph once on the cluster and once threaded, after one untimed run of
each (workers import dask and pandas on their first graph; dask's threads warm their own
caches). Every answer is checked against the threaded one. The threaded run starts
:data:`SETTLE_S` after the cluster's answer: what the cluster still does then (freeing the
graph's values, collecting garbage) would otherwise run beside it and slow it, which
flattered a cluster that leaves more work behind.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import Any

from .cluster import Cluster
from .common import Measurement, expect
from .dask_collections import dask_warmup

_warm: set[str] = set()  # rows whose untimed runs are done (one child process per row)


_seeds = itertools.count(1)  # a new seed for every graph: no run finds another's results
#: Seconds between the cluster's answer and the threaded run (see the module).
SETTLE_S = 0.25


def threaded_s(expr: Any) -> tuple[float, Any]:
    import dask

    start = time.perf_counter()
    with dask.config.set(scheduler="threads", num_workers=2):
        got = dask.compute(expr)[0]
    return time.perf_counter() - start, got


async def versus_threads(c: Cluster, name: str, make: Callable[[int], Any],
                         same: Callable[[Any, Any], bool]) -> Measurement:
    """``make(seed)``: the graph; the same graph runs on the cluster, then threaded."""
    if name not in _warm:
        await dask_warmup(c.client)
        await c.client.compute(make(next(_seeds)))
        threaded_s(make(next(_seeds)))
        _warm.add(name)
    expr = make(next(_seeds))
    start = time.perf_counter()
    got = await c.client.compute(expr)
    seconds = time.perf_counter() - start
    await asyncio.sleep(SETTLE_S)
    threads, want = threaded_s(expr)
    expect(same(got, want), f"{name}: {got!r:.80} differs from the threaded {want!r:.80}")
    return Measurement(seconds, {"threads_s": threads, "vs_threads": seconds / threads})


def _close(a: Any, b: Any) -> bool:
    import numpy as np

    return bool(np.isclose(a, b, rtol=1e-9))


def _array(n: int, chunk: int, seed: int):
    import dask.array as da

    return da.random.default_rng(seed).random((n, n), chunks=(chunk, chunk))


def _frame(days: int, seed: int):
    import dask
    import dask.datasets

    return dask.datasets.timeseries(start="2000-01-01", end=f"2000-01-{1 + days:02d}",
                                    freq="1s", partition_freq="1D", seed=seed)


async def bench_move_xxt(c: Cluster) -> Measurement:
    n = c.sizes["move_n"]
    def make(seed: int):
        x = _array(n, 500, seed)
        return (x + x.T).mean()

    return await versus_threads(c, "xxt", make, _close)


async def bench_move_matmul(c: Cluster) -> Measurement:
    n = c.sizes["move_matmul_n"]
    def make(seed: int):
        a = _array(n, 500, seed)
        return (a @ a.T).sum()

    return await versus_threads(c, "matmul", make, _close)


async def bench_move_rechunk(c: Cluster) -> Measurement:
    n = c.sizes["move_n"]
    def make(seed: int):
        return _array(n, 500, seed).rechunk((n, 250)).sum(axis=0)[::7].sum()

    return await versus_threads(c, "rechunk", make, _close)


async def bench_move_merge(c: Cluster) -> Measurement:
    import dask
    import dask.dataframe as dd
    import numpy as np
    import pandas as pd

    days = c.sizes["move_df_days"]

    def make(seed: int):
        with dask.config.set({"dataframe.shuffle.method": "tasks"}):
            left = _frame(days, seed)
            ids = np.arange(900, 1100)
            right = dd.from_pandas(pd.DataFrame({"id": ids, "w": ids * 0.5}), npartitions=4)
            joined = left.merge(right, on="id", how="inner", shuffle_method="tasks",
                                broadcast=False)
            return joined.w.sum() + joined.x.sum()

    return await versus_threads(c, "merge", make, _close)


async def bench_move_set_index(c: Cluster) -> Measurement:
    import dask

    days = c.sizes["move_df_days"]

    def make(seed: int):
        import numpy as np

        # given divisions (x is uniform on [-1, 1)): dask would otherwise compute them at
        # once, with whatever scheduler is the default
        edges = [float(v) for v in np.linspace(-1.0, 1.0, days + 1)]
        with dask.config.set({"dataframe.shuffle.method": "tasks"}):
            df = _frame(days, seed).set_index("x", shuffle_method="tasks", divisions=edges)
            return df.y.cumsum().sum()

    return await versus_threads(c, "set_index", make, _close)


async def bench_move_delayed_tree(c: Cluster) -> Measurement:
    from dask import delayed

    from .funcs import add, make_array

    leaves = c.sizes["move_tree_leaves"]

    def make(seed: int):
        level = [delayed(make_array)(i + seed, 2_000_000) for i in range(leaves)]
        while len(level) > 1:
            level = [delayed(add)(level[i], level[i + 1])
                     for i in range(0, len(level), 2)]
        return level[0].sum()

    return await versus_threads(c, "delayed_tree", make, _close)


# Rows where the fabric's cost per task, not data movement, decides (the issue's "already
# beats threads" rows): watched so that data-plane work does not cost them.


async def bench_threads_array_sum(c: Cluster) -> Measurement:
    def make(seed: int):
        import dask.array as da

        return (da.ones(c.sizes["threads_sum_chunks"] * 1_000, chunks=1_000) * seed).sum()

    return await versus_threads(c, "array_sum", make, _close)


async def bench_threads_groupby(c: Cluster) -> Measurement:
    import dask

    days = c.sizes["move_df_days"] // 2

    def make(seed: int):
        with dask.config.set({"dataframe.shuffle.method": "tasks"}):
            return _frame(days, seed).groupby("name").x.mean().sum()

    return await versus_threads(c, "groupby", make, _close)
