"""Chaos: a graph of a few hundred tasks while worker processes are killed at random moments.

Workers run as real processes: three under a Nanny (which starts each again when it dies) and
plain ``zfabric worker`` processes (a fresh one is started when one dies). A killer sends
SIGKILL to one of them every few hundred milliseconds until the graph is done. Every future
must end with the right value (or, should a task be unlucky enough to be on ALLOWED_FAILURES+1
dying workers, a KilledWorker that names it), nothing may hang, and once the futures are
released the scheduler must forget every task.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import signal
import subprocess
import sys
import time

import cloudpickle
import numpy as np
import psutil
import pytest

from zfabric import Client, KilledWorker, Nanny, Scheduler
from zfabric import config as zconfig

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.timeout(90)

FAST_ENV = {"ZFABRIC_HEARTBEAT_INTERVAL_S": "0.2"}
N_LEAVES = 160
STEP_S = 0.15  # each task's work: long enough for kills to land mid-task
MAX_KILLS = 12  # then the graph must finish: a fabric must not hang once the chaos stops


def leaf(i):
    """Odd leaves are large arrays (kept on the worker, lost with it), even ones small ints."""
    time.sleep(STEP_S)
    return np.full(10_000, i, dtype=np.int64) if i % 2 else i


def combine(*parts):
    time.sleep(STEP_S)
    return int(sum(int(np.sum(p)) for p in parts))


def total(*parts):
    return sum(parts)


def leaf_value(i) -> int:
    return 10_000 * i if i % 2 else i


def start_worker(address: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "zfabric", "worker", address, "--nthreads", "2",
         "--memory-limit", "0", "--log-level", "error"],
        env={**os.environ, **FAST_ENV}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        start_new_session=True,
    )


async def settle(future):
    try:
        return "ok", await future
    except KilledWorker as exc:
        return "killed", exc


async def test_random_worker_kills_during_a_graph_end_in_right_results():
    rng = random.Random(4)
    config = zconfig.from_env(HEARTBEAT_INTERVAL_S=0.2, WORKER_TTL_S=2.0)
    plain: list[subprocess.Popen] = []
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    kills = 0
    try:
        async with Scheduler(config=config) as s, \
                Nanny(s.address, nworkers=3, nthreads=2, memory_limit=0, config=config,
                      env=FAST_ENV) as nanny, \
                Client(s.address, asynchronous=True, config=config, set_as_default=False) as c:
            plain.append(start_worker(s.address))
            await asyncio.wait_for(c.wait_for_workers(4), 20)
            # Given a graph: leaves, combinations of three leaves each, sums, one total
            leaves = [c.submit(leaf, i) for i in range(N_LEAVES)]
            pairs = [(k, k + 1, (k + N_LEAVES // 2) % N_LEAVES) for k in range(0, N_LEAVES, 2)]
            combos = [c.submit(combine, *(leaves[i] for i in trio)) for trio in pairs]
            sums = [c.submit(total, *combos[g : g + 5]) for g in range(0, len(combos), 5)]
            final = c.submit(total, *sums)
            everything = [*leaves, *combos, *sums, final]
            expected = (
                [leaf_value(i) for i in range(N_LEAVES)]
                + [sum(leaf_value(i) for i in trio) for trio in pairs]
            )
            expected += [sum(expected[N_LEAVES + g : N_LEAVES + g + 5])
                         for g in range(0, len(combos), 5)]
            expected.append(sum(expected[N_LEAVES + len(combos) :]))
            assert len(everything) == len(expected) > 250

            async def killer():
                nonlocal kills
                await asyncio.sleep(0.5)
                while kills < MAX_KILLS:
                    await asyncio.sleep(rng.uniform(0.2, 0.6))
                    alive = [p for p in plain if p.poll() is None]
                    victims = [*nanny.pids, *(p.pid for p in alive)]
                    if not victims:
                        continue
                    victim = rng.choice(victims)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(victim, signal.SIGKILL)
                        kills += 1
                    if any(p.pid == victim for p in alive) and len(plain) < 4:
                        plain.append(start_worker(s.address))  # a fresh one takes its place

            # When worker processes are killed at random until the graph is done
            started = time.monotonic()
            chaos = asyncio.ensure_future(killer())
            try:
                outcomes = await asyncio.wait_for(
                    asyncio.gather(*(settle(f) for f in everything)), 45)
            except TimeoutError:
                states = collections.Counter(ts.state for ts in list(s.state.tasks.values()))
                workers = {ws.name: len(ws.processing) for ws in list(s.state.workers.values())}
                pytest.fail(f"the graph hangs after {kills} kills: tasks {dict(states)},"
                            f" workers {workers}, events {[e for _, e in s.state.events[-8:]]}")
            finally:
                chaos.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await chaos
            took = time.monotonic() - started
            # Then every future has its right value, or a KilledWorker that names its task
            killed = []
            for f, want, (how, got) in zip(everything, expected, outcomes, strict=True):
                if how == "killed":
                    assert got.task and got.count == config.ALLOWED_FAILURES + 1, got
                    killed.append(f.key)
                elif f in leaves and isinstance(got, np.ndarray):
                    assert int(got.sum()) == want, f.key
                else:
                    assert got == want, f.key
            assert kills >= 5, f"only {kills} kills in {took:.1f} s: not much chaos"
            assert len(killed) <= len(everything) // 10, killed
            # And the fabric still works, and forgets everything once the futures are gone
            await asyncio.wait_for(c.wait_for_workers(1), 20)
            assert await asyncio.wait_for(c.gather(c.map(lambda x: x * 2, range(10))),
                                          20) == [x * 2 for x in range(10)]
            del leaves, combos, sums, final, everything, outcomes, f
            deadline = time.monotonic() + 10
            while s.state.tasks and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not s.state.tasks, list(s.state.tasks.items())[:5]
    finally:
        for p in plain:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)
        left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(left, timeout=5)
