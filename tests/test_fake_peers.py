"""The fake-worker load harness of ``scripts/fake_peers.py``, small: 50 fake workers in one
process (raw DEALER peers over real sockets) against a real ``zfabric scheduler`` process and
a real client. No timing is asserted; the figures belong to the script."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from zfabric import Client, wait

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import fake_peers
import procs

N = 50


def noop(x):
    return None


def test_fifty_fake_workers_get_work_heartbeat_as_told_and_every_task_finishes(
        tmp_path, no_leftover_processes):
    env = procs.env_for_zfabric()
    env["ZFABRIC_HEARTBEAT_INTERVAL_S"] = "1.5"  # what the welcome tells the peers
    sched = procs.Scheduler(env, tmp_path, ["--no-dashboard"])
    peers = None
    try:
        peers = fake_peers.PeerProcess(sched.address, N, limit_s=60, timeout=20)
        st = peers.wait_welcomed(20)
        assert st["welcomed"] == N, st["errors"]
        with Client(sched.address, set_as_default=False) as c:
            # Given 50 fake workers the scheduler lists
            assert fake_peers.wait_workers(c, N, 20) == N
            # When no-op tasks are mapped, then every one finishes (the fake peers' results)
            assert c.gather(c.map(noop, range(500), pure=False)) == [None] * 500
            # and with each task finished 50 ms after it started, every fake peer gets work
            peers.set_delay(0.05)
            before = peers.stats()["got"]
            futures = c.map(noop, range(2 * N), pure=False)
            wait(futures, timeout=20)
            assert all(f.status == "finished" for f in futures)
            after = peers.stats()
            got = [b - a for a, b in zip(before, after["got"], strict=True)]
            assert sum(got) == 2 * N
            assert all(g > 0 for g in got), got
        # The peers heartbeat at the interval the scheduler gave them, and nothing was refused
        assert after["heartbeat_s"] == [1.5]
        for _ in range(50):  # a first round of heartbeats within 5 s
            if after["heartbeats"] >= N:
                break
            time.sleep(0.1)
            after = peers.stats()
        assert after["heartbeats"] >= N
        assert after["n_errors"] == 0, after["errors"]
    finally:
        if peers is not None:
            peers.close()
        procs.stop([sched.proc])
