"""Memory a task freed goes back to the system before a worker spills or pauses for it.

Worker processes keep blocks of up to 16 MiB in the C heap (``zfabric.process.WORKER_ENVIRON``:
reusing them saves the page faults of fresh memory on every chunk), so memory a task freed can
stay in the process's RSS; above the spill or pause threshold the worker gives the heap's free
memory back (``zfabric.worker.memory.trim_heap``) instead of spilling or pausing for it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap")

SCRIPT = textwrap.dedent('''
    import json, time
    import numpy as np
    from zfabric import Client, LocalCluster

    MB = 2**20

    def churn(n):
        # n MB in blocks of 0.5-4 MB, all alive at once, then freed in a shuffled order
        rng = np.random.default_rng(0)
        blocks = [np.ones(int(rng.choice([0.5, 1, 2, 4]) * MB) // 8) for _ in range(n)]
        held = sum(b.nbytes for b in blocks)
        order = rng.permutation(len(blocks))
        for i in order:
            blocks[i] = None
        return held

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    if __name__ == "__main__":
        with LocalCluster(n_workers=1, threads_per_worker=1, memory_limit=400 * MB) as cl, \\
                Client(cl) as c:
            [before] = c.run(rss).values()
            held = c.submit(churn, 150, pure=False).result(timeout=60)
            deadline = time.time() + 20
            while True:
                [now] = c.run(rss).values()
                if now < before + 150 * MB or time.time() > deadline:
                    break
                time.sleep(0.2)
            after = c.submit(len, [1, 2, 3]).result(timeout=20)  # not left paused
            info = c.scheduler_info()
            print(json.dumps({"before": before, "held": held, "now": now, "after": after,
                              "spilled": [w["metrics"].get("spilled_total", 0)
                                          for w in info["workers"].values()]}))
''')


def test_freed_heap_memory_goes_back_to_the_system_above_the_spill_threshold(tmp_path):
    path = tmp_path / "script.py"
    path.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    MB = 2**20
    # the task held more than the spill threshold (280 MiB of 400) leaves room for...
    assert out["held"] > 250 * MB, out
    # ...and once it ended, the worker's RSS came back to within 150 MiB of where it began
    assert out["now"] < out["before"] + 150 * MB, out
    assert out["after"] == 3, out  # and it runs tasks: not left paused


FAULTS_SCRIPT = textwrap.dedent('''
    import json, resource
    import numpy as np
    from zfabric import Client, LocalCluster

    def faults_per_chunk(n=20):
        # page faults of making and freeing a 2 MB chunk, n times (after one warm-up)
        a = np.ones(2**18)
        del a
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(n):
            a = np.ones(2**18)
            del a
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / n

    if __name__ == "__main__":
        with LocalCluster(n_workers=1, threads_per_worker=1) as cl, Client(cl) as c:
            print(json.dumps(c.submit(faults_per_chunk, pure=False).result(timeout=60)))
''')


def test_a_worker_process_reuses_its_heap_for_chunks_of_a_few_mb(tmp_path):
    # Given a worker process started by a LocalCluster's Nanny
    path = tmp_path / "script.py"
    path.write_text(FAULTS_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # When a task makes and frees 2 MB chunks, each comes from the heap: a few page faults,
    # not the 512 of fresh pages
    assert json.loads(proc.stdout.strip().splitlines()[-1]) < 64, proc.stdout
