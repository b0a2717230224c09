"""Unfinished multipart messages are bounded per connection (zfabric/intake.py, issue 15).

libzmq keeps every frame of a message until its last one arrives; these tests send such
messages with a raw ZMTP peer (tests/zmtp.py), since libzmq itself never would.
"""

from __future__ import annotations

import asyncio
import random
import time

import msgpack
import pytest
import zmq
from zmtp import RawPeer, frame

from zfabric import Client, intake, protocol
from zfabric.intake import HANDSHAKE_BYTES, Intake, Ledger
from zfabric.testing import cluster

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20


def inc(x):
    return x + 1


async def canary(c: Client) -> None:
    assert await asyncio.wait_for(c.submit(inc, 1, pure=False), 10) == 2


# ----------------------------------------------------------------------------- the ledger


@pytest.mark.parametrize("curve", [False, True], ids=["plain", "curve"])
def test_the_ledger_accounts_for_every_byte_the_kernel_received(curve):
    # Given a ROUTER with an intake guard and a DEALER, with or without CURVE
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    if curve:
        server_public, server_secret = zmq.curve_keypair()
        public, secret = zmq.curve_keypair()
        router.curve_server, router.curve_publickey = True, server_public
        router.curve_secretkey = server_secret
        dealer.curve_publickey, dealer.curve_secretkey = public, secret
        dealer.curve_serverkey = server_public
    dealer.setsockopt(zmq.ROUTING_ID, b"d" * 40)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    guard = Intake(router, curve=curve, slack=MiB, frame_limit=-1, max_frames=100,
                   name="test")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    try:
        # When it sends messages of every frame size around ZMTP's and CURVE's boundaries
        rng = random.Random(7)
        sizes = [0, 1, 30, 200, 222, 223, 254, 255, 256, 300, 5000, 70000]
        for _ in range(1500):
            dealer.send_multipart([b"a" * rng.choice(sizes) for _ in range(rng.randint(1, 4))])
            parts = router.recv_multipart(copy=False)
            conn = guard.received(parts[1].get(zmq.SRCFD), parts[0].bytes, parts[1:])
        time.sleep(0.1)
        assert guard.check() == []
        # Then what the kernel received is what the complete messages took, framing
        # included, plus the handshake: nothing is counted as unfinished
        fd = next(iter(guard.ledger.conns))
        received, unread = intake._tcp_counts(fd)
        held = received - unread - conn.complete
        assert 0 < held < HANDSHAKE_BYTES, held
        assert conn.peer == b"d" * 40 and conn.peer_address.startswith("127.0.0.1:")
    finally:
        guard.close()
        ctx.destroy(0)


def test_an_announcement_allows_one_message_within_the_ports_limits():
    ledger = Ledger(curve=False, slack=MiB, frame_limit=10 * MiB, max_frames=100)
    conn = ledger.received(5, b"p", [b"x"])
    base = conn.complete + HANDSHAKE_BYTES
    assert ledger.ahead(conn, base + MiB, 0) == 0  # the slack
    assert ledger.ahead(conn, base + MiB + 1, 0) == 1
    assert ledger.ahead(conn, base + MiB + 100, 100) == 0  # unread in the kernel: not held
    assert ledger.announce(conn, 8 * MiB, 1) is None
    assert ledger.ahead(conn, base + 9 * MiB, 0) < 0
    # the message it announced arrives: the allowance is spent
    ledger.received(5, b"p", [b"y" * 8 * MiB])
    assert conn.announced == 0
    # an announcement the port could not take, or malformed, allows nothing
    assert "more than the port takes" in ledger.announce(conn, 30 * MiB, 2)
    assert "bad announcement" in ledger.announce(conn, 10, 0)
    assert "bad announcement" in ledger.announce(conn, -1, 1)
    assert "bad announcement" in ledger.announce(conn, 10, 101)
    assert conn.announced == 0


