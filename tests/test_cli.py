"""The ``zfabric`` command, run as real subprocesses (and through typer's runner for --help).

Every test checks that no process it started is left behind.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from zfabric.cli import app, format_info

pytestmark = [pytest.mark.timeout(40), pytest.mark.usefixtures("no_leftover_processes")]

ZFABRIC = [sys.executable, "-m", "zfabric"]




class Procs:
    """Subprocesses started by a test; killed at the end if a test failed half-way."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, *args: str, **kw) -> subprocess.Popen:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        p = subprocess.Popen([*ZFABRIC, *args], text=True, **kw)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 10) -> int:
        p.send_signal(sig)
        return p.wait(timeout)

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def procs():
    p = Procs()
    yield p
    p.cleanup()


def wait_for(predicate, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        time.sleep(0.05)


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([*ZFABRIC, *args], capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------- arguments


@pytest.mark.parametrize("command", ["scheduler", "worker", "nanny", "info", "demo"])
def test_each_command_has_help(command):
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_help_through_python_dash_m():
    result = run("--help")
    assert result.returncode == 0
    for command in ("scheduler", "worker", "nanny", "info", "demo"):
        assert command in result.stdout
    assert "--identity" not in run("worker", "--help").stdout  # the Nanny's options are hidden


@pytest.mark.parametrize("args", [
    ["no-such-command"],
    ["worker"],  # neither ADDRESS nor --scheduler-file
    ["worker", "tcp://127.0.0.1:1", "--nthreads", "0"],
    ["worker", "tcp://127.0.0.1:1", "--resources", "GPU"],
    ["scheduler", "--port", "many"],
    ["nanny", "tcp://127.0.0.1:1", "--nworkers", "-1"],
    ["info", "--scheduler-file", "/nonexistent/scheduler.json"],
    ["worker", "tcp://127.0.0.1:1", "--log-level", "chatty"],
])
def test_bad_arguments_exit_with_2(args):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output


def test_info_without_scheduler_exits_1_and_names_the_address():
    result = run("info", "tcp://127.0.0.1:9", "--timeout", "0.3")
    assert result.returncode == 1
    assert "tcp://127.0.0.1:9" in result.stderr


def test_scheduler_port_in_use_exits_1(procs, tmp_path):
    sf = tmp_path / "scheduler.json"
    first = procs.start("scheduler", "--host", "127.0.0.1", "--port", "0",
                        "--scheduler-file", str(sf))
    address = wait_for(lambda: sf.exists() and json.loads(sf.read_text())["address"])
    port = address.rsplit(":", 1)[1]
    second = run("scheduler", "--host", "127.0.0.1", "--port", port)
    assert second.returncode == 1
    assert "cannot listen" in second.stderr
    assert procs.stop(first) == 0


def test_format_info():
    text = format_info({
        "address": "tcp://h:1",
        "workers": {"tcp://h:2": {"name": "w1", "nthreads": 2, "memory_limit": 2**30,
                                  "metrics": {"memory": 2**20, "executing": 1},
                                  "processing": 3, "in_memory": 4}},
        "tasks": {"memory": 4, "processing": 3},
    })
    assert "w1" in text and "tcp://h:2" in text and "1.00 MiB / 1.00 GiB" in text
    assert "Tasks: memory 4, processing 3" in text


# ---------------------------------------------------------------------- real processes


def test_scheduler_worker_info_with_scheduler_file(procs, tmp_path):
    sf, pf = tmp_path / "scheduler.json", tmp_path / "scheduler.pid"
    # Given a scheduler that writes its address and pid to files
    sched = procs.start("scheduler", "--host", "127.0.0.1", "--port", "0",
                        "--scheduler-file", str(sf), "--pid-file", str(pf))
    # and a worker that finds it through the file (started before the file may exist)
    worker = procs.start("worker", "--scheduler-file", str(sf), "--nthreads", "2",
                         "--name", "alice", "--memory-limit", "1GiB", "--resources", "GPU=2")
    address = wait_for(lambda: sf.exists() and json.loads(sf.read_text())["address"],
                       what="scheduler file")
    assert address.startswith("tcp://127.0.0.1:")
    assert int(pf.read_text()) == sched.pid

    # When we ask for info
    def info():
        r = run("info", "--scheduler-file", str(sf))
        return r if r.returncode == 0 and "alice" in r.stdout else None

    result = wait_for(info, what="worker in zfabric info")
    # Then it shows the worker's row
    line = next(x for x in result.stdout.splitlines() if x.startswith("alice"))
    assert "tcp://127.0.0.1:" in line and " 2 " in line and "/ 1.00 GiB" in line
    assert "Tasks:" in result.stdout

    # SIGTERM stops each one cleanly, and the scheduler removes its files
    assert procs.stop(worker) == 0
    assert "Worker at: tcp://" in worker.stdout.read()
    assert procs.stop(sched) == 0
    assert f"Scheduler at: {address}" in sched.stdout.read()
    assert not sf.exists() and not pf.exists()


def test_scheduler_listens_everywhere_by_default_and_stops_on_sigint(procs, tmp_path):
    sf = tmp_path / "scheduler.json"
    sched = procs.start("scheduler", "--port", "0", "--scheduler-file", str(sf))
    address = wait_for(lambda: sf.exists() and json.loads(sf.read_text())["address"])
    assert "0.0.0.0" not in address  # it gives out this host's own address
    result = run("info", address, "--timeout", "5")
    assert result.returncode == 0, result.stderr
    assert "0 workers, 0 threads" in result.stdout
    assert procs.stop(sched, signal.SIGINT) == 0


def test_worker_without_scheduler_gives_up_after_death_timeout(procs):
    start = time.monotonic()
    result = run("worker", "tcp://127.0.0.1:9", "--death-timeout", "0.5", "--nthreads", "1")
    assert result.returncode == 1
    assert "tcp://127.0.0.1:9" in result.stderr
    assert time.monotonic() - start < 10


def test_demo_runs():
    result = run("demo", "--tasks", "400", "--samples", "200", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "pi ≈" in result.stdout
    assert "799/799 tasks" in result.stdout
    assert "tasks/s" in result.stdout
    assert len([x for x in result.stdout.splitlines() if x.strip().startswith("worker ")]) == 2
