"""The bulk channel (zfabric/bulk.py): with security on, large buffers sealed with AES-GCM on
a plain connection to the worker's bulk port, their keys inside CurveZMQ.

The pieces a receiver takes (a forged, replayed, misplaced or foreign piece is dropped and
counted), the echo and a worker's fetch from a peer over it with real processes, hostile
plain sockets on the bulk port, and the ways a bulk transfer fails over to CurveZMQ: a
session the worker forgot, pieces that never open (tampered), the switch off. The shared-
memory path is off in every process here, so large values go over TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys

import cloudpickle
import msgpack
import numpy as np
import psutil
import pytest
import zmq
import zmq.asyncio

from zfabric import Client, Scheduler, Worker, bulk, streams
from zfabric import config as zconfig
from zfabric.security import Security, keygen
from zfabric.testing import until

pytest.importorskip("cryptography")
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.timeout(60)

#: A value that leaves in several pieces.
BIG = (streams.STREAM_MIN_BYTES + 3 * streams.PIECE_BYTES) // 8
_pack = msgpack.Packer(use_bin_type=True).pack


def tcp(**overrides) -> zconfig.Config:
    return zconfig.from_env(HEARTBEAT_INTERVAL_S=0.2, SAME_HOST_SHM=False, **overrides)


def big(seed: int):
    return np.arange(BIG, dtype="f8") + seed


def negate(x):
    return -x


@pytest.fixture
def keys(tmp_path):
    return keygen(tmp_path / "keys")


# ---------------------------------------------------------------- the pieces taken


def sealed(secrets, value, sid=7):
    """A requester's pieces of ``value`` and the worker's end that takes them."""
    sender = bulk.Session(secrets, requester=True, idle_s=1.0)
    taker = bulk.Session(secrets, requester=False, idle_s=1.0)
    pieces = []
    for (head, body), _ in sender.sealer.messages(sid, memoryview(value), bulk.Ring(2)):
        [op] = msgpack.unpackb(head)
        pieces.append((op, bytes(body)))
    return pieces, taker.inbound


def test_sealed_pieces_open_into_place_and_the_stream_is_whole():
    value = np.arange(BIG, dtype="f8")
    pieces, inbound = sealed(bulk.new_secrets(), value)
    assert len(pieces) > 4
    done = [inbound.piece(op, [body]) for op, body in pieces]
    assert done[:-1] == [None] * (len(pieces) - 1) and done[-1] == 7
    assert inbound.dropped == 0
    assert bytes(inbound.take(7)) == value.tobytes()


def test_forged_replayed_misplaced_and_foreign_pieces_are_dropped_and_counted():
    value = np.arange(BIG, dtype="f8")
    secrets = bulk.new_secrets()
    pieces, inbound = sealed(secrets, value)
    (op0, body0), (op1, body1) = pieces[0], pieces[1]
    # a first piece that does not open allocates nothing
    forged = bytearray(body0)
    forged[100] ^= 1
    assert inbound.piece(op0, [bytes(forged)]) is None
    assert not inbound.streams and inbound.dropped == 1
    # one sealed with another key, or naming another token, or out of place
    other, _ = sealed(bulk.new_secrets(), value)
    assert inbound.piece(op0, [other[0][1]]) is None
    assert inbound.piece({**op0, "t": os.urandom(16)}, [body0]) is None
    assert inbound.piece(op1, [body1]) is None  # before the first
    assert inbound.dropped == 4 and not inbound.streams
    # ids and sizes out of any range (never raised, only counted)
    for bad in ({"stream": -1}, {"stream": 2**64}, {"total": 2**64}, {"total": -5},
                {"t": [1]}, {"off": -streams.PIECE_BYTES}):
        assert inbound.piece({**op0, **bad}, [body0]) is None
    assert inbound.dropped == 10 and not inbound.streams
    # the real first piece; then it again (a replay), a piece cut short, one bound to
    # another offset or total (its associated data), and a forged second piece
    assert inbound.piece(op0, [body0]) is None and inbound.dropped == 10
    assert inbound.piece(op0, [body0]) is None
    assert inbound.piece(op1, [body1[:-1]]) is None
    assert inbound.piece({**op1, "total": op1["total"] + 1}, [body1]) is None
    forged = bytearray(body1)
    forged[-1] ^= 1
    assert inbound.piece(op1, [bytes(forged)]) is None
    assert inbound.dropped == 14
    # the rest, whole and right in spite of it all
    for op, body in pieces[1:]:
        inbound.piece(op, [body])
    assert inbound.dropped == 14
    assert bytes(inbound.take(7)) == value.tobytes()


def test_ops_wait_for_their_streams_and_fail_after_the_idle_limit():
    value = np.arange(BIG, dtype="f8")
    pieces, inbound = sealed(bulk.new_secrets(), value)
    waiting = bulk.Waiting(idle_s=1.0)
    op = {"op": "data", "id": 1, "items": [["k", b"h", 0, False, ["streams", [7]]]]}
    assert bulk.stream_ids([op]) == {7}
    waiting.hold({7}, "first", now=0.0)
    waiting.hold({8}, "never", now=0.0)
    for p, body in pieces[:-1]:
        inbound.piece(p, [body], now=0.5)
    assert waiting.ready(inbound) == []
    # pieces of its stream keep an op waiting; one whose stream never starts fails
    assert waiting.expired(inbound, now=1.2) == ["never"]
    inbound.piece(*[pieces[-1][0], [pieces[-1][1]]], now=1.2)
    assert waiting.ready(inbound) == ["first"] and not waiting


def test_without_cryptography_or_security_there_is_no_bulk_channel(monkeypatch):
    on = zconfig.from_env()
    assert bulk.enabled(on, Security.temporary())
    assert not bulk.enabled(on, None)
    assert not bulk.enabled(zconfig.from_env(BULK_CHANNEL=False), Security.temporary())
    monkeypatch.setattr(bulk, "_AESGCM", False)  # as where the package is not installed
    assert not bulk.enabled(on, Security.temporary())


# ---------------------------------------------------------------- real processes


def data_pool(c: Client):
    return c.data


async def test_echo_and_a_peer_fetch_go_sealed_on_the_bulk_channel(keys):
    config, sec = tcp(), Security(keys)
    async with Scheduler(config=config, security=sec, dashboard=False) as s, \
            Client(s.address, asynchronous=True, config=config, set_as_default=False,
                   security=sec) as c, \
            Worker(s.address, nthreads=1, memory_limit=0, config=config, security=sec) as a, \
            Worker(s.address, nthreads=1, memory_limit=0, config=config, security=sec) as b:
        # The client's value goes to a worker and comes back whole (in more pieces than a
        # sender's ring has buffers: each is reused only once sent)
        value = np.arange((bulk.RING_BUFFERS + 4) * streams.PIECE_BYTES // 8, dtype="f8")
        got = await asyncio.wait_for(c.submit(negate, value, workers=[a.address]), 20)
        np.testing.assert_array_equal(got, -value)
        del got, value
        # over the bulk channel both ways
        conn = data_pool(c).conns[a.address]
        assert conn.link is not None and conn.link.ready
        port = a._core.port
        assert port.bulk is not None and len(port.sessions) == 1
        [session] = port.sessions.values()
        assert session.ready and session.inbound.dropped == 0 and conn.link.inbound.dropped == 0
        assert session.inbound.whole_streams == 1 and conn.link.inbound.whole_streams == 1
        # A worker fetches a large value from its peer over the bulk channel too (once its
        # first fetch from that peer opened the session)
        for seed in (2, 3):
            x = c.submit(big, seed, workers=[a.address])
            y = c.submit(negate, x, workers=[b.address])
            np.testing.assert_array_equal(await asyncio.wait_for(y, 20), -big(seed))
            del x, y
        link = b._core.port.links[a.address]
        assert link is not None and link.ready and link.inbound.dropped == 0
        assert link.inbound.whole_streams == 1
        assert port.bulk_dropped == 0
        # and from a worker process, both to the client and to a peer
        proc = subprocess.Popen(
            [sys.executable, "-m", "zfabric", "worker", s.address, "--nthreads", "1",
             "--memory-limit", "0", "--log-level", "error", "--security", str(keys)],
            env={**os.environ, "ZFABRIC_SAME_HOST_SHM": "0"}, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL)
        try:
            await until(lambda: len(s.state.workers) == 3, 20, "the worker process joined")
            [w] = [ws.address for ws in s.state.workers.values() if ws.pid == proc.pid]
            for seed in (4, 5):
                v = c.submit(big, seed, workers=[w])
                np.testing.assert_array_equal(await asyncio.wait_for(v, 20), big(seed))
                u = c.submit(negate, v, workers=[b.address])
                np.testing.assert_array_equal(await asyncio.wait_for(u, 20), -big(seed))
                del u, v
            assert data_pool(c).conns[w].link.inbound.whole_streams == 2
            assert b._core.port.links[w].inbound.whole_streams == 1
        finally:
            proc.kill()
            proc.wait(10)


async def test_hostile_plain_sockets_on_the_bulk_port_are_dropped_and_never_answered(keys):
    config, sec = tcp(), Security(keys)
    async with Scheduler(config=config, security=sec, dashboard=False) as s, \
            Client(s.address, asynchronous=True, config=config, set_as_default=False,
                   security=sec) as c, \
            Worker(s.address, nthreads=1, memory_limit=0, config=config, security=sec) as a:
        np.testing.assert_array_equal(
            await asyncio.wait_for(c.submit(negate, big(3), workers=[a.address]), 20), -big(3))
        port = a._core.port
        [session] = port.sessions.values()
        endpoint = port.bulk.getsockopt_string(zmq.LAST_ENDPOINT)
        # Given a stranger on the bulk port: garbage, a piece and a hello for a token nobody
        # was given, and, knowing the live session's token (it crosses this port in the
        # clear), a hello, a piece starting a stream and a replay of it from its own connection
        stranger = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        stranger.setsockopt(zmq.LINGER, 0)
        stranger.connect(endpoint)
        try:
            head = {"op": "piece", "stream": 1, "off": 0, "total": 3 * streams.PIECE_BYTES}
            body = os.urandom(streams.PIECE_BYTES + bulk.TAG_BYTES)
            for message in ([b"garbage"], [b"\x91\xc0", b""],
                            [_pack([{**head, "t": [1, 2]}]), body],
                            [_pack([{**head, "t": session.token, "stream": -1}]), body],
                            [_pack([{**head, "t": os.urandom(16)}]), body],
                            bulk.hello(os.urandom(16)), bulk.hello(session.token),
                            [_pack([{**head, "t": session.token}]), body],
                            [_pack([{**head, "t": session.token}]), body]):
                await stranger.send_multipart(message)
            # Then each is dropped and counted, nothing is answered and nothing allocated
            await until(lambda: port.bulk_dropped >= 9, 10, "the stranger's messages dropped")
            assert not await stranger.poll(300)
            assert not session.inbound.streams
        finally:
            stranger.close(0)
        # and the worker and the session carry on
        np.testing.assert_array_equal(
            await asyncio.wait_for(c.submit(negate, big(4), workers=[a.address]), 20), -big(4))
        assert session.ready and session.inbound.dropped == 0


async def test_a_bulk_transfer_that_fails_is_sent_again_over_curve(keys):
    config, sec = tcp(BULK_IDLE_S=1.0), Security(keys)
    async with Scheduler(config=config, security=sec, dashboard=False) as s, \
            Client(s.address, asynchronous=True, config=config, set_as_default=False,
                   security=sec) as c, \
            Worker(s.address, nthreads=1, memory_limit=0, config=config, security=sec) as a, \
            Worker(s.address, nthreads=1, memory_limit=0, config=config, security=sec) as b:
        x = c.submit(big, 5, workers=[a.address])
        np.testing.assert_array_equal(await asyncio.wait_for(x, 20), big(5))
        port = a._core.port
        [session] = port.sessions.values()
        # Given the worker's pieces to the client tampered with on the way (sealed with a key
        # the client does not have): its answer waits, fails after BULK_IDLE_S, and is asked
        # for again over CurveZMQ
        session.sealer = bulk.Sealer(os.urandom(bulk.KEY_BYTES), session.token)
        np.testing.assert_array_equal(await asyncio.wait_for(c.gather(x), 20), big(5))
        conn = data_pool(c).conns[a.address]
        assert conn.link is None  # from now on over CurveZMQ
        # Given a worker that forgot the client's session: the client's value is sent again
        # over CurveZMQ (its pieces on the bulk port are dropped)
        c2 = await Client(s.address, asynchronous=True, config=config, set_as_default=False,
                          security=sec)
        try:
            np.testing.assert_array_equal(
                await asyncio.wait_for(c2.submit(negate, big(6), workers=[b.address]), 20),
                -big(6))
            b._core.port.sessions.clear()
            b._core.port.session_of.clear()
            np.testing.assert_array_equal(
                await asyncio.wait_for(c2.submit(negate, big(7), workers=[b.address]), 20),
                -big(7))
            assert b._core.port.bulk_dropped > 0
        finally:
            await c2.close()
        # Given a peer's pieces to a fetching worker tampered with: the fetch fails after
        # BULK_IDLE_S and is made again over CurveZMQ
        y = c.submit(big, 8, workers=[b.address])
        await asyncio.wait_for(y, 20)
        z = c.submit(big, 9, workers=[b.address])
        await asyncio.wait_for(z, 20)
        # (the first fetch opens the session: over CurveZMQ)
        np.testing.assert_array_equal(
            await asyncio.wait_for(c.submit(negate, y, workers=[a.address]), 20), -big(8))
        links = a._core.port.links
        await until(lambda: links.get(b.address) is not None and links[b.address].ready, 10,
                    "the fetch session ready")
        [fetched] = [s_ for s_ in b._core.port.sessions.values()
                     if s_.route == links[b.address].route]
        fetched.sealer = bulk.Sealer(os.urandom(bulk.KEY_BYTES), fetched.token)
        np.testing.assert_array_equal(
            await asyncio.wait_for(c.submit(negate, z, workers=[a.address]), 20), -big(9))
        assert a._core.port.links[b.address] is None


def cut_connections(port: int) -> int:
    """Shut down this process's accepted TCP connections on local ``port``."""
    cut = 0
    for conn in psutil.Process().net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.raddr and conn.fd >= 0:
            with contextlib.suppress(OSError):
                sock = socket.socket(fileno=os.dup(conn.fd))
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                    cut += 1
                finally:
                    sock.close()
    return cut


