"""Round trip: one tiny task at a time, awaited (``rtt_p50_ms``)."""

from __future__ import annotations

import statistics
import time

from .cluster import Cluster
from .common import Measurement, expect
from .funcs import inc


async def bench_rtt(c: Cluster) -> Measurement:
    client = c.client
    for i in range(c.sizes["rtt_warmup"]):
        expect(await client.submit(inc, i, pure=False) == i + 1, "inc returned a wrong value")
    samples_ms = []
    for i in range(c.sizes["rtt_iters"]):
        start = time.perf_counter()
        result = await client.submit(inc, i, pure=False)
        samples_ms.append((time.perf_counter() - start) * 1e3)
        expect(result == i + 1, "inc returned a wrong value")
    cuts = statistics.quantiles(samples_ms, n=100)
    return Measurement(
        statistics.median(samples_ms),
        {
            "iterations": len(samples_ms),
            "min_ms": min(samples_ms),
            "p90_ms": cuts[89],
            "p99_ms": cuts[98],
            "mean_ms": statistics.fmean(samples_ms),
        },
    )
