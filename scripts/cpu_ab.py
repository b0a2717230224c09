"""CPU time per no-op task of the scheduler and the client, two builds alternating (A/B).

Wall-clock rates on a shared machine drift by tens of percent between runs; the CPU time a
process spends per task drifts much less, and alternating the builds within one invocation
cancels slow trends. Each run starts a scheduler and two one-thread workers from one source
tree (as processes, through the ``zfabric`` command), maps a no-op over N items from a client
process of the same tree, and reads both processes' CPU times with psutil.

    python scripts/cpu_ab.py --a /tmp/zfabric-before --b . --runs 5 --tasks 20000

``git worktree add /tmp/zfabric-before <commit>`` makes the other tree.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLIENT = r"""
import json, sys, time, psutil
from zfabric import Client

def noop(x):
    return None

address, n, sched_pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sched = psutil.Process(sched_pid)
me = psutil.Process()
with Client(address, set_as_default=False) as c:
    c.wait_for_workers(2, timeout=30)
    c.gather(c.map(noop, range(2000), pure=False))  # warm up: functions, slots, durations
    s0, m0, t0 = sum(sched.cpu_times()[:2]), sum(me.cpu_times()[:2]), time.perf_counter()
    futures = c.map(noop, range(n), pure=False)
    c.gather(futures)
    wall = time.perf_counter() - t0
    s1, m1 = sum(sched.cpu_times()[:2]), sum(me.cpu_times()[:2])
print(json.dumps({"scheduler_us": (s1 - s0) / n * 1e6, "client_us": (m1 - m0) / n * 1e6,
                  "tasks_per_s": n / wall}))
"""


def run_once(tree: Path, tasks: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    cli = [sys.executable, "-m", "zfabric"]
    with tempfile.TemporaryDirectory() as tmp:
        sfile = Path(tmp) / "scheduler.json"
        procs = [subprocess.Popen([*cli, "scheduler", "--port", "0", "--host", "127.0.0.1",
                                   "--scheduler-file", str(sfile)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)]
        try:
            deadline = time.monotonic() + 20
            while not sfile.exists():
                if time.monotonic() > deadline:
                    raise RuntimeError("the scheduler did not start")
                time.sleep(0.05)
            time.sleep(0.05)
            address = json.loads(sfile.read_text())["address"]
            for _ in range(2):
                procs.append(subprocess.Popen(
                    [*cli, "worker", address, "--nthreads", "1"], env=env,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    start_new_session=True))
            out = subprocess.run([sys.executable, "-c", CLIENT, address, str(tasks),
                                  str(procs[0].pid)], env=env, capture_output=True, text=True,
                                 timeout=300)
            if out.returncode != 0:
                raise RuntimeError(out.stderr[-2000:])
            return json.loads(out.stdout.strip().splitlines()[-1])
        finally:
            for p in procs:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", type=Path, required=True, help="source tree of build A (before)")
    ap.add_argument("--b", type=Path, default=Path("."), help="source tree of build B (after)")
    ap.add_argument("--runs", type=int, default=5, help="runs of each build (alternating)")
    ap.add_argument("--tasks", type=int, default=20000, help="no-op tasks per run")
    args = ap.parse_args()
    trees = {"A": args.a.resolve(), "B": args.b.resolve()}
    results: dict[str, list[dict]] = {"A": [], "B": []}
    for i in range(args.runs):
        for name in ("A", "B") if i % 2 == 0 else ("B", "A"):
            r = run_once(trees[name], args.tasks)
            results[name].append(r)
            print(f"run {i + 1} {name}: scheduler {r['scheduler_us']:.1f} us/task, client"
                  f" {r['client_us']:.1f} us/task, {r['tasks_per_s']:,.0f} tasks/s", flush=True)
    print()
    med = {}
    for name in ("A", "B"):
        med[name] = {k: statistics.median(r[k] for r in results[name])
                     for k in ("scheduler_us", "client_us", "tasks_per_s")}
        print(f"median {name} ({trees[name]}): scheduler {med[name]['scheduler_us']:.1f} us,"
              f" client {med[name]['client_us']:.1f} us, {med[name]['tasks_per_s']:,.0f}"
              " tasks/s")
    for k in ("scheduler_us", "client_us"):
        change = (med["B"][k] / med["A"][k] - 1) * 100
        print(f"{k}: B vs A {change:+.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
