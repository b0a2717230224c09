"""``zfabric mpi`` and ``initialize()`` under Debian's real OpenMPI ``mpirun``.

Every test starts ``mpirun --allow-run-as-root --oversubscribe -n N`` on this host; the ranks
find their part from OpenMPI's environment and the scheduler's address from a scheduler file in
the test's directory. Skipped (saying why) without ``mpirun``, except with ``CI=true``, where
its absence fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from zfabric import Client

ROOT = Path(__file__).resolve().parent.parent
#: Bounded waits.
JOB_TIMEOUT_S = 60.0

#: The example docs/deploy.md shows (keep the two in step).
SCRIPT = r'''
import json
import os
import signal
import time

from zfabric import Client


def slow_double(x):
    time.sleep(0.02)
    return 2 * x


with Client() as client:  # the job's scheduler: zfabric mpi says where it is
    client.wait_for_workers(2, timeout=30)
    names = sorted(w["name"] for w in client.scheduler_info()["workers"].values())
    pids = client.run(os.getpid)  # {worker address: its process id}
    futures = client.map(slow_double, range(300))
    if os.environ.get("KILL_A_WORKER"):
        time.sleep(0.5)  # mid-run
        os.kill(pids[min(pids)], signal.SIGKILL)  # its rank's Nanny starts it again
    results = client.gather(futures)
    client.wait_for_workers(2, timeout=30)
    after = client.run(os.getpid)
print("REPORT " + json.dumps({"names": names, "ok": results == [2 * x for x in range(300)],
                              "pids": sorted(pids.values()), "after": sorted(after.values())}),
      flush=True)
'''

INITIALIZE = r'''
from zfabric import Client
from zfabric.deploy.mpi import initialize

initialize(nthreads=1, dashboard=False)
with Client() as client:
    client.wait_for_workers(2, timeout=30)
    print("REPORT", sum(client.gather(client.map(lambda x: x + 1, range(10)))), flush=True)
'''


def _mpirun(n: int) -> list[str]:
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        reason = "`mpirun` (Debian's openmpi-bin) is not installed"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    # -x passes PYTHONPATH on, so every rank runs this checkout's zfabric.
    return [mpirun, "--allow-run-as-root", "--oversubscribe", "-n", str(n),
            "-x", "PYTHONPATH", "-x", "KILL_A_WORKER"]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "KILL_A_WORKER": "", **extra}


def _run(argv: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(argv, cwd=cwd, env=_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"mpirun did not end within {JOB_TIMEOUT_S:g} s:\n{out}") from None
    return subprocess.CompletedProcess(argv, proc.returncode, out, "")


def _report(out: str):
    for line in out.splitlines():
        if line.startswith("REPORT "):
            return json.loads(line[len("REPORT "):])
    raise AssertionError(f"no report in mpirun's output:\n{out}")


ZFABRIC_MPI = [sys.executable, "-m", "zfabric", "mpi", "--no-dashboard"]


def test_zfabric_mpi_runs_a_script_on_two_workers(tmp_path):
    (tmp_path / "script.py").write_text(textwrap.dedent(SCRIPT))
    proc = _run([*_mpirun(4), *ZFABRIC_MPI, "script.py"], tmp_path)
    assert proc.returncode == 0, proc.stdout
    r = _report(proc.stdout)
    assert r["names"] == ["rank-2", "rank-3"]
    assert r["ok"]
    assert not (tmp_path / "scheduler.json").exists()  # rank 0 removed it as it ended


def test_a_killed_worker_restarts_in_its_rank_and_the_job_ends_cleanly(tmp_path):
    (tmp_path / "script.py").write_text(textwrap.dedent(SCRIPT))
    proc = _run([*_mpirun(4), *ZFABRIC_MPI, "script.py"], tmp_path, KILL_A_WORKER="1")
    assert proc.returncode == 0, proc.stdout
    r = _report(proc.stdout)
    assert r["ok"]
    assert len(r["after"]) == 2
    assert len(set(r["pids"]) & set(r["after"])) == 1  # one worker is a new process


def test_no_client_serves_a_later_client_until_it_shuts_down(tmp_path):
    argv = [*_mpirun(3), *ZFABRIC_MPI, "--no-client", "--scheduler-file", "sched.json"]
    proc = subprocess.Popen(argv, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        with Client(scheduler_file=str(tmp_path / "sched.json"), timeout=30,
                    set_as_default=False) as client:
            client.wait_for_workers(2, timeout=30)
            assert client.submit(sum, [1, 2, 3]).result(timeout=30) == 6
            client.shutdown()
        out, _ = proc.communicate(timeout=JOB_TIMEOUT_S)
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def test_initialize_in_a_script(tmp_path):
    (tmp_path / "script.py").write_text(textwrap.dedent(INITIALIZE))
    started = time.monotonic()
    proc = _run([*_mpirun(4), sys.executable, "script.py"], tmp_path)
    assert proc.returncode == 0, proc.stdout
    assert _report(proc.stdout) == sum(range(1, 11))
    assert time.monotonic() - started < JOB_TIMEOUT_S
