"""Kill the scheduler (SIGKILL) and start it again at the same address N times during a long
computation, and print what ran again.

    python scripts/scheduler_restart.py --kills 10 [--tasks 4000] [--down 1.0]

Real processes: ``zfabric scheduler``, two ``zfabric nanny`` (one worker of two threads each)
and the client program of the tests (``tests/restart_client.py graph``: leaves, every 100th a
10 MB array held on its worker, and a task per pair of neighbouring leaves), whose tasks leave
a side-effect file per run. The kills are spread evenly over the computation; after each the
scheduler is down ``--down`` seconds. At the end it prints, per kill, how many results existed
when it died, and over the whole run how many tasks ran more than once, split into those whose
result a worker held at a kill (the design says: none) and those that were running at a kill.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLIENT = REPO / "tests" / "restart_client.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def runs(d: Path) -> dict[str, list[tuple[str, float]]]:
    """key -> [(start|done, time)] from the side-effect files."""
    out: dict[str, list] = collections.defaultdict(list)
    for name in os.listdir(d):
        key, what, t, _ = name.split("~")
        out[key].append((what, float(t)))
    return out


def done_count(d: Path) -> int:
    return sum(1 for name in os.listdir(d) if "~done~" in name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--tasks", type=int, default=4000, help="tasks in the graph (even)")
    ap.add_argument("--down", type=float, default=1.0, help="seconds the scheduler is down")
    ap.add_argument("--step", type=float, default=0.01, help="seconds each task works")
    args = ap.parse_args()
    n = args.tasks // 2
    work = Path(tempfile.mkdtemp(prefix="zfabric-restart-"))
    effects = work / "effects"
    effects.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "ZFABRIC_HEARTBEAT_INTERVAL_S": "0.2", "ZFABRIC_RESTART_SETTLE_S": "2.5",
           "ZFABRIC_SCHEDULER_LOST_TIMEOUT_S": "30", "RESTART_STEP_S": str(args.step)}
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []

    def start(*cmd: str, log: str) -> subprocess.Popen:
        with open(work / log, "ab") as out:
            p = subprocess.Popen(list(cmd), env=env, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        return p

    def scheduler() -> subprocess.Popen:
        sfile = work / "scheduler.json"
        sfile.unlink(missing_ok=True)
        p = start(sys.executable, "-m", "zfabric", "scheduler", "--host", "127.0.0.1",
                  "--port", str(port), "--no-dashboard", "--scheduler-file", str(sfile),
                  log="scheduler.log")
        while not sfile.exists():
            time.sleep(0.02)
        return p

    try:
        sched = scheduler()
        for i in range(2):
            start(sys.executable, "-m", "zfabric", "nanny", address, "--nthreads", "2",
                  "--memory-limit", "0", "--log-level", "error", log=f"nanny{i}.log")
        with open(work / "client.out", "wb") as out, open(work / "client.log", "wb") as err:
            client = subprocess.Popen([sys.executable, str(CLIENT), "graph", address,
                                       str(effects), str(n)], env=env, stdout=out,
                                      stderr=err, start_new_session=True)
        procs.append(client)
        kills = []
        total = 2 * n
        for k in range(args.kills):
            target = total * (k + 1) // (args.kills + 1)
            while done_count(effects) < target and client.poll() is None:
                time.sleep(0.01)
            if client.poll() is not None:
                break
            t = time.time()
            sched.send_signal(signal.SIGKILL)
            sched.wait()
            kills.append((t, done_count(effects)))
            time.sleep(args.down)
            sched = scheduler()
        rc = client.wait(600)
        lines = [json.loads(x) for x in (work / "client.out").read_text().splitlines() if x]
        result = next((x for x in lines if "ok" in x), None)
        log = runs(effects)
        held_again = running_again = 0
        extra_runs = 0
        for _key, marks in log.items():
            starts = sorted(t for w, t in marks if w == "start")
            dones = sorted(t for w, t in marks if w == "done")
            if len(starts) <= 1:
                continue
            extra_runs += len(starts) - 1
            first_done = dones[0] if dones else float("inf")
            if any(first_done < kt for kt, _ in kills):
                held_again += 1
            else:
                running_again += 1
        print(f"kills: {len(kills)} (scheduler down {args.down:g} s each), tasks: {total},"
              f" client exit {rc}, every value right: {bool(result and result['ok'])}")
        for i, (_, ndone) in enumerate(kills, 1):
            print(f"  kill {i:2d}: {ndone:5d} task results existed")
        print(f"tasks run more than once: {held_again + running_again}"
              f" ({extra_runs} extra runs in all)")
        print(f"  whose result a worker held at a kill: {held_again}")
        print(f"  that were running or queued at a kill: {running_again}")
        if rc != 0 or not result or not result["ok"]:
            print((work / "client.log").read_text()[-3000:])
            sys.exit(1)
    finally:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)


if __name__ == "__main__":
    main()
