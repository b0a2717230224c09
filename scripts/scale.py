#!/usr/bin/env python
"""Scale with real processes: one scheduler, N single-thread worker processes, one blocking
client, as a user would run them; zfabric and (``--dask``) dask.distributed alike.

For each N (``--workers``), with a fresh scheduler (``zfabric scheduler`` or ``dask
scheduler``, dashboard off unless ``--dashboard``) and N ``worker ADDRESS --nthreads 1``
processes (dask's with ``--no-nanny``, as zfabric's worker command has none):

* no-op: ``gather(map(noop, range(T)))``, T = ``--tasks`` (10,000): the scheduler process's
  CPU µs per task and tasks/s;
* idle: the scheduler's CPU over ``--idle-s`` (10 s) with the N workers idle, % of one core;
* 20 tasks x 10 ms per worker (``--slow-per-worker``, ``--slow-ms``): efficiency = ideal
  (20 x 10 ms) / seconds from the first submit to the last result;
* the scheduler's RSS at the end.

    python scripts/scale.py --workers 16 128
    python scripts/scale.py --workers 16 128 512 1000 --dask --budget-s 520   # 16 cores, < 9 min

Starting many processes: the open files limit is raised to the hard limit (the scheduler
inherits it); workers start in batches (``--batch``), with at most two batches starting at
once; registration is awaited with a timeout. ``--budget-s`` bounds the whole run: every wait
is cut to the time left (minus a reserve to stop the processes), what could not be measured is
reported as such, and the remaining sizes are skipped. Every process started here is stopped at
the end, also on Ctrl-C, SIGTERM or an error (by process group, then by a marker in their
environment).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# procs.py beside us, and the zfabric of this checkout (its processes run that one too)
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import procs  # noqa: E402

MARKER = "ZFABRIC_SCALE_RUN"


def noop(x: Any) -> None:
    return None


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


class OutOfBudget(Exception):
    """The run's time budget is spent."""


class Budget:
    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self, reserve: float = 0.0) -> float:
        if self.end is None:
            return float("inf")
        return self.end - reserve - time.monotonic()

    def cut(self, timeout: float, reserve: float) -> float:
        """``timeout`` cut to what is left; OutOfBudget when nothing is."""
        left = self.left(reserve)
        if left <= 0:
            raise OutOfBudget
        return min(timeout, left)


class Impl:
    name = "zfabric"

    def api(self) -> Any:
        import zfabric

        return zfabric

    def scheduler_cmd(self, dashboard: bool) -> list[str]:
        return [sys.executable, "-m", "zfabric", "scheduler", "--host", "127.0.0.1", "--port",
                "0", *([] if dashboard else ["--no-dashboard"])]

    def worker_cmd(self, address: str) -> list[str]:
        return [sys.executable, "-m", "zfabric", "worker", address, "--nthreads", "1",
                "--death-timeout", "30"]

    def n_workers(self, client: Any) -> int:
        info = client.scheduler_info()
        return int(info.get("n_workers", len(info["workers"])))


class DaskImpl(Impl):
    name = "dask"

    def api(self) -> Any:
        import distributed

        return distributed

    def scheduler_cmd(self, dashboard: bool) -> list[str]:
        return [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                "--port", "0", *(["--dashboard-address", "127.0.0.1:0"] if dashboard
                                 else ["--no-dashboard"])]

    def worker_cmd(self, address: str) -> list[str]:
        return [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                "--no-nanny", "--no-dashboard", "--host", "127.0.0.1", "--death-timeout", "30"]

    def n_workers(self, client: Any) -> int:
        return int(client.run_on_scheduler(_dask_count))


def _dask_count(dask_scheduler: Any = None) -> int:
    return len(dask_scheduler.workers)


def reserve_for(n: int) -> float:
    """Seconds kept back to stop n workers and a scheduler."""
    return 15.0 + 0.02 * n


