"""zfabric across hosts, and the same-host shared-memory path, with real ``zfabric`` processes.

``test_three_hosts`` builds a LAN of three hosts in network namespaces (:mod:`netns`; root
only, skipped otherwise): the scheduler and the client on host a, a worker on host b, a Nanny
with one worker on host c. A ~40 MB array made on b is consumed by a task on c (a peer-to-peer
fetch from b to c) and the result is gathered by the client on a. The hosts share a
filesystem and a process table, so the shared-memory path *would* work between them: the test
proves it is not taken by counting the bytes each host's ``eth0`` received, and by checking
that the received arrays do not live in a mapping of a zfabric memfd segment.

The other two tests run on this host without namespaces: two workers hand a large value to
each other (and to the client) through shared memory, and a SIGKILLed worker's segments are
freed by the kernel (the host's ``Shmem`` drops by their size).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import netns
import numpy as np
import pytest

from zfabric import Client, shm

ZFABRIC = [sys.executable, "-m", "zfabric"]
#: Elements of the float64 array moved between hosts: 40 MB.
LAN_N = 5_000_000
LAN_NBYTES = LAN_N * 8
#: The scheduler's port on host a; the namespace is new, so any port is free.
LAN_PORT = 8786
#: Elements of the array moved on one host: 4 MiB, above shm's 1 MiB threshold.
LOCAL_N = 1 << 19
#: Bounded waits.
START_TIMEOUT_S = 20.0
CLIENT_TIMEOUT_S = 40.0

# Task functions, as source: the client on host a runs them as part of its script, and the
# tests on this host exec them into a module that is not importable, so that cloudpickle
# sends them by value (a worker cannot import this test module).
HELPERS = r'''
import numpy as np

from zfabric import shm


def make(n, seed=7):
    """n float64 numbers, the same for the same n and seed."""
    return np.random.default_rng(seed).random(n)


def in_shm(arr):
    """Whether arr was received through shared memory rather than read off a socket."""
    return shm.in_segment(arr)


def pool_stats():
    return shm.pool().stats()


def consume(x, producer, me):
    """A task that depends on x (made at producer) and runs at me."""
    return {"y": x * 2 + 1, "x_in_shm": in_shm(x), "producer_is_local": shm.is_local(producer),
            "me_is_local": shm.is_local(me)}


def eth0_bytes():
    """(rx, tx) bytes of this network namespace's eth0 (`ip netns exec` mounts its /sys)."""
    out = []
    for what in ("rx_bytes", "tx_bytes"):
        with open(f"/sys/class/net/eth0/statistics/{what}") as f:
            out.append(int(f.read()))
    return out
'''

CLIENT_MAIN = r'''

import json
import os
import sys
import time

from zfabric import Client, wait


def host_of(address):
    return address.rpartition(":")[0].removeprefix("tcp://")


def main(address, ip_b, ip_c, n):
    report = {}
    with Client(address, timeout=10, set_as_default=False) as c:
        deadline = time.monotonic() + 20
        while len(c.scheduler_info()["workers"]) < 2:
            if time.monotonic() > deadline:
                raise SystemExit(f"workers registered: {c.scheduler_info()['workers']}")
            time.sleep(0.1)
        workers = sorted(c.scheduler_info()["workers"])
        report["workers"] = workers
        (wb,) = [w for w in workers if host_of(w) == ip_b]
        (wc,) = [w for w in workers if host_of(w) == ip_c]
        report["local_addresses"] = c.run(lambda: sorted(shm.local_addresses()))
        report["client_is_local"] = {w: shm.is_local(w) for w in workers}

        # Small tasks, on both hosts and anywhere.
        report["squares"] = sum(c.gather(c.map(lambda i: i * i, range(100))))
        report["pinned"] = [c.submit(lambda: 1, workers=[w], pure=False).result(timeout=10)
                            for w in (wb, wc)]

        def snap():
            remote = c.run(eth0_bytes)
            return {"a": eth0_bytes(), "b": remote[wb], "c": remote[wc]}

        snaps = [snap()]
        fx = c.submit(make, n, workers=[wb], pure=False)
        wait([fx], timeout=20)
        report["x_held_by"] = c.who_has([fx])[fx.key]
        snaps.append(snap())
        fy = c.submit(consume, fx, wb, wc, workers=[wc], pure=False)
        wait([fy], timeout=20)
        report["y_held_by"] = c.who_has([fy])[fy.key]
        snaps.append(snap())
        r = fy.result(timeout=20)
        snaps.append(snap())
        report["snaps"] = snaps
        report["y_equal"] = bool(np.array_equal(r["y"], make(n) * 2 + 1))
        report["y_in_shm_at_client"] = in_shm(r["y"])
        report.update({k: v for k, v in r.items() if k != "y"})
    report.update(dataframe_shuffles(address))
    return report


