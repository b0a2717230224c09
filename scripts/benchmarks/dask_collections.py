"""dask collections computed with each implementation's client as the scheduler, each answer
checked against dask's threaded scheduler (``dask_*`` rows)."""

from __future__ import annotations

import time
from typing import Any

from .cluster import Cluster
from .common import Measurement, expect
from .funcs import plus_one


def threaded(collection: Any) -> Any:
    import dask

    return dask.compute(collection, scheduler="threads")[0]


async def dask_warmup(client: Any) -> None:
    """A small graph first, untimed: each worker imports dask on its first graph."""
    import dask.array as da

    expect(await client.compute(da.ones(4, chunks=2).sum()) == 4, "warm-up sum is wrong")


async def bench_dask_array_sum(c: Cluster) -> Measurement:
    import dask.array as da

    n = c.sizes["dask_sum_n"]
    x = da.ones(n, chunks=1_000).sum()
    want = float(n)
    await dask_warmup(c.client)
    start = time.perf_counter()
    got = await c.client.compute(x)
    seconds = time.perf_counter() - start
    expect(got == want == threaded(x), f"sum {got} differs from the threaded scheduler's")
    return Measurement(seconds, {"n": n, "chunks": n // 1_000})


async def bench_dask_xxt_mean(c: Cluster) -> Measurement:
    import dask.array as da
    import numpy as np

    n = c.sizes["dask_xxt_n"]
    x = da.random.default_rng(42).random((n, n), chunks=(250, 250))
    expr = (x + x.T).mean()
    want = threaded(expr)
    await dask_warmup(c.client)
    start = time.perf_counter()
    got = await c.client.compute(expr)
    seconds = time.perf_counter() - start
    expect(bool(np.isclose(got, want)), f"mean {got} differs from the threaded {want}")
    return Measurement(seconds, {"n": n})


async def bench_dask_groupby(c: Cluster) -> Measurement:
    import dask
    import dask.datasets

    days = c.sizes["dask_df_days"]
    with dask.config.set({"dataframe.shuffle.method": "tasks"}):
        df = dask.datasets.timeseries(start="2000-01-01", end=f"2000-01-{1 + days:02d}",
                                      freq="500ms", partition_freq="1D", seed=7)
        expr = df.groupby("name").x.mean()
        want = threaded(expr).sort_index()
        await dask_warmup(c.client)
        start = time.perf_counter()
        got = await c.client.compute(expr)
        seconds = time.perf_counter() - start
    got = got.sort_index()
    expect(len(got) == len(want) and bool((abs(got - want) < 1e-9).all()),
           "groupby-mean differs from the threaded scheduler's")
    return Measurement(seconds, {"rows": days * 86_400 * 2, "partitions": days})


async def bench_dask_persist(c: Cluster) -> Measurement:
    import dask.array as da

    n = c.sizes["dask_persist_n"]
    x = da.ones(n, chunks=1).map_blocks(plus_one)
    await dask_warmup(c.client)
    start = time.perf_counter()
    xp = c.client.persist(x)
    submitted = time.perf_counter() - start
    await c.api.wait(xp)
    seconds = time.perf_counter() - start
    sample = x[: min(n, 1_000)]
    got = await c.client.compute(xp[: min(n, 1_000)].sum())
    expect(got == threaded(sample.sum()) == 2 * len(sample), "persisted values are wrong")
    return Measurement(seconds, {"tasks": n, "client_submit_s": submitted})
