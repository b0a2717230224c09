"""``Client.story``, ``subscribe_topic`` and ``TransitionListener`` as a user runs them: a
``python script.py`` with its helpers in ``__main__``, on a LocalCluster of worker processes;
and ``story`` from an asynchronous client."""

from __future__ import annotations

import asyncio

import pytest
from userscript import run_script

from zfabric import Client, TransitionListener
from zfabric.config import Config
from zfabric.errors import RemoteProtocolError, ZFabricError
from zfabric.testing import cluster, until

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_leftover_processes")]


def test_story_and_pushed_events_in_a_users_script(tmp_path):
    out = run_script(tmp_path, """
        import logging
        import os
        import threading
        import time

        # the scheduler and the workers keep a transition log (off by default); a
        # subscriber's queue is small (to see it overflow)
        os.environ["ZFABRIC_TRANSITION_LOG_LENGTH"] = "100000"
        os.environ["ZFABRIC_WORKER_TRANSITION_LOG_LENGTH"] = "10000"
        os.environ["ZFABRIC_SUBSCRIPTION_QUEUE_EVENTS"] = "100"

        import zfabric
        from zfabric import Client, LocalCluster


        def inc(x):
            return x + 1


        def fail_once(path):
            if not os.path.exists(path):
                open(path, "w").close()
                raise RuntimeError("first try fails")
            return "second try"


        def spam(n):
            client = zfabric.get_client()
            for i in range(n):
                client.log_event("busy", i)
            return n


        class Broken:
            def add(self, *args):
                pass

            def story(self, *args, **kwargs):
                raise RuntimeError("this worker cannot answer")


        def break_story(dask_worker):
            dask_worker._core.plugins.story = Broken()


        class Moves(zfabric.TransitionListener):
            def __init__(self):
                super().__init__()
                self.seen = []

            def transition(self, key, start, finish, **kwargs):
                self.seen.append((key, start, finish, kwargs["stimulus_id"],
                                  kwargs["worker"]))


        def until(check, what, timeout=30):
            deadline = time.monotonic() + timeout
            while not check():
                assert time.monotonic() < deadline, what
                time.sleep(0.02)


        class Caught(logging.Handler):
            def __init__(self):
                super().__init__()
                self.messages = []

            def emit(self, record):
                self.messages.append(record.getMessage())


        if __name__ == "__main__":
            with LocalCluster(n_workers=2, threads_per_worker=1,
                              dashboard_address=None) as cluster, Client(cluster) as client:
                workers = sorted(client.scheduler_info()["workers"])

                # TransitionListener hears every move, even one no look would ever catch:
                # a failed try goes processing -> released -> processing in one op
                with Moves() as moves:
                    f = client.submit(fail_once, str(os.path.abspath("flag")), retries=1,
                                      key=("retry", 1))
                    assert f.result() == "second try"
                    until(lambda: (("retry", 1), "processing", "memory")
                          in [m[:3] for m in moves.seen], f"no memory move: {moves.seen}")
                mine = [m for m in moves.seen if m[0] == ("retry", 1)]
                assert [m[1:3] for m in mine] == [("new", "processing"),
                                                  ("processing", "released"),
                                                  ("released", "processing"),
                                                  ("processing", "memory")], mine
                assert mine[1][3].startswith("erred-") and mine[1][4] in workers

                # Client.story: the scheduler's and the workers' records, oldest first
                story = client.story(("retry", 1))
                assert all(type(r).__name__ == "StoryRecord" for r in story)
                assert story[0][:4] == ("scheduler", ("retry", 1), "new", "processing")
                times = [r.timestamp for r in story]
                assert times == sorted(times)
                sched = [(r.start, r.finish) for r in story if r.source == "scheduler"]
                assert sched == [m[1:3] for m in mine], sched
                on_workers = [r for r in story if r.source != "scheduler"]
                assert {r.source for r in on_workers} <= set(workers)
                assert ("executing", "error") in [(r.start, r.finish) for r in on_workers]
                assert ("executing", "memory") in [(r.start, r.finish) for r in on_workers]
                # by stimulus id: what one op did
                erred = [r for r in story if r.source == "scheduler"
                         and r.stimulus_id.startswith("erred-")]
                again = client.story(erred[0].stimulus_id)
                assert [(r.start, r.finish) for r in again if r.source == "scheduler"] == [
                    ("processing", "released"), ("released", "processing")]
                assert client.story(f) == story or len(client.story(f)) >= len(story)

                # on_error: a worker that cannot answer raises, or is left out
                client.run(break_story, workers=[workers[0]])
                try:
                    client.story(("retry", 1))
                except RuntimeError as exc:
                    assert "cannot answer" in str(exc)
                else:
                    raise AssertionError("story(on_error='raise') did not raise")
                kept = client.story(("retry", 1), on_error="ignore")
                assert workers[0] not in {r.source for r in kept}
                assert any(r.source == "scheduler" for r in kept)
                try:
                    client.story("x", on_error="return")
                except ValueError as exc:
                    assert "on_error" in str(exc)
                else:
                    raise AssertionError("a bad on_error did not raise")

                # subscribe_topic: pushed as logged, in order; none after unsubscribing
                got = []
                client.subscribe_topic("mytopic", got.append)
                for i in range(5):
                    client.log_event("mytopic", {"i": i})
                until(lambda: len(got) == 5, f"events: {got}")
                assert [m for _, m in got] == [{"i": i} for i in range(5)]
                client.unsubscribe_topic("mytopic")
                client.log_event("mytopic", {"i": 99})
                client.submit(inc, 1).result()
                time.sleep(0.3)
                assert len(got) == 5

                # a handler that blocks: the scheduler goes on, drops what does not fit the
                # subscriber's queue, and says how many were missed
                caught = Caught()
                logging.getLogger("zfabric.client").addHandler(caught)
                gate = threading.Event()
                busy = []

                def slow(event):
                    gate.wait(30)
                    busy.append(event[1])

                client.subscribe_topic("busy", slow)
                assert client.submit(spam, 3000).result() == 3000
                assert client.submit(inc, 41).result() == 42  # the scheduler is not blocked
                gate.set()

                def ended():  # (a full queue drops the newest: say it until it is heard)
                    client.log_event("busy", "end")
                    return "end" in busy

                until(ended, "the last event did not arrive")
                assert len(busy) < 1000, len(busy)
                until(lambda: any("missed" in m and "'busy'" in m for m in caught.messages),
                      f"no missed warning: {caught.messages}")
                client.unsubscribe_topic("busy")

                # a client's subscriptions end when it closes
                # (this client's own: its tasks' print and warn topics)
                subs = cluster.scheduler.state.subs
                before = subs.count()
                with Client(cluster, set_as_default=False) as other:
                    other.subscribe_topic("t", print)
                    Moves().start(other)  # never stopped: it ends with its client
                    assert subs.count() == before + 2 and subs.watching
                until(lambda: subs.count() == before and not subs.watching,
                      f"subscriptions left: {subs.by_peer}")
            print("ALL OK")
    """, timeout=110)
    assert "ALL OK" in out


