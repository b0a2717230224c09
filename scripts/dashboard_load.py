#!/usr/bin/env python
"""The dashboard's cost in a live scheduler process: a real ``zfabric scheduler`` (dashboard
on, one live reader of ``/events`` as an open tab is) against N fake workers in one process
(scripts/fake_peers.py), idle and then running ``--tasks`` tasks of ``--delay`` seconds each.

Measured from /proc (per thread): the scheduler process's CPU, and that of its dashboard
threads (``zf-dashboard``: merging is on the scheduler's loop, encoding and serving on these);
the same run with ``--no-dashboard`` gives the whole difference. The loop's own share (the
delta it builds) is what scripts/dashboard_scale.py times in isolation.

    python scripts/dashboard_load.py --peers 1000 --tasks 100000 --delay 0.01
    python scripts/dashboard_load.py --peers 2 --tasks 2000
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import procs  # noqa: E402
from fake_peers import PeerProcess, gather_within, noop, wait_workers  # noqa: E402

from zfabric import Client  # noqa: E402


def thread_cpu_s(pid: int, name: str) -> float:
    total = 0.0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                if f.read().strip() != name:
                    continue
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            continue
    return total


class Reader(threading.Thread):
    """A live reader of /events (as an open tab is): counts messages and bytes."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.messages, self.nbytes, self.stop = url, 0, 0, False

    def run(self) -> None:
        try:
            with urllib.request.urlopen(self.url, timeout=30) as r:
                while not self.stop:
                    line = r.readline()
                    if not line:
                        return
                    if line.startswith(b"data: "):
                        self.messages += 1
                        self.nbytes += len(line)
        except OSError:
            return


def open_browser(link: str):
    """Headless Chromium on the status page (its render time per update is read at the end)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000"):
        opts.add_argument(arg)
    d = webdriver.Chrome(options=opts, service=Service("/usr/bin/chromedriver"))
    d.get(link)
    return d


def run(n: int, dashboard: bool, args: argparse.Namespace) -> dict:
    env = procs.env_for_zfabric()
    extra = ["--dashboard-address", "127.0.0.1:0"] if dashboard else ["--no-dashboard"]
    out: dict = {"peers": n, "dashboard": dashboard}
    with procs.workdir("dash-load-") as tmp:
        sched = procs.Scheduler(env, Path(tmp), extra)
        peers = reader = browser = None
        try:
            peers = PeerProcess(sched.address, n, limit_s=args.timeout * 4 + 120,
                                timeout=args.timeout)
            peers.wait_welcomed(args.timeout)
            if dashboard:
                link = None
                for _ in range(100):
                    m = re.search(r"Dashboard at: (http://\S+)", sched.log.read_text())
                    if m:
                        link = m.group(1)
                        break
                    time.sleep(0.1)
                if link is None:
                    raise RuntimeError("the scheduler printed no dashboard link")
                reader = Reader(link.rsplit("/", 1)[0] + "/events")
                reader.start()
                if args.browser:
                    browser = open_browser(link)
            with Client(sched.address, set_as_default=False) as client:
                wait_workers(client, n, args.timeout)
                time.sleep(1.0)
                c0, d0, t0 = sched.cpu_s(), thread_cpu_s(sched.pid, "zf-dashboard"), time.time()
                m0 = reader.messages if reader else 0
                time.sleep(args.idle_s)
                c1, d1, t1 = sched.cpu_s(), thread_cpu_s(sched.pid, "zf-dashboard"), time.time()
                out["idle_cpu_pct"] = 100 * (c1 - c0) / (t1 - t0)
                out["idle_dash_pct"] = 100 * (d1 - d0) / (t1 - t0)
                out["idle_updates_per_s"] = ((reader.messages if reader else 0) - m0) / (t1 - t0)
                peers.set_delay(args.delay)
                b0 = reader.nbytes if reader else 0
                c0, d0, t0 = sched.cpu_s(), thread_cpu_s(sched.pid, "zf-dashboard"), time.time()
                futures = client.map(noop, range(args.tasks), pure=False)
                done = gather_within(client, futures, args.timeout)
                c1, d1, t1 = sched.cpu_s(), thread_cpu_s(sched.pid, "zf-dashboard"), time.time()
                del futures
                out["done"] = done
                out["run_s"] = t1 - t0
                out["run_cpu_s"] = c1 - c0
                out["run_dash_cpu_s"] = d1 - d0
                out["run_stream_kib_per_s"] = ((reader.nbytes if reader else 0) - b0) / 1024 / (
                    t1 - t0)
                if browser is not None:
                    out["render"] = browser.execute_script("return window.zfabricRender")
        finally:
            if browser is not None:
                browser.quit()
            if reader is not None:
                reader.stop = True
            if peers is not None:
                peers.close()
            procs.stop([sched.proc])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", type=int, nargs="+", default=[2, 1000])
    ap.add_argument("--tasks", type=int, default=100_000)
    ap.add_argument("--delay", type=float, default=0.01, help="seconds a task takes (0.01)")
    ap.add_argument("--idle-s", type=float, default=10.0)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--browser", action="store_true",
                    help="also open the status page in headless Chromium; print its render times")
    ap.add_argument("--on-only", action="store_true", help="skip the runs without a dashboard")
    args = ap.parse_args()
    procs.raise_nofile()
    print(f"{'peers':>5} {'dash':>4} | {'idle %':>6} {'dash %':>6} {'upd/s':>5} |"
          f" {'run s':>6} {'CPU s':>6} {'dash s':>6} {'KiB/s':>6}")
    for n in args.peers:
        for dashboard in (True,) if args.on_only else (False, True):
            r = run(n, dashboard, args)
            print(f"{n:>5} {'on' if dashboard else 'off':>4} | {r['idle_cpu_pct']:>6.2f}"
                  f" {r['idle_dash_pct']:>6.2f} {r['idle_updates_per_s']:>5.1f} |"
                  f" {r['run_s']:>6.1f} {r['run_cpu_s']:>6.2f} {r['run_dash_cpu_s']:>6.2f}"
                  f" {r['run_stream_kib_per_s']:>6.0f}" + ("" if r["done"] else " (timed out)"),
                  flush=True)
            if r.get("render"):
                t = r["render"]
                print(f"      page render per update: {t['count']} updates, mean"
                      f" {t['total'] / max(t['count'], 1):.1f} ms, max {t['max']:.1f} ms",
                      flush=True)


if __name__ == "__main__":
    main()
