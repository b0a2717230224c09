#!/usr/bin/env python
"""Scheduler and client memory under a flood of submissions (issue 14's bounded window).

    python scripts/submit_flood.py 1000000 [--window N] [--gate]

Starts a scheduler and one worker (1 thread) as processes, then ``client.map`` of N tiny tasks.
With ``--gate`` every task depends on one task that waits, so nothing finishes while memory is
measured (the scheduler holds at most the window of them, the client holds the rest);
without, the tasks run and their futures stay held. Prints the scheduler's RSS and the
client's RSS growth per Future (psutil), as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from zfabric import Client, wait
from zfabric.config import from_env


def first(x, gate=None):
    return x


def nap(path):
    while not os.path.exists(path):
        time.sleep(0.05)
    return 0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("n", type=int)
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--gate", action="store_true")
    args = p.parse_args()
    here = tempfile.mkdtemp(prefix="zfabric-flood-")
    sf = os.path.join(here, "scheduler.json")
    cmd = [sys.executable, "-m", "zfabric"]
    out = subprocess.DEVNULL
    sched = subprocess.Popen([*cmd, "scheduler", "--port", "0", "--host", "127.0.0.1",
                              "--scheduler-file", sf], stdout=out, stderr=out)
    worker = None
    try:
        while not (os.path.exists(sf) and Path(sf).read_text().strip()):
            time.sleep(0.05)
        addr = json.loads(Path(sf).read_text())["address"]
        worker = subprocess.Popen([*cmd, "worker", addr, "--nthreads", "1", "--memory-limit",
                                   "0"], stdout=out, stderr=out)
        cfg = from_env(SUBMIT_WINDOW_TASKS=args.window)
        with Client(addr, config=cfg) as c:
            c.wait_for_workers(1, timeout=30)
            assert c.submit(first, 1).result() == 1
            sp, me = psutil.Process(sched.pid), psutil.Process()
            gc.collect()
            time.sleep(0.5)
            s0, c0 = sp.memory_info().rss, me.memory_info().rss
            flag = os.path.join(here, "flag")
            gate = c.submit(nap, flag, pure=False) if args.gate else None
            start = time.time()
            if gate is not None:
                futures = c.map(first, range(args.n), gate=gate, pure=False)
            else:
                futures = c.map(first, range(args.n), pure=False)
            mapped = time.time() - start
            if gate is None:
                wait(futures)
            else:
                target = min(args.n, cfg.SUBMIT_WINDOW_TASKS)
                while sum(c.scheduler_info()["tasks"].values()) < target:
                    time.sleep(1.0)
            time.sleep(1.0)
            gc.collect()
            s1, c1 = sp.memory_info().rss, me.memory_info().rss
            tasks = c.scheduler_info()["tasks"]
            print(json.dumps({
                "n": args.n, "window": cfg.SUBMIT_WINDOW_TASKS, "gate": args.gate,
                "map_s": round(mapped, 1), "scheduler_rss_mb": round(s1 / 2**20),
                "scheduler_growth_mb": round((s1 - s0) / 2**20),
                "client_bytes_per_future": round((c1 - c0) / args.n),
                "scheduler_tasks": tasks}), flush=True)
    finally:
        for proc in (worker, sched):
            if proc is not None:
                proc.kill()
                proc.wait(10)


if __name__ == "__main__":
    main()
