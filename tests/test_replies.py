"""Direct replies (zfabric/replies.py): a small result a client waits for comes straight from
its worker; every other path still goes through the scheduler, and a refusal or a bad message
on a reply link changes nothing but the path."""

from __future__ import annotations

import asyncio
import dataclasses
from types import SimpleNamespace

import pytest
import zmq
import zmq.asyncio

from zfabric import Client, protocol
from zfabric.config import from_env
from zfabric.errors import RemoteProtocolError
from zfabric.testing import cluster, until

pytestmark = pytest.mark.timeout(60)

ON = dataclasses.replace(from_env(), DIRECT_REPLIES=True)


@pytest.fixture
async def fab():
    """The shared fixture's shape (a scheduler, two single-threaded workers, an asynchronous
    client), with direct replies on."""
    async with cluster(nworkers=2, nthreads=1) as (s, workers), \
            Client(s.address, asynchronous=True, config=ON, set_as_default=False) as c:
        yield SimpleNamespace(s=s, workers=workers, a=workers[0], b=workers[1], c=c)


def inc(x):
    return x + 1


async def test_results_waited_for_one_at_a_time_come_straight_from_the_worker(fab):
    c = fab.c
    direct = c.core.direct
    # When a client waits for each of its tasks in turn
    futures = []
    for i in range(30):
        futures.append(c.submit(inc, i, pure=False))
        assert await futures[-1] == i + 1
    # Then it linked to the worker that ran them and took most results from it
    assert direct.links and set(direct.links) <= {fab.a.address, fab.b.address}
    assert direct.received >= 20
    # and the scheduler learns of every one of them as held by a worker, as ever
    tasks = fab.s.state.tasks
    await until(lambda: all(f._wkey in tasks and tasks[f._wkey].state == "memory"
                            and tasks[f._wkey].who_has for f in futures), what="all in memory")
    assert all(f.status == "finished" for f in futures)


async def test_a_map_keeps_the_scheduler_path():
    async with cluster(nworkers=1, nthreads=1) as (s, _), \
            Client(s.address, asynchronous=True, config=ON, set_as_default=False) as c:
        futures = c.map(inc, range(200))
        assert await c.gather(futures) == list(range(1, 201))
        # many tasks in flight: no reply option, so no link and nothing direct
        assert c.core.direct.received == 0 and not c.core.direct.links


def test_a_blocking_client_gets_direct_results():
    async def run():
        async with cluster(nworkers=1, nthreads=1) as (s, _):
            def blocking():
                with Client(s.address, config=ON, set_as_default=False) as c:
                    values = [c.submit(inc, i, pure=False).result() for i in range(20)]
                    big = c.submit(bytes, 200_000).result()  # too large to ride inline
                    return values, len(big), c.core.direct.received
            return await asyncio.to_thread(blocking)

    values, nbig, received = asyncio.run(run())
    assert values == list(range(1, 21)) and nbig == 200_000
    assert received >= 10


async def test_direct_replies_off_every_result_comes_through_the_scheduler():
    async with cluster(nworkers=1, nthreads=1) as (s, _), \
            Client(s.address, asynchronous=True, set_as_default=False) as c:
        for i in range(5):
            assert await c.submit(inc, i, pure=False) == i + 1
        assert c.core.direct is None


async def test_a_worker_that_refuses_reply_to_leaves_the_results_on_the_scheduler_path(fab):
    c = fab.c
    direct = c.core.direct
    for i in range(5):
        assert await c.submit(inc, i, pure=False) == i + 1
    [address] = list(direct.links)[:1]
    # When the worker answers the link with an error (as one that does not know reply-to)
    direct._on_message(address, protocol.encode([{"op": "error", "message": "unexpected"}]))
    # Then the link is closed and never opened again, and results still come
    assert address not in direct.links and address in direct.refused
    before = direct.received
    for i in range(10):
        assert await c.submit(inc, i, pure=False) == i + 1
    assert address not in direct.links
    assert direct.received - before <= 10