def dataframe_shuffles(address):
    """A merge and a set_index with a zfabric client as dask's scheduler (shuffle "tasks")."""
    import dask
    import dask.dataframe as dd
    import pandas as pd

    out = {}
    with Client(address, timeout=10):  # the default client: dask's scheduler
        out["shuffle_method"] = dask.config.get("dataframe.shuffle.method")
        pdf = pd.DataFrame({"k": np.arange(4000) % 13, "v": np.arange(4000.0)})
        other = pd.DataFrame({"k": np.arange(13), "w": np.arange(13) * 10})
        df = dd.from_pandas(pdf, npartitions=6)
        odf = dd.from_pandas(other, npartitions=3)
        merged = df.merge(odf, on="k", shuffle_method="tasks")
        got = merged.groupby("k").w.sum().compute().sort_index()
        want = pdf.merge(other, on="k").groupby("k").w.sum().sort_index()
        out["df_merge_ok"] = bool(got.equals(want))
        indexed = df.set_index("k").v.compute()
        got = indexed.groupby(level=0).sum()
        want = pdf.set_index("k").v.groupby(level=0).sum().sort_index()
        out["df_set_index_ok"] = bool(indexed.index.is_monotonic_increasing
                                      and np.allclose(got.values, want.values)
                                      and list(got.index) == list(want.index))
        pids = dask.compute(*[dask.delayed(os.getpid)(dask_key_name=f"pid-{i}")
                              for i in range(6)])
        out["df_ran_remote"] = os.getpid() not in pids
    return out


if __name__ == "__main__":
    report = main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
    print("REPORT " + json.dumps(report), flush=True)
