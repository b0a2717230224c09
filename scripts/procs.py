"""Process helpers shared by the scale scripts (``fake_peers.py``, ``scale.py``): a file
descriptor limit raised for many peers, a ``zfabric scheduler`` process started and found, CPU
time and memory of a process read precisely, and every process started here stopped."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def raise_nofile() -> tuple[int, int]:
    """Raise this process's soft limit of open files to the hard one (inherited by every
    process started afterwards, the scheduler included); returns (soft, hard)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return (-1, -1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def env_for_zfabric() -> dict[str, str]:
    """This process's environment, the in-tree package first on PYTHONPATH, security off."""
    env = dict(os.environ)
    parts = [str(REPO_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    env.pop("ZFABRIC_SECURITY", None)
    return env


def cpu_s(pid: int) -> float:
    """CPU seconds of a live process: its threads' run times in ns from
    /proc/PID/task/*/schedstat, or psutil's user + system (10 ms ticks) where that is missing."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        tids = []
    total = 0.0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            continue
    if total:
        return total
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 1e6


def spawn(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in a session of its own (a Ctrl-C reaches only us; we stop it),
    output to ``log_path``."""
    with open(log_path, "ab") as out:
        return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


class Scheduler:
    """A scheduler process on 127.0.0.1 and a free port: ``zfabric scheduler ARGS``, or
    ``cmd`` (any scheduler CLI that takes ``--scheduler-file``, e.g. dask's)."""

    def __init__(self, env: dict[str, str], workdir: Path, args: Sequence[str] = (),
                 timeout: float = 30.0, cmd: Sequence[str] | None = None):
        self.log = workdir / "scheduler.log"
        sfile = workdir / "scheduler.json"
        if cmd is None:
            cmd = [sys.executable, "-m", "zfabric", "scheduler", "--host", "127.0.0.1",
                   "--port", "0"]
        self.proc = spawn([*cmd, "--scheduler-file", str(sfile), *args], env, self.log)
        self.pid = self.proc.pid
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, ValueError, KeyError):
                self.address: str = json.loads(sfile.read_text())["address"]
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"the scheduler exited ({self.proc.returncode}):"
                                   f" {tail(self.log)}")
            if time.monotonic() > deadline:
                stop([self.proc])
                raise RuntimeError(f"the scheduler wrote no address in {timeout:g} s:"
                                   f" {tail(self.log)}")
            time.sleep(0.05)

    def cpu_s(self) -> float:
        return cpu_s(self.pid)

    def rss_mb(self) -> float:
        return rss_mb(self.pid)


def stop(procs: Sequence[subprocess.Popen], grace: float = 5.0,
         sig: signal.Signals = signal.SIGTERM) -> None:
    """Signal each process's group (``sig``), wait up to ``grace`` s in all, then SIGKILL the
    rest (each was started in a session of its own, see :func:`spawn`)."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, sig)
    deadline = time.monotonic() + grace
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(max(0.0, deadline - time.monotonic()))
    for p in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)  # also what a process left behind in its group
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(2.0)


def workdir(prefix: str) -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=prefix)


def raise_on_sigterm() -> None:
    """A SIGTERM becomes SystemExit, so that ``finally`` blocks stop what we started."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def kill_marked(name: str, value: str) -> int:
    """Kill every process (but this one) whose environment has ``name=value``: what the
    processes we started left behind."""
    import psutil

    killed = 0
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get(name) == value:
                proc.kill()
                killed += 1
        except (psutil.Error, OSError):
            continue
    return killed
