#!/usr/bin/env python
"""Two builds side by side in one run (A/B): rates, round trip, and the CPU time per task of
every process of the cluster, median of N alternating runs.

Wall-clock rates on a shared machine drift by tens of percent between runs; the CPU time a
process spends per task drifts much less, and alternating the builds within one invocation
cancels slow trends. Each run is a fresh child process (PYTHONPATH set to that build's checkout)
that starts a cluster in one of these shapes (``--modes``):

``client``
    ``Client()`` with no address: the LocalCluster it starts by itself, with its defaults (on
    a 2-core machine: 2 worker processes of 1 thread).
``local2x1``
    ``LocalCluster(n_workers=2, threads_per_worker=1)`` then ``Client(cluster)``.
``cli``
    a bare ``zfabric scheduler`` process and two ``zfabric worker --nthreads 1`` processes,
    and ``Client(address)``.

In both LocalCluster shapes the scheduler runs in the client's process, in threads of its
own (``zfabric-scheduler``, ``zfabric-dashboard``): their CPU time is counted as the
scheduler's and taken out of the client's (per-thread times; a build whose scheduler has no
such thread shows no scheduler figure and counts it in the client's; the nannies run in the
client process's loops and count as the client). The worker processes are the client's
descendants (LocalCluster) or the processes started for the run (cli). Every process's and
thread's CPU time is read just before and just after each measured phase. Rows:

* no-op tasks/s: ``gather(map(noop, range(N)))``, N = ``--tasks`` (20,000);
* tree reduction tasks/s: ``--leaves`` (8,192) leaves from ``map``, then pairwise
  ``submit(add, a, b)`` to one future; all 2L-1 tasks over the elapsed time;
* round trip p50: ``submit(inc, i).result()`` one at a time, ``--rtt`` (500) of them;
* CPU µs per no-op task (and per tree task) of the client, the scheduler, the workers summed,
  and all together.

    python scripts/cpu_ab.py --a /work/main --b . --runs 5
    python scripts/cpu_ab.py --a /tmp/before --b . --modes local2x1 --tasks 5000 --runs 3

``git worktree add /tmp/before <commit>`` makes the other tree. Either tree only needs
``zfabric`` importable from its root. Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

MARKER_ENV = "ZFABRIC_CPU_AB_RUN"  # every process of this invocation carries it
MODES = ("client", "local2x1", "cli")

# The child: runs with the build's checkout first on PYTHONPATH; prints one JSON line.
DRIVER = r'''
import json, os, statistics, subprocess, sys, tempfile, threading, time
import psutil
import zfabric
from zfabric import Client

def noop(x):
    return None

def inc(x):
    return x + 1

def identity(x):
    return x

def add(a, b):
    return a + b

cfg = json.loads(sys.argv[1])
mode = cfg["mode"]
me = psutil.Process()
procs = []       # started here (cli mode)
cluster = None

def _schedstat(path):
    with open(path) as f:
        return int(f.read().split()[0]) / 1e9

def cpu(p):
    """CPU seconds of a process: its live threads' run time in ns (/proc/PID/task/*/schedstat),
    or psutil's user + system (10 ms ticks) where that is missing."""
    try:
        tasks = os.listdir(f"/proc/{p.pid}/task")
    except OSError:
        tasks = None
    if tasks:
        total = 0.0
        for tid in tasks:
            try:
                total += _schedstat(f"/proc/{p.pid}/task/{tid}/schedstat")
            except (OSError, ValueError, IndexError):
                pass
        if total:
            return total
    try:
        t = p.cpu_times()
        return t.user + t.system
    except psutil.Error:
        return 0.0

def scheduler_threads():
    """Native ids of an in-process scheduler's threads (its loop and its dashboard's)."""
    return [t.native_id for t in threading.enumerate()
            if t.name.startswith(("zfabric-scheduler", "zfabric-dashboard"))]

def thread_cpu(native_id):
    try:
        return _schedstat(f"/proc/self/task/{native_id}/schedstat")
    except (OSError, ValueError, IndexError):
        for t in me.threads():
            if t.id == native_id:
                return t.user_time + t.system_time
    return 0.0