async def test_bulk_connections_cut_mid_transfer_end_in_the_right_values(keys):
    config, sec = tcp(BULK_IDLE_S=1.0), Security(keys)
    async with Scheduler(config=config, security=sec, dashboard=False) as s, \
            Client(s.address, asynchronous=True, config=config, set_as_default=False,
                   security=sec) as c, \
            Worker(s.address, nthreads=1, memory_limit=0, config=config, security=sec) as a:
        np.testing.assert_array_equal(
            await asyncio.wait_for(c.submit(negate, big(11), workers=[a.address]), 20),
            -big(11))
        bulk_port = int(a._core.port.bulk.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        # Given the bulk connection cut while values go to the worker and come back
        for seed, delay in ((12, 0.0), (13, 0.005), (14, 0.02)):
            f = c.submit(negate, big(seed), workers=[a.address], pure=False)
            await asyncio.sleep(delay)
            assert cut_connections(bulk_port) >= 1 or delay  # (none left once it fell back)
            # Then each arrives whole (on the bulk channel again, or over CurveZMQ)
            np.testing.assert_array_equal(await asyncio.wait_for(f, 20), -big(seed))
            del f
        # and the worker carries on
        np.testing.assert_array_equal(
            await asyncio.wait_for(c.submit(negate, big(15), workers=[a.address]), 20),
            -big(15))


async def test_with_the_switch_off_large_values_go_over_curve_alone(keys):
    config, sec = tcp(BULK_CHANNEL=False), Security(keys)
    async with Scheduler(config=config, security=sec, dashboard=False) as s, \
            Client(s.address, asynchronous=True, config=config, set_as_default=False,
                   security=sec) as c, \
            Worker(s.address, nthreads=1, memory_limit=0, config=config, security=sec) as a:
        np.testing.assert_array_equal(
            await asyncio.wait_for(c.submit(negate, big(10), workers=[a.address]), 20),
            -big(10))
        assert a._core.port.bulk is None and not a._core.port.sessions
        assert data_pool(c).conns[a.address].link is None
