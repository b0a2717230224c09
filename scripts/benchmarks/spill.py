"""Spill: data larger than a worker's memory, written out and read back (``spill_mb_per_s``).
Runs its own LocalCluster in a fresh process."""

from __future__ import annotations

import contextlib
import time

from .common import Measurement, expect
from .funcs import array_sum, make_array
from .impls import Impl


def bench_spill(impl: Impl, timeout: float, sizes: dict[str, int]) -> Measurement:
    """One worker with 400 MB; 20 x 50 MB results held, then each read back (its sum)."""
    api = impl.api()
    n, nbytes = sizes["spill_tasks"], 50 * 10**6
    cluster = api.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                               memory_limit="400MB")
    try:
        client = api.Client(cluster)
        try:
            wid = next(iter(client.scheduler_info()["workers"]))
            start = time.perf_counter()
            futures = [client.submit(make_array, i, nbytes, pure=False) for i in range(n)]
            api.wait(futures, timeout=timeout)
            sums = client.gather([client.submit(array_sum, f, pure=False) for f in futures])
            seconds = time.perf_counter() - start
            workers = client.scheduler_info()["workers"]
        finally:
            with contextlib.suppress(Exception):
                client.close()
    finally:
        with contextlib.suppress(Exception):
            cluster.close()
    expect(sums == [float(i) * (nbytes // 8) for i in range(n)], "a sum is wrong")
    expect(list(workers) == [wid], "the worker was restarted (killed for its memory?)")
    mb = 2 * n * nbytes / 1e6
    return Measurement(mb / seconds, {"seconds": seconds, "arrays": n, "mb_moved": mb})


# --- dask collections: the same dask code, with each implementation's client as scheduler ---