async def test_bad_results_on_a_reply_link_are_refused_at_the_door(fab):
    c = fab.c
    direct = c.core.direct
    fut = c.submit(inc, 41, key="x", pure=False)
    assert await fut == 42
    pending = c.submit(inc, 1, key="y", pure=False)
    st = pending._state
    # When a reply link brings results of the wrong shape, for a key the client never had,
    # or for one that is already done
    for frames in (
        [b"\xc1"],  # not msgpack
        protocol.encode([{"op": "results", "items": [[1, b"v", 3]]}]),
        protocol.encode([{"op": "results", "items": [["x", "not bytes", 3]]}]),
        protocol.encode([{"op": "results", "items": "nope"}]),
        protocol.encode([{"op": "results", "items": [["unknown", b"v", 3]]}]),
    ):
        direct._on_message("tcp://127.0.0.1:1", frames)
    # Then nothing changed, and the real results still arrive
    assert fut.status == "finished" and await fut == 42
    assert await pending == 2 and st.status == "finished"


async def test_the_data_port_checks_reply_to_and_serves_on(fab):
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(fab.a.address)
    try:
        for op in ({"op": "reply-to", "token": 7}, {"op": "reply-to"},
                   {"op": "reply-to", "token": "t" * 65}, {"op": "reply-to", "token": ""}):
            await sock.send_multipart(protocol.encode([op]))
            assert await sock.poll(5000), op
            [answer], _ = protocol.decode(await sock.recv_multipart())
            assert answer["op"] == "error", (op, answer)
        # a good one is taken silently
        await sock.send_multipart(protocol.encode([{"op": "reply-to", "token": "abc"}]))
        assert not await sock.poll(200)
    finally:
        sock.close(0)
    assert await fab.c.submit(inc, 1, pure=False) == 2


async def test_the_scheduler_refuses_a_bad_reply_option():
    async with cluster(nworkers=1, nthreads=1) as (s, _), \
            Client(s.address, asynchronous=True, config=ON, set_as_default=False) as c:
        with pytest.raises(RemoteProtocolError):
            protocol.check_task_options("k", {"reply": 5})
        with pytest.raises(RemoteProtocolError):
            protocol.check_task_options("k", {"reply": "t" * 65})
        protocol.check_task_options("k", {"reply": "t" * 64})
        assert await c.submit(inc, 1, pure=False) == 2


async def test_a_worker_that_dies_after_replying_directly_changes_nothing_for_the_next(fab):
    c = fab.c
    for i in range(10):
        assert await c.submit(inc, i, pure=False) == i + 1
    linked = list(c.core.direct.links)
    assert linked
    # When the worker the client is linked to leaves
    gone = fab.a if fab.a.address == linked[0] else fab.b
    await gone.close()
    # Then the next results come from the other one, through the scheduler first
    for i in range(10):
        assert await asyncio.wait_for(c.submit(inc, 100 + i, pure=False), 10) == 101 + i


async def test_a_second_connection_naming_a_clients_token_gets_none_of_its_results():
    async with cluster(nworkers=1, nthreads=1) as (s, [w]), \
            Client(s.address, asynchronous=True, config=ON, set_as_default=False) as c:
        direct = c.core.direct
        for i in range(5):
            assert await c.submit(inc, i, pure=False) == i + 1
        assert list(direct.links) == [w.address]
        # When another connection names the client's token
        sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(w.address)
        try:
            await sock.send_multipart(protocol.encode([{"op": "reply-to",
                                                        "token": direct.token}]))
            await asyncio.sleep(0.1)
            before = direct.received
            for i in range(10):
                assert await c.submit(inc, i, pure=False) == i + 1
            # Then the results still go to the client that named it first, and none to it
            assert direct.received - before >= 5
            assert not await sock.poll(200)
        finally:
            sock.close(0)
