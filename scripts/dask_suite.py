"""Run dask's own test suite with a zfabric client as dask's default scheduler, and the same
tests with a dask.distributed client, then compare.

    python scripts/dask_suite.py                       # dask/array, bag, dataframe, tests
    python scripts/dask_suite.py dask.bag.tests dask/tests/test_delayed.py
    python scripts/dask_suite.py --only zfabric dask.bag.tests -- -x
    python scripts/dask_suite.py --recheck dask.dataframe   # dask.distributed: zfabric's failures
    python scripts/dask_suite.py --recheck dask.array -- --runslow -m slow

Each run is ``pytest`` over the installed dask package's tests (module names, or paths under
the dask package), in a fresh process that loads this file as a pytest plugin
(``-p dask_suite``): at the session's start it starts a cluster of two worker processes of
two threads and a client that becomes dask's default scheduler; tests that name a scheduler
of their own keep it. The plugin also gives the run what dask's repository-root conftest.py
gives dask's own (see below), the same for both schedulers; pytest loads the wheel's
dask/conftest.py; the current directory's pytest settings do not apply. Each test has a time
limit (pytest-timeout). Each run's verbose log and junit xml go to ``--results``. It prints
each run's pytest summary line, then the tests that pass through dask.distributed and fail
through zfabric. Long (minutes to an hour): not part of the suite.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: What the plugin starts in the pytest process: "zfabric" or "distributed".
SCHEDULER_VARIABLE = "DASK_SUITE_SCHEDULER"
DEFAULT_TARGETS = ["dask.array", "dask.bag", "dask.dataframe", "dask.tests"]
_session: list = []


# ---------------------------------------------------------------------------- the plugin
#
# What dask's repository-root conftest.py gives its test run (the installed wheel does not ship
# it), written here: the --runslow and --runarrayexpr options and the skips they control, dask's
# markers, assertion rewriting in dask's test helpers, the session-wide dask config, and a
# readable diff of two task-graph nodes. dask/conftest.py (xfail, shuffle_method, the pyarrow
# string markers) is in the wheel: the runner makes pytest load it (--confcutdir).

#: dask's markers (its pyproject.toml), so that a test's own marks are known.
DASK_MARKERS = {
    "network": "Test requires an internet connection",
    "slow": "Skipped unless --runslow passed",
    "gpu": "marks tests we want to run on GPUs",
    "skip_with_pyarrow_strings": "skipped when pyarrow string conversion is turned on",
    "xfail_with_pyarrow_strings": "xfailed when pyarrow string conversion is turned on",
    "array_expr": "Tests that are array-expr specific",
    "normal_and_array_expr": "Tests that run with and without array-expr",
}
#: Modules whose doctests dask does not collect (they matter only with --doctest-modules),
#: each with the optional package whose absence adds it (None: always).
IGNORED_MODULES = {
    "bytes/hdfs3.py": None, "bytes/pyarrow.py": None, "bytes/s3.py": None,
    "array/ghost.py": None, "array/fft.py": None, "dataframe/io/io.py": None,
    "dataframe/io/parquet/arrow.py": None, "dot.py": None, "ml.py": None,
    "array/stats.py": "scipy", "dataframe/io/orc/arrow.py": "pyarrow",
    "array/tiledb_io.py": "tiledb", "dataframe/io/sql.py": "sqlalchemy",
}
IGNORED_PACKAGES = {"array": "numpy", "dataframe": "pandas"}


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def pytest_addoption(parser) -> None:
    for flag, text in (("--runslow", "run slow tests"),
                       ("--runarrayexpr", "run array-expr tests")):
        try:
            parser.addoption(flag, action="store_true", help=text)
        except ValueError:  # dask's own root conftest.py is loaded too (a dask checkout)
            pass


def pytest_configure(config) -> None:
    import signal

    # A run started in the background (``cmd &`` in a script) inherits SIGINT ignored, and
    # Python then raises no KeyboardInterrupt: dask's test_interrupt would hang its pool.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    for name, text in DASK_MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def pytest_ignore_collect(collection_path, config):
    import dask

    root = Path(dask.__file__).resolve().parent
    try:
        rel = collection_path.resolve().relative_to(root).as_posix()
    except ValueError:
        return None
    if rel in IGNORED_MODULES:
        needs = IGNORED_MODULES[rel]
        if needs is None or not _importable(needs):
            return True
    top = rel.split("/")[0]
    if top in IGNORED_PACKAGES and not _importable(IGNORED_PACKAGES[top]):
        return True
    return None


def pytest_runtest_setup(item) -> None:
    import pytest

    marks = item.keywords
    if "slow" in marks and not item.config.getoption("--runslow"):
        pytest.skip("need --runslow option to run")
    arrayexpr = item.config.getoption("--runarrayexpr")
    if "array_expr" in marks and not arrayexpr:
        pytest.skip("need --runarrayexpr option to run")
    if arrayexpr and "array_expr" not in marks and "normal_and_array_expr" not in marks:
        pytest.skip("only array-expr tests are being run")


def pytest_assertrepr_compare(op, left, right):
    try:
        from dask._task_spec import Task
    except ImportError:
        return None
    if not (isinstance(left, Task) and isinstance(right, Task)):
        return None
    import difflib

    def parts(node) -> list[str]:
        return [str(node.func), *sorted(map(str, node.args)),
                *sorted(f"{k}: {v}" for k, v in node.kwargs.items())]

    return [f"Comparing two dask graph nodes: left {left.key}, right {right.key}",
            *difflib.ndiff(parts(left), parts(right))]


def _async_client_fallback():
    """Session-wide, as dask's run has it: an async client asked for a sync result falls back
    to a synchronous call."""
    import dask

    with dask.config.set({"admin.async-client-fallback": "sync"}):
        yield


try:
    import pytest as _pytest

    if SCHEDULER_VARIABLE in os.environ:  # loaded by pytest, before dask/conftest.py imports
        _pytest.register_assert_rewrite("dask.array.utils", "dask.dataframe.utils",
                                        "dask.bag.utils")
    dask_session_config = _pytest.fixture(autouse=True, scope="session")(_async_client_fallback)
except ImportError:  # the runner itself needs no pytest
    pass


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


#: A test's outcome in pytest's verbose output: ``<id> PASSED [ 3%]``.
_OUTCOME = re.compile(r"^(\S+::.+?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)(?: |$)", re.M)
_SUMMARY = re.compile(r"^(FAILED|ERROR) (\S+::\S+)", re.M)
_BAD = {"FAILED", "ERROR"}


def outcomes(text: str) -> dict[str, str]:
    """``{test id: outcome}`` from a verbose pytest log; a test that passed and then failed
    its teardown counts as an error."""
    out: dict[str, str] = {}
    for test, what in _OUTCOME.findall(text):
        test = test.split("site-packages/")[-1]
        if out.get(test) not in _BAD:
            out[test] = what
    # A test's own output (a worker's log line) can split its verbose line; the closing
    # summary (-rfE) names every failure and error on a line of its own.
    for what, test in _SUMMARY.findall(text):
        out[test.split("site-packages/")[-1]] = what
    return out


def run(which: str, targets: list[str], extra: list[str], timeout_s: float,
        results: Path, test_timeout_s: float = 120.0, tests: list[str] | None = None,
        reuse: bool = False) -> tuple[str, dict[str, str]]:
    """``(summary line, {test id: outcome})`` of one pytest run through ``which``; its log and
    junit xml go to ``results``. ``tests``: only these test ids (dask-relative) of the
    targets. ``reuse``: a finished run's log, where there is one, stands for the run."""
    import dask

    env = dict(os.environ, **{SCHEDULER_VARIABLE: which})
    here = str(Path(__file__).resolve().parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    site = str(Path(dask.__file__).resolve().parent.parent)
    name = re.sub(r"[^\w.-]+", "_", "+".join(targets)) + f"-{which}"
    results.mkdir(parents=True, exist_ok=True)
    collect = _paths(targets)
    if tests is not None:  # pytest reads them from a file (@file): any number of them
        name += "-recheck"
        listed = results / f"{name}.tests"
        listed.write_text("".join(f"{site}/{t}\n" for t in tests))
        collect = [f"@{listed}"]
    ini = results / "pytest.ini"  # none of the current directory's pytest settings
    ini.write_text("[pytest]\n")
    log = results / f"{name}.log"
    # --confcutdir: pytest then loads dask/conftest.py (above the collected test folders)
    cmd = [sys.executable, "-m", "pytest", "-p", "dask_suite", "-c", str(ini), "--rootdir",
           site, "--confcutdir", site, "-v", "-rfE", "--tb=short", "-p", "no:cacheprovider",
           "--timeout", f"{test_timeout_s:g}", f"--junitxml={results / (name + '.xml')}",
           *collect, *extra]
    if reuse and log.exists():
        out = log.read_text(errors="replace")
        took_s = re.search(r"^# wall (\d+) s$", out, re.M)
        if took_s:
            return _result(which, out, "", float(took_s.group(1)), None)
    start = time.monotonic()
    with open(log, "w") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                cwd=results)
        try:
            proc.wait(timeout=timeout_s)
            ended = ""
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            ended = f" (stopped after {timeout_s:g} s)"
    took = time.monotonic() - start
    with open(log, "a") as fh:
        fh.write(f"# wall {took:.0f} s\n")
    return _result(which, log.read_text(errors="replace"), ended, took, proc.returncode)


