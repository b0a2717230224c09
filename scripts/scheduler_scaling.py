"""How the scheduler's cost per task grows with the number of tasks it already holds.

Drives the sans-IO core (``SchedulerState``) directly, with no sockets, so that only the
scheduler's own work is timed. For each size N it first makes the scheduler hold N tasks
(pending behind a gate task that never finishes), then times a batch of 10,000 further tasks
through submit, dispatch to a worker, finish and release, and prints microseconds per task
for each phase. A flat scheduler shows the same figures at every N.

    python scripts/scheduler_scaling.py                  # N = 1,000, 100,000, 1,000,000
    python scripts/scheduler_scaling.py --sizes 1000 100000
"""

from __future__ import annotations

import argparse
import gc
import time

from zfabric import protocol, serialize
from zfabric.scheduler.state import SchedulerState

BATCH = 10_000


def inc(x):
    return x + 1


def run(held: int) -> dict[str, float]:
    s = SchedulerState(address="tcp://127.0.0.1:1")
    w, c = b"worker-1", b"client-1"
    s.handle(w, [protocol.hello("worker", "w1", address="tcp://127.0.0.1:2", nthreads=4)], 0.0)
    s.handle(c, [protocol.hello("client", "c1")], 0.0)
    fid, fbytes, args, _, _ = serialize.dumps_call(inc, (1,), {})
    functions = {fid: fbytes}
    gate = {"op": "submit", "tasks": [["gate", args, [], None, fid]], "functions": functions}
    s.handle(c, [gate], 0.0)
    for start in range(0, held, 10_000):
        tasks = [[f"held-{i}", args, ["gate"], None, fid]
                 for i in range(start, min(held, start + 10_000))]
        s.handle(c, [{"op": "submit", "tasks": tasks, "functions": functions}], 0.0)
    s.flush()
    gc.collect()
    keys = [f"timed-{i}" for i in range(BATCH)]

    t0 = time.perf_counter()
    for start in range(0, BATCH, 1000):
        tasks = [[k, args, [], None, fid] for k in keys[start : start + 1000]]
        s.handle(c, [{"op": "submit", "tasks": tasks, "functions": functions}], 1.0)
    out = s.flush()
    t1 = time.perf_counter()
    done = 0
    while done < BATCH:
        ran = [t[0] for op in out.get(w, ()) if op["op"] == "compute" for t in op["tasks"]]
        ran = [k for k in ran if k.startswith("timed-")]
        s.handle(w, [{"op": "finished", "tasks": [[k, 8, b"\x80\x05K\x02.", 1e-5] for k in ran]}],
                 2.0)
        done += len(ran)
        out = s.flush()
        if not ran:
            raise RuntimeError("the scheduler stopped dispatching")
    t2 = time.perf_counter()
    s.handle(c, [{"op": "release", "keys": keys}], 3.0)
    s.flush()
    t3 = time.perf_counter()
    assert len(s.tasks) == held + 1, len(s.tasks)
    return {
        "submit_us": (t1 - t0) / BATCH * 1e6,
        "run_us": (t2 - t1) / BATCH * 1e6,
        "release_us": (t3 - t2) / BATCH * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000, 1_000_000])
    parser.add_argument("--repeat", type=int, default=3)
    opts = parser.parse_args()
    print(f"{'tasks held':>12} {'submit us':>10} {'run us':>8} {'release us':>11} {'total us':>9}")
    for n in opts.sizes:
        runs = [run(n) for _ in range(opts.repeat)]
        best = {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in runs[0]}
        total = sum(best.values())
        print(f"{n:>12,} {best['submit_us']:>10.2f} {best['run_us']:>8.2f}"
              f" {best['release_us']:>11.2f} {total:>9.2f}")


if __name__ == "__main__":
    main()
