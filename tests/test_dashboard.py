"""The dashboard on real sockets: the HTTP thread, its live stream, /metrics, the figures it
shows against known work, and the page itself in a real headless browser (Chromium)."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from zfabric import Client, LocalCluster, get_task_stream, performance_report
from zfabric.scheduler import Scheduler
from zfabric.testing import cluster

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
#: Where screenshots go (kept by CI as artifacts).
ARTIFACTS = Path(os.environ.get("ZFABRIC_TEST_ARTIFACTS", ROOT / "test-artifacts"))
BROWSER_INSTALL = "apt-get install -y chromium chromium-driver && pip install selenium"


def base(link: str) -> str:
    return link.rsplit("/", 1)[0]


def get(url: str, timeout: float = 10) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type", "")


def snapshot(link: str) -> dict:
    status, body, _ = get(base(link) + "/api/snapshot")
    assert status == 200, body
    return json.loads(body)


def wait_for(predicate, timeout: float = 15, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(every)


def slow_inc(x):
    time.sleep(0.02)
    return x + 1


def warn_in_worker():
    logging.getLogger("zfabric.test").warning("a mark in a worker")


def ones(n):
    import numpy as np

    return np.ones(n, dtype="u1")


@pytest.fixture(scope="module")
def lc():
    """Two worker processes of two threads each, a dashboard on a free port, a client."""
    with LocalCluster(n_workers=2, threads_per_worker=2, dashboard_address="127.0.0.1:0") as c, \
            Client(c, set_as_default=False) as client:
        yield c, client


# ---------------------------------------------------------------------------- the server


def test_link_page_assets_and_health(lc):
    c, client = lc
    link = client.dashboard_link
    assert link == c.dashboard_link and link.startswith("http://127.0.0.1:")
    assert link.endswith("/status")
    status, page, ctype = get(link)
    assert status == 200 and ctype.startswith("text/html") and b"dashboard.js" in page
    for name in ("dashboard.js", "dashboard.css"):
        status, body, _ = get(base(link) + "/static/" + name)
        assert status == 200 and len(body) > 100
    assert get(base(link) + "/static/../server.py")[0] == 404
    assert get(base(link) + "/health")[1] == b"ok\n"
    assert get(base(link) + "/nothing")[0] == 404
    assert client.scheduler_info()["services"]["dashboard"] == link


def test_snapshot_figures_match_known_work(lc):
    c, client = lc
    # Given 40 tasks of one group, and one 8 MB array held on a worker
    futs = client.map(slow_inc, range(40), key=[f"slow_inc-{i}" for i in range(40)])
    arr = client.submit(ones, 8_000_000, key="ones-8mb")
    assert client.gather(futs) == list(range(1, 41))
    arr.result()
    # Then a published snapshot shows them
    def settled():
        snap = snapshot(c.dashboard_link)
        g = {g["name"]: g for g in snap["groups"]}
        if g.get("slow_inc", {}).get("done") == 40 and g.get("ones", {}).get("done") == 1:
            return snap
        return None

    snap = wait_for(settled)
    g = {g["name"]: g for g in snap["groups"]}["slow_inc"]
    assert (g["total"], g["processing"], g["waiting"], g["erred"]) == (40, 0, 0, 0)
    assert g["duration_s"] >= 40 * 0.02 * 0.9
    held = {w["address"]: w["nbytes"] for w in snap["workers"]}
    (holder,) = client.who_has(arr)[arr.key]
    assert 8_000_000 <= held[holder] < 8_100_000
    assert len(snap["workers"]) == 2 and {w["nthreads"] for w in snap["workers"]} == {2}
    assert any(e[1] == "slow_inc" and e[6] == "OK" for e in snap["stream"])
    assert snap["counters"]["messages_in"] > 0
    # When a task on the other worker needs the array, the fetch is reported with its size
    other = next(a for a in held if a != holder)
    n = client.submit(len, arr, key="len-8mb", workers=[other])
    assert n.result() == 8_000_000

    def fetched():
        snap = snapshot(c.dashboard_link)
        return [t for t in snap["transfers"] if t[0] == other and t[1] == holder] or None

    ((_, _, start, stop, nbytes, nkeys),) = wait_for(fetched)
    assert 8_000_000 <= nbytes < 8_100_000 and nkeys == 1 and 0 <= stop - start < 10
    del futs, arr, n


def test_live_stream_sends_snapshots(lc):
    c, _ = lc
    host, port = c.dashboard_link.split("//")[1].split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/events")
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("Content-Type") == "text/event-stream"
    times = []
    while len(times) < 3:
        line = r.fp.readline()
        if line.startswith(b"data: "):
            times.append(json.loads(line[6:])["time"])
    conn.close()
    assert times[0] < times[1] < times[2]  # a new snapshot each time, a few per second
    assert times[2] - times[0] < 2.0


def test_metrics_parse_with_prometheus_parser(lc):
    parser = pytest.importorskip("prometheus_client.parser")
    c, client = lc
    client.gather(client.map(slow_inc, range(5), key=[f"metric_inc-{i}" for i in range(5)]))

    def scrape():
        status, body, ctype = get(base(c.dashboard_link) + "/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        fams = {f.name: f for f in parser.text_string_to_metric_families(body.decode())}
        counts = [s for s in fams["zfabric_task_duration_seconds"].samples
                  if s.name.endswith("_count") and s.labels["group"] == "metric_inc"]
        return fams if counts and counts[0].value == 5 else None

    fams = wait_for(scrape)
    assert fams["zfabric_workers"].samples[0].value == 2
    assert fams["zfabric_threads"].samples[0].value == 4
    assert len(fams["zfabric_worker_memory_bytes"].samples) == 2
    assert all(s.value > 0 for s in fams["zfabric_worker_memory_bytes"].samples)
    assert {s.labels["direction"] for s in fams["zfabric_messages"].samples} == {"in", "out"}
    kinds = {s.labels["kind"]: s.value for s in fams["zfabric_events"].samples}
    assert kinds["worker-joined"] == 2


def test_metrics_without_prometheus_client_answer_501(lc, monkeypatch):
    c, _ = lc
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails
    status, body, _ = get(base(c.dashboard_link) + "/metrics")
    assert status == 501 and b"pip install 'zfabric[dashboard]'" in body


async def test_live_readers_are_bounded():
    async with Scheduler(dashboard_address="127.0.0.1:0") as s:
        s.dashboard.hub.max_readers = 1
        host, port = s.dashboard_link.split("//")[1].split("/")[0].split(":")
        first = http.client.HTTPConnection(host, int(port), timeout=10)
        first.request("GET", "/events")
        reading = await asyncio.to_thread(first.getresponse)  # holds the connection open
        assert reading.status == 200
        status, body, _ = await asyncio.to_thread(get, base(s.dashboard_link) + "/events")
        assert status == 503 and b"live readers" in body
        reading.close()
        await asyncio.to_thread(wait_for, lambda: s.dashboard.hub.readers == 0, 10)
        second = http.client.HTTPConnection(host, int(port), timeout=10)
        second.request("GET", "/events")
        reading = await asyncio.to_thread(second.getresponse)
        assert reading.status == 200
        reading.close()


async def test_port_in_use_falls_back_with_a_warning(caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level(logging.WARNING, logger="zfabric.dashboard.server"):
            async with Scheduler(dashboard_address=f"127.0.0.1:{port}") as s:
                assert s.dashboard is not None and s.dashboard.port != port
                assert f"port {port} is already in use" in caplog.text
                assert get(s.dashboard_link)[0] == 200


async def test_off_with_none_and_leaves_nothing_behind():
    async with cluster(nworkers=1, scheduler_kwargs={"dashboard_address": None}) as (s, _), \
            Client(s.address, asynchronous=True, set_as_default=False) as c:
        assert s.dashboard is None and c.dashboard_link is None
    # and a dashboard that was on is closed with its threads (cluster() checks for leaks)
    async with cluster(nworkers=1, scheduler_kwargs={"dashboard_address": ":0"}) as (s, _), \
            Client(s.address, asynchronous=True, set_as_default=False) as c:
        link = c.dashboard_link
        host, port = link.split("//")[1].split("/")[0].split(":")
        reader = socket.create_connection((host, int(port)))  # a live-stream reader
        reader.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reader.recv(100).startswith(b"HTTP/1.0 200")
    reader.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(link, timeout=2)


async def test_link_names_the_contact_host_when_listening_everywhere():
    async with Scheduler(host="0.0.0.0", dashboard_address=":0") as s:
        host = s.address.split("//")[1].rsplit(":", 1)[0]
        assert s.dashboard.host == "0.0.0.0"
        assert s.dashboard_link.startswith(f"http://{host}:") and host != "0.0.0.0"


def test_bad_dashboard_address_raises():
    with pytest.raises(ValueError, match="no port"):
        Scheduler(dashboard_address="localhost:web")
    with pytest.raises(TypeError, match="dashboard_address"):
        Scheduler(dashboard_address=3.5)


# ---------------------------------------------------------------------------- client side


def test_task_stream_report_logs_and_events(lc, tmp_path):
    _, client = lc
    report = tmp_path / "report.html"
    with performance_report(filename=str(report), client=client), \
            get_task_stream(client=client) as ts:
        futs = client.map(slow_inc, range(20), key=[f"report_inc-{i}" for i in range(20)])
        assert sum(client.gather(futs)) == sum(range(1, 21))
    assert len(ts.data) == 20
    rec = ts.data[0]
    assert set(rec) >= {"key", "worker", "thread", "status", "nbytes", "startstops"}
    ss = rec["startstops"][0]
    assert ss["action"] == "compute" and 0.015 < ss["stop"] - ss["start"] < 5
    assert len(client.get_task_stream(count=3)) == 3
    assert len(client.get_task_stream(start="2 minutes")) >= 20
    with pytest.raises(ImportError, match="bokeh"):  # without bokeh: says so
        client.get_task_stream(plot=True)
    text = report.read_text()
    assert "report_inc" in text and text.count('class="task"') == 20
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")  # offline
    client.log_event("my-topic", {"step": 1})
    client.log_event(["my-topic", "other"], "two")
    assert [m for _, m in client.get_events("my-topic")] == [{"step": 1}, "two"]
    assert "scheduler" in client.get_events()
    with pytest.raises(TypeError, match="msgpack"):
        client.log_event("my-topic", object())
    logging.getLogger("zfabric.test").warning("a mark in the scheduler's process")
    assert any(level == "WARNING" and text.endswith("a mark in the scheduler's process")
               for level, text in client.get_scheduler_logs())
    client.run(warn_in_worker)
    logs = client.get_worker_logs()
    assert sorted(logs) == sorted(client.scheduler_info()["workers"])
    for records in logs.values():
        assert any(lvl == "WARNING" and text.endswith("a mark in a worker")
                   for lvl, text in records)
    assert all(len(v) <= 1 for v in client.get_worker_logs(n=1).values())


PROGRESS_SCRIPT = """
import time
from dataclasses import dataclass
from zfabric import Client, LocalCluster, progress

