"""While a row runs with the dashboard on: one live-stream reader and the CPU time of the
scheduler process and of its dashboard threads."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .cluster import Cluster
from .common import expect


class DashboardProbe:
    """While a row runs: one reader of the dashboard's live stream (at the page's rate, no
    browser), and the CPU time of the scheduler process and of its dashboard threads (named
    ``zf-dashboard`` at the OS level; per-thread times from psutil)."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.events = 0
        self.stop = False
        self.thread: Any = None

    def _read(self, link: str) -> None:
        import http.client
        from urllib.parse import urlsplit

        u = urlsplit(link)
        conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=10)
        conn.request("GET", "/events")
        r = conn.getresponse()
        while not self.stop:
            line = r.fp.readline()
            if not line:
                break
            if line.startswith(b"data: "):
                json.loads(line[6:])  # a page parses every snapshot too
                self.events += 1
        conn.close()

    def _cpu(self) -> tuple[float, float]:
        import psutil

        pid = self.cluster.scheduler_pid
        proc = psutil.Process(pid)
        t = proc.cpu_times()
        dash = 0.0
        for th in proc.threads():
            try:
                name = Path(f"/proc/{pid}/task/{th.id}/comm").read_text().strip()
            except OSError:
                continue
            if name.startswith("zf-dashboard"):
                dash += th.user_time + th.system_time
        return t.user + t.system, dash

    def __enter__(self):
        import threading

        link = self.cluster.client.dashboard_link
        expect(bool(link), "the scheduler gave no dashboard link")
        self.thread = threading.Thread(target=self._read, args=(link,), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 5
        while not self.events and time.monotonic() < deadline:
            time.sleep(0.01)
        expect(self.events > 0, "the dashboard's live stream sent nothing")
        self.first = self.events
        self.start = self._cpu()
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc):
        self.end = self._cpu()
        self.seconds = time.monotonic() - self.t0
        self.stop = True
        self.thread.join(15)

    def figures(self) -> dict[str, Any]:
        proc = self.end[0] - self.start[0]
        dash = self.end[1] - self.start[1]
        return {
            "scheduler_cpu_s": proc,
            "dashboard_cpu_s": dash,
            "dashboard_cpu_share": dash / proc if proc > 0 else 0.0,
            "sse_events": self.events - self.first,
            "window_s": self.seconds,
        }