def start_workers(impl: Impl, client: Any, address: str, n: int, env: dict[str, str],
                  workdir: Path, batch: int, timeout: float, started: list) -> int:
    """Start ``n`` workers, ``batch`` at a time with at most two batches starting at once, and
    wait for all to register (at most ``timeout`` s); returns how many did."""
    deadline = time.monotonic() + timeout
    log = workdir / "workers.log"
    have = 0
    while len(started) < n:
        if time.monotonic() > deadline:
            return have
        for _ in range(min(batch, n - len(started))):
            started.append(procs.spawn(impl.worker_cmd(address), env, log))
        while len(started) - have > 2 * batch and time.monotonic() < deadline:
            time.sleep(0.1)
            have = impl.n_workers(client)
    while time.monotonic() < deadline:
        have = impl.n_workers(client)
        if have >= n:
            break
        dead = sum(1 for p in started if p.poll() is not None)
        if dead:
            raise RuntimeError(f"{dead} worker processes exited: {procs.tail(log, 1500)}")
        time.sleep(0.2)
    return have


def wait_all(api: Any, futures: list, timeout: float) -> bool:
    try:
        api.wait(futures, timeout=timeout)
    except TimeoutError:
        return False
    return all(f.done() for f in futures)


def run_n(impl: Impl, n: int, args: argparse.Namespace, budget: Budget, marker: str) -> dict:
    api = impl.api()
    env = procs.env_for_zfabric()
    env[MARKER] = marker
    reserve = reserve_for(n)
    out: dict[str, Any] = {"impl": impl.name, "workers": n}
    started: list = []
    sched = None
    with procs.workdir("zfabric-scale-") as tmp:
        try:
            sched = procs.Scheduler(env, Path(tmp), cmd=impl.scheduler_cmd(args.dashboard),
                                    timeout=budget.cut(60, reserve))
            # the default client: dask's wait() looks for one
            with api.Client(sched.address, timeout=budget.cut(60, reserve)) as client:
                t0 = time.monotonic()
                start_timeout = budget.cut(args.start_timeout or 60 + 0.3 * n, reserve)
                have = start_workers(impl, client, sched.address, n, env, Path(tmp),
                                     args.batch, start_timeout, started)
                out["start_s"] = time.monotonic() - t0
                if have < n:
                    out["error"] = (f"{have}/{n} workers registered in {start_timeout:.0f} s"
                                    + (" (budget)" if budget.left(reserve) <= 0 else ""))
                    return out
                # warm-up: each worker gets the function, a few tasks
                warm = client.map(noop, range(max(2 * n, 500)), pure=False)
                wait_all(api, warm, budget.cut(120, reserve))
                del warm

                # no-op
                c0, t0 = sched.cpu_s(), time.perf_counter()
                futures = client.map(noop, range(args.tasks), pure=False)
                done = wait_all(api, futures, budget.cut(args.phase_timeout, reserve))
                wall, c1 = time.perf_counter() - t0, sched.cpu_s()
                if not done:
                    out["error"] = f"no-op: {sum(f.done() for f in futures)}/{args.tasks} done"
                    return out
                client.gather(futures)
                del futures
                out["sched_us_per_task"] = (c1 - c0) / args.tasks * 1e6
                out["tasks_per_s"] = args.tasks / wall

                # idle
                time.sleep(min(1.0, budget.cut(1.0, reserve)))
                idle = budget.cut(args.idle_s, reserve)
                c0, t0 = sched.cpu_s(), time.monotonic()
                time.sleep(idle)
                out["idle_cpu_pct"] = (sched.cpu_s() - c0) / (time.monotonic() - t0) * 100
                if idle < args.idle_s:
                    out["idle_window_s"] = idle

                # 20 x 10 ms per worker
                total, seconds = args.slow_per_worker * n, args.slow_ms / 1e3
                ideal = args.slow_per_worker * seconds
                t0 = time.perf_counter()
                futures = client.map(nap, [seconds] * total, pure=False)
                done = wait_all(api, futures, budget.cut(args.phase_timeout, reserve))
                wall = time.perf_counter() - t0
                if done:
                    out["slow_s"], out["efficiency"] = wall, ideal / wall
                else:
                    out["efficiency_below"] = ideal / wall
                    out["error"] = (f"slow: {sum(f.done() for f in futures)}/{total} done in"
                                    f" {wall:.0f} s")
                del futures
                out["sched_rss_mb"] = sched.rss_mb()
        except OutOfBudget:
            out["error"] = "time budget spent"
        except Exception as exc:  # reported in its row; the other sizes still run
            out["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        finally:
            t0 = time.monotonic()
            procs.stop(started, grace=min(10.0, max(1.0, budget.left(5))), sig=signal.SIGKILL)
            if sched is not None:
                procs.stop([sched.proc], grace=3)
            procs.kill_marked(MARKER, marker)
            out["stop_s"] = time.monotonic() - t0
    return out


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value)


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    slow = f"{args.slow_per_worker}x{args.slow_ms:g}ms ideal/actual"
    cols = [("impl", "impl"), ("workers", "workers"), ("sched CPU µs/no-op", "sched_us_per_task"),
            ("no-op tasks/s", "tasks_per_s"), ("idle sched CPU %", "idle_cpu_pct"),
            (slow, "efficiency"), ("sched RSS MB", "sched_rss_mb"), ("start s", "start_s")]
    widths = [max(len(h), 8) for h, _ in cols]
    print("  ".join(h.rjust(w) for (h, _), w in zip(cols, widths, strict=True)))
    for r in rows:
        cells = []
        for (_, key), w in zip(cols, widths, strict=True):
            v = r.get(key)
            if key == "efficiency" and v is None and "efficiency_below" in r:
                cells.append(f"<{r['efficiency_below']:.2g}".rjust(w))
            else:
                cells.append(fmt(v).rjust(w))
        print("  ".join(cells))
    for r in rows:
        if "error" in r:
            print(f"{r['impl']} {r['workers']}: {r['error']}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--tasks", type=int, default=10_000, help="no-op tasks (10,000)")
    ap.add_argument("--idle-s", type=float, default=10.0)
    ap.add_argument("--slow-per-worker", type=int, default=20)
    ap.add_argument("--slow-ms", type=float, default=10.0)
    ap.add_argument("--batch", type=int, default=32, help="workers started at once (32)")
    ap.add_argument("--start-timeout", type=float,
                    help="seconds for all workers to register (default 60 + 0.3 per worker)")
    ap.add_argument("--phase-timeout", type=float, default=180.0)
    ap.add_argument("--budget-s", type=float, help="stop cleanly within this many seconds")
    ap.add_argument("--dask", action="store_true", help="also run dask.distributed")
    ap.add_argument("--dashboard", action="store_true", help="keep the dashboards on")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)
    budget = Budget(args.budget_s)
    procs.raise_on_sigterm()
    soft, hard = procs.raise_nofile()
    print(f"open files limit {soft} (hard {hard}); {os.cpu_count()} cores", file=sys.stderr)
    impls: list[Impl] = [Impl()]
    if args.dask:
        try:
            DaskImpl().api()
            impls.append(DaskImpl())
        except ImportError:
            print("dask.distributed is not installed; zfabric only", file=sys.stderr)
    marker = uuid.uuid4().hex
    rows: list[dict] = []
    interrupted = False
    try:
        for n in args.workers:
            for impl in impls:
                if budget.left(reserve_for(n)) <= 10:
                    rows.append({"impl": impl.name, "workers": n,
                                 "error": "skipped: time budget spent"})
                    continue
                print(f"{impl.name}, {n} workers ...", file=sys.stderr, flush=True)
                row = run_n(impl, n, args, budget, marker)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, SIGTERM: what was measured, then out
        print("interrupted", file=sys.stderr)
        interrupted = True
    finally:
        with contextlib.suppress(Exception):
            procs.kill_marked(MARKER, marker)
    print_table(rows, args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    if interrupted:
        return 130
    return 0 if rows and all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
