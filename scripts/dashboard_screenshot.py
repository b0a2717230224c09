"""Take the dashboard's screenshots (docs/dashboard*.png): a LocalCluster with work in
progress (a dask.array reduction, a mapped pipeline with a few failures, a task that spins in
a known function), each page seen through headless Chromium (``apt-get install -y chromium
chromium-driver``, ``pip install selenium``). Prints each page's render time per update (the
page measures it with the Performance API) and any error the page logged.

    python scripts/dashboard_screenshot.py [--out-dir docs]
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from zfabric import Client, LocalCluster

PAGES = ("status", "graph", "worker", "profile", "system", "history")


def load(i):
    import numpy as np

    time.sleep(random.uniform(0.02, 0.08))
    return np.random.default_rng(i).random(200_000)


def clean(a):
    time.sleep(random.uniform(0.01, 0.05))
    if random.random() < 0.01:
        raise ValueError("bad record")
    return a * 2


def summarize(a, b):
    time.sleep(0.03)
    return float(a.sum() + b.sum())


def parse(n):
    return [str(i) for i in range(n)]


def checksum(items):
    return sum(len(x) for x in items)


def transform(n):
    return checksum(parse(n)) + sum(i * i for i in range(n))


def spin_in_known_function(seconds):
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += transform(300) + checksum(parse(100))
    return n


def warn_in_worker():
    import logging

    logging.getLogger("zfabric.example").warning("a warning logged in a task on this worker")


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000",
                "--hide-scrollbars", "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=opts, service=Service("/usr/bin/chromedriver"))


def shoot(d, url: str, out: Path, wait_s: float = 2.5) -> dict:
    d.get(url)
    time.sleep(wait_s)
    d.save_screenshot(str(out))
    timing = d.execute_script("return window.zfabricRender || null")
    errors = [e["message"] for e in d.get_log("browser") if e["level"] == "SEVERE"]
    return {"timing": timing, "errors": errors}


def main() -> None:
    import dask.array as da

    parser = argparse.ArgumentParser()
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parents[1] / "docs")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with LocalCluster(n_workers=3, threads_per_worker=2, dashboard_address="127.0.0.1:0") as c, \
            Client(c) as client:
        x = da.random.random((4000, 4000), chunks=(500, 500))
        total = client.compute((x + x.T).sum())
        spin = client.submit(spin_in_known_function, 3.0, key="spin-1")
        loaded = client.map(load, range(300))
        cleaned = client.map(clean, loaded)
        sums = [client.submit(summarize, cleaned[i], cleaned[-1 - i]) for i in range(150)]
        base = c.dashboard_link.rsplit("/", 1)[0]
        d = browser()
        try:
            time.sleep(2)
            worker = next(iter(client.scheduler_info()["workers"]))
            client.run(warn_in_worker, workers=[worker])
            for page in PAGES:
                url = f"{base}/{page}"
                if page == "worker":
                    url += f"?address={worker}"
                if page == "profile":
                    url += "?group=spin"
                result = shoot(d, url, args.out_dir / f"dashboard-{page}.png")
                print(page, result)
            total.result()
            spin.result()
        finally:
            d.quit()
        del loaded, cleaned, sums
    print(f"wrote {args.out_dir}/dashboard-*.png")


if __name__ == "__main__":
    main()
