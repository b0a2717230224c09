"""Actors: objects kept on a worker, called straight at its data port."""

from __future__ import annotations

import pytest
from userscript import run_script

pytestmark = pytest.mark.timeout(90)


def test_counter_actor_from_tasks_and_client_then_its_worker_dies(tmp_path,
                                                                   no_leftover_processes):
    out = run_script(tmp_path, """
        import os
        import signal
        import time

        from zfabric import Client, LocalCluster
        from zfabric.errors import ActorLost


        class Counter:
            def __init__(self, start=0):
                self.n = start
                self.active = 0
                self.overlaps = 0

            def incr(self, k=1):
                self.active += 1
                if self.active > 1:
                    self.overlaps += 1
                time.sleep(0.001)
                self.n += k
                self.active -= 1
                return self.n

            def where(self):
                return os.getpid()

            def fail(self):
                raise KeyError("inside the actor")


        def bump(counter, times):
            return [counter.incr().result() for _ in range(times)][-1]


        if __name__ == "__main__":
            with LocalCluster(n_workers=2, threads_per_worker=2) as cluster, \\
                    Client(cluster) as client:
                counter = client.submit(Counter, 100, actor=True).result()
                print("first", counter.incr().result(), counter.n)
                # Several tasks on both workers call it at once, and the client too
                tasks = [client.submit(bump, counter, 25, pure=False) for _ in range(8)]
                calls = [counter.incr(2) for _ in range(50)]
                print("client", [c.result() for c in calls] == sorted(c.result() for c in calls))
                client.gather(tasks)
                print("total", counter.n, "overlaps", counter.overlaps)
                try:
                    counter.fail().result()
                except KeyError as exc:
                    print("error", exc)
                several = [f.result() for f in client.map(Counter, [1, 2, 3], actor=True)]
                print("map", [a.incr().result() for a in several])
                # When the worker holding it is killed, the next call says so
                os.kill(counter.where().result(), signal.SIGKILL)
                t = time.monotonic()
                try:
                    counter.incr().result()
                except ActorLost as exc:
                    print("lost", time.monotonic() - t < 10, "create the actor again" in str(exc))
    """)
    assert "first 101 101" in out
    assert "client True" in out
    assert "total 401 overlaps 0" in out  # 101 + 8 * 25 + 50 * 2
    assert "error 'inside the actor'" in out
    assert "map [2, 3, 4]" in out
    assert "lost True True" in out


async def test_actor_with_an_asynchronous_client(fab):
    class Box:
        def __init__(self):
            self.items = []

        def add(self, x):
            self.items.append(x)
            return len(self.items)

        async def later(self, x):
            return x * 2

    box = await fab.c.submit(Box, actor=True)
    assert [await box.add(i) for i in range(3)] == [1, 2, 3]
    assert await box.items == [0, 1, 2]
    assert await box.later(21) == 42
    with pytest.raises(TypeError):
        fab.c.submit(lambda: 1, actor=True)


def test_actors_of_a_secure_and_a_plain_cluster_in_one_process(tmp_path):
    # A script that used a cluster with keys, then one without: each actor handle calls with
    # the keys of the client it came from (they once all used the first client's keys)
    out = run_script(tmp_path, """
        from zfabric import Client, LocalCluster


        class Box:
            def __init__(self, v):
                self.v = v

            def get(self):
                return self.v


        if __name__ == "__main__":
            with LocalCluster(n_workers=1, processes=False, security=True) as secure, \\
                    Client(secure) as c1:
                a = c1.submit(Box, "secure", actor=True).result(timeout=30)
                assert a.get().result(timeout=30) == "secure"
                with LocalCluster(n_workers=1, processes=False) as plain, \\
                        Client(plain, set_as_default=False) as c2:
                    b = c2.submit(Box, "plain", actor=True).result(timeout=30)
                    assert b.get().result(timeout=30) == "plain"
                    assert a.get().result(timeout=30) == "secure"
            print("all good")
    """)
    assert "all good" in out
