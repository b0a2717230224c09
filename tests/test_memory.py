"""Worker memory: spilling to disk, pausing, the local directory, and what the scheduler sees.

Layers: the spill store alone (real files), the scheduler's handling of ``worker-status``
(sans-IO), in-process workers on real sockets, and user-style scripts run as subprocesses
with Nannies (memory is per process: RSS thresholds need worker processes of their own).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from zfabric import Client, Nanny, Scheduler, Worker, protocol
from zfabric.config import Config
from zfabric.testing import cluster, until
from zfabric.worker.memory import MemoryManager, memory_fractions
from zfabric.worker.spill import SpillStore, worker_directory

W1, W2 = b"w1", b"w2"
A1, A2 = "tcp://10.0.0.1:1001", "tcp://10.0.0.2:1002"
C = b"client-1"

MB = 2**20


# ---------------------------------------------------------------------------- the store


def test_store_spills_raw_buffers_and_reads_back(tmp_path):
    store = SpillStore(str(tmp_path / "w"))
    store.open()
    a = np.arange(1_000_000, dtype=np.int64)
    store.put("a", a, a.nbytes)
    store.put("b", {"small": 1}, 100)
    assert store.managed == a.nbytes + 100
    # Given a value in memory, when it is evicted (least recently used first) ...
    assert store.evict() == a.nbytes
    assert store.is_spilled("a") and store.managed == 100 and store.spilled >= a.nbytes
    files = os.listdir(tmp_path / "w")
    assert len(files) == 1
    # ... its file holds the raw buffer (plus a small pickle header), not a pickled copy.
    size = os.path.getsize(tmp_path / "w" / files[0])
    assert a.nbytes <= size < a.nbytes + 1024
    # A peer is served from the file without bringing the value back.
    _, bufs, _ = store.serialized_from_disk("a")
    assert bytes(bufs[0][:16]) == a.tobytes()[:16] and store.is_spilled("a")
    del bufs
    # Reading it brings it back, writable and equal; the file stays as a clean copy ...
    b = store["a"]
    assert not store.is_spilled("a") and np.array_equal(a, b) and b.flags.writeable
    assert os.listdir(tmp_path / "w") == files
    assert store.counters["spilled"] == 1 and store.counters["unspilled"] == 1
    # ... so evicting it unchanged writes nothing ...
    del b
    store.evict(skip={"b"})
    assert store.counters["rewrites_saved"] == 1 and os.listdir(tmp_path / "w") == files
    # ... while a value changed in memory (copy-on-write: never the file) is written anew.
    b = store["a"]
    b[0] = -1
    assert store.evict(skip={"b"}) and store.counters["rewrites_saved"] == 1
    assert len(os.listdir(tmp_path / "w")) == 1 and os.listdir(tmp_path / "w") != files
    c = store["a"]
    assert c[0] == -1 and np.array_equal(c[1:], a[1:])
    # Freeing the key removes its file.
    del b, c
    store.pop("a")
    assert os.listdir(tmp_path / "w") == []
    store.close()
    assert not (tmp_path / "w").exists()


def test_full_disk_pauses_instead_of_crashing(tmp_path):
    store = SpillStore(str(tmp_path / "w"))
    store.open()
    mm = MemoryManager(store, memory_limit=100 * MB, name="t",
                       fractions={"target": 0.01, "spill": 0, "pause": 0})
    store.put("x", np.ones(4 * MB // 8), 4 * MB)
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    prev = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 * MB, old[1]))  # files stop at 1 MB: EFBIG
    try:
        mm.spill_to_target(now=0.0)
        changed = mm.check(rss=0, now=0.0, measure_rss=lambda: 0)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, prev)
    assert changed and mm.paused and "cannot spill" in mm.reason
    assert "x" in store.fast and os.listdir(tmp_path / "w") == []  # kept, no partial file
    # Once the disk takes values again (after the retry delay), it spills and resumes.
    mm.spill_to_target(now=10.0)
    assert store.is_spilled("x")
    assert mm.check(rss=0, now=10.0, measure_rss=lambda: 0) and not mm.paused
    store.close()


def test_fractions_are_checked():
    cfg = Config()
    assert memory_fractions(cfg) == {"target": 0.6, "spill": 0.7, "pause": 0.8,
                                     "terminate": 0.95}
    assert memory_fractions(cfg, target=False, spill=0)["target"] == 0.0
    with pytest.raises(ValueError, match="memory_pause_fraction"):
        memory_fractions(cfg, pause=1.5)
    with pytest.raises(ValueError, match="memory_spill_fraction"):
        memory_fractions(cfg, spill="lots")


# ---------------------------------------------------------------------------- the scheduler


def given(*workers):
    """A scheduler state with these (ident, address) workers and one client; outbox flushed."""
    from zfabric.scheduler.state import SchedulerState

    state = SchedulerState(address="tcp://sched:8786", config=Config())
    for ident, address in workers:
        state.handle(ident, [protocol.hello("worker", ident.decode(), address=address,
                                            nthreads=1)], 0.0)
    state.handle(C, [protocol.hello("client", C.decode())], 0.0)
    state.flush()
    return state


def task(key):
    return [key, b"payload-" + key.encode(), [], None]


def test_paused_worker_gets_no_work_and_its_queued_tasks_move():
    state = given((W1, A1), (W2, A2))
    state.handle(b"client-1", [{"op": "submit", "tasks": [task(f"t{i}") for i in range(6)]}],
                 1.0)
    state.handle(W1, [{"op": "started", "keys": ["t0"]}], 1.0)
    on_w1 = set(state.workers[W1].processing)
    assert "t0" in on_w1 and len(on_w1) > 1
    state.flush()
    # When W1 pauses, every task it has not started goes to W2; t0 stays.
    state.handle(W1, [{"op": "worker-status", "status": "paused", "reason": "memory"}], 2.0)
    out = state.flush()
    assert set(state.workers[W1].processing) == {"t0"}
    assert sorted(out[W1][0]["keys"]) == sorted(on_w1 - {"t0"})  # freed there
    moved = {item[0] for op in out[W2] if op["op"] == "compute" for item in op["tasks"]}
    assert moved  # W2 takes what it has room for; the rest waits in the scheduler's queue
    for key in on_w1 - {"t0"}:
        ts = state.tasks[key]
        assert (key in moved and ts.processing_on is state.workers[W2]) or ts.state == "queued"
    info = state.info()["workers"][A1]
    assert info["status"] == "paused" and info["status_reason"] == "memory"
    assert any("paused" in text for _, text in state.events)
    # New work skips it; after it resumes it gets work again.
    state.handle(b"client-1", [{"op": "submit", "tasks": [task("late")]}], 3.0)
    assert "late" not in state.workers[W1].processing
    state.handle(W1, [{"op": "worker-status", "status": "running", "reason": ""}], 4.0)
    assert state.workers[W1].status == "running"
    assert any("resumed" in text for _, text in state.events)
    state.validate()


def test_bad_worker_status_is_refused_at_the_door():
    state = given((W1, A1))
    with pytest.raises(protocol.RemoteProtocolError):
        protocol.check({"op": "worker-status", "status": 3, "reason": ""})
    state.handle(W1, [{"op": "worker-status", "status": "asleep", "reason": ""}], 1.0)
    out = state.flush()
    assert out[W1][0]["op"] == "error" and "asleep" in out[W1][0]["message"]
    assert state.workers[W1].status == "running"


# ---------------------------------------------------------------------------- in-process


def _make(n):
    return np.arange(n, dtype=np.int64)


def _total(a):
    return int(a.sum())


async def test_peer_fetches_a_spilled_value(tmp_path):
    # Worker a spills everything it holds (tiny target; the RSS thresholds are off: they
    # would measure this test process).
    async with cluster(nworkers=2, names=["a", "b"], memory_limit="1GB",
                       memory_target_fraction=1e-6, memory_spill_fraction=0,
                       memory_pause_fraction=0, local_directory=str(tmp_path)) as (s, ws):
        a = ws[0]
        async with Client(s.address, asynchronous=True, set_as_default=False) as c:
            n = 2 * MB
            x = c.submit(_make, n, workers=["a"])
            await x
            await until(lambda: a._core.store.is_spilled(x.key), what="spilled on a")
            y = c.submit(_total, x, workers=["b"], allow_other_workers=False)
            assert await y == n * (n - 1) // 2
            store = a._core.store
            assert store.counters["served_from_disk"] >= 1
            assert store.is_spilled(x.key)  # served from disk, not brought back into memory
            assert store.counters["unspilled"] == 0
            # the client gets it too, and a local task reads it back
            assert int((await x).sum()) == n * (n - 1) // 2
            z = c.submit(_total, x, workers=["a"])
            assert await z == n * (n - 1) // 2
            info = await c.scheduler_info()
            assert info["workers"][a.address]["memory"]["spilled"] >= 0


async def test_local_directory_removed_on_clean_exit(tmp_path):
    async with Scheduler() as s:
        w = Worker(s.address, nthreads=1, memory_limit=0, local_directory=str(tmp_path))
        await w
        made = os.listdir(tmp_path)
        assert made == [os.path.basename(w._core.local_directory)]
        await w.close()
        assert os.listdir(tmp_path) == []


async def test_local_directory_removed_after_sigkill_under_nanny(tmp_path,
                                                                no_leftover_processes):
    async with Scheduler() as s, Nanny(s.address, nworkers=1, nthreads=1, memory_limit=0,
                                       local_directory=str(tmp_path)) as n:
        first = n.processes[0]
        mine = worker_directory(str(tmp_path), first.identity)
        await until(lambda: os.path.isdir(mine), what="local directory made")
        os.kill(first.pid, signal.SIGKILL)
        await until(lambda: n.processes and n.processes[0] is not first
                    and n.slots[0].phase == "running", timeout=20, what="restart")
        assert not os.path.exists(mine)
        second = worker_directory(str(tmp_path), n.processes[0].identity)
        assert os.listdir(tmp_path) == [os.path.basename(second)]
    assert os.listdir(tmp_path) == []


def test_bad_local_directory_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        Worker("tcp://127.0.0.1:1", local_directory=str(tmp_path / "nope"))


# ---------------------------------------------------------------------------- processes

SPILL_SCRIPT = textwrap.dedent('''
    import json, sys
    import numpy as np
    from zfabric import Client, LocalCluster, as_completed

    MB = 2**20
    LIMIT = 300 * MB
    SIZE = 20 * MB

    def make(i):
        return np.full(SIZE // 8, i, dtype=np.float64)

    def check(a, i):
        return bool(a.shape == (SIZE // 8,) and a[0] == i and a[-1] == i
                    and float(a.sum()) == i * (SIZE // 8))

    if __name__ == "__main__":
        spilling = sys.argv[1] == "on"
        kw = {} if spilling else dict(memory_target_fraction=0, memory_spill_fraction=0,
                                      memory_pause_fraction=0)
        count = 3 * 2 * LIMIT // SIZE  # results 3x the workers' total memory limit
        with LocalCluster(n_workers=2, threads_per_worker=1, memory_limit=LIMIT, **kw) as cl, \\
                Client(cl) as c:
            futures = [c.submit(make, i) for i in range(count)]
            checks = [c.submit(check, f, i) for i, f in enumerate(futures)]
            try:  # the first failure ends it
                ok = all(f.result() for f in as_completed(checks))
                error = None
            except Exception as exc:
                ok, error = False, type(exc).__name__
            if ok:  # held as futures all along: a few come to the client whole
                ok = all(c.gather(futures[i])[0] == i for i in (0, count // 2, count - 1))
            info = c.scheduler_info()
            print(json.dumps({"ok": ok, "error": error, "count": count,
                              "events": [e[1] for e in info["events"]],
                              "metrics": [w["metrics"] for w in info["workers"].values()]}))
''')


def _run_script(tmp_path, text, *args, timeout=90, env=None):
    path = tmp_path / "script.py"
    path.write_text(text)
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path, env=full_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_results_3x_memory_complete_by_spilling(tmp_path):
    out, _ = _run_script(tmp_path, SPILL_SCRIPT, "on")
    assert out["ok"], out
    assert not [e for e in out["events"] if "removed" in e], out["events"]
    assert sum(m.get("spilled_total", 0) for m in out["metrics"]) >= out["count"] // 2
    assert sum(m.get("spilled", 0) for m in out["metrics"]) > 300 * MB


def test_results_3x_memory_without_spilling_kill_workers(tmp_path):
    # No allowed failure: the first worker killed for its memory ends it (quickly).
    out, _ = _run_script(tmp_path, SPILL_SCRIPT, "off", env={"ZFABRIC_ALLOWED_FAILURES": "0"})
    assert not out["ok"] and out["error"] == "KilledWorker", out
    assert any("terminated" in e for e in out["events"])


PAUSE_SCRIPT = textwrap.dedent('''
    import json, os, sys, time
    from zfabric import Client, LocalCluster

    MB = 2**20
    held = []

    def hog(flag):
        held.append(bytearray(300 * MB))  # zero-filled: every page is touched
        deadline = time.time() + 60
        while not os.path.exists(flag) and time.time() < deadline:
            time.sleep(0.05)
        held.clear()
        return os.getpid()

    def work(i):
        time.sleep(0.05)
        return os.getpid()

    if __name__ == "__main__":
        flag = sys.argv[1]
        with LocalCluster(n_workers=2, threads_per_worker=1, memory_limit=400 * MB) as cl, \\
                Client(cl) as c:
            info = c.scheduler_info()["workers"]
            a, b = sorted(info)
            pid_a, pid_b = info[a]["pid"], info[b]["pid"]
            h = c.submit(hog, flag, workers=[a])
            # Tasks given to both workers; those queued behind the hog can only finish if the
            # scheduler takes them back from the paused worker.
            tasks = [c.submit(work, i, pure=False) for i in range(12)]
            pids = c.gather(tasks)
            hog_running = not h.done()
            status = c.scheduler_info()["workers"][a]["status"]
            open(flag, "w").close()
            assert h.result() == pid_a
            deadline = time.time() + 20
            while c.scheduler_info()["workers"][a]["status"] != "running":
                assert time.time() < deadline, "worker never resumed"
                time.sleep(0.05)
            after = c.submit(work, 99, workers=[a], pure=False).result(timeout=20)
            events = [e[1] for e in c.scheduler_info()["events"]]
            print(json.dumps({"pids": pids, "a": pid_a, "b": pid_b, "hog_running": hog_running,
                              "status": status, "after": after, "events": events}))
''')


def test_pause_moves_queued_tasks_and_resumes(tmp_path):
    out, _ = _run_script(tmp_path, PAUSE_SCRIPT, str(tmp_path / "flag"))
    assert out["hog_running"] and out["status"] == "paused", out
    assert set(out["pids"]) == {out["b"]}, out  # all ran elsewhere while a was paused
    assert out["after"] == out["a"]  # a resumed and runs tasks again
    paused = [e for e in out["events"] if "paused" in e]
    assert paused and any("resumed" in e for e in out["events"])
    assert not [e for e in out["events"] if "removed" in e]


def test_cli_info_shows_status_and_spilled():
    from zfabric.cli import format_info

    text = format_info({"address": "tcp://x:1", "workers": {"tcp://w:1": {
        "name": "w", "nthreads": 1, "memory_limit": 100 * MB, "status": "paused",
        "metrics": {"memory": 90 * MB, "spilled": 30 * MB}, "in_memory": 3}}})
    assert "paused" in text and "30.00 MiB" in text and "SPILLED" in text


def test_cli_has_the_memory_options():
    env = {**os.environ, "COLUMNS": "200"}
    for command, extra in (("worker", ()), ("nanny", ("--memory-terminate-fraction",))):
        out = subprocess.run([sys.executable, "-m", "zfabric", command, "--help"],
                             capture_output=True, text=True, timeout=30, env=env).stdout
        for option in ("--memory-target-fraction", "--memory-spill-fraction",
                       "--memory-pause-fraction", "--local-directory", *extra):
            assert option in out, (command, option)


def test_nanny_passes_the_thresholds_to_its_workers():
    from zfabric.process import parse_worker_argv, worker_command

    cmd = worker_command("tcp://127.0.0.1:1", identity="worker-x", nthreads=1,
                         memory_limit=100, nanny="n", parent_pid=1, ready_fd=3,
                         memory_fractions={"target": 0.5, "spill": 0, "pause": 0.9,
                                           "terminate": 0.95},
                         local_directory="/tmp")
    args = parse_worker_argv(cmd[cmd.index("worker") + 1:])
    assert (args["memory_target_fraction"], args["memory_spill_fraction"],
            args["memory_pause_fraction"], args["local_directory"]) == (0.5, 0.0, 0.9, "/tmp")
    with pytest.raises(ValueError, match="processes=True"):
        from zfabric import LocalCluster

        LocalCluster(processes=False, memory_terminate_fraction=0.9)