'''


def _helpers() -> SimpleNamespace:
    module = {"__name__": "zfabric_multihost_helpers"}  # not in sys.modules: pickled by value
    exec(compile(HELPERS, "<multihost helpers>", "exec"), module)
    return SimpleNamespace(**module)


def _host_of(address: str) -> str:
    return address.rpartition(":")[0].removeprefix("tcp://")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _logs(log_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{_tail(p)}" for p in sorted(log_dir.glob("*.log")))


def _wait_for_file(path: Path, procs: list[subprocess.Popen], log_dir: Path) -> dict:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            return json.loads(path.read_text())
        dead = [p.args for p in procs if p.poll() is not None]
        assert not dead, f"exited early: {dead}\n{_logs(log_dir)}"
        assert time.monotonic() < deadline, f"no {path.name} after {START_TIMEOUT_S} s\n" \
            f"{_logs(log_dir)}"
        time.sleep(0.05)


def _shmem_bytes() -> int:
    """Shared memory in use on this host (``Shmem`` in /proc/meminfo; memfds count there)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no Shmem line in /proc/meminfo")


def _delta(snaps: list[dict], i: int, host: str) -> tuple[int, int]:
    """(rx, tx) bytes host received and sent between snapshot i and i + 1."""
    (rx0, tx0), (rx1, tx1) = snaps[i][host], snaps[i + 1][host]
    return rx1 - rx0, tx1 - tx0


# ---------------------------------------------------------------------- three hosts


@pytest.fixture
def lan():
    """Three hosts on a bridge, each in its own network namespace; torn down afterwards."""
    with netns.lan_for_test(3) as lan:
        yield lan
    assert lan.names() == [], "network namespaces left behind"


@pytest.fixture(autouse=True)
def _same_host_shm(monkeypatch):
    # The shared-memory path is on by default (config.SAME_HOST_SHM); these tests check that
    # it is taken exactly where it should be, so every process they start has it on whatever
    # the environment says.
    monkeypatch.setenv("ZFABRIC_SAME_HOST_SHM", "1")


def test_three_hosts(lan, tmp_path):
    # Given a scheduler on host a, a worker on host b and a Nanny with one worker on host c
    a, b, c = 0, 1, 2
    address = f"tcp://{lan.ips[a]}:{LAN_PORT}"
    sched_file = tmp_path / "scheduler.json"

    def start(host: int, log: str, *args: str) -> subprocess.Popen:
        with open(tmp_path / f"{log}.log", "w") as out:
            return lan.popen(host, [*ZFABRIC, *args], stdout=out, stderr=subprocess.STDOUT)

    procs = [
        start(a, "scheduler", "scheduler", "--host", lan.ips[a], "--port", str(LAN_PORT),
              "--scheduler-file", str(sched_file)),
        start(b, "worker-b", "worker", address, "--nthreads", "1", "--memory-limit", "0",
              "--death-timeout", "20"),
        start(c, "nanny-c", "nanny", address, "--nworkers", "1", "--nthreads", "1",
              "--memory-limit", "0", "--death-timeout", "20"),
    ]
    assert _wait_for_file(sched_file, procs, tmp_path)["address"] == address

    # When a client on host a makes a 40 MB array on b, consumes it on c and gathers the result
    script = tmp_path / "client.py"
    script.write_text(HELPERS + CLIENT_MAIN)
    client = lan.popen(a, [sys.executable, str(script), address, lan.ips[b], lan.ips[c],
                           str(LAN_N)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
    try:
        out, err = client.communicate(timeout=CLIENT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        client.kill()
        out, err = client.communicate()
        pytest.fail(f"client did not finish in {CLIENT_TIMEOUT_S} s\n{err}\n{_logs(tmp_path)}")
    assert client.returncode == 0, f"client failed:\n{out}\n{err}\n{_logs(tmp_path)}"
    (line,) = [ln for ln in out.splitlines() if ln.startswith("REPORT ")]
    r = json.loads(line.removeprefix("REPORT "))

    # Then both workers registered with addresses on their own hosts, each seeing only its own
    wb, wc = sorted(r["workers"], key=lambda w: _host_of(w) != lan.ips[b])
    assert [_host_of(wb), _host_of(wc)] == [lan.ips[b], lan.ips[c]]
    for w, own in ((wb, lan.ips[b]), (wc, lan.ips[c])):
        seen = set(r["local_addresses"][w])
        assert own in seen and not seen & (set(lan.ips) - {own}), (w, seen)
    # and no two of the hosts count as one for shared memory
    assert r["client_is_local"] == {wb: False, wc: False}
    assert r["producer_is_local"] is False and r["me_is_local"] is True
    # and small tasks ran
    assert r["squares"] == sum(i * i for i in range(100)) and r["pinned"] == [1, 1]
    # and the values are where they were made, and right
    assert r["x_held_by"] == [wb] and r["y_held_by"] == [wc]
    assert r["y_equal"] is True

    # And the bytes went over TCP: while x was made nothing large moved,
    snaps = r["snaps"]
    small = LAN_NBYTES // 10
    for host in "abc":
        assert max(_delta(snaps, 0, host)) < small, ("make", host, _delta(snaps, 0, host))
    # c received x from b (peer to peer: not through host a) into socket memory, not shm,
    assert _delta(snaps, 1, "c")[0] >= LAN_NBYTES, _delta(snaps, 1, "c")
    assert _delta(snaps, 1, "b")[1] >= LAN_NBYTES, _delta(snaps, 1, "b")
    assert _delta(snaps, 1, "a")[0] < small, _delta(snaps, 1, "a")
    assert r["x_in_shm"] is False
    # and the client on a received y from c.
    assert _delta(snaps, 2, "a")[0] >= LAN_NBYTES, _delta(snaps, 2, "a")
    assert _delta(snaps, 2, "c")[1] >= LAN_NBYTES, _delta(snaps, 2, "c")
    assert _delta(snaps, 2, "b")[0] < small, _delta(snaps, 2, "b")
    assert r["y_in_shm_at_client"] is False
    # And dask dataframes shuffle across the hosts by tasks (no files on the client's host)
    assert r["shuffle_method"] == "tasks"
    assert r["df_merge_ok"] is True and r["df_set_index_ok"] is True
    assert r["df_ran_remote"] is True


# ---------------------------------------------------------------------- one host


class LocalCluster:
    """A ``zfabric scheduler`` on 127.0.0.1 and ``zfabric worker`` processes, logging to files."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.sched_file = log_dir / "scheduler.json"
        self.procs: list[subprocess.Popen] = []
        self.address = ""

    def _start(self, log: str, *args: str) -> subprocess.Popen:
        with open(self.log_dir / f"{log}.log", "w") as out:
            p = subprocess.Popen([*ZFABRIC, *args], stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def start(self, nworkers: int) -> str:
        self._start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", "0",
                    "--scheduler-file", str(self.sched_file))
        for _ in range(nworkers):
            self.worker()
        self.address = _wait_for_file(self.sched_file, self.procs, self.log_dir)["address"]
        return self.address

    def worker(self) -> subprocess.Popen:
        return self._start(f"worker-{len(self.procs)}", "worker", "--scheduler-file",
                           str(self.sched_file), "--nthreads", "1", "--memory-limit", "0",
                           "--death-timeout", "20")

    def workers(self, client: Client, n: int, exclude=()) -> list[str]:
        """The addresses of the registered workers, once ``n`` are there (minus ``exclude``)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            found = sorted(set(client.scheduler_info()["workers"]) - set(exclude))
            if len(found) >= n:
                return found
            assert time.monotonic() < deadline, f"workers: {found}\n{_logs(self.log_dir)}"
            time.sleep(0.05)

    def close(self) -> None:
        """SIGTERM every process group, SIGKILL what is left after 5 s or if interrupted."""
        try:
            for p in self.procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            for p in self.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=max(0.0, deadline - time.monotonic()))
        finally:
            for p in self.procs:
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
                    p.wait(timeout=5)


@pytest.fixture
def local(tmp_path):
    if not shm.available():
        pytest.skip("memfd segments are not available here")
    cluster = LocalCluster(tmp_path)
    try:
        yield cluster
    finally:
        cluster.close()


def test_same_host_workers_share_memory(local):
    # Given two worker processes on this host
    h = _helpers()
    address = local.start(nworkers=2)
    with Client(address, timeout=10, set_as_default=False) as c:
        wa, wb = local.workers(c, 2)
        pids = c.run(os.getpid)
        assert sorted(pids.values()) == sorted(p.pid for p in local.procs[1:])

        # When a task on b consumes a 4 MiB array made on a, and the client gathers the result
        fx = c.submit(h.make, LOCAL_N, workers=[wa], pure=False)
        fy = c.submit(h.consume, fx, wa, wb, workers=[wb], pure=False)
        r = fy.result(timeout=20)

        # Then b received x in a segment of its own, and so did the client for y
        assert r["producer_is_local"] is True and r["me_is_local"] is True
        assert r["x_in_shm"] is True
        assert h.in_shm(r["y"])
        assert np.array_equal(r["y"], h.make(LOCAL_N) * 2 + 1)

        # and a large argument went from the client into a segment of the worker.
        fz = c.submit(h.in_shm, h.make(LOCAL_N, seed=3), workers=[wa], pure=False)
        assert fz.result(timeout=20) is True

        # Once nothing refers to the values, no lease is left open anywhere and the segments
        # are back in the pools for the next transfer.
        del fx, fy, fz, r
        deadline = time.monotonic() + 10
        while True:
            stats = c.run(h.pool_stats)
            if all(s["leased"] == 0 and s["free"] >= 1 for s in stats.values()):
                break
            assert time.monotonic() < deadline, stats
            time.sleep(0.1)
        assert shm.pool().stats()["leased"] == 0


def test_killed_worker_leaks_no_segments(local):
    # Given a worker holding 64 MiB it received through shared memory
    h = _helpers()
    address = local.start(nworkers=1)
    n = 8 << 20  # float64 elements: 64 MiB
    with Client(address, timeout=10, set_as_default=False) as c:
        (wa,) = local.workers(c, 1)
        pid_a = c.run(os.getpid)[wa]
        assert pid_a == local.procs[1].pid
        [fx] = c.scatter([h.make(n)], workers=[wa])
        assert c.submit(h.in_shm, fx, pure=False).result(timeout=20) is True
        before = _shmem_bytes()

        # When that worker is killed with SIGKILL
        os.kill(pid_a, signal.SIGKILL)
        local.procs[1].wait(timeout=5)

        # Then the kernel frees its segments: nothing has a name to leak by.
        deadline = time.monotonic() + 5
        while before - _shmem_bytes() < 0.9 * n * 8:
            assert time.monotonic() < deadline, (before, _shmem_bytes())
            time.sleep(0.05)
