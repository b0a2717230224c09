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

``--quick`` uses small sizes (2,000 no-ops, 1,024 leaves, 10 MiB echo, 10,000
pending / 2,000 done tasks for zfabric), one repetition and 30 s timeouts.  It
runs zfabric only unless ``--impl dask`` is asked for explicitly (dask alone
needs 40-50 s even with its tiny quick sizes).

The table goes to stdout, progress to stderr.  Exit status is 0 when every
selected row of every available implementation produced a number, 1 otherwise
(dask.distributed not being installed is only a note, not a failure).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import inspect
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RUN_MARKER_ENV = "ZFABRIC_BENCH_RUN"  # set in every process this run starts
CHILD_LINE_PREFIX = "@@bench "  # child -> parent result lines on stdout
N_WORKERS = 2
CLIENT_CLOSE_TIMEOUT = 10.0
PROCESS_STOP_GRACE = 3.0


# ---------------------------------------------------------------------------
# Task functions.  They live in ``__main__`` so cloudpickle ships them by value;
# workers never need to import this script.
# ---------------------------------------------------------------------------


def inc(x: int) -> int:
    return x + 1


class Counter:
    """An actor for actor_call_p50_ms."""

    def __init__(self) -> None:
        self.n = 0

    def incr(self) -> int:
        self.n += 1
        return self.n

    def value(self) -> int:
        return self.n


def noop(x: Any) -> None:
    return None


def identity(x: Any) -> Any:
    return x


def add(a: Any, b: Any) -> Any:
    return a + b


def first(x: Any, gate: Any = None) -> Any:
    return x


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


class BenchError(Exception):
    """A benchmark produced a wrong result or could not measure."""


class SetupError(BenchError):
    """The cluster could not be started; later cluster rows are skipped."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise BenchError(message)


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def last_line(path: Path) -> str:
    lines = [line.strip() for line in tail(path, 50).splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def is_loopback(address: str) -> bool:
    """True for addresses that cannot leave this machine."""
    scheme, sep, rest = address.partition("://")
    if not sep:
        rest = scheme
    elif scheme in ("inproc", "ipc"):
        return True
    host = rest.rsplit(":", 1)[0] if ":" in rest else rest
    host = host.strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


# ---------------------------------------------------------------------------
# Implementation adapters
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Impl:
    """How to reach one implementation of the dask.distributed API."""

    name: str  # used on the command line and as the JSON key
    title: str  # column header
    package: str  # module exporting Client, LocalCluster, ...
    required: bool  # False: a missing install is a note, not a failure
    full_sizes: dict[str, int]
    quick_sizes: dict[str, int]

    def available(self) -> bool:
        try:
            return importlib.util.find_spec(self.package) is not None
        except (ImportError, ValueError):
            return False

    def api(self) -> Any:
        return importlib.import_module(self.package)

    def sizes(self, quick: bool) -> dict[str, int]:
        return dict(self.quick_sizes if quick else self.full_sizes)

    def env(self) -> dict[str, str]:
        """Environment for this implementation's child processes."""
        return dict(os.environ)

    def scheduler_cmd(self, scheduler_file: Path) -> list[str]:
        raise NotImplementedError

    def worker_cmd(self, address: str) -> list[str]:
        raise NotImplementedError

    def client_kwargs(self) -> dict[str, Any]:
        return {}

    def cluster_kwargs(self) -> dict[str, Any]:
        return {}

    async def worker_addresses(self, client: Any) -> list[str]:
        info = client.scheduler_info()
        if inspect.isawaitable(info):
            info = await info
        return list(info.get("workers", {}))


