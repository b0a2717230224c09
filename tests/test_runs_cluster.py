"""Root tasks in runs, end to end: a delayed tree's leaves on a LocalCluster of two worker
processes land beside their siblings, so the first level of the reduction fetches (almost)
nothing (the pure rules: tests/test_runs.py)."""

from __future__ import annotations

import numpy as np
import pytest

dask = pytest.importorskip("dask")

from zfabric import Client, LocalCluster, wait  # noqa: E402

pytestmark = pytest.mark.timeout(120) if hasattr(pytest.mark, "timeout") else []


def test_a_delayed_trees_first_level_fetches_almost_nothing():
    from dask import delayed

    with LocalCluster(n_workers=2, threads_per_worker=1) as cluster, Client(cluster) as c:
        for seed in (0, 1000):  # the first graph, and one after (with durations known)
            # Given 64 leaves of 320 kB (held by workers, not inline) and the sums of each
            # pair, computed in one graph (all of them wanted: a worker that fetched a leaf
            # for a sum keeps its copy)
            leaves = [delayed(np.full)(40_000, float(seed + i)) for i in range(64)]
            sums = [delayed(np.add)(leaves[i], leaves[i + 1]) for i in range(0, 64, 2)]
            futures = c.compute(leaves + sums)
            wait(futures, timeout=60)
            assert float(futures[64 + 5].result()[0]) == 2 * seed + 21.0
            # Then each pair and its sum are held by one worker, the same (a sum that fetched
            # a leaf would leave a second copy of it where it ran)
            who = c.who_has(futures)
            held = [who[f.key] for f in futures]
            assert all(len(h) >= 1 for h in held), held
            leaf_at, sum_at = held[:64], held[64:]
            local = sum(leaf_at[2 * j] == leaf_at[2 * j + 1] == sum_at[j]
                        and len(sum_at[j]) == 1 for j in range(32))
            assert local >= 29, (seed, local, held)
            # and both workers had their share of the leaves
            assert len({h[0] for h in leaf_at}) == 2
            del futures
