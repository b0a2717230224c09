"""The one run loop. The parent runs each (implementation, row) pair in a child process (this
same script with hidden ``--_child`` options), which runs the row's repetitions and reports
each value as a JSON line; the parent keeps the values, their median, and prints the
implementations side by side with zfabric's advantage."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import funcs
from .cluster import Cluster, kill_marked_processes, running_cluster, signal_group
from .common import (
    CHILD_LINE_PREFIX,
    CLIENT_CLOSE_TIMEOUT,
    BenchError,
    Measurement,
    Row,
    SetupError,
    fmt,
    log,
)
from .impls import EXTRA_IMPLS, IMPLS, Impl, ZfabricDashboardImpl
from .probe import DashboardProbe
from .rows import ROWS

#: The script every child runs (``scripts/bench.py``).
BENCH_SCRIPT = Path(__file__).resolve().parents[1] / "bench.py"


def emit(kind: str, **payload: Any) -> None:
    print(CHILD_LINE_PREFIX + json.dumps({"kind": kind, **payload}), flush=True)


def describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def report(impl: Impl, row: Row, m: Measurement, label: str) -> None:
    """One repetition's value: logged, and sent to the parent."""
    log(f"[{impl.name}] {row.name} {label}: {fmt(m.value)} {row.unit}")
    emit("value", value=m.value, extra=m.extra)


async def run_cluster_row(
    impl: Impl, row: Row, sizes: dict[str, int], repeat: int, timeout: float
) -> None:
    """``repeat`` repetitions of a cluster row: on one cluster, or a fresh one for each."""
    run = row.run
    assert run is not None

    async def measure(cluster: Cluster, rep: int) -> None:
        if isinstance(impl, ZfabricDashboardImpl):
            with DashboardProbe(cluster) as probe:
                m = await asyncio.wait_for(run(cluster), timeout)
            m.extra.update(probe.figures())
        else:
            m = await asyncio.wait_for(run(cluster), timeout)
        report(impl, row, m, f"{rep + 1}/{repeat}")

    if row.fresh_cluster:
        for rep in range(repeat):
            async with running_cluster(impl, sizes, timeout) as cluster:
                await measure(cluster, rep)
    else:
        async with running_cluster(impl, sizes, timeout) as cluster:
            for rep in range(repeat):
                await measure(cluster, rep)


def ship_functions_by_value() -> None:
    """The task functions travel by value, as they did from ``__main__``: workers need not
    import this package (dask.distributed checks the exact module name)."""
    import cloudpickle

    cloudpickle.register_pickle_by_value(funcs)


def child_main(args: argparse.Namespace) -> int:
    impl_name, row_name = args._child
    impl, row = IMPLS.get(impl_name) or EXTRA_IMPLS[impl_name], ROWS[row_name]
    sizes = json.loads(args._sizes)
    os.environ.update(row.env)  # before any cluster process starts: they inherit it
    warnings.filterwarnings("ignore", message="(Sending large graph|Large object)")
    try:
        api = impl.api()
        ship_functions_by_value()
        emit("meta", version=str(getattr(api, "__version__", "unknown")))
        if row.local is not None:
            for _ in range(args.repeat):
                report(impl, row, row.local(impl, args.timeout, sizes), args._rep_label)
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
        sys.executable, str(BENCH_SCRIPT),
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
            if row.local is None and impl.name in setup_broken:
                result.error = "skipped: its cluster failed to start in an earlier row"
                continue
            log(f"[{impl.name}] {row.name} ...")
            sizes = impl.sizes(args.quick)
            if row.local is not None:  # a fresh process for every repetition
                for rep in range(args.repeat):
                    label = f"{rep + 1}/{args.repeat}"
                    run_child(impl, row, sizes, 1, args.timeout, marker, result, label)
                    if result.error:
                        break
            else:
                run_child(impl, row, sizes, args.repeat, args.timeout, marker, result)
                if result.setup_failed:
                    setup_broken.add(impl.name)



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
    for row in rows:  # rows measured against dask's threaded scheduler in the same run
        cells = []
        for name in shown:
            result = results.get((name, row.name))
            ratios = [e["vs_threads"] for e in result.extras if "vs_threads" in e] if result else []
            if ratios:
                threads = statistics.median(e["threads_s"] for e in result.extras)
                cells.append(f"{IMPLS[name].title} {statistics.median(ratios):.2f}x"
                             f" (threads {fmt(threads)} s)")
        if cells:
            print(f"{row.name} / dask threaded (2 threads): " + ", ".join(cells))


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