def start_cli():
    env = dict(os.environ)
    tmp = tempfile.mkdtemp(prefix="cpu-ab-")
    sfile = os.path.join(tmp, "scheduler.json")
    cli = [sys.executable, "-m", "zfabric"]
    out = open(os.path.join(tmp, "log"), "wb")
    procs.append(subprocess.Popen([*cli, "scheduler", "--port", "0", "--host", "127.0.0.1",
                                   "--scheduler-file", sfile], env=env, stdout=out,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
    deadline = time.monotonic() + 30
    address = None
    while address is None:
        if time.monotonic() > deadline or procs[0].poll() is not None:
            raise RuntimeError("the scheduler did not start: "
                               + open(os.path.join(tmp, "log"), errors="replace").read()[-2000:])
        try:
            address = json.load(open(sfile))["address"]
        except (OSError, ValueError, KeyError):
            time.sleep(0.05)
    for _ in range(2):
        procs.append(subprocess.Popen([*cli, "worker", address, "--nthreads", "1"], env=env,
                                      stdout=out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL))
    return address

class Meter:
    """CPU seconds of each kind of process, read before and after a phase."""

    def __init__(self):
        self.sched_tids = scheduler_threads()
        if mode == "cli":
            self.workers = []
            for p in procs[1:]:
                pp = psutil.Process(p.pid)
                self.workers += [pp, *pp.children(recursive=True)]
            self.scheduler = psutil.Process(procs[0].pid)
        else:
            self.scheduler = None
            self.workers = me.children(recursive=True)

    def read(self):
        client = cpu(me)
        sched = None
        if self.scheduler is not None:
            sched = cpu(self.scheduler)
        elif self.sched_tids:
            sched = sum(thread_cpu(t) for t in self.sched_tids)
            client -= sched
        return {"client": client, "scheduler": sched,
                "workers": sum(cpu(p) for p in self.workers)}

    def per_task(self, before, after, n):
        out = {}
        for k in before:
            if before[k] is None:
                out[k] = None
            else:
                out[k] = (after[k] - before[k]) / n * 1e6
        out["total"] = sum(v for v in out.values() if v is not None)
        return out

try:
    if mode == "client":
        client = Client(set_as_default=False)
        expected = getattr(getattr(client, "cluster", None), "n_workers", None) or 1
    elif mode == "local2x1":
        cluster = zfabric.LocalCluster(n_workers=2, threads_per_worker=1)
        client = Client(cluster, set_as_default=False)
        expected = 2
    else:
        client = Client(start_cli(), set_as_default=False)
        expected = 2
    with client:
        client.wait_for_workers(expected, timeout=60)
        info = client.scheduler_info()
        workers = info.get("n_workers", len(info["workers"]))
        meter = Meter()
        client.gather(client.map(noop, range(cfg["warmup"]), pure=False))
        for i in range(20):
            client.submit(inc, i, pure=False).result()
        result = {"workers": workers, "version": getattr(zfabric, "__version__", "?"),
                  "file": zfabric.__file__}

        n = cfg["tasks"]
        b, t0 = meter.read(), time.perf_counter()
        got = client.gather(client.map(noop, range(n), pure=False))
        wall = time.perf_counter() - t0
        assert len(got) == n
        result["noop_tasks_per_s"] = n / wall
        result["noop_cpu_us"] = meter.per_task(b, meter.read(), n)

        leaves = cfg["leaves"]
        b, t0 = meter.read(), time.perf_counter()
        level = client.map(identity, range(leaves), pure=False)
        while len(level) > 1:
            nxt = [client.submit(add, level[i], level[i + 1], pure=False)
                   for i in range(0, len(level) - 1, 2)]
            if len(level) % 2:
                nxt.append(level[-1])
            level = nxt
        total = level[0].result()
        wall = time.perf_counter() - t0
        assert total == leaves * (leaves - 1) // 2, total
        del level, nxt
        result["tree_tasks_per_s"] = (2 * leaves - 1) / wall
        result["tree_cpu_us"] = meter.per_task(b, meter.read(), 2 * leaves - 1)

        samples = []
        for i in range(cfg["rtt"]):
            t0 = time.perf_counter()
            r = client.submit(inc, i, pure=False).result()
            samples.append((time.perf_counter() - t0) * 1e3)
            assert r == i + 1
        result["rtt_p50_ms"] = statistics.median(samples)
    print("@@cpu_ab " + json.dumps(result), flush=True)
finally:
    if cluster is not None:
        cluster.close()
    for p in procs[1:] + procs[:1]:
        p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
'''

#: (label, key in the child's result, unit, higher is better); a key "a.b" reads a nested one.
ROWS = [
    ("no-op tasks/s", "noop_tasks_per_s", "tasks/s", True),
    ("tree reduction tasks/s", "tree_tasks_per_s", "tasks/s", True),
    ("round trip p50", "rtt_p50_ms", "ms", False),
    ("no-op CPU: client", "noop_cpu_us.client", "µs/task", False),
    ("no-op CPU: scheduler", "noop_cpu_us.scheduler", "µs/task", False),
    ("no-op CPU: workers (sum)", "noop_cpu_us.workers", "µs/task", False),
    ("no-op CPU: all processes", "noop_cpu_us.total", "µs/task", False),
    ("tree CPU: client", "tree_cpu_us.client", "µs/task", False),
    ("tree CPU: scheduler", "tree_cpu_us.scheduler", "µs/task", False),
    ("tree CPU: workers (sum)", "tree_cpu_us.workers", "µs/task", False),
    ("tree CPU: all processes", "tree_cpu_us.total", "µs/task", False),
]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def pick(result: dict, key: str) -> float | None:
    value: Any = result
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value if isinstance(value, int | float) else None


def kill_marked(marker: str) -> None:
    """Kill whatever process of this invocation is still alive (an overrun child's cluster)."""
    import psutil

    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get(MARKER_ENV) == marker:
                proc.kill()
        except (psutil.Error, OSError):
            continue


def run_once(tree: Path, mode: str, cfg: dict, timeout: float, marker: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), **{MARKER_ENV: marker})
    env.pop("ZFABRIC_SECURITY", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, json.dumps({**cfg, "mode": mode})], env=env,
        cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise RuntimeError(f"no result in {timeout:.0f} s") from None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        kill_marked(marker)
    for line in out.splitlines():
        if line.startswith("@@cpu_ab "):
            return json.loads(line.removeprefix("@@cpu_ab "))
    raise RuntimeError(f"exit code {proc.returncode}: {err.strip()[-1500:]}")


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def median(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def print_table(mode: str, trees: dict[str, Path], results: dict[str, list[dict]]) -> None:
    na, nb = len(results["A"]), len(results["B"])
    workers = {r.get("workers") for rs in results.values() for r in rs}
    print(f"\n{mode}: {', '.join(f'{w} workers' for w in sorted(workers, key=str))};"
          f" medians of {na} (A) and {nb} (B) runs, alternating")
    head = f"{'row':<26} {'unit':<8} {'A':>10} {'B':>10} {'b/a':>7}  {'A runs':<30} B runs"
    print(head)
    print("-" * len(head))
    for label, key, unit, _ in ROWS:
        a = [pick(r, key) for r in results["A"]]
        b = [pick(r, key) for r in results["B"]]
        ma, mb = median(a), median(b)
        ratio = f"{mb / ma:.3f}" if ma and mb is not None else "-"
        runs_a = " ".join(fmt(v) for v in a)
        runs_b = " ".join(fmt(v) for v in b)
        print(f"{label:<26} {unit:<8} {fmt(ma):>10} {fmt(mb):>10} {ratio:>7}  {runs_a:<30}"
              f" {runs_b}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", type=Path, required=True, help="checkout of build A (before)")
    ap.add_argument("--b", type=Path, default=Path("."), help="checkout of build B (after)")
    ap.add_argument("--runs", type=int, default=5, help="runs of each build per mode")
    ap.add_argument("--modes", default=",".join(MODES),
                    help=f"comma-separated, of {', '.join(MODES)} (default: all)")
    ap.add_argument("--tasks", type=int, default=20_000, help="no-op tasks per run")
    ap.add_argument("--leaves", type=int, default=8_192, help="leaves of the tree reduction")
    ap.add_argument("--rtt", type=int, default=500, help="round trips per run")
    ap.add_argument("--warmup", type=int, default=2_000, help="untimed no-op tasks first")
    ap.add_argument("--timeout", type=float, default=300, help="seconds allowed per run")
    ap.add_argument("--json", type=Path, help="write every run's figures here")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if bad := [m for m in modes if m not in MODES]:
        ap.error(f"unknown mode(s) {bad}; choose from {', '.join(MODES)}")
    trees = {"A": args.a.resolve(), "B": args.b.resolve()}
    for name, tree in trees.items():
        if not (tree / "zfabric" / "__init__.py").exists():
            ap.error(f"--{name.lower()} {tree}: no zfabric/ package there")
    cfg = {"tasks": args.tasks, "leaves": args.leaves, "rtt": args.rtt, "warmup": args.warmup}
    marker = uuid.uuid4().hex
    every: dict[str, dict[str, list[dict]]] = {}
    failures = 0
    try:
        for mode in modes:
            results: dict[str, list[dict]] = {"A": [], "B": []}
            every[mode] = results
            for i in range(args.runs):
                for name in ("A", "B") if i % 2 == 0 else ("B", "A"):
                    try:
                        r = run_once(trees[name], mode, cfg, args.timeout, marker)
                    except RuntimeError as exc:
                        failures += 1
                        log(f"{mode} run {i + 1} {name}: failed: {exc}")
                        continue
                    results[name].append(r)
                    cpu = r["noop_cpu_us"]
                    log(f"{mode} run {i + 1} {name}: {r['noop_tasks_per_s']:,.0f} no-op/s,"
                        f" tree {r['tree_tasks_per_s']:,.0f}/s, rtt {r['rtt_p50_ms']:.3f} ms;"
                        f" µs/no-op: client {fmt(cpu['client'])}, scheduler"
                        f" {fmt(cpu['scheduler'])}, workers {fmt(cpu['workers'])}")
    except KeyboardInterrupt:
        log("interrupted")
    finally:
        kill_marked(marker)
    print(f"A = {trees['A']}\nB = {trees['B']}")
    for mode, results in every.items():
        print_table(mode, trees, results)
    print("\nb/a above 1 is B higher (better for tasks/s, worse for ms and µs)."
          " CPU times: the threads' run times from /proc/PID/task/*/schedstat (ns),"
          " psutil's 10 ms ticks where that is missing.")
    if args.json:
        args.json.write_text(json.dumps({"trees": {k: str(v) for k, v in trees.items()},
                                         "config": cfg, "runs": every}, indent=1) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