@dataclass
class Job:
    n: int

def work(job):
    time.sleep(0.01)
    return job.n * 2

def combine(xs):
    return sum(xs)

if __name__ == "__main__":
    with LocalCluster(n_workers=1, threads_per_worker=2, dashboard_address=None) as c, \\
            Client(c) as client:
        futs = client.map(work, [Job(i) for i in range(30)])
        total = client.submit(combine, futs)
        progress(futs, total)
        print("result", total.result())
"""


def test_progress_from_a_script(tmp_path):
    script = tmp_path / "prog.py"
    script.write_text(PROGRESS_SCRIPT)
    import subprocess

    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=50, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1] == "result 870"
    final = lines[-4:-1]  # the last frame: the total, then one bar per group
    assert final[0].startswith("[" + "#" * 40 + "] 100% Completed | 31/31")
    assert final[1].startswith("combine [") and final[1].endswith("1/1")
    assert final[2].startswith("work    [" + "#" * 40) and final[2].endswith("30/30")


async def test_progress_is_awaitable_with_an_async_client(fab, capsys):
    from zfabric import progress

    futs = fab.c.map(slow_inc, range(10))
    await progress(futs, multi=False)
    assert all(f.done() for f in futs)
    assert "100% Completed | 10/10" in capsys.readouterr().out
    with pytest.raises(TypeError, match="Futures"):
        progress([1, 2])


def test_top_once_and_info(lc):
    import subprocess

    c, client = lc
    client.gather(client.map(slow_inc, range(3), key=[f"top_inc-{i}" for i in range(3)]))
    out = subprocess.run([sys.executable, "-m", "zfabric", "top", c.scheduler_address, "--once"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "Workers" in text and "Progress by task group" in text and "top_inc" in text
    for w in client.scheduler_info()["workers"]:
        assert w in text
    assert "3/3" in text and c.dashboard_link in text
    out = subprocess.run([sys.executable, "-m", "zfabric", "info", c.scheduler_address],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "%" in out.stdout and "[" in out.stdout
    assert f"Dashboard: {c.dashboard_link}" in out.stdout


# ---------------------------------------------------------------------------- the browser


def browser():
    """A headless Chromium driven by Selenium, or a skip (a failure in CI) saying what to
    install."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        webdriver = None
    if not (chromium and driver and webdriver):
        if os.environ.get("CI") == "true":
            pytest.fail(f"no headless browser for the dashboard test: {BROWSER_INSTALL}")
        pytest.skip(BROWSER_INSTALL)
    opts = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000"):
        opts.add_argument(arg)
    opts.binary_location = chromium
    return webdriver.Chrome(options=opts, service=Service(driver))


