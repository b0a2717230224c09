"""The everyday Client API as dask.distributed users call it, in ``python script.py``
subprocesses on a LocalCluster of worker processes (issue: divergences from dask.distributed).
"""

from __future__ import annotations

import pytest
from userscript import run_script

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_leftover_processes")]


def test_client_api_behaves_like_dask_distributed(tmp_path):
    out = run_script(tmp_path, """
        import os
        import signal
        import threading
        import time
        from concurrent.futures import CancelledError

        import numpy as np

        import zfabric
        from zfabric import Client, LocalCluster, as_completed, default_client, wait
        from zfabric.errors import ZFabricError


        class Flaky:
            def __init__(self, path):
                self.path = path

            def __call__(self, x):
                if not os.path.exists(self.path):
                    open(self.path, "w").close()
                    raise RuntimeError("first time fails")
                return x * 2


        def expect(exc_type, fn, *args, match="", **kwargs):
            try:
                fn(*args, **kwargs)
            except exc_type as exc:
                assert match in str(exc), (match, str(exc))
                return exc
            raise AssertionError(f"{fn} did not raise {exc_type.__name__}")


        if __name__ == "__main__":
            with LocalCluster(n_workers=2, threads_per_worker=1) as cluster, \\
                    Client(cluster) as client:
                addr = cluster.scheduler_address
                info = client.scheduler_info()
                workers = sorted(info["workers"])
                assert info["n_workers"] == 2 and info["total_threads"] == 2, info
                assert info["total_memory"] > 0 and info["started"] > 0
                w = info["workers"][workers[0]]
                assert w["status"] == "running" and w["memory_limit"] > 0
                assert "local_directory" in w
                assert len(client.scheduler_info(n_workers=1)["workers"]) == 1

                # wait() is a named tuple; timeouts take dask's strings
                fs = client.map(lambda x: x + 1, range(4))
                res = wait(fs, timeout="10s")
                assert len(res.done) == 4 and not res.not_done
                assert fs[0].result(timeout="5s") == 1

                # workers= filters
                assert list(client.nthreads(workers=[workers[0]])) == [workers[0]]
                assert list(client.has_what(workers=workers[1])) == [workers[1]]
                assert set(client.processing(workers=workers)) == set(workers)
                assert sum(client.nbytes(fs).values()) > 0

                # run: dask_worker injected, on_error honoured, wait=False
                names = client.run(lambda dask_worker: dask_worker.address)
                assert names == {a: a for a in workers}, names

                def fail_on_first(dask_worker):
                    if dask_worker.address == workers[0]:
                        raise ValueError("nope")
                    return 1

                expect(ValueError, client.run, fail_on_first, match="nope")
                got = client.run(fail_on_first, on_error="return")
                assert isinstance(got[workers[0]], ValueError) and got[workers[1]] == 1
                assert client.run(fail_on_first, on_error="ignore") == {workers[1]: 1}
                assert client.run(os.getpid, wait=False) is None
                expect(ValueError, client.run, os.getpid, on_error="bad")
                expect(ValueError, client.run, os.getpid, nanny=True)
                expect(ZFabricError, client.run_on_scheduler, os.getpid,
                       match="never runs user code")

                # keywords that would be silently ignored raise
                # keys this (insecure) scheduler does not use: a clear error, no silent drop
                expect(ZFabricError, Client, addr, security=True, timeout=5,
                       match="does not speak CurveZMQ")
                expect(ValueError, Client, addr, serializers=["msgpack"])
                expect(ValueError, Client, addr, direct_to_workers=False)
                expect(TypeError, Client, addr, n_workers=3)
                expect(TypeError, client.scheduler_info, bogus=1)

                # cancel with a reason
                slow = client.submit(time.sleep, 5, pure=False)
                client.cancel(slow, reason="not needed any more")
                err = expect(CancelledError, slow.result, timeout=10)
                assert slow.key in str(err) and "not needed any more" in str(err)

                # retry
                flaky = client.submit(Flaky(str(tmp := os.path.join(os.getcwd(), "flag"))), 21)
                expect(RuntimeError, flaky.result, timeout=30, match="first time")
                flaky.retry()
                assert flaky.result(timeout=30) == 42

                # done callbacks run on a thread of their own, where result() works
                seen = []
                done = threading.Event()

                def callback(fut):
                    seen.append((fut.result(), threading.current_thread().name))
                    done.set()

                cb = client.submit(lambda: 7)
                cb.add_done_callback(callback)
                assert done.wait(30)
                assert seen[0][0] == 7 and seen[0][1].startswith("zfabric-callbacks"), seen

                # as_completed: timeout, has_ready, next_batch, batches, clear
                many = client.map(lambda x: x, range(10), pure=False)
                ac = as_completed(many)
                got = []
                for batch in ac.batches():
                    got.extend(batch)
                assert sorted(f.result() for f in got) == list(range(10))
                stuck = client.submit(time.sleep, 3, pure=False)
                ac = as_completed([stuck], timeout=0.5)
                expect(TimeoutError, next, ac)
                ac.clear()
                assert ac.count() == 0 and not ac.has_ready()
                client.cancel(stuck)

                # current / as_current / default_client falls back
                assert Client.current() is client and default_client() is client
                other = Client(addr)
                assert default_client() is other
                with client.as_current():
                    assert Client.current() is client
                other.close()
                assert default_client() is client

                # scheduler files
                path = os.path.join(os.getcwd(), "scheduler.json")
                client.write_scheduler_file(path)
                with Client(scheduler_file=path, set_as_default=False) as third:
                    assert third.submit(lambda: 3).result(timeout=30) == 3

                # versions
                v = client.get_versions(check=True)
                assert v["client"]["zfabric"] == zfabric.__version__
                assert set(v["workers"]) == set(workers)

                # result(timeout=) bounds the fetch too: the holder is stopped
                big = client.submit(np.ones, 2_000_000, workers=[workers[0]])
                wait(big)
                pid = client.run(os.getpid, workers=[workers[0]])[workers[0]]
                os.kill(pid, signal.SIGSTOP)
                try:
                    t0 = time.monotonic()
                    try:
                        big.result(timeout=1.5)
                    except TimeoutError:
                        pass
                    else:
                        raise AssertionError("a value came from a stopped worker"
                                             f" ({big.status}, {client.who_has(big)})")
                    elapsed = time.monotonic() - t0
                    assert elapsed < 10, f"result(timeout=1.5) took {elapsed:.1f} s"
                finally:
                    os.kill(pid, signal.SIGCONT)

                # restart cancels every future, finished ones too
                kept = client.submit(lambda: 1)
                assert kept.result(timeout=30) == 1
                client.restart()
                assert kept.status == "cancelled"
                expect(CancelledError, kept.result, timeout=5, match="restarted")
                assert client.submit(lambda: 2).result(timeout=30) == 2
            print("all good")
    """)
    assert "all good" in out


def test_priority_is_honoured_on_busy_workers(tmp_path):
    # Given both workers busy, 20 low-priority tasks then 20 high-priority ones
    out = run_script(tmp_path, """
        import time

        from zfabric import Client, LocalCluster, wait


        def work(tag, i):
            start = time.time()
            time.sleep(0.05)
            return tag, start


        if __name__ == "__main__":
            with LocalCluster(n_workers=2, threads_per_worker=1) as cluster, \\
                    Client(cluster) as client:
                client.gather(client.map(work, ["warm"] * 4, range(4), pure=False))
                busy = client.map(lambda x: time.sleep(0.5), range(2), pure=False)
                low = client.map(work, ["low"] * 20, range(20), pure=False, priority=0)
                high = client.map(work, ["high"] * 20, range(20), pure=False, priority=10)
                wait(busy + low + high, timeout=60)
                runs = sorted(client.gather(low + high), key=lambda r: r[1])
                first = [tag for tag, _ in runs[:20]]
                print("high among the first 20:", first.count("high"))
                assert first.count("high") >= 14, first
            print("all good")
    """)
    assert "all good" in out
