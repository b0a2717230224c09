#!/usr/bin/env python
"""What the dashboard's feed costs the scheduler at scale, sans-IO: a real SchedulerState with
N fake workers (hello ops) and T tasks, and the deltas the scheduler's loop builds for the
dashboard (:meth:`Observer.delta`, four a second by default) merged as the dashboard's thread
merges them (:class:`zfabric.dashboard.view.View`).

For each (workers, tasks) it prints what one delta touched (workers looked at, rows rebuilt,
groups, task-stream entries: the counts tests/test_dashboard_scale.py holds) and its time:

* quiet: nothing changed since the last delta;
* busy: ``--finish`` tasks finished since the last delta (10 ms tasks on every worker thread
  finish about threads x 25 a quarter second);

and the share of one core the feed takes at ``--rate`` deltas a second (delta + merge).

    python scripts/dashboard_scale.py                       # 1,000 workers; 10k, 100k, 1M tasks
    python scripts/dashboard_scale.py --workers 2 1000 --tasks 10000 100000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zfabric import protocol
from zfabric.config import Config
from zfabric.dashboard.view import View
from zfabric.scheduler.feed import SCAN_WORKERS
from zfabric.scheduler.state import SchedulerState

C = b"client-1"


def build(nworkers: int, ntasks: int) -> tuple[SchedulerState, dict]:
    state = SchedulerState(address="tcp://sched:8786", config=Config())
    for i in range(nworkers):
        ident = f"w{i}".encode()
        state.handle(ident, [protocol.hello("worker", ident.decode(),
                                            address=f"tcp://10.{i >> 16}.{(i >> 8) & 255}."
                                                    f"{i & 255}:1000", nthreads=2)], 0.0)
    state.handle(C, [protocol.hello("client", "c")], 0.0)
    state.flush()
    running: dict = {}
    batch = 50_000
    for first in range(0, ntasks, batch):
        tasks = [[f"load-{i}", b"p", [], None] for i in range(first, min(ntasks, first + batch))]
        state.handle(C, [{"op": "submit", "tasks": tasks}], 1.0)
        for peer, ops in state.flush().items():
            for op in ops:
                if op["op"] == "compute":
                    running.setdefault(peer, []).extend(t[0] for t in op["tasks"])
    return state, running


def beat(state: SchedulerState, now: float) -> None:
    """Every worker heartbeats (no metrics: its row does not change), so none is silent."""
    for ident in list(state.workers):
        state.handle(ident, [{"op": "heartbeat"}], now)
    state.flush()


def finish(state: SchedulerState, running: dict, n: int, now: float) -> None:
    """``n`` tasks finish, spread over the workers; their new work is noted as running."""
    done = 0
    for peer in list(running):
        keys = running[peer]
        if not keys:
            continue
        take, running[peer] = keys[:2], keys[2:]
        state.handle(peer, [{"op": "finished", "tasks": [
            [k, 8, None, 0.01, now - 0.01, now, 7] for k in take]}], now)
        done += len(take)
        if done >= n:
            break
    for peer, ops in state.flush().items():
        for op in ops:
            if op["op"] == "compute":
                running.setdefault(peer, []).extend(t[0] for t in op["tasks"])


def measure(nworkers: int, ntasks: int, finished: int, rate: float, reps: int) -> dict:
    t0 = time.perf_counter()
    state, running = build(nworkers, ntasks)
    built_s = time.perf_counter() - t0
    obs = state.observe
    view = View()
    now = 2.0
    for _ in range(2 * nworkers // SCAN_WORKERS + 4):  # every worker seen, the round went round
        beat(state, now)
        state.tick(now)
        view.merge(obs.delta(state, now))
        now += 1 / rate
    out: dict = {"workers": nworkers, "tasks": ntasks, "build_s": built_s}
    for phase in ("quiet", "busy"):
        times, merges = [], []
        work: dict = {}
        for _ in range(reps):
            if phase == "busy":
                finish(state, running, finished, now)
            beat(state, now)
            state.tick(now)
            a = time.perf_counter()
            delta = obs.delta(state, now)
            b = time.perf_counter()
            view.merge(delta)
            c = time.perf_counter()
            times.append(b - a)
            merges.append(c - b)
            work = dict(obs.feed.work)
            now += 1 / rate
        per = statistics.median(times) + statistics.median(merges)
        out[phase] = {"delta_us": 1e6 * statistics.median(times),
                      "merge_us": 1e6 * statistics.median(merges),
                      "core_pct": 100 * per * rate, "work": work}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1000])
    ap.add_argument("--tasks", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--finish", type=int, default=500, help="tasks finished between busy deltas")
    ap.add_argument("--rate", type=float, default=4.0, help="deltas a second (4)")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    print(f"{'workers':>7} {'tasks':>9} | {'quiet µs':>8} {'%core':>6} {'looked':>6} {'rows':>4}"
          f" | {'busy µs':>8} {'%core':>6} {'looked':>6} {'rows':>4} {'groups':>6}"
          f" {'stream':>6}")
    for nworkers in args.workers:
        for ntasks in args.tasks:
            r = measure(nworkers, ntasks, args.finish, args.rate, args.reps)
            q, b = r["quiet"], r["busy"]
            print(f"{nworkers:>7} {ntasks:>9,} | {q['delta_us'] + q['merge_us']:>8.0f}"
                  f" {q['core_pct']:>6.2f} {q['work']['workers']:>6} {q['work']['worker_rows']:>4}"
                  f" | {b['delta_us'] + b['merge_us']:>8.0f} {b['core_pct']:>6.2f}"
                  f" {b['work']['workers']:>6} {b['work']['worker_rows']:>4}"
                  f" {b['work']['groups']:>6} {b['work']['stream']:>6}", flush=True)


if __name__ == "__main__":
    main()
