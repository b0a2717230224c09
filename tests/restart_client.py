"""The client program of tests/test_scheduler_restart.py and scripts/scheduler_restart.py, run
as ``python restart_client.py MODE ADDRESS DIR [N]`` while they kill and restart the scheduler.

Every task leaves a side-effect log in DIR: a file ``KEY~start~TIME~ID`` when it starts and
``KEY~done~TIME~ID`` when it ends, so that the caller can tell, per key, how often it ran and
whether its result existed when the scheduler was killed. The program prints one JSON line
per result (``{"mode": ..., "ok": ...}``) and, with ``--hold``, keeps its futures until its
stdin closes (so that another client can look them up by key).
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid

import numpy as np

BIG_EVERY = 100  # every 100th leaf returns a 10 MB array (held on its worker)
BIG = 10 * 2**20 // 8


def mark(d: str, key: str, what: str) -> None:
    with open(os.path.join(d, f"{key}~{what}~{time.time():.6f}~{uuid.uuid4().hex[:8]}"), "w"):
        pass


def leaf(i, d, step):
    mark(d, f"leaf-{i}", "start")
    time.sleep(step)
    value = np.full(BIG, i, dtype=np.float64) if i % BIG_EVERY == 0 else i
    mark(d, f"leaf-{i}", "done")
    return value


def total(x):
    return float(np.sum(x)) if isinstance(x, np.ndarray) else float(x)


def combine(a, b, i, d, step):
    mark(d, f"combine-{i}", "start")
    time.sleep(step)
    mark(d, f"combine-{i}", "done")
    return total(a) + total(b) + i


def leaf_value(i):
    return float(i * BIG) if i % BIG_EVERY == 0 else float(i)


def say(**fields) -> None:
    print(json.dumps(fields), flush=True)


def graph(c, d, n, step):
    """n leaves and n combines of two neighbouring leaves: 2n tasks."""
    leaves = [c.submit(leaf, i, d, step, key=f"leaf-{i}") for i in range(n)]
    combos = [c.submit(combine, leaves[i], leaves[(i + 1) % n], i, d, step, key=f"combine-{i}")
              for i in range(n)]
    say(mode="graph", submitted=2 * n)
    got = c.gather(combos)
    want = [leaf_value(i) + leaf_value((i + 1) % n) + i for i in range(n)]
    bad = [i for i in range(n) if got[i] != want[i]]
    bigs = c.gather([leaves[i] for i in range(0, n, BIG_EVERY)])
    bad_big = [i for i, v in zip(range(0, n, BIG_EVERY), bigs, strict=True)
               if v.shape != (BIG,) or v[0] != i or v[-1] != i]
    some = [i for i in range(1, n, 7) if i % BIG_EVERY]
    small = c.gather([leaves[i] for i in some])
    bad_small = [i for i, v in zip(some, small, strict=True) if v != i]
    say(mode="graph", ok=not (bad or bad_big or bad_small), bad=bad[:10], bad_big=bad_big,
        bad_small=bad_small[:10])
    return leaves + combos


def dask_modes(c, d, step):
    import dask
    import dask.array as da

    def slow(block, d=d, step=step):
        mark(d, f"block-{uuid.uuid4().hex[:8]}", "start")
        time.sleep(step)
        return block

    x = da.ones((2000, 2000), chunks=(125, 125))  # 256 blocks
    y = x.map_blocks(slow, dtype=float)
    persisted = (y * 2).persist()
    say(mode="dask", submitted=True)
    s = dask.compute(y.sum())[0]
    p = float(persisted.sum().compute())
    say(mode="dask", ok=s == 2000 * 2000 and p == 2 * 2000 * 2000, compute=float(s),
        persist=p)
    return [persisted]


def late(c, d, n):
    """A client started after the restart: the other client's finished futures, by key."""
    from zfabric import Future

    keys = [f"combine-{i}" for i in range(0, n, 97)]
    got = c.gather([Future(k, c) for k in keys])
    want = [leaf_value(i) + leaf_value((i + 1) % n) + i for i in range(0, n, 97)]
    info = c.scheduler_info()
    who = c.who_has([Future(f"leaf-{i}", c) for i in range(0, n, BIG_EVERY)])
    say(mode="late", ok=got == want, workers=len(info["workers"]),
        held=sum(1 for v in who.values() if v))


def main() -> None:
    from zfabric import Client

    mode, address, d = sys.argv[1:4]
    n = int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[4].isdigit() else 1000
    step = float(os.environ.get("RESTART_STEP_S", "0.004"))
    with Client(address, set_as_default=True) as c:
        c.wait_for_workers(1, timeout=30)
        if mode == "graph":
            held = graph(c, d, n, step)
        elif mode == "dask":
            held = dask_modes(c, d, step)
        elif mode == "late":
            late(c, d, n)
            held = []
        else:
            raise SystemExit(f"unknown mode {mode!r}")
        if "--hold" in sys.argv:
            sys.stdin.read()
        del held


if __name__ == "__main__":
    main()