class ZfabricImpl(Impl):
    def _cli(self) -> list[str]:
        if importlib.util.find_spec("zfabric.__main__") is not None:
            return [sys.executable, "-m", "zfabric"]
        script = shutil.which(
            "zfabric", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        )
        if script is None:
            raise SetupError("neither `python -m zfabric` nor a `zfabric` command is available")
        return [script]

    def scheduler_cmd(self, scheduler_file: Path) -> list[str]:
        return [
            *self._cli(),
            "scheduler",
            "--port",
            "0",
            "--scheduler-file",
            str(scheduler_file),
            "--host",
            "127.0.0.1",
            *self.dashboard_args(),
        ]

    def dashboard_args(self) -> list[str]:
        return ["--no-dashboard"]  # as dask runs with --no-dashboard

    def worker_cmd(self, address: str) -> list[str]:
        return [*self._cli(), "worker", address, "--nthreads", "1"]

    def env(self) -> dict[str, str]:
        env = self._env()
        env.pop("ZFABRIC_SECURITY", None)  # plain zfabric: no keys, whatever we were given
        return env

    def _env(self) -> dict[str, str]:
        # Make the in-tree package importable without installing it.
        env = dict(os.environ)
        paths = [str(REPO_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        return env


_CURVE_KEYS: list[str] = []  # the key directory of this run (made once, in the parent)


class ZfabricCurveImpl(ZfabricImpl):
    """zfabric with CurveZMQ on every socket: the CLI processes read ZFABRIC_SECURITY, the
    client and LocalCluster are given the keys."""

    def env(self) -> dict[str, str]:
        env = self._env()
        keys = os.environ.get("ZFABRIC_SECURITY") or (_CURVE_KEYS[0] if _CURVE_KEYS else None)
        if keys is None:
            from zfabric.security import keygen

            keys = tempfile.mkdtemp(prefix="zfabric-bench-keys-")
            keygen(keys)
            _CURVE_KEYS.append(keys)
        env["ZFABRIC_SECURITY"] = keys
        return env

    def client_kwargs(self) -> dict[str, Any]:
        security = importlib.import_module("zfabric.security").Security
        return {"security": security(os.environ["ZFABRIC_SECURITY"])}

    def cluster_kwargs(self) -> dict[str, Any]:
        return {"security": True}


class ZfabricDashboardImpl(ZfabricImpl):
    """zfabric with its dashboard on and one live-stream reader (the dashboard-cost runs)."""

    def dashboard_args(self) -> list[str]:
        return ["--dashboard-address", "127.0.0.1:0"]


class DaskImpl(Impl):
    def scheduler_cmd(self, scheduler_file: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "distributed.cli.dask_scheduler",
            "--port",
            "0",
            "--scheduler-file",
            str(scheduler_file),
            "--host",
            "127.0.0.1",
            "--no-dashboard",
        ]

    def worker_cmd(self, address: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "distributed.cli.dask_worker",
            address,
            "--nthreads",
            "1",
            "--no-nanny",
            "--no-dashboard",
            "--host",
            "127.0.0.1",
        ]

    async def worker_addresses(self, client: Any) -> list[str]:
        # An asynchronous dask Client's scheduler_info() is a cache without
        # per-worker entries, so ask the scheduler directly.
        info = await client.scheduler.identity(n_workers=-1)
        return list(info["workers"])


# The dask-collection rows run the same sizes on both implementations (side by side).
DASK_FULL = dict(dask_sum_n=10_000_000, dask_xxt_n=4_000, dask_df_days=16,
                 dask_persist_n=100_000)
DASK_QUICK = dict(dask_sum_n=200_000, dask_xxt_n=1_000, dask_df_days=2, dask_persist_n=2_000)

IMPLS: dict[str, Impl] = {
    "zfabric": ZfabricImpl(
        name="zfabric",
        title="zfabric",
        package="zfabric",
        required=True,
        full_sizes=dict(
            rtt_warmup=20,
            rtt_iters=300,
            actor_warmup=200,
            actor_iters=2000,
            noop_tasks=20_000,
            tree_leaves=8_192,
            echo_mb=100,
            pending_tasks=100_000,
            done_tasks=20_000,
            **DASK_FULL,
            spill_tasks=20,
        ),
        quick_sizes=dict(
            rtt_warmup=10,
            rtt_iters=100,
            actor_warmup=50,
            actor_iters=300,
            noop_tasks=2_000,
            tree_leaves=1_024,
            echo_mb=10,
            pending_tasks=10_000,
            done_tasks=2_000,
            **DASK_QUICK,
            spill_tasks=8,
        ),
    ),
    "zfabric-curve": ZfabricCurveImpl(
        name="zfabric-curve",
        title="zfabric+CURVE",
        package="zfabric",
        required=True,
        full_sizes=dict(
            rtt_warmup=20,
            rtt_iters=300,
            noop_tasks=20_000,
            tree_leaves=8_192,
            echo_mb=100,
            pending_tasks=100_000,
            done_tasks=20_000,
        ),
        quick_sizes=dict(
            rtt_warmup=10,
            rtt_iters=100,
            noop_tasks=2_000,
            tree_leaves=1_024,
            echo_mb=10,
            pending_tasks=10_000,
            done_tasks=2_000,
        ),
    ),
    "dask": DaskImpl(
        name="dask",
        title="dask.distributed",
        package="distributed",
        required=False,
        full_sizes=dict(
            rtt_warmup=20,
            rtt_iters=300,
            actor_warmup=200,
            actor_iters=2000,
            noop_tasks=2_000,
            tree_leaves=1_024,
            echo_mb=100,
            pending_tasks=10_000,
            done_tasks=2_000,
            **DASK_FULL,
            spill_tasks=20,
        ),
        quick_sizes=dict(
            rtt_warmup=5,
            rtt_iters=50,
            actor_warmup=50,
            actor_iters=300,
            noop_tasks=500,
            tree_leaves=256,
            echo_mb=10,
            pending_tasks=2_000,
            done_tasks=500,
            **DASK_QUICK,
            spill_tasks=8,
        ),
    ),
}


#: Implementations that are no column of the table: the dashboard-cost runs.
EXTRA_IMPLS: dict[str, Impl] = {
    "zfabric+dashboard": ZfabricDashboardImpl(
        name="zfabric+dashboard",
        title="zfabric, dashboard on",
        package="zfabric",
        required=True,
        full_sizes=IMPLS["zfabric"].full_sizes,
        quick_sizes=IMPLS["zfabric"].quick_sizes,
    ),
}
#: Rows the dashboard-cost runs alternate (dashboard off, then on, each a fresh cluster).
DASHBOARD_COST_ROWS = ("noop_tasks_per_s", "rtt_p50_ms")


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------


def spawn(cmd: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own process group, output to ``log_path``."""
    with open(log_path, "wb") as out:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def signal_group(proc: subprocess.Popen[Any], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def stop_processes(procs: list[subprocess.Popen[Any]], grace: float = PROCESS_STOP_GRACE) -> None:
    """SIGTERM every process group, wait up to ``grace`` s, then SIGKILL."""
    for proc in procs:
        if proc.poll() is None:
            signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    for proc in procs:
        signal_group(proc, signal.SIGKILL)  # also stragglers whose leader already left
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1.0)


def kill_marked_processes(marker: str) -> int:
    """Kill every process whose environment carries this run's marker."""
    try:
        import psutil
    except ImportError:
        return 0
    killed = 0
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get(RUN_MARKER_ENV) == marker:
                proc.kill()
                killed += 1
        except (psutil.Error, OSError):
            continue
    return killed


def tree_rss(pid: int) -> int:
    """Resident memory of a process plus all of its descendants, in bytes."""
    import psutil

    root = psutil.Process(pid)
    total = root.memory_info().rss
    for child in root.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += child.memory_info().rss
    return total


# ---------------------------------------------------------------------------
# A running cluster: scheduler + 2 worker subprocesses + an async client
# ---------------------------------------------------------------------------


@dataclass
class Cluster:
    api: Any
    client: Any
    scheduler_pid: int
    sizes: dict[str, int]
    timeout: float


async def read_scheduler_address(
    path: Path, proc: subprocess.Popen[Any], log_path: Path, deadline: float
) -> str:
    while True:
        if path.exists():
            try:
                address = json.loads(path.read_text()).get("address")
            except (OSError, ValueError):
                address = None  # still being written
            if address:
                return str(address)
        if proc.poll() is not None:
            raise SetupError(f"scheduler exited with code {proc.returncode}: {last_line(log_path)}")
        if time.monotonic() > deadline:
            raise SetupError(
                f"scheduler wrote no address to {path.name} in time; "
                f"last output: {last_line(log_path)}"
            )
        await asyncio.sleep(0.05)


async def start_client(client: Any) -> None:
    await client  # a dask-style Client connects when awaited


async def close_client(client: Any) -> None:
    closing = client.close()
    if inspect.isawaitable(closing):
        await closing


@contextlib.asynccontextmanager
async def running_cluster(impl: Impl, sizes: dict[str, int], timeout: float):
    api = impl.api()
    env = impl.env()
    procs: list[subprocess.Popen[Any]] = []
    logs: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="zfabric-bench-") as tmp:
        workdir = Path(tmp)
        deadline = time.monotonic() + timeout

        def check_alive() -> None:
            for proc, path in zip(procs, logs, strict=True):
                if proc.poll() is not None:
                    raise SetupError(
                        f"{path.stem} exited with code {proc.returncode}: {last_line(path)}"
                    )

        def dump_logs() -> None:
            for path in logs:
                log(f"--- last lines of {path.stem} log ({impl.name}) ---\n{tail(path)}")

        client = None
        try:
            sched_file = workdir / "scheduler.json"
            logs.append(workdir / "scheduler.log")
            procs.append(spawn(impl.scheduler_cmd(sched_file), logs[-1], env))
            address = await read_scheduler_address(sched_file, procs[0], logs[0], deadline)
            if not is_loopback(address):
                raise SetupError(
                    f"scheduler advertises non-loopback address {address!r}; "
                    "this benchmark only talks to 127.0.0.1"
                )
            for i in range(N_WORKERS):
                logs.append(workdir / f"worker-{i}.log")
                procs.append(spawn(impl.worker_cmd(address), logs[-1], env))

            client = api.Client(address, asynchronous=True, **impl.client_kwargs())
            try:
                await asyncio.wait_for(start_client(client), max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                raise SetupError(f"client could not connect to {address} in time")

            while True:
                workers = await asyncio.wait_for(impl.worker_addresses(client), timeout)
                if len(workers) >= N_WORKERS:
                    break
                check_alive()
                if time.monotonic() > deadline:
                    raise SetupError(
                        f"only {len(workers)}/{N_WORKERS} workers registered in {timeout:.0f}s"
                    )
                await asyncio.sleep(0.05)
            if not all(is_loopback(w) for w in workers):
                raise SetupError(f"workers advertise non-loopback addresses {workers}")

            yield Cluster(
                api=api, client=client, scheduler_pid=procs[0].pid, sizes=sizes, timeout=timeout
            )
        except BaseException:
            dump_logs()
            raise
        finally:
            if client is not None:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(close_client(client), CLIENT_CLOSE_TIMEOUT)
            stop_processes(procs[1:])  # workers first, while the scheduler still listens
            stop_processes(procs[:1])


# ---------------------------------------------------------------------------
# Benchmarks (shared by both implementations)
# ---------------------------------------------------------------------------


@dataclass
class Measurement:
    value: float
    extra: dict[str, Any] = field(default_factory=dict)


async def bench_rtt(c: Cluster) -> Measurement:
    client = c.client
    for i in range(c.sizes["rtt_warmup"]):
        expect(await client.submit(inc, i, pure=False) == i + 1, "inc returned a wrong value")
    samples_ms = []
    for i in range(c.sizes["rtt_iters"]):
        start = time.perf_counter()
        result = await client.submit(inc, i, pure=False)
        samples_ms.append((time.perf_counter() - start) * 1e3)
        expect(result == i + 1, "inc returned a wrong value")
    cuts = statistics.quantiles(samples_ms, n=100)
    return Measurement(
        statistics.median(samples_ms),
        {
            "iterations": len(samples_ms),
            "min_ms": min(samples_ms),
            "p90_ms": cuts[89],
            "p99_ms": cuts[98],
            "mean_ms": statistics.fmean(samples_ms),
        },
    )


def _actor_calls(api: Any, address: str, warmup: int, iters: int) -> dict[str, Any]:
    """Blocking client: p50 of an actor method call and of a tiny task, in the same run."""
    with api.Client(address, set_as_default=False) as client:
        made = client.submit(Counter, actor=True)  # held: dask frees an actor with its Future
        counter = made.result()
        for _ in range(warmup):
            counter.incr().result()
        calls = []
        for _ in range(iters):
            start = time.perf_counter()
            counter.incr().result()
            calls.append((time.perf_counter() - start) * 1e3)
        count = counter.value().result()
        expect(count == warmup + iters, f"the actor counted {count}")
        for i in range(warmup):
            client.submit(inc, i, pure=False).result()
        tasks = []
        for i in range(iters // 2):
            start = time.perf_counter()
            client.submit(inc, i, pure=False).result()
            tasks.append((time.perf_counter() - start) * 1e3)
    return {"calls_ms": calls, "tasks_ms": tasks}


async def bench_actor(c: Cluster) -> Measurement:
    client = c.client
    address = getattr(client, "scheduler_address", None) or client.scheduler.address
    out = await asyncio.wait_for(asyncio.to_thread(
        _actor_calls, c.api, address, c.sizes["actor_warmup"], c.sizes["actor_iters"]),
        c.timeout)
    calls, tasks = out["calls_ms"], out["tasks_ms"]
    p50, task_p50 = statistics.median(calls), statistics.median(tasks)
    return Measurement(p50, {
        "iterations": len(calls),
        "p90_ms": statistics.quantiles(calls, n=10)[8],
        "blocking_task_rtt_p50_ms": task_p50,
        "ratio_to_task_rtt": p50 / task_p50,
    })


async def bench_noop(c: Cluster) -> Measurement:
    client, n = c.client, c.sizes["noop_tasks"]
    await client.gather(client.map(noop, range(min(100, n)), pure=False))  # warm-up
    start = time.perf_counter()
    futures = client.map(noop, range(n), pure=False)
    results = await client.gather(futures)
    seconds = time.perf_counter() - start
    expect(len(results) == n, f"gathered {len(results)} results, expected {n}")
    return Measurement(n / seconds, {"tasks": n, "seconds": seconds})


async def bench_tree(c: Cluster) -> Measurement:
    client, leaves = c.client, c.sizes["tree_leaves"]
    expect(await client.submit(add, 1, 2, pure=False) == 3, "add returned a wrong value")
    start = time.perf_counter()
    level = client.map(identity, range(leaves), pure=False)
    while len(level) > 1:
        reduced = [
            client.submit(add, level[i], level[i + 1], pure=False)
            for i in range(0, len(level) - 1, 2)
        ]
        if len(level) % 2:
            reduced.append(level[-1])
        level = reduced
    total = await level[0]
    seconds = time.perf_counter() - start
    expect(total == leaves * (leaves - 1) // 2, f"tree sum {total} is wrong")
    tasks = 2 * leaves - 1
    return Measurement(tasks / seconds, {"tasks": tasks, "leaves": leaves, "seconds": seconds})


async def bench_echo(c: Cluster) -> Measurement:
    """Steady state: two untimed echoes of the same size first (one per worker: the array
    lands on either), for both implementations alike; the first (cold) one is reported too."""
    import numpy as np

    client, mb = c.client, c.sizes["echo_mb"]
    data = np.ones(mb * 2**20 // 8)
    cold = None
    for _ in range(2):
        start = time.perf_counter()
        warm = await client.submit(identity, data, pure=False)
        cold = cold or time.perf_counter() - start
        del warm
    data = np.arange(mb * 2**20 // 8, dtype="f8")
    start = time.perf_counter()
    echoed = await client.submit(identity, data, pure=False)
    seconds = time.perf_counter() - start
    expect(
        isinstance(echoed, np.ndarray)
        and echoed.shape == data.shape
        and bool(np.array_equal(echoed, data)),
        "echoed array differs from the original",
    )
    return Measurement(2 * mb / seconds, {"mib_each_way": mb, "seconds": seconds,
                                          "first_echo_mb_per_s": 2 * mb / cold})


async def settled_rss(
    pid: int,
    *,
    window: int = 5,
    interval: float = 0.2,
    tolerance: float = 0.005,
    max_wait: float = 10.0,
) -> int:
    """RSS of ``pid`` once ``window`` samples in a row agree within ``tolerance``."""
    samples: list[int] = []
    deadline = time.monotonic() + max_wait
    while True:
        samples.append(tree_rss(pid))
        recent = samples[-window:]
        if len(recent) == window and max(recent) - min(recent) <= tolerance * max(recent):
            return recent[-1]
        if time.monotonic() > deadline:
            return samples[-1]
        await asyncio.sleep(interval)


async def bench_sched_pending(c: Cluster) -> Measurement:
    client, n = c.client, c.sizes["pending_tasks"]
    expect(await client.submit(inc, 0, pure=False) == 1, "inc returned a wrong value")
    before = await settled_rss(c.scheduler_pid)
    # The gate outlives the measurement (the cluster is killed afterwards).
    gate = client.submit(nap, c.timeout + 60, pure=False)
    futures = client.map(first, range(n), gate=gate, pure=False)
    # A round trip after the submission so the scheduler has taken it in.
    expect(await client.submit(inc, 1, pure=False) == 2, "inc returned a wrong value")
    after = await settled_rss(c.scheduler_pid)
    expect(not gate.done(), "the gate task finished early; tasks were not pending")
    expect(len(futures) == n, "map returned the wrong number of futures")
    return Measurement((after - before) / n, {"tasks": n, "rss_before": before, "rss_after": after})


async def bench_sched_done(c: Cluster) -> Measurement:
    client, n = c.client, c.sizes["done_tasks"]
    expect(await client.submit(inc, 0, pure=False) == 1, "inc returned a wrong value")
    before = await settled_rss(c.scheduler_pid)
    futures = client.map(inc, range(n), pure=False)
    results = await client.gather(futures)
    expect(len(results) == n, f"gathered {len(results)} results, expected {n}")
    after = await settled_rss(c.scheduler_pid)
    return Measurement((after - before) / n, {"tasks": n, "rss_before": before, "rss_after": after})


def make_array(i: int, nbytes: int) -> Any:
    import numpy as np

    return np.full(nbytes // 8, float(i))


def array_sum(a: Any) -> float:
    return float(a.sum())


def bench_spill(impl: Impl, timeout: float, sizes: dict[str, int]) -> Measurement:
    """One worker with 400 MB; 20 x 50 MB results held, then each read back (its sum)."""
    api = impl.api()
    n, nbytes = sizes["spill_tasks"], 50 * 10**6
    cluster = api.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                               memory_limit="400MB")
    try:
        client = api.Client(cluster)
        try:
            wid = next(iter(client.scheduler_info()["workers"]))
            start = time.perf_counter()
            futures = [client.submit(make_array, i, nbytes, pure=False) for i in range(n)]
            api.wait(futures, timeout=timeout)
            sums = client.gather([client.submit(array_sum, f, pure=False) for f in futures])
            seconds = time.perf_counter() - start
            workers = client.scheduler_info()["workers"]
        finally:
            with contextlib.suppress(Exception):
                client.close()
    finally:
        with contextlib.suppress(Exception):
            cluster.close()
    expect(sums == [float(i) * (nbytes // 8) for i in range(n)], "a sum is wrong")
    expect(list(workers) == [wid], "the worker was restarted (killed for its memory?)")
    mb = 2 * n * nbytes / 1e6
    return Measurement(mb / seconds, {"seconds": seconds, "arrays": n, "mb_moved": mb})


# --- dask collections: the same dask code, with each implementation's client as scheduler ---


def plus_one(block: Any) -> Any:
    return block + 1


def threaded(collection: Any) -> Any:
    import dask

    return dask.compute(collection, scheduler="threads")[0]


async def dask_warmup(client: Any) -> None:
    """A small graph first, untimed: each worker imports dask on its first graph."""
    import dask.array as da

    expect(await client.compute(da.ones(4, chunks=2).sum()) == 4, "warm-up sum is wrong")


async def bench_dask_array_sum(c: Cluster) -> Measurement:
    import dask.array as da

    n = c.sizes["dask_sum_n"]
    x = da.ones(n, chunks=1_000).sum()
    want = float(n)
    await dask_warmup(c.client)
    start = time.perf_counter()
    got = await c.client.compute(x)
    seconds = time.perf_counter() - start
    expect(got == want == threaded(x), f"sum {got} differs from the threaded scheduler's")
    return Measurement(seconds, {"n": n, "chunks": n // 1_000})


async def bench_dask_xxt_mean(c: Cluster) -> Measurement:
    import dask.array as da
    import numpy as np

    n = c.sizes["dask_xxt_n"]
    x = da.random.default_rng(42).random((n, n), chunks=(250, 250))
    expr = (x + x.T).mean()
    want = threaded(expr)
    await dask_warmup(c.client)
    start = time.perf_counter()
    got = await c.client.compute(expr)
    seconds = time.perf_counter() - start
    expect(bool(np.isclose(got, want)), f"mean {got} differs from the threaded {want}")
    return Measurement(seconds, {"n": n})


async def bench_dask_groupby(c: Cluster) -> Measurement:
    import dask
    import dask.datasets

    days = c.sizes["dask_df_days"]
    with dask.config.set({"dataframe.shuffle.method": "tasks"}):
        df = dask.datasets.timeseries(start="2000-01-01", end=f"2000-01-{1 + days:02d}",
                                      freq="500ms", partition_freq="1D", seed=7)
        expr = df.groupby("name").x.mean()
        want = threaded(expr).sort_index()
        await dask_warmup(c.client)
        start = time.perf_counter()
        got = await c.client.compute(expr)
        seconds = time.perf_counter() - start
    got = got.sort_index()
    expect(len(got) == len(want) and bool((abs(got - want) < 1e-9).all()),
           "groupby-mean differs from the threaded scheduler's")
    return Measurement(seconds, {"rows": days * 86_400 * 2, "partitions": days})


async def bench_dask_persist(c: Cluster) -> Measurement:
    import dask.array as da

    n = c.sizes["dask_persist_n"]
    x = da.ones(n, chunks=1).map_blocks(plus_one)
    await dask_warmup(c.client)
    start = time.perf_counter()
    xp = c.client.persist(x)
    submitted = time.perf_counter() - start
    await c.api.wait(xp)
    seconds = time.perf_counter() - start
    sample = x[: min(n, 1_000)]
    got = await c.client.compute(xp[: min(n, 1_000)].sum())
    expect(got == threaded(sample.sum()) == 2 * len(sample), "persisted values are wrong")
    return Measurement(seconds, {"tasks": n, "client_submit_s": submitted})


def bench_localcluster(impl: Impl, timeout: float) -> Measurement:
    """Runs synchronously, in a fresh process, after the library is imported."""
    api = impl.api()  # import outside the timed region
    start = time.perf_counter()
    cluster = api.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                               **impl.cluster_kwargs())
    try:
        client = api.Client(cluster)
        try:
            result = client.submit(inc, 1).result(timeout=timeout)
            seconds = time.perf_counter() - start
        finally:
            with contextlib.suppress(Exception):
                client.close()
    finally:
        with contextlib.suppress(Exception):
            cluster.close()
    expect(result == 2, f"inc(1) returned {result!r}")
    return Measurement(seconds, {"seconds": seconds})


@dataclass(frozen=True)
class Row:
    name: str
    unit: str
    higher_is_better: bool
    run: Callable[[Cluster], Awaitable[Measurement]] | None  # None: LocalCluster row
    fresh_cluster: bool = False  # start a new cluster for every repetition
    local: Callable[..., Measurement] | None = None  # a LocalCluster row other than start-up


ROWS: dict[str, Row] = {
    row.name: row
    for row in [
        Row("rtt_p50_ms", "ms", False, bench_rtt),
        Row("actor_call_p50_ms", "ms", False, bench_actor),
        Row("noop_tasks_per_s", "tasks/s", True, bench_noop),
        Row("tree_tasks_per_s", "tasks/s", True, bench_tree),
        Row("echo_mb_per_s", "MB/s", True, bench_echo),
        Row("localcluster_first_result_s", "s", False, None),
        Row(
            "sched_bytes_per_task_pending", "B/task", False, bench_sched_pending, fresh_cluster=True
        ),
        Row("sched_bytes_per_task_done", "B/task", False, bench_sched_done, fresh_cluster=True),
        Row("dask_array_sum_s", "s", False, bench_dask_array_sum),
        Row("dask_xxT_mean_s", "s", False, bench_dask_xxt_mean),
        Row("dask_groupby_mean_s", "s", False, bench_dask_groupby),
        Row("dask_persist_100k_s", "s", False, bench_dask_persist),
        Row("spill_mb_per_s", "MB/s", True, None, local=bench_spill),
    ]
}
ROW_ALIASES = {
    "sched_bytes_per_task": ["sched_bytes_per_task_pending", "sched_bytes_per_task_done"]
}


# ---------------------------------------------------------------------------
# Child process: one (implementation, row) pair, results as JSON lines
# ---------------------------------------------------------------------------


def emit(kind: str, **payload: Any) -> None:
    print(CHILD_LINE_PREFIX + json.dumps({"kind": kind, **payload}), flush=True)


def describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def run_cluster_row(
    impl: Impl, row: Row, sizes: dict[str, int], repeat: int, timeout: float
) -> None:
    assert row.run is not None
    done = 0

    async def measure(cluster: Cluster) -> None:
        nonlocal done
        if isinstance(impl, ZfabricDashboardImpl):
            with DashboardProbe(cluster) as probe:
                m = await asyncio.wait_for(row.run(cluster), timeout)
            m.extra.update(probe.figures())
        else:
            m = await asyncio.wait_for(row.run(cluster), timeout)
        done += 1
        log(f"[{impl.name}] {row.name} {done}/{repeat}: {fmt(m.value)} {row.unit}")
        emit("value", value=m.value, extra=m.extra)

    if row.fresh_cluster:
        for _ in range(repeat):
            async with running_cluster(impl, sizes, timeout) as cluster:
                await measure(cluster)
    else:
        async with running_cluster(impl, sizes, timeout) as cluster:
            for _ in range(repeat):
                await measure(cluster)


class DashboardProbe:
    """While a row runs: one reader of the dashboard's live stream (at the page's rate, no
    browser), and the CPU time of the scheduler process and of its dashboard threads (named
    ``zf-dashboard`` at the OS level; per-thread times from psutil)."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.events = 0
        self.stop = False
        self.thread: Any = None

    def _read(self, link: str) -> None:
        import http.client
        from urllib.parse import urlsplit

        u = urlsplit(link)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
        conn.request("GET", "/events")
        r = conn.getresponse()
        while not self.stop:
            line = r.fp.readline()
            if not line:
                break
            if line.startswith(b"data: "):
                json.loads(line[6:])  # a page parses every snapshot too
                self.events += 1
        conn.close()

    def _cpu(self) -> tuple[float, float]:
        import psutil

        pid = self.cluster.scheduler_pid
        proc = psutil.Process(pid)
        t = proc.cpu_times()
        dash = 0.0
        for th in proc.threads():
            try:
                name = Path(f"/proc/{pid}/task/{th.id}/comm").read_text().strip()
            except OSError:
                continue
            if name.startswith("zf-dashboard"):
                dash += th.user_time + th.system_time
        return t.user + t.system, dash

    def __enter__(self):
        import threading

        link = self.cluster.client.dashboard_link
        expect(bool(link), "the scheduler gave no dashboard link")
        self.thread = threading.Thread(target=self._read, args=(link,), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 5
        while not self.events and time.monotonic() < deadline:
            time.sleep(0.01)
        expect(self.events > 0, "the dashboard's live stream sent nothing")
        self.first = self.events
        self.start = self._cpu()
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc):
        self.end = self._cpu()
        self.seconds = time.monotonic() - self.t0
        self.stop = True
        self.thread.join(15)

    def figures(self) -> dict[str, Any]:
        proc = self.end[0] - self.start[0]
        dash = self.end[1] - self.start[1]
        return {
            "scheduler_cpu_s": proc,
            "dashboard_cpu_s": dash,
            "dashboard_cpu_share": dash / proc if proc > 0 else 0.0,
            "sse_events": self.events - self.first,
            "window_s": self.seconds,
        }


def child_main(args: argparse.Namespace) -> int:
    impl_name, row_name = args._child
    impl, row = IMPLS.get(impl_name) or EXTRA_IMPLS[impl_name], ROWS[row_name]
    sizes = json.loads(args._sizes)
    warnings.filterwarnings("ignore", message="(Sending large graph|Large object)")
    try:
        api = impl.api()
        emit("meta", version=str(getattr(api, "__version__", "unknown")))
        if row.run is None:
            for _ in range(args.repeat):
                if row.local is not None:
                    m = row.local(impl, args.timeout, sizes)
                else:
                    m = bench_localcluster(impl, args.timeout)
                log(f"[{impl.name}] {row.name} {args._rep_label}: {fmt(m.value)} {row.unit}")
                emit("value", value=m.value, extra=m.extra)
        else:
            asyncio.run(run_cluster_row(impl, row, sizes, args.repeat, args.timeout))
    except Exception as exc:
        if not isinstance(exc, BenchError | TimeoutError):
            traceback.print_exc()
        message = describe(exc)
        log(f"[{impl.name}] {row.name} failed: {message}")
        emit("error", message=message, setup=isinstance(exc, SetupError | ImportError))
        return 1
    return 0


# ---------------------------------------------------------------------------
# Parent: run children, collect, print
# ---------------------------------------------------------------------------


@dataclass
class Result:
    """Everything learned about one (implementation, row) pair."""

    values: list[float] = field(default_factory=list)
    extras: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    skipped: str | None = None  # why the row was not run (not a failure)
    setup_failed: bool = False
    version: str | None = None

    @property
    def median(self) -> float | None:
        if self.error is not None or not self.values:
            return None
        return statistics.median(self.values)


Results = dict[tuple[str, str], Result]  # keyed by (impl name, row name)


def median_of(results: Results, impl: str, row: Row) -> float | None:
    result = results.get((impl, row.name))
    return None if result is None else result.median


def run_child(
    impl: Impl,
    row: Row,
    sizes: dict[str, int],
    repeat: int,
    timeout: float,
    marker: str,
    result: Result,
    rep_label: str = "",
) -> None:
    """Run ``repeat`` repetitions of one row in a child process; fill ``result``."""
    cmd = [
        sys.executable, str(Path(__file__).resolve()),
        "--_child", impl.name, row.name, "--_sizes", json.dumps(sizes),
        "--repeat", str(repeat), "--timeout", str(timeout), "--_rep-label", rep_label,
    ]  # fmt: skip
    clusters = repeat if row.fresh_cluster else 1
    budget = clusters * (timeout + 2 * CLIENT_CLOSE_TIMEOUT) + repeat * timeout + 30
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=impl.env(),
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=budget)
    except subprocess.TimeoutExpired:
        signal_group(proc, signal.SIGKILL)
        out, _ = proc.communicate()
        result.error = f"killed after {budget:.0f}s without finishing"
    finally:
        signal_group(proc, signal.SIGKILL)
        kill_marked_processes(marker)

    for line in out.decode(errors="replace").splitlines():
        if not line.startswith(CHILD_LINE_PREFIX):
            continue
        msg = json.loads(line.removeprefix(CHILD_LINE_PREFIX))
        if msg["kind"] == "meta":
            result.version = msg["version"]
        elif msg["kind"] == "value":
            result.values.append(msg["value"])
            result.extras.append(msg["extra"])
        elif msg["kind"] == "error":
            result.error = msg["message"]
            result.setup_failed = msg["setup"]
    if result.error is None and proc.returncode != 0:
        result.error = f"child exited with code {proc.returncode}"
    if result.error is None and len(result.values) < repeat:
        result.error = f"only {len(result.values)}/{repeat} repetitions reported"


def run_all(
    args: argparse.Namespace, impls: list[Impl], marker: str, notes: list[str], results: Results
) -> None:
    """Run every selected row for every implementation, filling ``results`` as it goes."""
    unavailable = {impl.name for impl in impls if not impl.available()}
    for impl in impls:
        if impl.name in unavailable:
            what = "not importable" if impl.required else "not installed; skipped"
            notes.append(f"{impl.title}: {impl.package} {what}")
        else:
            sizes = impl.sizes(args.quick)
            notes.append(
                f"{impl.title} sizes: " + ", ".join(f"{k}={v:,}" for k, v in sizes.items())
            )

    setup_broken: set[str] = set()  # implementations whose cluster would not start
    for row in args.rows:
        for impl in impls:
            result = results[impl.name, row.name] = Result()
            if impl.name in unavailable:
                if impl.required:
                    result.error = f"{impl.package} is not importable"
                else:
                    result.skipped = f"{impl.package} is not installed"
                continue
            if row.run is not None and impl.name in setup_broken:
                result.error = "skipped: its cluster failed to start in an earlier row"
                continue
            log(f"[{impl.name}] {row.name} ...")
            sizes = impl.sizes(args.quick)
            if row.run is None:  # a fresh process for every repetition
                for rep in range(args.repeat):
                    label = f"{rep + 1}/{args.repeat}"
                    run_child(impl, row, sizes, 1, args.timeout, marker, result, label)
                    if result.error:
                        break
            else:
                run_child(impl, row, sizes, args.repeat, args.timeout, marker, result)
                if result.setup_failed:
                    setup_broken.add(impl.name)


def run_dashboard_cost(args: argparse.Namespace, marker: str) -> dict[str, list[dict]]:
    """Dashboard off, then on, ``args.dashboard_cost`` times, each a fresh cluster per row;
    returns every run: ``{row: [{"dashboard": bool, "value": ..., **extra}, ...]}``."""
    off, on = IMPLS["zfabric"], EXTRA_IMPLS["zfabric+dashboard"]
    runs: dict[str, list[dict]] = {name: [] for name in DASHBOARD_COST_ROWS}
    for i in range(args.dashboard_cost):
        for impl in (off, on):
            for name in DASHBOARD_COST_ROWS:
                result = Result()
                log(f"[dashboard cost {i + 1}/{args.dashboard_cost}] {impl.name} {name}")
                sizes = impl.sizes(args.quick)
                # ten times the row's usual work, so that CPU times (10 ms ticks) mean something
                sizes["noop_tasks"] *= 10
                sizes["rtt_iters"] *= 10
                run_child(impl, ROWS[name], sizes, 1, args.timeout, marker, result)
                entry: dict[str, Any] = {"run": i + 1, "dashboard": impl is on}
                if result.error:
                    entry["error"] = result.error
                else:
                    entry["value"] = result.values[0]
                    entry.update(result.extras[0])
                runs[name].append(entry)
    return runs


def print_dashboard_cost(runs: dict[str, list[dict]]) -> None:
    print()
    print("dashboard cost: the no-op and round-trip rows (ten times their usual work) with the"
          " dashboard off and on (one live-stream reader), alternating, each run a fresh"
          " cluster")
    print(f"{'row':<18} {'run':>3}  {'off':>10}  {'on':>10}  {'dashboard CPU':>13}"
          f"  {'of scheduler CPU':>16}  {'SSE events':>10}")
    for name, entries in runs.items():
        by_run: dict[int, dict[bool, dict]] = {}
        for e in entries:
            by_run.setdefault(e["run"], {})[e["dashboard"]] = e
        for i, pair in sorted(by_run.items()):
            a, b = pair.get(False, {}), pair.get(True, {})
            share = b.get("dashboard_cpu_share")
            print(f"{name:<18} {i:>3}  {fmt(a.get('value')):>10}  {fmt(b.get('value')):>10}"
                  f"  {b.get('dashboard_cpu_s', 0) * 1e3:>10.1f} ms"
                  f"  {'n/a' if share is None else f'{share * 100:.2f} %':>16}"
                  f"  {b.get('sse_events', 'n/a'):>10}")
        offs = [e["value"] for e in entries if not e["dashboard"] and "value" in e]
        ons = [e["value"] for e in entries if e["dashboard"] and "value" in e]
        shares = [e["dashboard_cpu_share"] for e in entries if "dashboard_cpu_share" in e]
        if offs and ons:
            m_off, m_on = statistics.median(offs), statistics.median(ons)
            print(f"{name:<18} median off {fmt(m_off)}, on {fmt(m_on)} (on/off"
                  f" {m_on / m_off:.3f}); dashboard threads at most"
                  f" {max(shares) * 100:.2f} % of the scheduler process's CPU")


def fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def advantage(row: Row, results: Results) -> float | None:
    """How many times better zfabric is than dask (>1: zfabric better)."""
    zf, dask = median_of(results, "zfabric", row), median_of(results, "dask", row)
    if zf is None or dask is None or zf <= 0 or dask <= 0:
        return None
    return zf / dask if row.higher_is_better else dask / zf


def print_table(rows: list[Row], results: Results, notes: list[str]) -> None:
    shown = [impl.name for impl in IMPLS.values()
             if impl.name in ("zfabric", "dask") or any(k[0] == impl.name for k in results)]
    headers = ["row", "unit", *(IMPLS[name].title for name in shown), "zfabric advantage"]
    table = []
    for row in rows:
        adv = advantage(row, results)
        better = "higher" if row.higher_is_better else "lower"
        table.append([
            row.name,
            f"{row.unit} ({better} better)",
            *(fmt(median_of(results, name, row)) for name in shown),
            "n/a" if adv is None else f"{adv:.2f}x",
        ])  # fmt: skip
    widths = [max(len(line[i]) for line in [headers, *table]) for i in range(len(headers))]

    def render(cells: list[str]) -> str:
        left = [cell.ljust(width) for cell, width in zip(cells[:2], widths, strict=False)]
        right = [cell.rjust(width) for cell, width in zip(cells[2:], widths[2:], strict=True)]
        return "  ".join(left + right)

    print(render(headers))
    print("-" * len(render(headers)))
    for cells in table:
        print(render(cells))
    print(
        "zfabric advantage: zfabric/dask for rates, dask/zfabric for times and bytes;"
        " >1x means zfabric is better."
    )
    for note in notes:
        print(f"note: {note}")


def json_report(
    args: argparse.Namespace, impls: list[Impl], results: Results, elapsed: float
) -> dict[str, Any]:
    def raw(impl: Impl, row: Row) -> dict[str, Any]:
        result = results.get((impl.name, row.name), Result(skipped="not reached"))
        return {
            "median": result.median,
            "values": result.values,
            "extras": result.extras,
            "error": result.error,
            "skipped": result.skipped,
        }

    return {
        "argv": sys.argv[1:],
        "quick": args.quick,
        "repeat": args.repeat,
        "timeout_s": args.timeout,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "elapsed_s": elapsed,
        "sizes": {impl.name: impl.sizes(args.quick) for impl in impls},
        "versions": {impl: r.version for (impl, _), r in results.items() if r.version},
        "rows": {
            row.name: {
                "unit": row.unit,
                "higher_is_better": row.higher_is_better,
                "zfabric_advantage": advantage(row, results),
                "results": {impl.name: raw(impl, row) for impl in impls},
            }
            for row in args.rows
        },
    }


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
