"""Actors: a blocking client's actor method calls against its tiny-task round trip
(``actor_call_p50_ms``)."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from .cluster import Cluster
from .common import Measurement, expect
from .funcs import Counter, inc


def _actor_calls(api: Any, address: str, warmup: int, iters: int) -> dict[str, Any]:
    """Blocking client: p50 of an actor method call and of a tiny task, in the same run."""
    with api.Client(address, set_as_default=False) as client:
        made = client.submit(Counter, actor=True)  # held: dask frees an actor with its Future
        counter = made.result()
        for _ in range(warmup):
            counter.incr().result()
        calls = []
        for _ in range(iters):
            start = time.perf_counter()
            counter.incr().result()
            calls.append((time.perf_counter() - start) * 1e3)
        count = counter.value().result()
        expect(count == warmup + iters, f"the actor counted {count}")
        for i in range(warmup):
            client.submit(inc, i, pure=False).result()
        tasks = []
        for i in range(iters // 2):
            start = time.perf_counter()
            client.submit(inc, i, pure=False).result()
            tasks.append((time.perf_counter() - start) * 1e3)
    return {"calls_ms": calls, "tasks_ms": tasks}


async def bench_actor(c: Cluster) -> Measurement:
    client = c.client
    address = getattr(client, "scheduler_address", None) or client.scheduler.address
    out = await asyncio.wait_for(asyncio.to_thread(
        _actor_calls, c.api, address, c.sizes["actor_warmup"], c.sizes["actor_iters"]),
        c.timeout)
    calls, tasks = out["calls_ms"], out["tasks_ms"]
    p50, task_p50 = statistics.median(calls), statistics.median(tasks)
    return Measurement(p50, {
        "iterations": len(calls),
        "p90_ms": statistics.quantiles(calls, n=10)[8],
        "blocking_task_rtt_p50_ms": task_p50,
        "ratio_to_task_rtt": p50 / task_p50,
    })
