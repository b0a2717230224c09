"""Take the README's dashboard screenshot (docs/dashboard.png): a LocalCluster with work in
progress, seen through headless Chromium (``apt-get install -y chromium chromium-driver``,
``pip install selenium``).

    python scripts/dashboard_screenshot.py [--out docs/dashboard.png]
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from zfabric import Client, LocalCluster


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


def main() -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "docs" /
                        "dashboard.png")
    args = parser.parse_args()
    with LocalCluster(n_workers=3, threads_per_worker=2, dashboard_address="127.0.0.1:0") as c, \
            Client(c) as client:
        loaded = client.map(load, range(300))
        cleaned = client.map(clean, loaded)
        sums = [client.submit(summarize, cleaned[i], cleaned[-1 - i]) for i in range(150)]
        opts = Options()
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000",
                    "--hide-scrollbars"):
            opts.add_argument(arg)
        d = webdriver.Chrome(options=opts, service=Service("/usr/bin/chromedriver"))
        try:
            d.get(c.dashboard_link)
            time.sleep(3)
            d.save_screenshot(str(args.out))
        finally:
            d.quit()
        del loaded, cleaned, sums
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
