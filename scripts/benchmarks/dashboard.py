"""The dashboard-cost runs (``--dashboard-cost N``): the no-op and round-trip rows with the
dashboard off and on, alternating, each a fresh cluster."""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from .common import fmt, log
from .impls import DASHBOARD_COST_ROWS, EXTRA_IMPLS, IMPLS
from .rows import ROWS
from .runner import Result, run_child


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
