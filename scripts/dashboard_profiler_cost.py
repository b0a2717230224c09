#!/usr/bin/env python
"""What the workers' statistical profiler costs: worker processes run tasks that compute for
``--task-ms`` (10) each, for ``--seconds``; the profiler's thread (``zf-profiler``) and each
worker process are read from /proc. Prints the profiler's CPU per task and as a share of the
worker's CPU.

    python scripts/dashboard_profiler_cost.py [--workers 2] [--threads 1] [--seconds 10]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import procs  # noqa: E402

from zfabric import Client, LocalCluster  # noqa: E402


def compute_for(ms: float) -> int:
    end = time.perf_counter() + ms / 1000
    n = 0
    while time.perf_counter() < end:
        n += sum(range(50))
    return n


def thread_cpu(pid: int, name: str) -> float:
    total = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                if f.read().strip() != name:
                    continue
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0]) / 1e9
        except (OSError, ValueError):
            continue
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--task-ms", type=float, default=10.0)
    args = ap.parse_args()
    with LocalCluster(n_workers=args.workers, threads_per_worker=args.threads,
                      dashboard_address=None) as c, Client(c) as client:
        pids = list(client.run(os.getpid).values())
        client.gather(client.map(compute_for, [1.0] * 50, pure=False))
        n = int(args.seconds * 1000 / args.task_ms * args.workers * args.threads)
        w0 = [procs.cpu_s(p) for p in pids]
        p0 = [thread_cpu(p, "zf-profiler") for p in pids]
        t0 = time.perf_counter()
        client.gather(client.map(compute_for, [args.task_ms] * n, pure=False))
        wall = time.perf_counter() - t0
        w1 = [procs.cpu_s(p) for p in pids]
        p1 = [thread_cpu(p, "zf-profiler") for p in pids]
    worker_s = sum(w1) - sum(w0)
    prof_s = sum(p1) - sum(p0)
    print(f"{n} tasks of {args.task_ms:g} ms on {args.workers} x {args.threads} threads in"
          f" {wall:.1f} s: workers {worker_s:.2f} CPU s, profiler {prof_s:.3f} CPU s ="
          f" {prof_s / max(worker_s, 1e-9) * 100:.2f} % of the workers' CPU,"
          f" {prof_s / n * 1e6:.1f} µs per task")


if __name__ == "__main__":
    main()
