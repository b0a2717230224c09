#!/usr/bin/env python
"""Benchmark zfabric against dask.distributed on the same small cluster.

Both implementations run the *same* benchmark functions; each one is plugged in
through a small adapter (``Impl``) that knows how to import its client API and
how to start its scheduler and worker processes.  A missing or broken
implementation shows ``n/a`` in its column instead of stopping the run.

Rows
----
rtt_p50_ms
    One tiny task round trip: ``await client.submit(inc, i, pure=False)``,
    sequentially, 300 timed iterations after 20 warm-up ones.  p50 in ms.
actor_call_p50_ms
    A blocking client (``Client(address)``, in a thread of the benchmarking
    process) makes a ``Counter`` actor, then 200 warm-up and 2,000 timed
    sequential ``counter.incr().result()`` calls; p50 in ms.  The same client's
    tiny-task round trip p50 (1,000 ``submit(inc).result()``) is in the JSON as
    ``blocking_task_rtt_p50_ms``, with ``ratio_to_task_rtt``.
noop_tasks_per_s
    ``client.map(noop, range(N), pure=False)`` then ``gather``; tasks per second.
    N = 20,000 for zfabric and 2,000 for dask (dask is much slower per task).
tree_tasks_per_s
    Tree reduction with futures: L leaves from ``map(identity, range(L))``, then
    levels of pairwise ``submit(add, a, b)`` until one future remains, awaited.
    All 2L-1 tasks divided by the elapsed time.  L = 8,192 zfabric, 1,024 dask.
echo_mb_per_s
    A 100 MiB float64 array sent as the argument of a task that returns it; the
    result is gathered and checked for equality.  MB/s = 2 x 100 / seconds.
    Steady state: two untimed echoes of the same size come first (one per worker),
    for every implementation; the first one's rate is kept in the JSON as
    ``first_echo_mb_per_s``.
localcluster_first_result_s
    Seconds from ``LocalCluster(n_workers=2, threads_per_worker=1,
    processes=True)`` to the first ``Client(cluster).submit(inc, 1).result()``.
    Each repetition is a fresh Python process that imports the library before
    the clock starts, so import time is not counted; closing is not timed.
dask_array_sum_s, dask_xxT_mean_s, dask_groupby_mean_s, dask_persist_100k_s
    dask collections computed with the implementation's client
    (``await client.compute(x)``), wall time from the call to the result, each
    answer checked against dask's local threaded scheduler (not timed): (1)
    ``da.ones(10_000_000, chunks=1_000).sum()``; (2) ``(x + x.T).mean()`` with
    ``x = da.random.default_rng(42).random((4000, 4000), chunks=(250, 250))``;
    (3) groupby("name").x.mean() of ``dask.datasets.timeseries`` over 16 days
    at 500 ms (2.76 M rows, 16 partitions, shuffle method "tasks"); (4)
    ``client.persist(da.ones(100_000, chunks=1).map_blocks(f))`` until every
    block is in memory (``wait``); the JSON keeps the client's own submit time
    as ``client_submit_s``.  A small untimed graph goes first (workers import
    dask on their first graph).
sched_bytes_per_task_pending / sched_bytes_per_task_done
    Growth of the scheduler process's RSS (psutil, whole process tree) divided
    by the number of tasks it holds: (pending) tasks that all depend on a
    "gate" task that sleeps for longer than the measurement, so they stay
    waiting; (done) finished tasks whose futures the client still holds.
    100,000 / 20,000 tasks for zfabric, 10,000 / 2,000 for dask.  A fresh
    cluster is started for every repetition of these two rows.
spill_mb_per_s
    Data larger than a worker's memory: ``LocalCluster(n_workers=1,
    threads_per_worker=1, memory_limit="400MB")`` at each library's default spill
    settings; 20 tasks each return a 50 MB array, held as futures (most of them
    must go to disk), then one task per array reads it back (its sum, checked).
    MB/s = (20 x 50 MB written + 20 x 50 MB read back) / seconds from the first
    submit to the last sum.  Same sizes for both (8 arrays with ``--quick``); a
    worker killed on the way fails the row.

Medians are over ``--repeat`` repetitions (default 3).  The "zfabric advantage"
column is always oriented so that a value above 1x means zfabric is better:
zfabric/dask for rates, dask/zfabric for times and bytes.

Cluster shape (identical for both implementations, every cluster row)
-------------------------------------------------------------------
* scheduler: its own subprocess, started through the CLI
  (``python -m zfabric scheduler --port 0 --scheduler-file F --host 127.0.0.1``
  or ``python -m distributed.cli.dask_scheduler --port 0 --scheduler-file F
  --host 127.0.0.1 --no-dashboard``); its address is read from F.  A separate
  process is the fair choice: neither scheduler shares a GIL or an event loop
  with the benchmarking client, it is how both are deployed, and it is what the
  memory rows need anyway (RSS measured by pid).
* workers: 2 subprocesses x 1 thread, ``python -m zfabric worker ADDR
  --nthreads 1`` or ``python -m distributed.cli.dask_worker ADDR --nthreads 1
  --no-nanny --no-dashboard --host 127.0.0.1``.
* client: ``Client(address, asynchronous=True)`` in the benchmarking process.
  Timing starts only after the scheduler reports both workers.

Each (implementation, row) pair runs in its own child Python process (this
same script, started with hidden ``--_child`` options), so a crash or hang in
one cannot take down the others: every wait has a timeout, the parent kills a
child that overruns its budget, and at the end every process started by this
run (found by a marker in its environment) is killed.  All traffic stays on the
loopback interface.

How to run
----------
    python scripts/bench.py                       # both implementations, full sizes
    python scripts/bench.py --quick --impl zfabric   # CI smoke test, < 1 minute
    python scripts/bench.py --only rtt_p50_ms,echo_mb_per_s --repeat 5
    python scripts/bench.py --json bench.json     # raw numbers and medians
    python scripts/bench.py --impl both --only move --repeat 3     # data-moving collections
    python scripts/bench.py --impl both --curve --tls --only echo_tcp_mb_per_s --repeat 3

``--quick`` uses small sizes (2,000 no-ops, 1,024 leaves, 10 MiB echo, 10,000
pending / 2,000 done tasks for zfabric), one repetition and 30 s timeouts.  It
runs zfabric only unless ``--impl dask`` is asked for explicitly (dask alone
needs 40-50 s even with its tiny quick sizes).

The table goes to stdout, progress to stderr.  Exit status is 0 when every
selected row of every available implementation produced a number, 1 otherwise
(dask.distributed not being installed is only a note, not a failure).

Layout
------
This file is the runner (command line, then the table). The rows live in
``scripts/benchmarks/``, one module per family (roundtrip, actors, tasks, data, startup,
memory, dask_collections, data_moving, spill), with one shared run loop in ``benchmarks/runner.py``
(a child process per row, repetitions, medians, the side-by-side table and the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks package beside us

from benchmarks.cluster import kill_marked_processes
from benchmarks.common import REPO_ROOT, RUN_MARKER_ENV, log
from benchmarks.dashboard import print_dashboard_cost, run_dashboard_cost
from benchmarks.impls import IMPLS
from benchmarks.rows import ROW_ALIASES, ROWS
from benchmarks.runner import Results, child_main, json_report, print_table, run_all


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark zfabric against dask.distributed (see the module docstring)."
    )
    parser.add_argument("--impl", choices=["zfabric", "dask", "zfabric-curve", "both"],
                        default="both")
    parser.add_argument(
        "--only", metavar="ROW[,ROW]", help=f"rows to run: {', '.join([*ROWS, *ROW_ALIASES])}"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        help="repetitions per row; the median is reported (default 3, quick 1)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes, one repetition, zfabric only unless --impl dask: "
        "a smoke test under a minute",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        help="seconds allowed for cluster start-up and for each measurement "
        "(default 120, quick 30)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write raw numbers here")
    parser.add_argument(
        "--curve",
        action="store_true",
        help="also run zfabric with CurveZMQ security on every socket (keys from `zfabric"
        " keygen` in a temporary directory), in a column of its own",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="also run dask.distributed with TLS on every connection (temporary"
        " certificates), in a column of its own (for the echo rows)",
    )
    parser.add_argument(
        "--dashboard-cost",
        type=int,
        default=0,
        metavar="N",
        help="also run the no-op and round-trip rows N times with the dashboard off and on"
        " (one live-stream reader), alternating, and report every run (N >= 5 for the record)",
    )
    parser.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--_sizes", help=argparse.SUPPRESS)
    parser.add_argument("--_rep-label", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.timeout is None:
        args.timeout = 30.0 if args.quick else 120.0
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.only:
        names: list[str] = []
        for name in filter(None, (part.strip() for part in args.only.split(","))):
            if name in ROW_ALIASES:
                names.extend(ROW_ALIASES[name])
            elif name in ROWS:
                names.append(name)
            else:
                parser.error(f"unknown row {name!r}; choose from {', '.join(ROWS)}")
        args.rows = [ROWS[name] for name in dict.fromkeys(names)]
    else:
        args.rows = list(ROWS.values())
    return args


def raise_system_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, raise_system_exit)  # so finally blocks clean up
    if args._child:
        return child_main(args)

    sys.path.insert(0, str(REPO_ROOT))  # so the in-tree zfabric is found
    marker = uuid.uuid4().hex
    os.environ[RUN_MARKER_ENV] = marker  # inherited by everything started from here
    notes: list[str] = []
    impls = [IMPLS["zfabric"], IMPLS["dask"]] if args.impl == "both" else [IMPLS[args.impl]]
    if args.quick and args.impl == "both":
        impls = [IMPLS["zfabric"]]
        notes.append("--quick skips dask.distributed unless --impl dask is given (40-50 s alone)")
    if args.curve and IMPLS["zfabric-curve"] not in impls:
        impls.insert(1, IMPLS["zfabric-curve"])
    if args.tls:
        impls.append(IMPLS["dask-tls"])

    started = time.monotonic()
    interrupted = False
    results: Results = {}
    cost: dict[str, list[dict]] = {}
    try:
        run_all(args, impls, marker, notes, results)
        if args.dashboard_cost:
            cost = run_dashboard_cost(args, marker)
    except KeyboardInterrupt:
        interrupted = True
        notes.append("interrupted")
    finally:
        kill_marked_processes(marker)
    elapsed = time.monotonic() - started

    failures = [(key, r.error) for key, r in results.items() if r.error]
    notes.extend(f"{impl}/{row}: {error.splitlines()[0]}" for (impl, row), error in failures)
    notes.append(f"repeat={args.repeat}, quick={args.quick}, total {elapsed:.1f}s")
    print_table(args.rows, results, notes)
    if cost:
        print_dashboard_cost(cost)
        failures += [(("zfabric+dashboard", name), e["error"]) for name, entries in cost.items()
                     for e in entries if "error" in e]
    if args.json:
        report = json_report(args, impls, results, elapsed)
        if cost:
            report["dashboard_cost"] = cost
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {args.json}")
    if interrupted:
        return 130
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
