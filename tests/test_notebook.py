"""zfabric in Jupyter, as a user sees it: a real notebook run by a real kernel (nbclient and
ipykernel), its rich outputs checked in the saved notebook, and the HTML reprs rendered offline
by headless Chromium into a screenshot kept as a test artifact."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("ipywidgets")

from test_dashboard import ARTIFACTS, browser  # noqa: E402

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_leftover_processes")]

CELLS = [
    "from zfabric import Client, LocalCluster, progress, wait\n"
    "cluster = LocalCluster(n_workers=1, threads_per_worker=2, dashboard_address=None)\n"
    "client = Client(cluster)",
    "client",
    "cluster",
    "f = client.submit(sum, [1, 2])\nassert f.result() == 3\nf",
    "import time\n"
    "futures = client.map(time.sleep, [0.05] * 4, pure=False)\n"
    "bar = progress(futures)\nbar",
    "wait(futures)\n"
    "time.sleep(1)  # the widget's thread draws its last state\n"
    "print(sorted((b.value, b.max) for b in bar.bars.values()))",
    "client.close()\ncluster.close()",
]


def html_of(cell) -> str:
    return "".join(o.get("data", {}).get("text/html", "") for o in cell.outputs
                   if o.output_type in ("execute_result", "display_data"))


def test_a_notebook_shows_rich_reprs_and_a_finished_progress_widget(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in CELLS]
    runner = nbclient.NotebookClient(nb, timeout=90, kernel_name="python3",
                                     store_widget_state=True,
                                     resources={"metadata": {"path": str(tmp_path)}})
    runner.execute(env=dict(os.environ))
    nbformat.write(nb, tmp_path / "run.ipynb")
    saved = nbformat.read(tmp_path / "run.ipynb", as_version=4)
    client_html, cluster_html, future_html = (html_of(saved.cells[i]) for i in (1, 2, 3))
    # the Client: scheduler address, status and its one worker
    assert "zfabric Client" in client_html and "tcp://" in client_html
    assert "running" in client_html and ">Workers<" in client_html
    # the cluster and a Future: its key, status and type
    assert "LocalCluster" in cluster_html and "Threads" in cluster_html
    assert "Future" in future_html and "finished" in future_html and "int" in future_html
    for html in (client_html, cluster_html, future_html):
        assert "<script" not in html and "http://" not in html.split("Dashboard")[0]
    # the progress widget: a view in the cell, its final state saved with the notebook
    bar_outputs = saved.cells[4].outputs
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {})
               for o in bar_outputs)
    assert "[(4, 4)]" in saved.cells[5].outputs[0]["text"]
    state = saved.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    bars = [m["state"] for m in state.values() if m["model_name"] == "IntProgressModel"]
    assert bars and all(b["value"] == b["max"] == 4 for b in bars), bars
    assert all(b["bar_style"] == "success" for b in bars)

    # rendered offline (nothing fetched: the reprs are inline HTML) into a screenshot
    page = tmp_path / "reprs.html"
    page.write_text("<!doctype html><meta charset=utf-8><body style='margin:16px'>"
                    + "<br>".join((client_html, cluster_html, future_html)) + "</body>")
    d = browser()
    try:
        d.get(page.as_uri())
        text = d.find_element("tag name", "body").text
        assert "zfabric Client" in text and "LocalCluster" in text and "finished" in text
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        d.save_screenshot(str(ARTIFACTS / "notebook-reprs.png"))
        assert Path(ARTIFACTS / "notebook-reprs.png").stat().st_size > 1000
    finally:
        d.quit()
