"""Many small tasks: no-ops through ``map`` + ``gather`` (``noop_tasks_per_s``) and a tree
reduction with futures (``tree_tasks_per_s``)."""

from __future__ import annotations

import time

from .cluster import Cluster
from .common import Measurement, expect
from .funcs import add, identity, noop


async def bench_noop(c: Cluster) -> Measurement:
    client, n = c.client, c.sizes["noop_tasks"]
    await client.gather(client.map(noop, range(min(100, n)), pure=False))  # warm-up
    start = time.perf_counter()
    futures = client.map(noop, range(n), pure=False)
    results = await client.gather(futures)
    seconds = time.perf_counter() - start
    expect(len(results) == n, f"gathered {len(results)} results, expected {n}")
    return Measurement(n / seconds, {"tasks": n, "seconds": seconds})


async def bench_tree(c: Cluster) -> Measurement:
    client, leaves = c.client, c.sizes["tree_leaves"]
    expect(await client.submit(add, 1, 2, pure=False) == 3, "add returned a wrong value")
    start = time.perf_counter()
    level = client.map(identity, range(leaves), pure=False)
    while len(level) > 1:
        reduced = [
            client.submit(add, level[i], level[i + 1], pure=False)
            for i in range(0, len(level) - 1, 2)
        ]
        if len(level) % 2:
            reduced.append(level[-1])
        level = reduced
    total = await level[0]
    seconds = time.perf_counter() - start
    expect(total == leaves * (leaves - 1) // 2, f"tree sum {total} is wrong")
    tasks = 2 * leaves - 1
    return Measurement(tasks / seconds, {"tasks": tasks, "leaves": leaves, "seconds": seconds})