def test_page_in_a_real_browser(lc, tmp_path):
    from selenium.webdriver.common.by import By

    c, client = lc
    d = browser()
    try:
        # Given work in progress: two groups, one waiting on the other
        futs = client.map(slow_inc, range(200), key=[f"page_inc-{i}" for i in range(200)])
        pairs = [client.submit(sum, futs[i:i + 2], key=f"page_sum-{i}")
                 for i in range(0, 200, 2)]
        d.get(c.dashboard_link)

        def page() -> dict:
            # read the rendered DOM in one go (the page redraws a few times a second)
            return d.execute_script("""
                const q = (s) => Array.from(document.querySelectorAll(s));
                return {
                  done: Object.fromEntries(q('#progress .group').map((r) => [
                      r.dataset.group, r.querySelector('b.done').textContent.split(' / ')
                        .map(Number)])),
                  workers: q('#workers tr.worker').map((r) => r.dataset.address),
                  bars: q('#stream rect.task').map((r) => r.dataset.group),
                  transfers: q('#stream rect.transfer').length,
                  live: document.getElementById('live').className,
                };""")

        # Then the live data arrives: one row per worker, progress, task-stream bars
        first = wait_for(lambda: (p := page())["done"].get("page_inc", [0])[0] > 0 and p,
                         timeout=20)
        assert sorted(first["workers"]) == sorted(client.scheduler_info()["workers"])
        assert first["done"]["page_inc"][1] == 200 and first["live"] == "ok"
        assert "page_inc" in first["bars"]
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        d.save_screenshot(str(ARTIFACTS / "dashboard.png"))
        # and the numbers grow to the total
        seen = [first["done"]["page_inc"][0]]
        wait_for(lambda: seen.append(page()["done"]["page_inc"][0]) or seen[-1] == 200,
                 timeout=30, every=0.25)
        assert len(set(seen)) >= 2 and seen == sorted(seen)
        wait_for(lambda: page()["done"].get("page_sum") == [100, 100], timeout=20)
        # a fetch between workers shows in the task stream
        a, b = sorted(first["workers"])
        big = client.submit(ones, 4_000_000, key="page_ones", workers=[a])
        assert client.submit(len, big, key="page_len", workers=[b]).result() == 4_000_000
        wait_for(lambda: page()["transfers"] > 0, timeout=10)
        del futs, pairs, big
        # And a performance report opens in the same browser, offline
        report = tmp_path / "report.html"
        with performance_report(filename=str(report), client=client):
            client.gather(client.map(slow_inc, range(10), key=[f"rep_inc-{i}" for i in
                                                              range(10)]))
        d.get(report.as_uri())
        groups = [e.text for e in d.find_elements(By.CSS_SELECTOR, "#groups td:first-child")]
        assert groups == ["rep_inc"]
        assert len(d.find_elements(By.CSS_SELECTOR, "svg.stream rect.task")) == 10
        d.save_screenshot(str(ARTIFACTS / "performance-report.png"))
    finally:
        d.quit()


