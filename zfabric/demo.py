"""``zfabric demo``: estimate pi with a few thousand tasks on a LocalCluster and say what ran where.

The task functions live here, in an importable module, so that workers unpickle them by
reference.
"""

from __future__ import annotations

import os
import random
import sys
import time

from .client import Client
from .cluster import LocalCluster
from .futures import as_completed

__all__ = ["combine", "run_demo", "sample"]


def sample(seed: int, n: int) -> tuple[int, int, dict[int, int]]:
    """Throw ``n`` random points at the unit square: (inside the quarter circle, n, {pid: 1})."""
    rnd = random.Random(seed).random
    inside = 0
    for _ in range(n):
        x, y = rnd(), rnd()
        if x * x + y * y <= 1.0:
            inside += 1
    return inside, n, {os.getpid(): 1}


def combine(a: tuple, b: tuple) -> tuple[int, int, dict[int, int]]:
    """Add two partial results; count this task for the process that ran it."""
    ran = dict(a[2])
    for pid, count in b[2].items():
        ran[pid] = ran.get(pid, 0) + count
    me = os.getpid()
    ran[me] = ran.get(me, 0) + 1
    return a[0] + b[0], a[1] + b[1], ran


def _bar(done: int, total: int, elapsed: float, width: int = 40) -> str:
    filled = width * done // max(1, total)
    return f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} tasks {elapsed:5.2f} s"


def run_demo(*, n_workers: int = 2, tasks: int = 2000, samples: int = 1000,
             processes: bool = True, out=None) -> dict:
    """Run the demo, print its report to ``out`` (stdout) and return the numbers."""
    out = out or sys.stdout
    t0 = time.perf_counter()
    kind = "processes" if processes else "threads"
    print(f"Starting a LocalCluster of {n_workers} worker {kind}...", file=out, flush=True)
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=processes) as cluster, \
            Client(cluster, set_as_default=False) as client:
        started = time.perf_counter() - t0
        t1 = time.perf_counter()
        level = client.map(sample, range(tasks), [samples] * tasks)
        futures = list(level)
        while len(level) > 1:  # a tree reduction: each task adds two partial results
            nxt = [client.submit(combine, a, b) for a, b in zip(level[::2], level[1::2],
                                                                strict=False)]
            futures.extend(nxt)
            if len(level) % 2:
                nxt.append(level[-1])
            level = nxt
        total, shown = len(futures), 0.0
        for done, _ in enumerate(as_completed(futures), 1):
            now = time.perf_counter()
            if now - shown > 0.05 or done == total:
                shown = now
                print(_bar(done, total, now - t1), end="", file=out, flush=True)
        inside, n, ran = level[0].result(timeout=60)
        elapsed = time.perf_counter() - t1
        workers = client.scheduler_info()["workers"]
    print(file=out)
    pi = 4 * inside / n
    by_pid = {w.get("pid"): (w.get("name"), addr) for addr, w in workers.items()}
    print(f"pi ≈ {pi:.5f} (off by {abs(pi - 3.141592653589793):.5f}) from {n:,} random points",
          file=out)
    print(f"{total:,} tasks in {elapsed:.2f} s: {total / elapsed:,.0f} tasks/s"
          f" (cluster started in {started:.2f} s)", file=out)
    if processes:
        for pid, count in sorted(ran.items(), key=lambda kv: -kv[1]):
            name, addr = by_pid.get(pid, ("?", "?"))
            print(f"  worker {name} at {addr} (pid {pid}): {count:,} tasks", file=out)
    else:
        print(f"  {sum(ran.values()):,} tasks ran in this process's worker threads", file=out)
    out.flush()
    return {"pi": pi, "tasks": total, "seconds": elapsed, "by_pid": ran}
