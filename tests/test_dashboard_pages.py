"""Every page of the dashboard in a real headless browser (Chromium), during a computation and
after it: the graph of a dask.array reduction, a worker's own page, the profile of a task that
spins in a known function, the system page, and the history after the work ended and after a
reload. Screenshots of each page go to the test artifacts."""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack

import pytest
from test_dashboard import ARTIFACTS, browser, wait_for

from zfabric import Client, LocalCluster, keys, performance_report

pytestmark = pytest.mark.timeout(120)

# errors and transfers: never a task group's colour (as attributes, and as computed styles)
ERROR_COLOURS = {"#e53935", "#d32f2f", "rgb(229, 57, 53)", "rgb(211, 47, 47)"}


def spin_in_known_function(seconds):
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += sum(range(100))
    return n


def warn_in_worker():
    logging.getLogger("zfabric.test").warning("a mark in this worker")


def pause(x):
    time.sleep(0.02)
    return x


def test_every_page_during_and_after_a_computation(tmp_path):
    da = pytest.importorskip("dask.array")
    from dask.utils import key_split

    d = browser()

    def graph() -> dict:
        return d.execute_script(
            "return Object.fromEntries(Array.from(document.querySelectorAll("
            "'#graph g.group-node')).map((n) => [n.dataset.group, Number(n.dataset.total)]))")

    try:
        with LocalCluster(n_workers=2, threads_per_worker=2,
                          dashboard_address="127.0.0.1:0") as c, \
                Client(c, set_as_default=False) as client, ExitStack() as recording:
            base = c.dashboard_link.rsplit("/", 1)[0]
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            # Given a dask.array reduction, a task that spins in a known function, and a
            # stream of short tasks that keeps the cluster busy while the pages are visited
            x = da.ones((400, 400), chunks=(100, 100))
            total = (x + 1).sum()
            report = tmp_path / "report.html"
            recording.enter_context(performance_report(filename=str(report), client=client))
            spin = client.submit(spin_in_known_function, 1.5, key="spin-1")
            busy = client.map(pause, range(300), key=[f"pause-{i}" for i in range(300)])
            result = client.compute(total)

            # The status page: a row per worker, each one click from its own page
            d.get(base + "/status")
            rows = wait_for(lambda: d.execute_script(
                "return Array.from(document.querySelectorAll('#workers tr.worker'))"
                ".map((r) => r.dataset.address)") if d.execute_script(
                "return document.querySelectorAll('#workers tr.worker').length") == 2 else None)
            assert sorted(rows) == sorted(client.scheduler_info()["workers"])
            d.save_screenshot(str(ARTIFACTS / "dashboard-status.png"))
            address = rows[0]
            client.run(warn_in_worker, workers=[address])
            d.execute_script("document.querySelector('#workers tr.worker a').click()")
            wait_for(lambda: "/worker" in d.current_url)
            shown = wait_for(lambda: d.execute_script(
                "return Array.from(document.querySelectorAll('#worker-tasks tr.worker-task'))"
                ".map((r) => r.firstChild.textContent)") or None)
            assert d.execute_script(
                "return document.getElementById('worker-address').textContent") == address
            # its own log lines, sent with its heartbeats
            wait_for(lambda: "a mark in this worker" in d.execute_script(
                "return document.getElementById('worker-events').textContent"), timeout=20)
            d.save_screenshot(str(ARTIFACTS / "dashboard-worker.png"))

            # The graph page: the groups, sized and coloured by state while they run
            d.get(base + "/graph")
            wait_for(lambda: {"pause", "spin"} <= set(graph()), timeout=20)
            d.save_screenshot(str(ARTIFACTS / "dashboard-graph.png"))

            # The profile page: the spinning task's time is in the function it spins in
            d.get(base + "/profile?group=spin")
            wait_for(lambda: d.execute_script(
                "return document.querySelector('#flame g.frame[data-function="
                "\"spin_in_known_function\"]') !== null"), timeout=20)
            d.save_screenshot(str(ARTIFACTS / "dashboard-profile.png"))

            # The system page: the scheduler and both workers over time
            d.get(base + "/system")
            procs = wait_for(lambda: (p := d.execute_script(
                "return Array.from(document.querySelectorAll('#sys-legend .process'))"
                ".map((e) => e.dataset.process)")) and len(p) == 3 and p)
            assert procs[0] == "scheduler" and sorted(procs[1:]) == sorted(rows)
            d.save_screenshot(str(ARTIFACTS / "dashboard-system.png"))

            # When the work is over
            assert result.result() == 400 * 400 * 2
            spin.result()
            client.gather(busy)
            recording.close()
            # the performance report has the graph, profile and history pages too
            text = report.read_text()
            assert 'data-function="spin_in_known_function"' in text
            assert 'class="group-node" data-group="sum-partial"' in text
            assert 'class="history"' in text
            records = client.get_task_stream()
            ran_there = {str(keys.from_wire(r["key"])) for r in records
                         if r["worker"] == address}
            assert shown and set(shown) <= ran_there
            # the reduction's groups as dask names them, with their counts
            expected: dict[str, int] = {}
            for r in records:
                key = keys.from_wire(r["key"])
                if isinstance(key, tuple) or "sum" in key:
                    g = key_split(key)
                    expected[g] = expected.get(g, 0) + 1
            assert {"sum", "sum-partial"} <= set(expected)
            d.get(base + "/graph")
            wait_for(lambda: all(graph().get(g) == n for g, n in expected.items()),
                     timeout=20)
            edges = d.execute_script("return document.querySelectorAll('#graph line.edge')"
                                     ".length")
            assert edges >= len(expected) - 1  # the reduction's groups are linked

            # Then the history shows the computation, and still does after a reload
            d.get(base + "/history")

            def history():
                got = d.execute_script(
                    "return Object.fromEntries(Array.from(document.querySelectorAll("
                    "'#hist-table tr.hist-group')).map((r) => [r.dataset.group,"
                    " Number(r.dataset.n)]))")
                want = dict(expected, pause=300, spin=1)
                return got if all(got.get(g) == n for g, n in want.items()) else None

            wait_for(history, timeout=20)
            d.refresh()
            wait_for(history, timeout=20)
            d.save_screenshot(str(ARTIFACTS / "dashboard-history.png"))

            # and no task group anywhere is drawn in the colour of errors or transfers
            for page in ("status", "graph", "history"):
                d.get(base + "/" + page)
                wait_for(lambda: int(d.execute_script(
                    "return document.body.dataset.updates || 0")) > 1)
                fills = d.execute_script(
                    "return Array.from(document.querySelectorAll('#stream rect.task,"
                    " #hist-groups rect, #graph circle[stroke-width=\"4\"], #progress i.swatch'))"
                    ".map((e) => (e.tagName === 'I' ? getComputedStyle(e).backgroundColor :"
                    " e.tagName === 'circle' ? e.getAttribute('stroke') :"
                    " e.getAttribute('fill') || '').toLowerCase())")
                assert fills and not ERROR_COLOURS & set(fills), page
            timing = d.execute_script("return window.zfabricRender")
            assert timing["count"] > 0
    finally:
        d.quit()
