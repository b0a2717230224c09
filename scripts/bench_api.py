#!/usr/bin/env python
"""Figures for the cluster-side API, zfabric and (where installed) dask.distributed side by
side in one run, on a LocalCluster of 2 single-threaded worker processes each.

Rows
----
retire_mb_per_s
    A worker holding 20 arrays of 5 MiB (100 MiB) that nobody else holds is retired; its
    data moves to the other worker first. MiB moved / seconds of ``retire_workers``.
replicate_mb_per_s
    ``replicate`` of 20 arrays of 5 MiB held by one worker to both workers.
executor_map_calls_per_s
    ``list(client.get_executor().map(noop, range(N)))``: N = 2,000 calls.
joblib_calls_per_s
    ``Parallel(n_jobs=-1)(delayed(noop)(i) for i in range(N))`` on each implementation's
    joblib backend ("zfabric", "dask"), N = 5,000, and joblib's own "loky" for reference.

Medians over ``--repeat`` runs (default 3); timings on a shared machine drift, so compare the
columns of one run, not runs of different days.

    python scripts/bench_api.py [--repeat 3] [--impl zfabric,dask]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import numpy as np

MIB = 2**20
N_ARRAYS = 20
ARRAY_BYTES = 5 * MIB


def noop(x):
    return x


def make_array(i):
    return np.full(ARRAY_BYTES // 8, i, dtype=np.float64)


def clients(impl: str):
    if impl == "zfabric":
        from zfabric import Client, LocalCluster
    else:
        from dask.distributed import Client, LocalCluster
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, memory_limit=0, processes=True,
                           **({"dashboard_address": ":0"} if impl == "dask" else {}))
    return cluster, Client(cluster)


def held_on_one(client):
    a, _ = sorted(client.scheduler_info()["workers"])
    futures = client.map(make_array, range(N_ARRAYS), workers=[a], pure=False)
    client.gather(futures)
    return a, futures


def bench_retire(impl):
    cluster, client = clients(impl)
    try:
        a, futures = held_on_one(client)
        t = time.perf_counter()
        client.retire_workers([a])
        dt = time.perf_counter() - t
        assert client.gather(futures)[-1][0] == N_ARRAYS - 1
        return N_ARRAYS * ARRAY_BYTES / MIB / dt
    finally:
        client.close()
        cluster.close()


def bench_replicate(impl):
    cluster, client = clients(impl)
    try:
        _, futures = held_on_one(client)
        t = time.perf_counter()
        client.replicate(futures, n=2)
        dt = time.perf_counter() - t
        assert all(len(v) == 2 for v in client.who_has(futures).values())
        return N_ARRAYS * ARRAY_BYTES / MIB / dt
    finally:
        client.close()
        cluster.close()


def bench_executor(impl, n=2000):
    cluster, client = clients(impl)
    try:
        ex = client.get_executor()
        list(ex.map(noop, range(50)))
        t = time.perf_counter()
        assert list(ex.map(noop, range(n))) == list(range(n))
        return n / (time.perf_counter() - t)
    finally:
        client.close()
        cluster.close()


def bench_joblib(impl, n=5000):
    import joblib
    from joblib import Parallel, delayed

    if impl == "loky":
        backend, cluster, client = "loky", None, None
    else:
        cluster, client = clients(impl)
        backend = "zfabric" if impl == "zfabric" else "dask"
    try:
        with joblib.parallel_config(backend=backend, n_jobs=2 if impl == "loky" else -1):
            Parallel()(delayed(noop)(i) for i in range(100))
            t = time.perf_counter()
            out = Parallel()(delayed(noop)(i) for i in range(n))
            dt = time.perf_counter() - t
        assert out == list(range(n))
        return n / dt
    finally:
        if client is not None:
            client.close()
            cluster.close()


ROWS = {
    "retire_mb_per_s": bench_retire,
    "replicate_mb_per_s": bench_replicate,
    "executor_map_calls_per_s": bench_executor,
    "joblib_calls_per_s": bench_joblib,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--impl", default="zfabric,dask")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # dask's "port 8787 is in use"
    logging.getLogger("distributed").setLevel(logging.ERROR)
    impls = args.impl.split(",")
    print(f"{'row':28}" + "".join(f"{i:>14}" for i in [*impls, "loky"]))
    for row, fn in ROWS.items():
        cells = []
        for impl in [*impls, "loky"]:
            if impl == "loky" and row != "joblib_calls_per_s":
                cells.append("")
                continue
            try:
                runs = []
                for _ in range(args.repeat):  # alternate would be fairer; runs are short
                    runs.append(fn(impl))
                cells.append(f"{statistics.median(runs):,.0f}")
            except Exception as exc:  # a missing or broken implementation shows n/a
                cells.append("n/a")
                print(f"  {row} {impl}: {type(exc).__name__}: {exc}")
        print(f"{row:28}" + "".join(f"{c:>14}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
