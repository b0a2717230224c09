"""Scripts written the way users write them, run as ``python script.py`` subprocesses.

Their classes, dataclasses, helpers and exceptions live in the script's ``__main__`` (and in a
module beside the script), which the worker processes cannot import: all of it must travel by
value, and a value a worker cannot unpickle must fail its task, never the worker.
"""

from __future__ import annotations

import pytest
from userscript import run_script

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("no_leftover_processes")]


def test_main_objects_travel_by_value(tmp_path):
    # Given a script whose data types, helpers and exceptions are defined in __main__ and in a
    # module beside it
    helper = """
        class Point3:
            def __init__(self, x, y, z):
                self.x, self.y, self.z = x, y, z

            def total(self):
                return self.x + self.y + self.z
    """
    out = run_script(tmp_path, """
        import dataclasses
        import os

        import numpy as np

        from beside import Point3
        from zfabric import Client, LocalCluster


        @dataclasses.dataclass
        class P:
            x: int
            y: int

            def norm(self):
                return self.x + self.y


        class Box:
            def __init__(self, inner, array=None):
                self.inner = inner
                self.array = array


        class Oops(Exception):
            pass


        def double_norm(p):
            return p.norm() * 2


        def apply(fn, value):
            return fn(value)


        def boom(msg):
            raise Oops(msg)


        def make_box(n):
            return Box(P(n, n), np.arange(n, dtype="f8"))


        if __name__ == "__main__":
            with LocalCluster(n_workers=2, threads_per_worker=1) as cluster, \\
                    Client(cluster) as client:
                me = os.getpid()
                # an instance as an argument, nested instances, a helper as an argument
                assert client.submit(double_norm, P(1, 2)).result(timeout=30) == 6
                assert client.submit(lambda b: b.inner.norm(), Box(P(3, 4))).result() == 7
                assert client.submit(apply, double_norm, P(2, 2)).result() == 8
                assert client.submit(apply, fn=double_norm, value=P(5, 5)).result() == 20
                # a result of a __main__ type comes back as that type
                out = client.submit(P, 5, 6).result()
                assert isinstance(out, P) and out == P(5, 6), out
                # large buffers inside a __main__ object (out of band), both ways
                big = client.submit(make_box, 200_000).result()
                assert isinstance(big, Box) and big.array.sum() == sum(range(200_000))
                arr = np.ones(300_000)
                assert client.submit(lambda b: b.array.sum(), Box(P(0, 0), arr)).result() \\
                    == 300_000
                # map, scatter and a dependency chain of __main__ values
                assert client.gather(client.map(double_norm, [P(i, i) for i in range(10)])) \\
                    == [4 * i for i in range(10)]
                f = client.scatter(P(7, 8))
                assert client.submit(double_norm, f).result() == 30
                chained = client.submit(double_norm, client.submit(P, 1, 1))
                assert chained.result() == 4
                # the module beside the script: the workers cannot import it either
                assert client.submit(lambda p: p.total(), Point3(1, 2, 3)).result() == 6
                assert isinstance(client.submit(Point3, 1, 1, 1).result(), Point3)
                # an exception class of __main__ is caught as itself
                try:
                    client.submit(boom, "bad").result()
                except Oops as exc:
                    assert str(exc) == "bad"
                else:
                    raise AssertionError("no Oops")
                # run() with a __main__ function and result
                pids = client.run(lambda: P(os.getpid(), 0))
                assert len(pids) == 2 and all(isinstance(p, P) and p.x != me
                                              for p in pids.values()), pids
            print("all good")
    """, files={"beside.py": helper})
    assert "all good" in out