def test_a_descriptor_reused_before_its_events_are_read_keeps_what_its_new_connection_sent():
    ledger = Ledger(curve=False, slack=MiB, frame_limit=10 * MiB, max_frames=100)
    old = ledger.accepted(7, ino=100, peer_address="127.0.0.1:1")
    ledger.received(7, b"old", [b"x" * 1000])
    # Given a connection that closed and a new one accepted on its descriptor, whose first
    # messages (an announcement of 4 pieces, then 3 of them) came before the monitor's events
    new = ledger.received(7, b"new", [b"announce"])
    ledger.announce(new, MiB, 1, messages=4)
    for _ in range(3):
        ledger.received(7, b"new", [b"y" * MiB])
    # When the events are read (DISCONNECTED, then ACCEPTED on the same number)
    ledger.closed(7, in_events=True)
    assert ledger.accepted(7, ino=200, peer_address="127.0.0.1:2") is new
    # Then the new connection keeps what it completed and its announcement: its fourth piece,
    # in flight, is allowed
    assert new is not old and new.complete > 3 * MiB
    assert ledger.ahead(new, new.complete + HANDSHAKE_BYTES + 2 * MiB, 0) <= 0
    # and it is forgotten when it closes in turn
    ledger.closed(7, in_events=True)
    assert 7 not in ledger.conns


def test_large_messages_are_announced_and_small_ones_are_not():
    assert protocol.announcement([b"x" * protocol.ANNOUNCE_ABOVE]) is None
    notice = protocol.announcement([b"h", memoryview(b"y" * protocol.ANNOUNCE_ABOVE)])
    ops, _ = protocol.decode(notice)
    assert ops == [{"op": "announce", "bytes": protocol.ANNOUNCE_ABOVE + 1, "frames": 2}]


# --------------------------------------------------------------------- against real ports

