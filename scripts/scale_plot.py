"""Plot the scheduler's CPU per task against the number of workers (docs/scale.png).

Two series: the pure scheduler state driven without sockets (measured here, as
``scheduler_scaling.py --workers`` does), and, when given, the figures of the fake-peer harness
against a real ``zfabric scheduler`` process (``fake_peers.py --json FILE``). Needs matplotlib
(``pip install matplotlib``; the plot is made for the docs, not by the package)::

    python scripts/fake_peers.py --peers 2 100 500 1000 --json /tmp/fake.json
    python scripts/scale_plot.py --fake /tmp/fake.json --out docs/scale.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scheduler_scaling import run_workers  # noqa: E402  (a sibling script)


def pure_state(workers: list[int], repeat: int) -> dict[int, float]:
    out = {}
    for n in workers:
        out[n] = statistics.median(run_workers(n) for _ in range(repeat))
        print(f"pure state, {n:>5,} workers: {out[n]:6.2f} us/task", flush=True)
    return out


def fake_peers(path: Path) -> dict[int, float]:
    rows = json.loads(path.read_text())
    rows = rows.get("rows", rows) if isinstance(rows, dict) else rows
    out = {}
    for row in rows:
        peers = row.get("peers") or row.get("n")
        cost = row.get("noop_sched_us_per_task")
        if peers and cost:
            out[int(peers)] = float(cost)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 16, 128, 512, 1000])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--fake", type=Path, help="fake_peers.py --json output to plot beside")
    ap.add_argument("--out", type=Path, default=Path("docs/scale.png"))
    args = ap.parse_args()
    try:
        import matplotlib
    except ImportError:
        sys.exit("scale_plot.py needs matplotlib: pip install matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {"pure scheduler state (no sockets)": pure_state(args.workers, args.repeat)}
    if args.fake is not None:
        series["real scheduler process, fake-peer workers"] = fake_peers(args.fake)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for label, points in series.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("workers")
    ax.set_ylabel("scheduler CPU, µs per no-op task")
    ax.set_title("zfabric: the scheduler's cost per task as the cluster grows")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