def _result(which: str, out: str, ended: str, took: float,
            code: int | None) -> tuple[str, dict[str, str]]:
    lines = [ln for ln in out.splitlines() if ln.strip()]
    summary = next((ln for ln in reversed(lines)
                    if ln.startswith("=") and re.search(r"\d+ \w+.* in [\d.]+s", ln)), "")
    found = outcomes(out)
    if not summary:  # it ended early: count what it got through
        counts: dict[str, int] = {}
        for what in found.values():
            counts[what.lower()] = counts.get(what.lower(), 0) + 1
        summary = ", ".join(f"{n} {w}" for w, n in sorted(counts.items())) + " (incomplete"
        summary += f", exit {code})"
    return f"{which}: {summary.strip('= ')}{ended} (wall {took:.0f} s)", found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="dask's own tests through zfabric and dask.distributed, compared")
    p.add_argument("targets", nargs="*", default=DEFAULT_TARGETS,
                   help="dask test packages or files (default: %(default)s)")
    p.add_argument("--only", choices=["zfabric", "distributed"],
                   help="run through one scheduler only")
    p.add_argument("--timeout", type=float, default=3 * 3600.0, help="seconds per run")
    p.add_argument("--test-timeout", type=float, default=120.0,
                   help="seconds per test (pytest-timeout; default: %(default)s)")
    p.add_argument("--recheck", action="store_true",
                   help="through dask.distributed, run only the tests that fail through "
                        "zfabric (the comparison, quickly; no totals for dask.distributed)")
    p.add_argument("--reuse", action="store_true",
                   help="a run whose finished log is in the results folder is not run again")
    p.add_argument("--results", type=Path,
                   default=Path(tempfile.gettempdir()) / "dask-suite-results",
                   help="folder for each run's log and junit xml (default: %(default)s)")
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)  # what follows goes to pytest
    args = p.parse_args(argv[:cut])
    extra = argv[cut + 1:]
    runs = [args.only] if args.only else ["zfabric", "distributed"]
    results = args.results.resolve()
    worse: list[str] = []
    for target in args.targets:  # one pytest per target: a crash ends only its own run
        found: dict[str, dict[str, str]] = {}
        for which in runs:
            only = None
            if args.recheck and which == "distributed" and "zfabric" in found:
                only = sorted(t for t, what in found["zfabric"].items() if what in _BAD)
                if not only:
                    found[which] = {}
                    print(f"{target} {which}: nothing to recheck", flush=True)
                    continue
            summary, found[which] = run(which, [target], extra, args.timeout, results,
                                        args.test_timeout, only, args.reuse)
            if only is not None:
                summary = summary.replace(f"{which}:", f"{which} (zfabric's failures only):")
            print(f"{target} {summary}", flush=True)
            for test, what in sorted(found[which].items()):  # as it goes
                if what in _BAD:
                    print(f"  {what.lower()} through {which}: {test}", flush=True)
        if len(runs) == 2:
            bad = sorted(t for t, what in found["zfabric"].items()
                         if what in _BAD and found["distributed"].get(t) == "PASSED")
            if args.recheck and bad:  # the same tests, alone, through zfabric
                summary, alone = run("zfabric", [target], extra, args.timeout, results,
                                     args.test_timeout, bad, args.reuse)
                print(f"{target} {summary.replace('zfabric:', 'zfabric (alone):')}",
                      flush=True)
                bad = [t + ("  (passes through zfabric alone: order-dependent)"
                            if alone.get(t) == "PASSED" else "") for t in bad]
            worse += bad
    if len(runs) == 2:
        print(f"pass through dask.distributed, fail through zfabric: {len(worse)}")
        for test in worse:
            print(f"  {test}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
