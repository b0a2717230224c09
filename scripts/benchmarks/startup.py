"""Start-up: a LocalCluster to its first result (``localcluster_first_result_s``), in a fresh
process after the library is imported."""

from __future__ import annotations

import contextlib
import time

from .common import Measurement, expect
from .funcs import inc
from .impls import Impl


def bench_localcluster(impl: Impl, timeout: float, sizes: dict[str, int]) -> Measurement:
    """Runs synchronously, in a fresh process, after the library is imported."""
    api = impl.api()  # import outside the timed region
    start = time.perf_counter()
    cluster = api.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                               **impl.cluster_kwargs())
    try:
        client = api.Client(cluster)
        try:
            result = client.submit(inc, 1).result(timeout=timeout)
            seconds = time.perf_counter() - start
        finally:
            with contextlib.suppress(Exception):
                client.close()
    finally:
        with contextlib.suppress(Exception):
            cluster.close()
    expect(result == 2, f"inc(1) returned {result!r}")
    return Measurement(seconds, {"seconds": seconds})
