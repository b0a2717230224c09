"""The 100 MB echo over TCP, with the CPU time every process spends on it.

A scheduler and two one-thread workers (CLI processes, ``ZFABRIC_SAME_HOST_SHM=0``, CurveZMQ
keys with ``--curve``) and an asynchronous client in this process; each echo is timed, and
the CPU time (user + system, all threads) of every process over the echoes after the first
two is divided by their number. On a shared machine the rate moves with the load; the CPU
per echo is what a change to the data path changes.

    python scripts/echo_cpu.py [--curve] [--echoes 8] [--mb 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import psutil


def identity(x):
    return x


async def echoes(address: str, security, n: int, mb: int, procs: list) -> None:
    import zfabric

    kwargs = {"security": security} if security is not None else {}
    async with zfabric.Client(address, asynchronous=True, set_as_default=False, **kwargs) as c:
        while len((await c.scheduler_info())["workers"]) < 2:
            await asyncio.sleep(0.1)
        data = np.arange(mb * 2**20 // 8, dtype="f8")
        every = [psutil.Process(p.pid) for p in procs] + [psutil.Process()]
        rates, before = [], []
        for i in range(n):
            if i == 2:
                before = [sum(p.cpu_times()[:2]) for p in every]
            start = time.perf_counter()
            echoed = await c.submit(identity, data, pure=False)
            rates.append(2 * mb / (time.perf_counter() - start))
            assert echoed.shape == data.shape
            del echoed
        after = [sum(p.cpu_times()[:2]) for p in every]
    cpu = [round((b - a) / (n - 2) * 1e3) for a, b in zip(before, after, strict=True)]
    print(f"MB/s each echo: {[round(r) for r in rates]}; median of all but the first two:"
          f" {statistics.median(rates[2:]):,.0f}")
    print(f"CPU ms per echo: scheduler {cpu[0]}, workers {cpu[1]} + {cpu[2]}, client {cpu[3]};"
          f" total {sum(cpu)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--curve", action="store_true", help="CurveZMQ on every socket")
    parser.add_argument("--echoes", type=int, default=8)
    parser.add_argument("--mb", type=int, default=100)
    args = parser.parse_args()
    env = {**os.environ, "ZFABRIC_SAME_HOST_SHM": "0"}
    env.pop("ZFABRIC_SECURITY", None)
    security = None
    if args.curve:
        from zfabric.security import Security, keygen

        keys = tempfile.mkdtemp(prefix="zfabric-echo-keys-")
        keygen(keys)
        env["ZFABRIC_SECURITY"] = keys
        security = Security(keys)
    os.environ["ZFABRIC_SAME_HOST_SHM"] = "0"
    where = tempfile.mkdtemp(prefix="zfabric-echo-")
    sfile = os.path.join(where, "scheduler.json")
    cli = [sys.executable, "-m", "zfabric"]
    procs = [subprocess.Popen([*cli, "scheduler", "--port", "0", "--scheduler-file", sfile,
                               "--host", "127.0.0.1", "--no-dashboard"], env=env,
                              start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 30
        address = None
        while address is None:
            if time.monotonic() > deadline:
                raise SystemExit("the scheduler did not start")
            try:
                with open(sfile) as f:
                    address = json.load(f)["address"]
            except (OSError, ValueError, KeyError):
                time.sleep(0.05)
        for _ in range(2):
            procs.append(subprocess.Popen([*cli, "worker", address, "--nthreads", "1"],
                                          env=env, start_new_session=True,
                                          stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        asyncio.run(echoes(address, security, max(3, args.echoes), args.mb, procs))
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