def test_undecodable_values_fail_their_task_not_the_worker(tmp_path):
    # Given a value that pickles on the client but cannot be unpickled in another process
    out = run_script(tmp_path, """
        import os

        from zfabric import Client, LocalCluster
        from zfabric.errors import SerializationError


        class Grumpy:
            def __init__(self, size=0):
                self.pid = os.getpid()
                self.payload = b"x" * size

            def __setstate__(self, state):
                if state["pid"] != os.getpid():
                    raise ValueError("Grumpy refuses to leave home")
                self.__dict__.update(state)


        def use(g):
            return len(g.payload)


        def expect_failure(future, *words):
            try:
                future.result(timeout=30)
            except SerializationError as exc:
                text = str(exc)
                assert all(w in text for w in words), text
            else:
                raise AssertionError("the task should have failed")


        if __name__ == "__main__":
            with LocalCluster(n_workers=2, threads_per_worker=1) as cluster, \\
                    Client(cluster) as client:
                workers = sorted(client.scheduler_info()["workers"])
                # an argument: fails in the task, with the unpickling error
                expect_failure(client.submit(use, Grumpy()), "refuses to leave home")
                # scattered and inline: the key and the error are named
                small = client.scatter(Grumpy(), hash=False)
                expect_failure(client.submit(use, small), small.key, "refuses to leave home")
                # scattered and large, put on one worker directly
                large = client.scatter(Grumpy(200_000), hash=False)
                expect_failure(client.submit(use, large), "refuses to leave home")
                # a dependency fetched from a peer: made on one worker, used on the other
                made = client.submit(Grumpy, 300_000, workers=[workers[0]], pure=False)
                expect_failure(client.submit(use, made, workers=[workers[1]],
                                             allow_other_workers=False),
                               made.key, "refuses to leave home")
                # every worker is still there and still works
                assert sorted(client.scheduler_info()["workers"]) == workers
                assert client.gather(client.map(lambda x: x + 1, range(20))) \\
                    == list(range(1, 21))
            print("all good")
    """)
    assert "all good" in out


def test_a_crashed_worker_loop_is_a_death_not_a_goodbye(tmp_path):
    # Given a worker under a Nanny whose loop thread dies of an unexpected exception
    out = run_script(tmp_path, """
        import gc
        import time

        from zfabric import Client, LocalCluster


        def break_the_loop():
            from zfabric.worker.core import WorkerLoop

            loops = [o for o in gc.get_objects() if isinstance(o, WorkerLoop)]

            def broken(now):
                raise RuntimeError("a bug in the loop")

            for loop in loops:
                loop._beat = broken
            return len(loops)


        if __name__ == "__main__":
            with LocalCluster(n_workers=1, threads_per_worker=1) as cluster, \\
                    Client(cluster) as client:
                before = set(client.scheduler_info()["workers"])
                (n,) = client.run(break_the_loop).values()
                assert n == 1
                # Then the Nanny starts a fresh process (a clean goodbye would have closed it)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    now = set(client.scheduler_info()["workers"])
                    if now and now != before:
                        break
                    time.sleep(0.1)
                else:
                    raise AssertionError("no fresh worker after the crash")
                assert client.submit(lambda: 42).result(timeout=30) == 42
            print("all good")
    """)
    assert "all good" in out


def test_tasks_that_submit_tasks_on_one_thread(tmp_path):
    # Given a cluster of one worker with one thread, where a task can only wait for the tasks
    # it submits if it gives its slot back
    out = run_script(tmp_path, """
        import dataclasses
        import os

        from zfabric import (Client, LocalCluster, get_client, get_worker, rejoin, secede,
                             worker_client)


        @dataclasses.dataclass
        class Holder:
            future: object


        def fib(n):
            if n < 2:
                return n
            with worker_client() as client:
                a, b = client.submit(fib, n - 1), client.submit(fib, n - 2)
                return a.result(timeout=30) + b.result(timeout=30)


        def by_hand(n):
            client = get_client()
            futures = client.map(lambda x: x * 10, range(n))
            secede()
            total = sum(client.gather(futures))
            rejoin()
            return total, id(get_client()) == id(client), get_worker().address


        def peek(holder, plain):
            # a Future inside an object arrives as a Future; one at the top level as its value
            from zfabric import Future
            assert isinstance(holder.future, Future), type(holder.future)
            return holder.future.result(timeout=30) + plain


        def nested_dask():
            import dask

            where = dask.delayed(lambda: get_worker().address)()
            (address,) = dask.compute(where)
            return address


        if __name__ == "__main__":
            with LocalCluster(n_workers=1, threads_per_worker=1) as cluster, \\
                    Client(cluster) as client:
                assert client.submit(fib, 8).result(timeout=60) == 21
                total, same, address = client.submit(by_hand, 5).result(timeout=30)
                assert total == 100 and same, (total, same)
                assert address in client.scheduler_info()["workers"]
                f = client.submit(lambda: 5)
                assert client.submit(peek, Holder(f), f).result(timeout=30) == 10
                # dask.compute inside a task runs on the worker's client (as zfabric tasks)
                assert client.submit(nested_dask).result(timeout=60) == address
                # outside a task
                for fn in (get_worker, secede, rejoin):
                    try:
                        fn()
                    except ValueError:
                        pass
                    else:
                        raise AssertionError(fn)
                assert get_client() is client
            print("all good")
    """)
    assert "all good" in out
