"""The joblib backend, adaptive scaling and retirement as users run them: ``python script.py``
with a LocalCluster of worker processes, a blocking Client, and the task functions and classes
defined in the script's ``__main__`` (joblib nests them inside its batches)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("no_leftover_processes")]



def run_script(tmp_path, body: str, timeout: float = 80) -> str:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(body))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def test_zfabric_and_its_client_modules_do_not_import_joblib():
    code = ("import sys, zfabric.client, zfabric.cluster, zfabric.executor,"
            " zfabric.joblib_backend, zfabric.adaptive, zfabric.cluster_admin;"
            " bad = [m for m in ('joblib', 'sklearn', 'numpy') if m in sys.modules];"
            " assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_joblib_backend_registered_on_first_import_runs_on_the_cluster(tmp_path):
    out = run_script(tmp_path, """
        import os, sys, time
        from dataclasses import dataclass
        import numpy as np
        from zfabric import Client, LocalCluster

        @dataclass
        class Item:
            i: int

        def pid_and_sum(item, arr):
            # (20 ms: a worker that holds arr but has no free slot takes tasks of a fraction
            # of a millisecond rather than have the other fetch 1.6 MB; real work spreads)
            time.sleep(0.02)
            return os.getpid(), item.i + float(arr.sum())

        def slow_or_fail(i):
            if i == 0:
                time.sleep(0.3)
                raise ValueError("boom")
            time.sleep(1.0)
            return i

        if __name__ == "__main__":
            with LocalCluster(n_workers=2, threads_per_worker=1, memory_limit=0) as cluster, \\
                    Client(cluster) as client:
                assert "joblib" not in sys.modules, "Client() imported joblib"
                import joblib
                from joblib import Parallel, delayed
                from joblib.parallel import BACKENDS
                assert "zfabric" in BACKENDS, "not registered on joblib's first import"

                scatters = []
                real_scatter = client.scatter
                def counting_scatter(*args, **kwargs):
                    scatters.append(1)
                    return real_scatter(*args, **kwargs)
                client.scatter = counting_scatter

                arr = np.ones(200_000)  # 1.6 MB: scattered once, reused by every batch
                with joblib.parallel_config(backend="zfabric"):
                    out = Parallel(n_jobs=-1, batch_size=1)(
                        delayed(pid_and_sum)(Item(i), arr) for i in range(40))
                assert [s for _, s in out] == [i + 200_000.0 for i in range(40)]
                pids = {p for p, _ in out}
                assert os.getpid() not in pids and len(pids) == 2, pids
                assert len(scatters) == 1, f"scattered {len(scatters)} times"
                pair = [np.ones(50_000), np.ones(50_000)]  # a list of arrays: scattered whole
                with joblib.parallel_config(backend="zfabric"):
                    out = Parallel(n_jobs=-1, batch_size=1)(
                        delayed(pid_and_sum)(Item(i), pair[0]) for i in range(4))
                    sums = Parallel(n_jobs=-1)(delayed(len)(pair) for i in range(10))
                assert sums == [2] * 10 and len(scatters) == 3, len(scatters)
                print("parallel ok")

                # a failing batch cancels the pending ones on the cluster
                t = time.monotonic()
                try:
                    with joblib.parallel_config(backend="zfabric"):
                        Parallel(n_jobs=-1, batch_size=1, pre_dispatch="all")(
                            delayed(slow_or_fail)(i) for i in range(20))
                except ValueError as exc:
                    assert "boom" in str(exc)
                else:
                    raise AssertionError("no error")
                deadline = time.monotonic() + 3
                while any(client.processing().values()) and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert not any(client.processing().values()), client.processing()
                # 19 tasks of 1 s on 2 workers would take 10 s; at most the two running finish
                assert time.monotonic() - t < 3, time.monotonic() - t
                print("cancel ok")
    """)
    assert "parallel ok" in out and "cancel ok" in out


def test_joblib_imported_first_and_grid_search_matches_default_backend(tmp_path):
    out = run_script(tmp_path, """
        import joblib
        from sklearn.datasets import load_iris
        from sklearn.model_selection import GridSearchCV
        from sklearn.svm import SVC
        from zfabric import Client, LocalCluster

        if __name__ == "__main__":
            X, y = load_iris(return_X_y=True)
            grid = {"C": [0.1, 1, 10], "gamma": [0.01, 0.1, 1]}
            expected = GridSearchCV(SVC(), grid, n_jobs=1).fit(X, y)
            with LocalCluster(n_workers=2, threads_per_worker=1, memory_limit=0) as cluster, \\
                    Client(cluster):
                assert "zfabric" in joblib.parallel.BACKENDS  # joblib was imported already
                with joblib.parallel_config(backend="zfabric"):
                    got = GridSearchCV(SVC(), grid, n_jobs=-1).fit(X, y)
            assert got.best_params_ == expected.best_params_, (got.best_params_,
                                                                expected.best_params_)
            assert abs(got.best_score_ - expected.best_score_) < 1e-12
            print("grid ok", got.best_params_)
    """)
    assert "grid ok" in out


def test_adaptive_adds_workers_for_a_burst_then_retires_them_without_losing_results(tmp_path):
    out = run_script(tmp_path, """
        import os, time
        import numpy as np
        from zfabric import Client, LocalCluster

        def slow_array(i, log_path):
            with open(log_path, "a") as f:  # one line per run: a recomputation adds one
                f.write(f"{i}\\n")
            time.sleep(0.4)
            return np.full(100_000, i, dtype=np.int64)  # large: stays on its worker

        if __name__ == "__main__":
            with LocalCluster(n_workers=1, threads_per_worker=1, memory_limit=0) as cluster, \\
                    Client(cluster) as client:
                adaptive = cluster.adapt(minimum=1, maximum=3, interval="200ms", wait_count=3,
                                         target_duration="1s")
                log = os.path.abspath("runs.log")  # workers run elsewhere
                futures = client.map(slow_array, range(12), log_path=log)
                most = 1
                while not all(f.done() for f in futures):
                    most = max(most, len(client.scheduler_info()["workers"]))
                    time.sleep(0.05)
                assert most == 3, f"grew to {most} workers"
                # idle: back to the minimum after wait_count checks, data moved off first
                deadline = time.monotonic() + 15
                while len(client.scheduler_info()["workers"]) > 1:
                    assert time.monotonic() < deadline, "idle workers were not retired"
                    time.sleep(0.05)
                results = client.gather(futures)
                assert [int(r[0]) for r in results] == list(range(12))
                assert all(len(r) == 100_000 for r in results)
                # nothing was recomputed: every task ran exactly once
                with open(log) as f:
                    runs = sorted(int(line) for line in f)
                assert runs == list(range(12)), runs
                assert [kind for _, kind, _, _ in adaptive.log][:1] == ["up"]
                assert "down" in [kind for _, kind, _, _ in adaptive.log]
                while len(cluster.workers) > 1:  # the retired processes are exiting
                    assert time.monotonic() < deadline, cluster.workers
                    time.sleep(0.05)
                print("adaptive ok", adaptive.log)
    """)
    assert "adaptive ok" in out


def test_retire_and_replicate_keep_main_objects_intact(tmp_path):
    out = run_script(tmp_path, """
        from dataclasses import dataclass
        import numpy as np
        from zfabric import Client, LocalCluster

        @dataclass
        class Frame:
            name: str
            data: np.ndarray

        def make(name, n):
            return Frame(name, np.arange(n))

        if __name__ == "__main__":
            with LocalCluster(n_workers=3, threads_per_worker=1, memory_limit=0) as cluster, \\
                    Client(cluster) as client:
                frames = client.map(make, ["a", "b", "c"], [300_000] * 3)
                client.gather(frames)
                client.replicate(frames[:1], n=2)
                assert len(client.who_has(frames[:1])[frames[0].key]) == 2
                holders = sorted({a for f in frames for a in client.who_has([f])[f.key]})
                client.retire_workers(holders[:2])
                got = client.gather(frames)
                assert [f.name for f in got] == ["a", "b", "c"]
                assert all(int(f.data.sum()) == 300_000 * 299_999 // 2 for f in got)
                assert type(got[0]).__name__ == "Frame"
                print("retire ok", len(client.scheduler_info()["workers"]))
    """)
    assert "retire ok" in out
