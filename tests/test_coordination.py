"""Lock, Semaphore, Event, Variable, Queue and datasets with real processes and sockets."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from userscript import run_script

from zfabric import Client, Event, Lock, Queue, Semaphore, Variable
from zfabric.testing import cluster, until

pytestmark = pytest.mark.timeout(90)


def test_primitives_across_worker_processes(tmp_path, no_leftover_processes):
    # Given a user's script (its functions in __main__) and two worker processes
    out = run_script(tmp_path, """
        import time
        from zfabric import Client, Event, LocalCluster, Lock, Queue, Semaphore, Variable


        def increment(lock, counter):
            with lock:
                value = counter.get()
                time.sleep(0.001)
                counter.set(value + 1)


        def span(sem):
            with sem:
                start = time.time()
                time.sleep(0.05)
                return start, time.time()


        def produce(queue, n):
            for i in range(n):
                queue.put(i)
            return n


        def wait_for(event):
            return event.wait(timeout=30)


        if __name__ == "__main__":
            with LocalCluster(n_workers=2, threads_per_worker=2) as cluster, \\
                    Client(cluster) as client:
                # 20 tasks increment a Variable under a Lock
                lock, counter = Lock(), Variable("counter")
                counter.set(0)
                client.gather(client.map(increment, [lock] * 20, [counter] * 20, pure=False))
                print("counter", counter.get())

                # Semaphore(1): no two holders overlap
                sem = Semaphore(max_leases=1, name="db")
                spans = sorted(client.gather([client.submit(span, sem, pure=False)
                                              for _ in range(8)]))
                print("overlaps", sum(a[1] > b[0] for a, b in zip(spans, spans[1:])))
                print("leases", sem.get_value())

                # A Queue filled by a task, drained by the client in order
                queue = Queue("numbers", maxsize=5)
                filler = client.submit(produce, queue, 30)
                print("drained", [queue.get(timeout=10) for _ in range(30)] == list(range(30)))
                print("filler", filler.result(), queue.qsize())

                # An Event set by the client releases the waiting tasks
                event = Event("go")
                waiting = [client.submit(wait_for, event, pure=False) for _ in range(4)]
                time.sleep(0.3)
                print("before", sum(f.done() for f in waiting))
                event.set()
                print("after", client.gather(waiting))

                # Timeouts
                try:
                    Variable("unset").get(timeout=0.2)
                except TimeoutError:
                    print("variable timeout")
                try:
                    Queue("empty").get(timeout=0.2)
                except TimeoutError:
                    print("queue timeout")
                lock.acquire()
                t = time.monotonic()
                print("second acquire", Lock(lock.name).acquire(timeout=0.3),
                      time.monotonic() - t >= 0.29)
                lock.release()

                # Datasets across two clients; a published future outlives its handle
                client.publish_dataset(total=client.submit(sum, [1, 2, 3]))
                client.publish_dataset({"a": [1, 2]}, name="meta")
                with Client(cluster.scheduler_address, set_as_default=False) as other:
                    print("datasets", sorted(other.list_datasets()),
                          other.get_dataset("total").result(), other.datasets["meta"],
                          other.get_dataset("missing", default="none"))
                    try:
                        other.publish_dataset(meta=1)
                    except KeyError:
                        print("taken")
                    other.unpublish_dataset("meta")
                print("left", client.list_datasets())

                # A persisted dask collection (tuple keys) published by one client, computed
                # by another
                import dask.array as da
                client.publish_dataset(client.persist(da.arange(100, chunks=10) * 2),
                                       name="array")
                with Client(cluster.scheduler_address, set_as_default=False) as other:
                    array = other.get_dataset("array")
                    print("array", type(array).__name__, int(other.compute(array.sum()).result()))
    """)
    assert "counter 20" in out
    assert "overlaps 0" in out and "leases 0" in out
    assert "drained True" in out and "filler 30 0" in out
    assert "before 0" in out and "after [True, True, True, True]" in out
    assert "variable timeout" in out and "queue timeout" in out
    assert "second acquire False True" in out
    assert "datasets ['meta', 'total'] 6 {'a': [1, 2]} none" in out
    assert "taken" in out and "left ['total']" in out
    assert "array Array 9900" in out


async def test_async_client_large_values_and_futures(fab):
    # Given an asynchronous client
    c = fab.c
    lock = Lock("a", client=c)
    assert await lock.acquire()
    assert await lock.locked()
    assert await Lock("a", client=c).acquire(blocking=False) is False
    await lock.release()
    async with Semaphore(2, "s", client=c) as sem:
        assert await sem.get_value() == 1

    # A value above the inline limit goes to a worker; the scheduler holds only its key
    var = Variable("big", client=c)
    big = b"x" * (c.config.INLINE_BYTES + 10)
    await var.set(big)
    assert await var.get() == big
    [item] = [v.item for v in fab.s.state.coord.variables.values()]
    assert item[0] == "s" and len(item) == 2

    # A Future set into a Variable keeps its result alive after the handle is dropped
    f = c.submit(lambda: 42, pure=False)
    key = f.key
    await var.set(f)
    del f
    await asyncio.sleep(0.2)
    assert key in fab.s.state.tasks
    assert await (await var.get()) == 42
    await var.delete()

    # Futures inside a queued object arrive as Futures bound to the reader's client
    q = Queue("futures", client=c)
    g = c.submit(lambda: 7, pure=False)
    await q.put({"result": g})
    del g
    got = await q.get(timeout=5)
    assert await got["result"] == 7
    assert await q.get(batch=True) == []
    with pytest.raises(TimeoutError):
        await q.get(timeout=0.1)

    # Event: wait returns False on timeout, True once set
    ev = Event("e", client=c)
    assert await ev.wait(timeout=0.1) is False
    await ev.set()
    assert await ev.is_set() and await ev.wait()
    await ev.clear()
    assert not await ev.is_set()

    # Primitives pickle by name and refer to the same state inside tasks
    def bump(v, lk):
        with lk:
            v.set(v.get() + 1)
        return lk.name

    counter = Variable("n", client=c)
    await counter.set(0)
    names = await c.gather(c.map(bump, [counter] * 5, [lock] * 5, pure=False))
    assert names == ["a"] * 5 and await counter.get() == 5

    # Bad arguments raise at once
    with pytest.raises(ValueError):
        Semaphore(0, client=c)
    with pytest.raises(ValueError):
        Queue(client=c, maxsize=-1)
    with pytest.raises(RuntimeError):
        await Lock("never", client=c).release()


def test_sigkilled_holder_releases_its_lease_at_once(no_leftover_processes):
    # Given a task on a worker process holding a lock
    from zfabric import LocalCluster

    def hold(lock):
        lock.acquire()
        time.sleep(60)

    with LocalCluster(n_workers=2, threads_per_worker=1) as lc, Client(lc) as c:
        lock = Lock("held")
        holder = c.submit(hold, lock, pure=False)
        deadline = time.monotonic() + 20
        while not lock.locked():
            assert time.monotonic() < deadline, "the task never took the lock"
            time.sleep(0.05)
        [address] = [a for a, keys in c.processing().items() if holder.key in keys]
        pid = c.run(os.getpid, workers=[address])[address]
        # When its worker process is killed with SIGKILL
        t = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        # Then the lease goes at once (the Nanny reports the death), not after lease_timeout
        assert Lock("held").acquire(timeout=10)
        assert time.monotonic() - t < 5
        del holder


async def test_queue_lives_while_a_client_uses_it():
    async with cluster(nworkers=1, nthreads=1) as (s, _):
        async with Client(s.address, asynchronous=True, set_as_default=False) as a, \
                Client(s.address, asynchronous=True, set_as_default=False) as b:
            await Queue("shared", client=a).put(1)
            assert await Queue("shared", client=b).get() == 1
            await Queue("shared", client=a).close()
            assert "shared" in s.state.coord.queues  # b still uses it
        # the goodbyes reach the scheduler soon after
        await until(lambda: "shared" not in s.state.coord.queues, 5, "queue forgotten")


def test_lease_of_a_stopped_holder_lapses_after_lease_timeout(no_leftover_processes):
    # Given a task on a worker process holding a lease with a 3 s lease_timeout
    from zfabric import LocalCluster

    def hold(sem):
        sem.acquire()
        time.sleep(60)

    with LocalCluster(n_workers=1, threads_per_worker=1) as lc, Client(lc) as c:
        with pytest.raises(ValueError, match="three heartbeats"):
            Semaphore(1, "short", lease_timeout=0.5)
        sem = Semaphore(1, "short", lease_timeout=3)
        holder = c.submit(hold, sem, pure=False)
        deadline = time.monotonic() + 20
        while sem.get_value() == 0:
            assert time.monotonic() < deadline, "the task never took the lease"
            time.sleep(0.05)
        [pid] = c.run(os.getpid).values()
        # When its process stops (alive, so no death is reported, but silent)
        os.kill(pid, signal.SIGSTOP)
        try:
            # Then the lease lapses once the holder's client has been silent for 3 s
            assert Semaphore(1, "short", lease_timeout=3).acquire(timeout=15)
        finally:
            os.kill(pid, signal.SIGCONT)
        del holder