async def test_story_from_an_asynchronous_client():
    config = Config(TRANSITION_LOG_LENGTH=1000)
    async with cluster(config=config) as (s, workers), \
            Client(s.address, asynchronous=True, set_as_default=False) as c:
        f = c.submit(lambda x: x + 1, 1, key="async-inc-1")
        assert await f == 2
        story = await c.story("async-inc-1")
        assert [(r.source, r.start, r.finish) for r in story] == [
            ("scheduler", "new", "processing"), ("scheduler", "processing", "memory")]
        assert story[0].worker in {w.address for w in workers}
        assert await c.story() == []


async def test_transition_listener_on_an_asynchronous_client(fab):
    seen: list = []

    class Moves(TransitionListener):
        def transition(self, key, start, finish, **kwargs):
            seen.append((key, start, finish))

    # When a listener is started and stopped by awaiting, and used with async with
    assert await fab.c.submit(lambda x: x + 1, 0) == 1  # (its first submit subscribes to
    await until(lambda: len(fab.c.core.subscriptions) == 2, 10)  # print and warn)
    before = set(fab.c.core.subscriptions)
    listener = await Moves(keys=["async-a"]).start(fab.c)
    assert len(fab.c.core.subscriptions) == len(before) + 1
    assert await fab.c.submit(lambda x: x + 1, 1, key="async-a") == 2
    await until(lambda: ("async-a", "processing", "memory") in seen, 10, f"moves: {seen}")
    await listener.stop()
    await listener.stop()  # (again: nothing to do)
    # Then it heard the task's moves, and nothing after it stopped
    n = len(seen)
    assert await fab.c.submit(lambda x: x + 1, 2, key="async-a-2") == 3
    await asyncio.sleep(0.3)
    assert len(seen) == n and set(fab.c.core.subscriptions) == before


async def test_story_without_a_log_says_how_to_keep_one(fab):
    # Given a cluster with the default settings (no process keeps a transition log)
    assert await fab.c.submit(lambda x: x + 1, 1, key="inc-1") == 2
    # Then story raises an error that says how to keep one; with on_error="ignore" it is
    # empty
    with pytest.raises(ZFabricError, match="TRANSITION_LOG_LENGTH"):
        await fab.c.story("inc-1")
    assert await fab.c.story("inc-1", on_error="ignore") == []


async def test_a_malformed_subscribe_fails_its_request_and_the_client_goes_on(fab):
    # When a subscribe request that the protocol's door refuses is made
    with pytest.raises(RemoteProtocolError, match="subscribe request what"):
        await asyncio.wait_for(fab.c.core.subscribe(lambda *a: None, what="everything"), 10)
    # Then its wait ends with the error, and the client and scheduler serve on
    assert fab.c.core.subscriptions == {}
    assert await fab.c.submit(lambda x: x + 1, 1) == 2
