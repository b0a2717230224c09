"""Scheduler memory per task held, pending and done (``sched_bytes_per_task_*``)."""

from __future__ import annotations

from .cluster import Cluster, settled_rss
from .common import Measurement, expect
from .funcs import first, inc, nap


async def bench_sched_pending(c: Cluster) -> Measurement:
    client, n = c.client, c.sizes["pending_tasks"]
    expect(await client.submit(inc, 0, pure=False) == 1, "inc returned a wrong value")
    before = await settled_rss(c.scheduler_pid)
    # The gate outlives the measurement (the cluster is killed afterwards).
    gate = client.submit(nap, c.timeout + 60, pure=False)
    futures = client.map(first, range(n), gate=gate, pure=False)
    # A round trip after the submission so the scheduler has taken it in.
    expect(await client.submit(inc, 1, pure=False) == 2, "inc returned a wrong value")
    after = await settled_rss(c.scheduler_pid)
    expect(not gate.done(), "the gate task finished early; tasks were not pending")
    expect(len(futures) == n, "map returned the wrong number of futures")
    return Measurement((after - before) / n, {"tasks": n, "rss_before": before, "rss_after": after})


async def bench_sched_done(c: Cluster) -> Measurement:
    client, n = c.client, c.sizes["done_tasks"]
    expect(await client.submit(inc, 0, pure=False) == 1, "inc returned a wrong value")
    before = await settled_rss(c.scheduler_pid)
    futures = client.map(inc, range(n), pure=False)
    results = await client.gather(futures)
    expect(len(results) == n, f"gathered {len(results)} results, expected {n}")
    after = await settled_rss(c.scheduler_pid)
    return Measurement((after - before) / n, {"tasks": n, "rss_before": before, "rss_after": after})
