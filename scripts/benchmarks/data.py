"""Data movement: a large array to a task and back (``echo_mb_per_s``)."""

from __future__ import annotations

import time

from .cluster import Cluster
from .common import Measurement, expect
from .funcs import identity


async def bench_echo(c: Cluster) -> Measurement:
    """Steady state: two untimed echoes of the same size first (one per worker: the array
    lands on either), for both implementations alike; the first (cold) one is reported too."""
    import numpy as np

    client, mb = c.client, c.sizes["echo_mb"]
    data = np.ones(mb * 2**20 // 8)
    cold = 0.0
    for _ in range(2):
        start = time.perf_counter()
        warm = await client.submit(identity, data, pure=False)
        cold = cold or time.perf_counter() - start
        del warm
    data = np.arange(mb * 2**20 // 8, dtype="f8")
    start = time.perf_counter()
    echoed = await client.submit(identity, data, pure=False)
    seconds = time.perf_counter() - start
    expect(
        isinstance(echoed, np.ndarray)
        and echoed.shape == data.shape
        and bool(np.array_equal(echoed, data)),
        "echoed array differs from the original",
    )
    return Measurement(2 * mb / seconds, {"mib_each_way": mb, "seconds": seconds,
                                          "first_echo_mb_per_s": 2 * mb / cold})