async def test_progress_in_a_notebook_returns_at_once(fab, monkeypatch, capsys):
    pytest.importorskip("ipywidgets")
    from zfabric import progress
    from zfabric.progressbar import WidgetProgressBar

    futs = fab.c.map(slow_inc, range(12), key=[f"nb_inc-{i}" for i in range(12)])
    bar = progress(futs, notebook=True)
    assert isinstance(bar, WidgetProgressBar) and not all(f.done() for f in futs)
    await fab.c.gather(futs)
    await asyncio.to_thread(bar.thread.join, 10)
    assert not bar.thread.is_alive()
    assert (bar.bars["nb_inc"].value, bar.bars["nb_inc"].max) == (12, 12)
    assert bar.bars["nb_inc"].bar_style == "success" and bar.labels["nb_inc"].value == "12 / 12"
    # without ipywidgets: text, still without blocking
    monkeypatch.setitem(sys.modules, "ipywidgets", None)
    more = fab.c.map(slow_inc, range(3), key=[f"nb2_inc-{i}" for i in range(3)])
    assert progress(more, notebook=True) is None
    await fab.c.gather(more)
    await asyncio.sleep(0.5)
    assert "100% Completed | 3/3" in capsys.readouterr().out


def test_top_live_in_a_terminal_until_interrupted(lc):
    import pty
    import select
    import signal
    import subprocess

    c, _ = lc
    master, slave = pty.openpty()
    env = dict(os.environ, COLUMNS="160", LINES="50", TERM="xterm")
    proc = subprocess.Popen([sys.executable, "-m", "zfabric", "top", c.scheduler_address,
                             "--interval", "0.2"], stdin=slave, stdout=slave, stderr=slave,
                            env=env)
    os.close(slave)
    out = b""
    try:
        deadline = time.monotonic() + 20
        while out.count(b"Progress by task group") < 3 and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    out += os.read(master, 65536)
                except OSError:
                    break
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert b"\x1b[?1049h" in out  # the alternate (full) screen
    assert out.count(b"Progress by task group") >= 3  # redrawn, live


def test_scheduler_command_dashboard_options(tmp_path):
    import subprocess

    bad = subprocess.run([sys.executable, "-m", "zfabric", "scheduler", "--port", "0",
                          "--dashboard-address", "nope"], capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 2 and "--dashboard-address" in bad.stderr
    proc = subprocess.Popen([sys.executable, "-m", "zfabric", "scheduler", "--port", "0",
                             "--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        assert lines[0].startswith("Scheduler at: tcp://127.0.0.1:")
        assert lines[1].startswith("Dashboard at: http://127.0.0.1:")
        assert get(lines[1].split(": ", 1)[1].strip())[0] == 200
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