def _endless(nbytes: int) -> bytes:
    """Empty frames that all say "more": libzmq keeps ~64 bytes of memory per 2 sent."""
    return frame(b"", more=True) * (nbytes // 2)


def _announce(nbytes: int, nframes: int = 1) -> bytes:
    return msgpack.packb([{"op": "announce", "bytes": nbytes, "frames": nframes}])


def _padded_heartbeat(nbytes: int) -> bytes:
    return msgpack.packb([{"op": "heartbeat", "pad": b"p" * nbytes}])


@pytest.mark.parametrize("port", ["scheduler", "worker"])
async def test_an_unfinished_message_gets_its_connection_shut_down(port):
    # Given a cluster serving a client
    async with cluster(1) as (s, [w]), \
            Client(s.address, asynchronous=True, set_as_default=False) as c:
        address = s.address if port == "scheduler" else w.address
        raw = await asyncio.to_thread(RawPeer, address)
        try:
            # When a peer sends one message of 32 MiB of empty frames, never finished
            # (that would be 1 GiB in libzmq: 64 bytes per frame)
            open_after = await asyncio.to_thread(raw.trickle, _endless(32 * MiB),
                                                 256 * 1024, 0.005)
            # Then its connection is shut down soon after INCOMPLETE_MESSAGE_BYTES (1 MiB)
            assert not open_after
            assert raw.sent < 12 * MiB, raw.sent
            if port == "scheduler":
                assert any("shut down" in text and "INCOMPLETE_MESSAGE_BYTES" in text
                           for _, text in s.state.events)
            # and everyone else is served as before
            await canary(c)
            [x] = await c.scatter([b"v" * 100_000], workers=[w.address])
            assert len(await c.submit(bytes.upper, x)) == 100_000
        finally:
            raw.close()


async def test_an_announced_message_may_arrive_slowly_and_an_unannounced_one_may_not():
    async with cluster(1) as (s, _), \
            Client(s.address, asynchronous=True, set_as_default=False) as c:
        body = _padded_heartbeat(6 * MiB)
        message = frame(body)

        async def slowly(*preamble: bytes) -> bool:
            # 6 MiB in 256 KiB pieces 25 ms apart: about 0.6 s, a dozen checks
            raw = await asyncio.to_thread(RawPeer, s.address)
            try:
                for m in preamble:
                    raw.message(m)
                return await asyncio.to_thread(raw.trickle, message, 256 * 1024, 0.025)
            finally:
                raw.close()

        # Given a peer that announces a 6 MiB message and sends it slowly: it stays connected
        assert await slowly(_announce(len(body)))
        # one that sends the same without announcing it is shut down
        assert not await slowly()
        # and so is one that announces less than it sends
        assert not await slowly(_announce(MiB))
        await canary(c)


# ------------------------------------------------------------------- across a slow link

SLOW_CLIENT = r'''
import sys
import numpy as np
from zfabric import Client

address = sys.argv[1]
big = b"x" * (6 << 20)
with Client(address, timeout=20) as client:
    # 6 MiB inline in a submit (scheduler's port), 6 MiB of array as an argument and 6 MiB
    # scattered (a worker's data port); at 40 Mbit/s each takes over a second to arrive
    assert client.submit(len, big, pure=False).result(timeout=60) == len(big)
    array = np.ones(6 << 17)
    assert client.submit(np.sum, array).result(timeout=60) == array.size
    [x] = client.scatter([big])
    assert client.submit(len, x).result(timeout=60) == len(big)
    print("OK", flush=True)
'''


@pytest.fixture
def slow_lan():
    import netns

    with netns.lan_for_test(2) as lan:
        yield lan


@pytest.mark.timeout(120)
def test_large_messages_over_a_slow_link_are_announced_not_cut_off(slow_lan, tmp_path):
    import subprocess
    import sys

    from netns import NetnsError, ip

    lan = slow_lan
    # Given a scheduler and a worker on host a, and host b's link slowed to 40 Mbit/s
    try:
        ip("netns", "exec", lan.hosts[1], "tc", "qdisc", "add", "dev", lan.IFACE, "root",
           "tbf", "rate", "40mbit", "burst", "32kb", "latency", "2s")
    except (NetnsError, OSError) as exc:
        pytest.skip(f"cannot shape a namespace's link here (tc tbf): {exc}")
    address = f"tcp://{lan.ips[0]}:8786"
    zfabric = [sys.executable, "-m", "zfabric"]
    logs = {}
    for name, args in (("scheduler", ["scheduler", "--host", lan.ips[0], "--port", "8786",
                                      "--no-dashboard"]),
                       ("worker", ["worker", address, "--nthreads", "1", "--memory-limit", "0",
                                   "--death-timeout", "60"])):
        logs[name] = tmp_path / f"{name}.log"
        with open(logs[name], "w") as out:
            lan.popen(0, [*zfabric, *args], stdout=out, stderr=subprocess.STDOUT)
    # When a client on host b sends large messages to both ports
    script = tmp_path / "client.py"
    script.write_text(SLOW_CLIENT)
    client = lan.popen(1, [sys.executable, str(script), address], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
    out, err = client.communicate(timeout=100)
    text = "".join(f"\n--- {n}\n{p.read_text()[-3000:]}" for n, p in logs.items())
    # Then they all arrive: announced, none is taken for an unfinished message
    assert client.returncode == 0 and "OK" in out, err + text
    assert "shutting down the connection" not in text, text


def test_a_review_looks_only_at_connections_that_sent_bytes_since_the_last():
    # Given a ROUTER with an intake guard and 40 connected DEALERs that said something once
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    guard = Intake(router, curve=False, slack=MiB, frame_limit=-1, max_frames=100,
                   name="test")
    dealers = [ctx.socket(zmq.DEALER) for _ in range(40)]
    try:
        for d in dealers:
            d.connect(f"tcp://127.0.0.1:{port}")
            d.send(b"hello")
        for _ in dealers:
            parts = router.recv_multipart(copy=False)
            guard.received(parts[1].get(zmq.SRCFD), parts[0].bytes, parts[1:])
        time.sleep(0.1)
        assert guard.check() == []
        assert len(guard.ledger.conns) == 40
        # When they stay quiet, a review looks at none of them
        before = guard.looked_at
        time.sleep(0.05)
        assert guard.check() == [] and guard.looked_at == before
        # and when two of them send, it looks at those two only
        dealers[3].send(b"x" * 1000)
        dealers[7].send(b"y" * 1000)
        for _ in range(2):
            parts = router.recv_multipart(copy=False)
            guard.received(parts[1].get(zmq.SRCFD), parts[0].bytes, parts[1:])
        time.sleep(0.05)
        assert guard.check() == [] and guard.looked_at == before + 2
    finally:
        guard.close()
        ctx.destroy(0)
