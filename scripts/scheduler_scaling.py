"""How the scheduler's cost per task grows with the number of tasks it already holds.

Drives the sans-IO core (``SchedulerState``) directly, with no sockets, so that only the
scheduler's own work is timed. For each size N it first makes the scheduler hold N tasks
(pending behind a gate task that never finishes), then times a batch of 10,000 further tasks
through submit, dispatch to a worker, finish and release, and prints microseconds per task
for each phase. A flat scheduler shows the same figures at every N.

    python scripts/scheduler_scaling.py                  # N = 1,000, 100,000, 1,000,000
    python scripts/scheduler_scaling.py --sizes 1000 100000

With ``--workers``, how the cost per task grows with the number of workers instead: N
single-thread workers that said hello, 10,000 no-op tasks submitted in batches of 1,000; each
round every worker reports everything it was given in one ``finished`` op, then the state
flushes. It prints the scheduler's CPU microseconds per task (median of ``--repeat`` runs);
a flat scheduler shows the same figure at every N.

    python scripts/scheduler_scaling.py --workers 2 16 128 512 1000
    python scripts/scheduler_scaling.py --workers 1000 --profile   # where the time goes
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


def run_workers(n: int, ntasks: int = BATCH, batch: int = 1000, prof=None) -> float:
    """Microseconds per task for ``ntasks`` no-op tasks on ``n`` single-thread workers
    (``prof``: a profiler to run over the timed part only)."""
    s = SchedulerState(address="tcp://127.0.0.1:1")
    c = b"client-1"
    workers = [f"worker-{i}".encode() for i in range(n)]
    for i, w in enumerate(workers):
        s.handle(w, [protocol.hello("worker", f"w{i}", address=f"tcp://127.0.0.1:{10000 + i}",
                                    nthreads=1)], 0.0)
    s.handle(c, [protocol.hello("client", "c1")], 0.0)
    s.flush()
    fid, fbytes, args, _, _ = serialize.dumps_call(inc, (1,), {})
    functions = {fid: fbytes}
    keys = [f"t-{i}" for i in range(ntasks)]
    gc.collect()
    clock = time.process_time  # CPU time: other processes on the machine do not count
    spent = 0.0  # in the state's own calls only, not in this driver's

    def state(method, *args):
        nonlocal spent
        t0 = clock()
        out = method(*args)
        spent += clock() - t0
        return out

    given: dict[bytes, list[str]] = {}
    done = 0
    now = 1.0

    def collect(out) -> None:
        for peer, ops in out.items():
            for op in ops:
                if op["op"] == "compute":
                    given.setdefault(peer, []).extend(t[0] for t in op["tasks"])

    if prof is not None:
        prof.enable()
    for start in range(0, ntasks, batch):
        tasks = [[k, args, [], None, fid] for k in keys[start : start + batch]]
        state(s.handle, c, [{"op": "submit", "tasks": tasks, "functions": functions}], now)
        collect(state(s.flush))
    while done < ntasks:
        if not given:
            raise RuntimeError("the scheduler stopped dispatching")
        rounds, given = given, {}
        for peer, ran in rounds.items():
            # as a worker reports: key, size, small value, duration, start, stop, thread
            op = {"op": "finished",
                  "tasks": [[k, 8, b"\x80\x05K\x02.", 1e-5, now, now + 1e-5, 1] for k in ran]}
            state(s.handle, peer, [op], now)
            done += len(ran)
        collect(state(s.flush))
    state(s.handle, c, [{"op": "release", "keys": keys}], now)
    state(s.flush)
    if prof is not None:
        prof.disable()
    assert not s.tasks, len(s.tasks)
    return spent / ntasks * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000, 1_000_000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="time 10,000 tasks on N single-thread workers, for each N")
    parser.add_argument("--profile", action="store_true",
                        help="with --workers: cProfile the last N, top 25 by own time")
    opts = parser.parse_args()
    if opts.workers:
        print(f"{'workers':>8} {'us/task':>8} {'x 1st':>6}")
        first = None
        for n in opts.workers:
            best = sorted(run_workers(n) for _ in range(opts.repeat))[opts.repeat // 2]
            first = first or best
            print(f"{n:>8,} {best:>8.2f} {best / first:>6.2f}", flush=True)
        if opts.profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            run_workers(opts.workers[-1], prof=prof)
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return
    print(f"{'tasks held':>12} {'submit us':>10} {'run us':>8} {'release us':>11} {'total us':>9}")
    for n in opts.sizes:
        runs = [run(n) for _ in range(opts.repeat)]
        best = {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in runs[0]}
        total = sum(best.values())
        print(f"{n:>12,} {best['submit_us']:>10.2f} {best['run_us']:>8.2f}"
              f" {best['release_us']:>11.2f} {total:>9.2f}")


if __name__ == "__main__":
    main()
