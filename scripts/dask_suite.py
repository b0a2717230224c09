"""Run dask's own test suite with a zfabric client as dask's default scheduler, and the same
tests with a dask.distributed client, then compare.

    python scripts/dask_suite.py                       # dask/array, bag, dataframe, tests
    python scripts/dask_suite.py dask.bag.tests dask/tests/test_delayed.py
    python scripts/dask_suite.py --only zfabric dask.bag.tests -- -x

Each run is ``pytest`` over the installed dask package's tests (module names, or paths under
the dask package), in a fresh process that loads this file as a pytest plugin
(``-p dask_suite``): at the session's start it starts a cluster of two worker processes of
two threads and a client that becomes dask's default scheduler; tests that name a scheduler
of their own keep it. It prints each run's pytest summary line, then the tests that pass
through dask.distributed and fail through zfabric. Long (minutes): not part of the suite.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

#: What the plugin starts in the pytest process: "zfabric" or "distributed".
SCHEDULER_VARIABLE = "DASK_SUITE_SCHEDULER"
DEFAULT_TARGETS = ["dask.array", "dask.bag", "dask.dataframe", "dask.tests"]
_session: list = []


# ---------------------------------------------------------------------------- the plugin


def pytest_sessionstart(session) -> None:
    which = os.environ.get(SCHEDULER_VARIABLE)
    if which == "zfabric":
        import zfabric

        cluster = zfabric.LocalCluster(n_workers=2, threads_per_worker=2,
                                       dashboard_address=None)
        client = zfabric.Client(cluster)
    elif which == "distributed":
        import distributed

        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=2,
                                           dashboard_address=":0")
        client = distributed.Client(cluster)
    else:
        return
    _session.extend([client, cluster])


def pytest_sessionfinish(session, exitstatus) -> None:
    for obj in _session:
        try:
            obj.close()
        except Exception:  # a test may have closed it: the run's result stands
            pass
    _session.clear()


# ---------------------------------------------------------------------------- the runner


def _paths(targets: list[str]) -> list[str]:
    """Module names and dask-relative paths as paths pytest can collect."""
    import dask

    root = Path(dask.__file__).resolve().parent
    out = []
    for t in targets:
        if t.endswith(".py") or "/" in t:
            rel = t[len("dask/"):] if t.startswith("dask/") else t
            out.append(str(root / rel))
        else:
            parts = t.split(".")[1:]
            path = root.joinpath(*parts)
            out.append(str(path if path.is_dir() else path.with_suffix(".py")))
    return out


def run(which: str, targets: list[str], extra: list[str], timeout_s: float) -> tuple[str, set]:
    """``(summary line, failed test ids)`` of one pytest run through ``which``."""
    env = dict(os.environ, **{SCHEDULER_VARIABLE: which})
    here = str(Path(__file__).resolve().parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "pytest", "-p", "dask_suite", "-q", "-rfE", "--tb=short", "-p",
           "no:cacheprovider", "--timeout", "120", *_paths(targets), *extra]
    start = time.monotonic()
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        out = done.stdout
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        out += f"\n(timed out after {timeout_s:g} s)"
    lines = [ln for ln in out.splitlines() if ln.strip()]
    summary = next((ln for ln in reversed(lines) if re.search(r"\d+ (passed|failed)", ln)),
                   lines[-1] if lines else "(no output)")
    failed = {m.group(1) for m in re.finditer(r"^(?:FAILED|ERROR) (\S+)", out, re.M)}
    took = time.monotonic() - start
    return f"{which}: {summary.strip('= ')} (wall {took:.0f} s)", failed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("targets", nargs="*", default=DEFAULT_TARGETS,
                   help="dask test packages or files (default: %(default)s)")
    p.add_argument("--only", choices=["zfabric", "distributed"],
                   help="run through one scheduler only")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    args, extra = p.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    runs = [args.only] if args.only else ["zfabric", "distributed"]
    failed: dict[str, set] = {w: set() for w in runs}
    totals: dict[str, dict[str, int]] = {w: {} for w in runs}
    for target in args.targets:  # one pytest per target: a crash ends only its own run
        for which in runs:
            summary, bad = run(which, [target], extra, args.timeout)
            print(f"{target} {summary}", flush=True)
            for test in sorted(bad):  # as it goes: a long run's partial result is useful
                print(f"  failed through {which}: {test.split('site-packages/')[-1]}",
                      flush=True)
            failed[which] |= bad
            for n, what in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed)",
                                      summary):
                totals[which][what] = totals[which].get(what, 0) + int(n)
    for which in runs:
        print(f"total {which}: " + ", ".join(f"{n} {w}" for w, n in totals[which].items()))
    if len(runs) == 2:
        worse = sorted(failed["zfabric"] - failed["distributed"])
        print(f"failing through zfabric only: {len(worse)}")
        for test in worse:
            print(f"  {test.split('site-packages/')[-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
