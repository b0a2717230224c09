"""SSHCluster against the real OpenSSH, on a LAN of three network-namespace hosts.

The fixture builds the LAN (:mod:`netns`), makes a client key and a host key, and runs
Debian's ``sshd`` on each host (root may log in with the key only). The root namespace cannot
reach the hosts, so every client script runs inside host a; the hosts share this filesystem,
so ``remote_python`` is a wrapper that runs this interpreter with this checkout on
``PYTHONPATH``. Skipped (saying why) without root, iproute2 or OpenSSH, except with
``CI=true``, where a missing program fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import netns
import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Bounded waits.
SCRIPT_TIMEOUT_S = 90.0
#: The death timeout the SIGKILL test gives its workers.
SHORT_DEATH_TIMEOUT_S = 5.0

PRELUDE = r'''
import asyncio, json, sys, time
from zfabric import Client
from zfabric.deploy.ssh import SSHCluster, SSHError

HOSTS = {hosts!r}
CONNECT = {{"username": "root", "client_keys": [{key!r}], "known_hosts": None}}
PYTHON = {python!r}


def report(**kw):
    print("REPORT " + json.dumps(kw), flush=True)
'''

#: The example docs/deploy.md shows (keep the two in step), then adaptive scaling.
COMPUTE = r'''
def host_of(address):
    return address.rpartition(":")[0].removeprefix("tcp://")


with SSHCluster(HOSTS, connect_options=CONNECT, remote_python=PYTHON,
                worker_options={"nthreads": 2}, scheduler_options={"dashboard": False}) as cluster:
    with Client(cluster) as client:
        cluster.wait_for_workers(2, timeout=30)
        total = sum(client.gather(client.map(lambda x: x * x, range(100))))
        first = sorted(host_of(w) for w in client.scheduler_info()["workers"])
        cluster.scale(3)  # one more Nanny, on the next worker host in turn
        cluster.wait_for_workers(3, timeout=30)
        third = sorted(host_of(w) for w in client.scheduler_info()["workers"])
        cluster.scale(1)
        after = len(client.scheduler_info()["workers"])
        logs = sorted(cluster.get_logs())
        jobs = list(cluster.jobs)
        # Adaptive: a second Nanny while 0.2 s tasks queue, back to one once idle.
        adaptive = cluster.adapt(minimum=1, maximum=2, interval="200ms", wait_count=3,
                                 target_duration="1s")
        futures = client.map(lambda x: time.sleep(0.2) or x, range(40))
        deadline = time.monotonic() + 30
        while len(cluster.workers) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        grew = len(cluster.workers)
        adapted = sum(client.gather(futures))
        while len(cluster.workers) > 1 and time.monotonic() < deadline + 30:
            time.sleep(0.1)
        shrank = len(cluster.workers)
        adaptive.stop()
    report(total=total, scheduler=cluster.scheduler_address, first=first, third=third,
           after=after, logs=logs, jobs=jobs, grew=grew, adapted=adapted, shrank=shrank,
           log=[entry[1:] for entry in adaptive.log])
'''

FAILURES = r'''
def attempt(**kw):
    t = time.monotonic()
    try:
        with SSHCluster(**kw):
            return {"error": None}
    except SSHError as exc:
        return {"error": str(exc), "seconds": time.monotonic() - t}


out = {}
out["unreachable"] = attempt(hosts=[HOSTS[0], UNREACHABLE], connect_options=CONNECT,
                             remote_python=PYTHON)
out["no_zfabric"] = attempt(hosts=HOSTS[:2], connect_options=CONNECT,
                            remote_python=[PYTHON, BARE_PYTHON])
out["no_python"] = attempt(hosts=HOSTS[:2], connect_options=CONNECT,
                           remote_python=[PYTHON, "/nonexistent/bin/python3"])


async def asynchronous():
    async with SSHCluster(HOSTS[:2], connect_options=CONNECT, remote_python=PYTHON,
                          asynchronous=True) as cluster:
        await cluster.wait_for_workers(1, timeout=30)
        async with Client(cluster, asynchronous=True) as client:
            return await client.submit(sum, [1, 2, 3])


out["asynchronous"] = asyncio.run(asynchronous())
report(**out)
'''

HANG = r'''
cluster = SSHCluster(HOSTS, connect_options=CONNECT, remote_python=PYTHON,
                     death_timeout={death_timeout}, scheduler_options={{"dashboard": False}})
cluster.wait_for_workers(2, timeout=30)
report(scheduler=cluster.scheduler_address)
time.sleep(600)
'''


def _require(reason: str | None) -> None:
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def ssh_lan(tmp_path_factory):
    _require(netns.unavailable_reason() or netns.ssh_unavailable_reason())
    d = tmp_path_factory.mktemp("ssh")
    os.chmod(d, 0o700)
    key = netns.make_ssh_keys(str(d))
    python = d / "python"
    python.write_text(f"#!/bin/sh\nexport PYTHONPATH={ROOT}\nexec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    # An environment without zfabric: a bare venv of the same interpreter.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(d / "bare")],
                   check=True, timeout=60)
    with netns.lan_for_test(3) as lan:
        for i in range(3):
            netns.start_sshd(lan, i, str(d))
        for i in range(3):
            netns.wait_for_port(lan, i, 22)
        lan.ssh_dir = d
        lan.prelude = PRELUDE.format(hosts=list(lan.ips), key=key, python=str(python))
        yield lan


def _script(lan, body: str) -> list[str]:
    path = lan.ssh_dir / f"script-{time.monotonic_ns()}.py"
    path.write_text(textwrap.dedent(lan.prelude) + body)
    return lan.argv(0, [sys.executable, str(path)])


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _report(out: str) -> dict:
    for line in out.splitlines():
        if line.startswith("REPORT "):
            return json.loads(line[len("REPORT "):])
    raise AssertionError(f"no report in the script's output:\n{out}")


def _sshd_logs(lan) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                     for p in sorted(lan.ssh_dir.glob("sshd-*.log")))


def test_ssh_cluster_runs_a_computation_and_close_leaves_nothing(ssh_lan):
    lan = ssh_lan
    proc = subprocess.run(_script(lan, COMPUTE), capture_output=True, text=True,
                          timeout=SCRIPT_TIMEOUT_S, env=_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr + _sshd_logs(lan)
    r = _report(proc.stdout)
    assert r["total"] == sum(x * x for x in range(100))
    a, b, c = lan.ips
    assert r["scheduler"].startswith(f"tcp://{a}:")  # the first host, by the address ssh used
    assert r["first"] == [b, c]
    assert r["third"] == [b, b, c]
    assert r["after"] == 1
    assert r["jobs"] == ["0"]
    assert {"Cluster", "Scheduler"} <= set(r["logs"])
    assert r["adapted"] == sum(range(40))
    assert (r["grew"], r["shrank"]) == (2, 1), r["log"]
    assert netns.zfabric_pids(lan) == {}


def test_ssh_cluster_start_failures_name_the_host_and_stderr_and_async_use(ssh_lan):
    lan = ssh_lan
    unreachable = lan.ips[0].rpartition(".")[0] + ".250"
    bare = str(lan.ssh_dir / "bare" / "bin" / "python")
    body = f"UNREACHABLE = {unreachable!r}\nBARE_PYTHON = {bare!r}\n{FAILURES}"
    proc = subprocess.run(_script(lan, body), capture_output=True, text=True,
                          timeout=SCRIPT_TIMEOUT_S * 2, env=_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = _report(proc.stdout)
    for case in ("unreachable", "no_zfabric", "no_python"):
        assert r[case]["error"], case
        assert r[case]["seconds"] < 60, r[case]
    assert f"host {unreachable!r}" in r["unreachable"]["error"]
    assert "ssh: connect to host" in r["unreachable"]["error"]
    assert f"host {lan.ips[1]!r}" in r["no_zfabric"]["error"]
    assert "No module named zfabric" in r["no_zfabric"]["error"]
    assert f"host {lan.ips[1]!r}" in r["no_python"]["error"]
    assert "/nonexistent/bin/python3" in r["no_python"]["error"]
    assert r["asynchronous"] == 6
    # A failed start closes what had started (the scheduler on host a).
    assert netns.zfabric_pids(lan) == {}


def test_sigkilled_client_leaves_nothing_after_the_death_timeout(ssh_lan):
    lan = ssh_lan
    body = HANG.format(death_timeout=SHORT_DEATH_TIMEOUT_S)
    log = lan.ssh_dir / "hang.log"
    with open(log, "w") as out:
        proc = lan.popen(0, _script(lan, body)[len(lan.argv(0, [])):], stdout=out,
                         stderr=subprocess.STDOUT, env=_env())
    deadline = time.monotonic() + SCRIPT_TIMEOUT_S
    while "REPORT" not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    running = netns.zfabric_pids(lan)
    assert set(running) == set(lan.hosts), running  # a scheduler and two Nannies
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    killed = time.monotonic()
    while netns.zfabric_pids(lan):
        assert time.monotonic() - killed < SHORT_DEATH_TIMEOUT_S + 15, netns.zfabric_pids(lan)
        time.sleep(0.2)
    print(f"nothing left {time.monotonic() - killed:.1f} s after the SIGKILL")


def test_workers_exit_after_the_death_timeout_once_the_scheduler_is_gone(ssh_lan):
    lan = ssh_lan
    body = HANG.format(death_timeout=SHORT_DEATH_TIMEOUT_S)
    log = lan.ssh_dir / "gone.log"
    with open(log, "w") as out:
        proc = lan.popen(0, _script(lan, body)[len(lan.argv(0, [])):], stdout=out,
                         stderr=subprocess.STDOUT, env=_env())
    try:
        deadline = time.monotonic() + SCRIPT_TIMEOUT_S
        while "REPORT" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        # The scheduler dies without a word (its session stays open): only the death
        # timeout can end the Nannies on hosts b and c.
        (scheduler,) = [int(p) for p in netns.ip("netns", "pids", lan.hosts[0]).split()
                        if "-m zfabric scheduler" in _cmdline(p)
                        and not _cmdline(p).startswith("ssh ")]  # not the local ssh client
        os.kill(scheduler, signal.SIGKILL)
        killed = time.monotonic()
        while set(netns.zfabric_pids(lan)) & set(lan.hosts[1:]):
            assert time.monotonic() - killed < SHORT_DEATH_TIMEOUT_S + 15, \
                netns.zfabric_pids(lan)
            time.sleep(0.2)
        print(f"workers gone {time.monotonic() - killed:.1f} s after their scheduler")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
