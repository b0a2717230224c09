"""The ZeroMQ behaviours that bite (DESIGN.md §6a), each met with real sockets.

- ROUTER_MANDATORY: a send to a peer that has gone raises instead of vanishing; the scheduler
  survives it and drops the peer at once.
- IMMEDIATE=0: a DEALER queues what it sends while its scheduler is down and delivers it to
  the next process bound at that address; that scheduler refuses it as stale (``reregister``).
- Routing ids: a process that reuses a connected id is ignored, so each incarnation gets a
  fresh one, and a restarted worker with a fresh id is accepted at once.
- LINGER: closing with unsent messages never hangs.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import zmq
import zmq.asyncio

from zfabric import Client, Scheduler, Worker, _zmq, protocol
from zfabric import config as zconfig
from zfabric.errors import CommTimeoutError
from zfabric.testing import FakePeer, until

pytestmark = pytest.mark.timeout(60)


def events(s: Scheduler) -> list[str]:
    return [text for _, text in list(s.state.events)]


def worker_hello(address: str = "tcp://127.0.0.1:9") -> dict:
    return dict(address=address, nthreads=1, pid=1, name="fake")


def inc(x):
    return x + 1


# ---------------------------------------------------------------------------- ROUTER_MANDATORY


CLIENT_SCRIPT = textwrap.dedent("""
    import asyncio, sys, time
    from zfabric import Client

    async def main():
        c = await Client(sys.argv[1], asynchronous=True)
        f = c.submit(time.sleep, 0.5, key="orphan")
        print("submitted", flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
""")


async def test_send_to_a_client_that_is_gone_drops_it_at_once():
    # CLIENT_TTL_S is left at its default (30 s): only the failed send can notice the loss
    async with Scheduler() as s, Worker(s.address, nthreads=1, memory_limit=0):
        proc = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, s.address],
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
        try:
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20)
            assert line.strip() == "submitted"
            await until(lambda: "orphan" in s.state.tasks, 5, "the orphan task submitted")
            assert len(s.state.clients) == 3  # the client, and the fire-and-forget and held holders
            # When the client process dies while its task runs
            proc.kill()
            proc.wait(5)
            # Then the result cannot be sent to it: the scheduler drops the client and its
            # task at once, instead of after CLIENT_TTL_S
            took = await until(lambda: "orphan" not in s.state.tasks, 5, "the orphan released")
            assert took < 3.0
            assert len(s.state.clients) == 2  # the two pseudo clients
            # And carries on serving
            async with Client(s.address, asynchronous=True, set_as_default=False) as c:
                assert await asyncio.wait_for(c.submit(inc, 1), 5) == 2
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


async def test_send_to_a_worker_that_is_gone_drops_it_and_moves_its_task():
    async with Scheduler() as s, Client(s.address, asynchronous=True,
                                        set_as_default=False) as c:
        # Given a worker that registered, then lost its connection without a word
        async with FakePeer(s.address, role="worker") as ghost:
            assert (await ghost.hello(**worker_hello()))["op"] == "welcome"
        await asyncio.sleep(0.3)  # the ROUTER notices the closed connection
        assert len(s.state.workers) == 1
        # When the scheduler sends it a task, the send fails and the worker is dropped
        f = c.submit(inc, 1)
        took = await until(lambda: not s.state.workers, 3, "the gone worker dropped")
        assert took < 2.0  # well before WORKER_TTL_S
        assert any("connection" in e for e in events(s)), events(s)
        # And the task, which never started, runs on the next worker without suspicion
        async with Worker(s.address, nthreads=1, memory_limit=0):
            assert await asyncio.wait_for(f, 5) == 2
        assert s.state.tasks[f.key].suspicious == 0


# ---------------------------------------------------------------------------- IMMEDIATE=0 replay


async def test_messages_queued_while_the_scheduler_was_down_are_refused_by_the_next_one():
    s1 = await Scheduler()
    port = int(s1.address.rsplit(":", 1)[1])
    s2 = None
    try:
        async with FakePeer(s1.address, role="worker") as worker, \
                FakePeer(s1.address) as client:
            first = await worker.hello(**worker_hello())
            assert (await client.hello())["op"] == "welcome"
            # When the scheduler goes, its goodbye tells both to register again
            await s1.close()
            await worker.expect("reregister")
            await client.expect("reregister")
            # Let the DEALERs see the connection close first: a message sent in the instant
            # before is taken by the dying connection and lost (ZeroMQ's own behaviour).
            await asyncio.sleep(0.5)
            # While no scheduler listens, the DEALERs queue what they send (IMMEDIATE=0)
            await worker.send({"op": "finished", "tasks": [["stale", 3, b"old", 0.1]]})
            await client.send({"op": "submit", "tasks": [["stale-submit", b"old", [], None]]})
            # When a new scheduler binds the same address, the queued ops reach it
            s2 = await Scheduler("127.0.0.1", port)
            # Then it knows neither peer: it refuses their ops and asks them to register
            refused = await worker.expect("reregister", timeout=10)
            assert "unknown peer" in refused["reason"]
            assert "unknown peer" in (await client.expect("reregister", timeout=10))["reason"]
            assert not s2.state.tasks and not s2.state.workers
            assert len(s2.state.clients) == 2  # only the fire-and-forget and held holders
            # And once they say hello they are welcome, in the new scheduler's epoch
            again = await worker.hello(**worker_hello())
            assert again["op"] == "welcome" and again["epoch"] != first["epoch"]
            assert (await client.hello())["op"] == "welcome"
            assert len(s2.state.workers) == 1 and len(s2.state.clients) == 3
    finally:
        await s1.close()
        if s2 is not None:
            await s2.close()


async def test_workers_and_clients_come_back_to_a_scheduler_restarted_at_the_same_address():
    config = zconfig.from_env(HEARTBEAT_INTERVAL_S=0.1)
    s = await Scheduler(config=config)
    port = int(s.address.rsplit(":", 1)[1])
    w = await Worker(s.address, nthreads=1, memory_limit=0, config=config)
    c = await Client(s.address, asynchronous=True, config=config, set_as_default=False)
    try:
        assert await asyncio.wait_for(c.submit(inc, 1), 5) == 2
        worker_id = w.id
        await s.close()
        await asyncio.sleep(0.5)  # heartbeats pile up in the DEALERs meanwhile
        s = await Scheduler("127.0.0.1", port, config=config)
        # The stale heartbeats are refused, the hellos accepted: same worker, same client
        await until(lambda: len(s.state.workers) == 1 and c.epoch == s.id, 10, "both back")
        assert [ws.id for ws in s.state.workers.values()] == [worker_id]
        assert await asyncio.wait_for(c.submit(inc, 2, pure=False), 5) == 3
    finally:
        await c.close()
        await w.close()
        await s.close()


# ---------------------------------------------------------------------------- routing ids


async def test_restarted_worker_with_a_fresh_routing_id_is_accepted():
    async with Scheduler() as s:
        old = FakePeer(s.address, role="worker", identity=b"worker-old-incarnation")
        try:
            assert (await old.hello(**worker_hello()))["op"] == "welcome"
            # A process reusing a routing id that is still connected is ignored by the ROUTER
            # (no ROUTER_HANDOVER): its hello gets no answer at all
            async with FakePeer(s.address, role="worker",
                                identity=b"worker-old-incarnation") as twin:
                with pytest.raises(CommTimeoutError):
                    await twin.hello(**worker_hello())
            # So every incarnation gets a fresh id, and one with a fresh id is accepted at
            # once, replacing the old record at the same data address
            assert _zmq.new_identity("worker") != _zmq.new_identity("worker")
            async with FakePeer(s.address, role="worker",
                                identity=_zmq.new_identity("worker")) as new:
                assert (await new.hello(**worker_hello()))["op"] == "welcome"
                assert list(s.state.workers) == [new.identity]
                assert "replaced" in (await old.expect("reregister"))["reason"]
        finally:
            old.close()


async def test_each_worker_incarnation_has_its_own_routing_id():
    async with Scheduler() as s:
        w1 = await Worker(s.address, nthreads=1, memory_limit=0)
        first = w1.id
        await w1.close()
        async with Worker(s.address, nthreads=1, memory_limit=0) as w2:
            assert w2.id != first
            await until(lambda: list(s.state.workers) == [w2.id.encode()], 5)


# ---------------------------------------------------------------------------- LINGER


def test_every_socket_sets_linger_and_keeps_router_mandatory():
    ctx = zmq.Context.instance()
    router, address = _zmq.router(ctx, "127.0.0.1")
    dealer = _zmq.dealer(ctx, address, _zmq.new_identity("test"))
    try:
        assert router.getsockopt(zmq.LINGER) == zconfig.DEFAULT.LINGER_MS
        assert dealer.getsockopt(zmq.LINGER) == zconfig.DEFAULT.LINGER_MS
        # ROUTER_MANDATORY is write-only; check its effect: a send to an unknown id raises
        with pytest.raises(zmq.ZMQError) as info:
            router.send_multipart([b"nobody", b"x"], zmq.NOBLOCK)
        assert info.value.errno == zmq.EHOSTUNREACH
    finally:
        router.close()
        dealer.close()


LINGER_SCRIPT = textwrap.dedent("""
    import asyncio, time
    import zmq, zmq.asyncio
    from zfabric import Client, Scheduler, Worker

    async def main():
        s = await Scheduler()
        w = await Worker(s.address, nthreads=1, memory_limit=0)
        c = await Client(s.address, asynchronous=True)
        await s.close()
        # a few thousand messages with nobody to take them, queued in the DEALERs
        futures = [c.submit(time.sleep, i, pure=False) for i in range(3000)]
        await asyncio.sleep(0.3)
        await c.close()
        await w.close()

    asyncio.run(main())
    # Terminating a context waits for every socket's unsent messages, for LINGER at most
    zmq.asyncio.Context.instance().term()
    zmq.Context.instance().term()
    print("clean exit", flush=True)
""")


def test_closing_with_unsent_messages_never_hangs():
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", LINGER_SCRIPT], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "clean exit" in proc.stdout
    assert time.monotonic() - start < 20


async def test_a_peer_that_does_not_read_is_dropped_before_the_scheduler_grows():
    # Given a scheduler that queues few messages per peer and keeps at most 2 MB for one
    cfg = zconfig.from_env(HWM_MESSAGES=10, PEER_BACKLOG_BYTES=2_000_000)
    async with Scheduler(config=cfg) as s:
        sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 1)
        sock.setsockopt(zmq.RCVBUF, 4096)
        sock.setsockopt(zmq.ROUTING_ID, b"slow-client")
        sock.connect(s.address)
        try:
            await sock.send_multipart(protocol.encode([protocol.hello("client", "slow")]))
            assert await sock.poll(5000)
            ops, _ = protocol.decode(await sock.recv_multipart())
            assert ops[0]["op"] == "welcome"
            # When a client asks for much more than that and never reads the answers (one
            # message per scheduler turn: each turn's replies leave as one message)
            for batch in range(300):
                await sock.send_multipart(protocol.encode([
                    {"op": "request", "id": batch * 1000 + i, "kind": "info", "args": {}}
                    for i in range(1000)]))
                await asyncio.sleep(0.005)
                if b"slow-client" not in s.state.clients:
                    break
            # Then the scheduler drops it, says why, and keeps nothing for it
            await until(lambda: b"slow-client" not in s.state.clients, 20, "slow client dropped")
            assert any("did not read its messages" in e for e in events(s)), events(s)[-3:]
            assert s.backlog_bytes == 0
            # and carries on serving everyone else
            async with Client(s.address, asynchronous=True, set_as_default=False) as c:
                info = await asyncio.wait_for(c.scheduler_info(), 5)
                assert "workers" in info
        finally:
            sock.close(0)
