"""The same-host shared-memory path: the segment pool, writes from another process, fallbacks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import zmq

from zfabric import protocol, shm, streams
from zfabric.testing import gen_cluster, until
from zfabric.transfer import SHM_THRESHOLD_BYTES, pack_values, unpack_values

pytestmark = pytest.mark.skipif(not shm.available(), reason="memfd segments are not available")

MiB = 1 << 20


def test_lease_write_adopt_round_trip():
    pool = shm.Pool()
    data = np.arange(3 * MiB // 8, dtype="f8")
    desc = pool.lease(data.nbytes + 100)
    assert desc is not None and desc[1] == os.getpid() and desc[5] >= data.nbytes + 100
    assert shm.write(desc, [memoryview(b"x" * 100), data])
    head, body = pool.adopt(desc[0], [100, data.nbytes])
    assert bytes(head) == b"x" * 100
    np.testing.assert_array_equal(np.frombuffer(body, dtype="f8"), data)
    assert pool.stats()["leased"] == 0


def test_segment_returns_to_the_pool_when_its_value_is_gone_and_is_reused():
    pool = shm.Pool()
    desc = pool.lease(2 * MiB)
    assert shm.write(desc, [b"a" * (2 * MiB)])
    (view,) = pool.adopt(desc[0], [2 * MiB])
    arr = np.frombuffer(view, dtype="u1")
    del view
    assert pool.stats()["free"] == 0  # the array still uses it
    del arr
    assert pool.stats() == {"free": 1, "free_bytes": 2 * MiB, "leased": 0, "kept_fds": 1}
    again = pool.lease(2 * MiB - 10)
    assert again[2:5] == desc[2:5]  # the same segment (fd, device, inode), pages already there
    assert pool.lease(16 * MiB)[4] != desc[4]  # far too small to reuse: a new one


def test_cancelled_and_expired_leases_are_never_reused():
    pool = shm.Pool(lease_timeout_s=5)
    a = pool.lease(MiB, now=100.0)
    b = pool.lease(MiB, now=100.0)
    pool.cancel(a[0])
    pool.expire(now=104.0)
    assert pool.stats()["leased"] == 1
    pool.expire(now=105.0)
    assert pool.stats() == {"free": 0, "free_bytes": 0, "leased": 0, "kept_fds": 0}
    for lease in (a[0], b[0]):
        with pytest.raises(ValueError, match="unknown or expired"):
            pool.adopt(lease, [10])
    # a sender still holding the descriptor writes into an orphan, or finds nothing
    assert not shm.write(a, [b"late"])


def test_outstanding_leases_are_bounded(monkeypatch):
    monkeypatch.setattr(shm, "MAX_LEASES", 3)
    pool = shm.Pool()
    leases = [pool.lease(MiB) for _ in range(4)]
    assert leases[3] is None and all(leases[:3])
    pool.cancel(leases[0][0])
    assert pool.lease(MiB) is not None


def test_sizes_that_do_not_fit_the_lease_are_refused():
    pool = shm.Pool()
    desc = pool.lease(MiB)
    with pytest.raises(ValueError, match="do not fit"):
        pool.adopt(desc[0], [desc[5] + 1])
    assert not shm.write(pool.lease(MiB), [b"x" * (desc[5] + 1)])


def test_free_segments_idle_too_long_are_closed():
    pool = shm.Pool()
    desc = pool.lease(MiB, now=10.0)
    (view,) = pool.adopt(desc[0], [MiB])
    del view
    pool.expire(now=11.0, idle_s=30)
    assert pool.stats()["free"] == 1
    pool.expire(now=50.0, idle_s=30)
    assert pool.stats()["free"] == 0 and pool.stats()["kept_fds"] == 0


def test_write_refuses_a_descriptor_that_names_another_file():
    pool = shm.Pool()
    desc = pool.lease(MiB)
    assert not shm.write([desc[0], desc[1], desc[2], desc[3], desc[4] + 1, desc[5]], [b"x"])
    assert not shm.write([desc[0], 999_999_999, 3, 0, 0, MiB], [b"x"])  # no such process
    assert not shm.write(["junk"], [b"x"])


def test_another_process_writes_into_a_lease():
    # Given a lease in this process
    pool = shm.Pool()
    desc = pool.lease(4 * MiB)
    # When another process writes into it by its descriptor
    code = textwrap.dedent(f"""
        import numpy as np
        from zfabric import shm
        assert shm.write({desc!r}, [np.arange({4 * MiB // 8}, dtype="f8")])
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    # Then this process sees the data in its mapping
    (view,) = pool.adopt(desc[0], [4 * MiB])
    np.testing.assert_array_equal(np.frombuffer(view, dtype="f8"), np.arange(4 * MiB // 8))


def test_pack_and_unpack_values_through_a_lease():
    big = np.arange(2 * MiB // 8, dtype="f8")
    small = b"s" * 10
    values = [("big", b"h1", [memoryview(big)], False), ("small", b"h2", [small], True)]
    # Asked: the large value is announced by its sizes, the small one comes in a frame
    items, frames, out = pack_values(values, ask=True)
    assert items[0][4] == ["sizes", [big.nbytes]] and items[1][4] is None and out == []
    got = list(unpack_values(items, frames))
    assert got[0] == ("big", b"h1", None, False, [big.nbytes])
    assert [bytes(b) for b in got[1][2]] == [small] and got[1][3] is True
    # Given a segment, it is written there and adopted on unpacking
    into = {"big": shm.pool().lease(big.nbytes)}
    items, frames, _ = pack_values(values, into=into)
    assert items[0][4][0] == "seg" and frames == [small]
    ((_, _, bufs, _, _), _) = list(unpack_values(items, frames))
    np.testing.assert_array_equal(np.frombuffer(bufs[0], dtype="f8"), big)


def test_large_buffers_leave_as_streams_joined_on_a_pooled_segment():


    big = np.arange((streams.STREAM_MIN_BYTES + streams.PIECE_BYTES // 2) // 8, dtype="f8")
    edge = np.ones(streams.STREAM_MIN_BYTES // 8)  # not more than the threshold: one frame
    values = [("a", b"h1", [b"tiny", memoryview(big)], False), ("b", b"h2", [edge], True)]
    # Not asked to stream: every buffer leaves whole
    items, frames, out = pack_values(values)
    assert [i[2:] for i in items] == [[2, False, None], [1, True, None]] and len(frames) == 3
    assert out == []
    # Streamed: the large buffer leaves first, as pieces that are views of itself
    items, frames, out = pack_values(values, stream=True)
    [(sid, view)] = out
    assert items[0][2:] == [1, False, ["streams", [0, sid]]]
    assert items[1][2:] == [1, True, None] and len(frames) == 2
    messages = streams.messages(sid, view)
    pieces = -(-big.nbytes // streams.PIECE_BYTES)
    assert len(messages) == 1 + pieces
    assert protocol.decode(messages[0])[0] == [{"op": "announce", "frames": 2, "messages": pieces,
                                                "bytes": streams.PIECE_BYTES + 128}]
    assert all(np.shares_memory(np.frombuffer(m[1], dtype="u1"), big) for m in messages[1:])
    # and the receiver joins the pieces as they come, into a segment of its pool
    table = streams.Table()
    for m in messages[1:]:
        ops, bufs = protocol.decode(m)
        table.piece(ops[0], bufs)
    got = list(unpack_values(items, frames, table=table))
    assert len(table) == 0
    assert bytes(got[0][2][0]) == b"tiny" and got[1][2] == [edge]
    result = np.frombuffer(got[0][2][1], dtype="f8")
    np.testing.assert_array_equal(result, big)
    assert shm.in_segment(result, shm.SCRATCH_NAME) and not shm.in_segment(result)
    scratch = shm.pool().scratch
    free = scratch.stats()["free"]
    del got, result
    assert scratch.stats()["free"] == free + 1


def test_streams_that_do_not_add_up_are_refused():

    from zfabric.errors import RemoteProtocolError

    def piece(sid, off, total, data=b"x" * 10):
        table.piece({"op": "piece", "stream": sid, "off": off, "total": total}, [data])

    table = streams.Table(frame_limit=1000, max_streams=2)
    with pytest.raises(RemoteProtocolError, match="did not start"):
        piece(1, 10, 20)
    with pytest.raises(RemoteProtocolError, match="more than this port takes"):
        piece(1, 0, 1001)
    piece(1, 0, 20)
    with pytest.raises(RemoteProtocolError, match="does not follow"):
        piece(1, 15, 20)  # a gap
    assert len(table) == 0  # the stream is dropped
    piece(2, 0, 15)
    with pytest.raises(RemoteProtocolError, match="before the last one ended"):
        piece(3, 0, 15)
    for ids in ([5], [0, 0]):  # an unknown stream, more frames named than came
        with pytest.raises(RemoteProtocolError, match=r"unknown|name more frames"):
            list(unpack_values([["k", b"h", 1, False, ["streams", ids]]], [b"x"], table=table))
    piece(4, 0, 15)
    with pytest.raises(RemoteProtocolError, match="10 of 15 bytes came"):
        list(unpack_values([["k", b"h", 0, False, ["streams", [4]]]], [], table=table))
    # a stream that stops coming is dropped after a while
    piece(6, 0, 15, b"x" * 5)
    table.expire(time.monotonic() + streams.IDLE_S + 1)
    assert len(table) == 0


def test_unpack_refuses_an_unknown_lease():
    from zfabric.errors import RemoteProtocolError

    with pytest.raises(RemoteProtocolError, match="unknown or expired"):
        list(unpack_values([["k", b"h", 0, False, ["seg", 10**9, [5]]]], []))
    with pytest.raises(RemoteProtocolError, match="unknown location"):
        list(unpack_values([["k", b"h", 0, False, ["elsewhere"]]], []))


@gen_cluster(nworkers=1)
async def test_worker_falls_back_to_frames_when_the_segment_cannot_be_opened(c, s, a):
    # Given a large value on a worker
    f = c.submit(np.arange, 2 * MiB // 8, dtype="f8", workers=[a.address])
    await f
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(a.address)
        # When a peer names a segment the worker cannot open
        bogus = [1, 999_999_999, 3, 1, 1, 4 * MiB]
        sock.send_multipart(protocol.encode(
            [{"op": "get-data", "id": 1, "keys": [f.key], "into": {f.key: bogus}}]))
        assert sock.poll(10_000)
        ops, frames = protocol.decode(sock.recv_multipart())
        # Then the value comes over the socket instead
        item = ops[0]["items"][0]
        assert item[4] is None and item[2] == 1
        assert len(frames[0]) >= SHM_THRESHOLD_BYTES * 2
        # and a lease asked for by a peer is granted within the limits
        sock.send_multipart(protocol.encode(
            [{"op": "lease", "id": 2, "sizes": [MiB, -1, "x", 1 << 62]}]))
        assert sock.poll(10_000)
        ops, _ = protocol.decode(sock.recv_multipart())
        descs = ops[0]["items"]
        assert descs[0][1] == os.getpid() and descs[1:] == [None, None, None]
        shm.pool().cancel(descs[0][0])
    finally:
        sock.close()
        ctx.term()


@gen_cluster()
async def test_large_values_move_through_shared_memory_on_one_host(c, s, a, b):
    # Given a client and workers in one process, all with the shared-memory path on
    assert not shm.in_segment(np.zeros(4))
    data = np.arange(4 * MiB // 8, dtype="f8")
    # When a large argument goes to a task, a dependency moves between workers,
    x = c.submit(lambda v: (shm.in_segment(v), v + 1), data, workers=[a.address], pure=False)
    y = c.submit(lambda t: (shm.in_segment(t[1]), t[1] * 2), x, workers=[b.address], pure=False)
    (arg_in_seg, _), (dep_in_seg, out) = await c.gather([x, y])
    # Then each landed in a segment of its receiver, and the result reached the client in one
    assert arg_in_seg and dep_in_seg and shm.in_segment(out)
    np.testing.assert_array_equal(out, (data + 1) * 2)
    del x, y, out
    await until(lambda: shm.pool().stats()["leased"] == 0)


@gen_cluster()
async def test_chunks_of_a_group_seen_before_take_one_request_each(c, s, a, b):
    # Given large values of one group on worker a
    chunks = [c.submit(np.full, 3 * MiB // 8, float(i), key=f"chunk-{i}", workers=[a.address])
              for i in range(3)]
    await c.gather(chunks)
    stats = b._core.state.fetch_stats
    # When b fetches the first: its sizes, then the value written into a segment
    first = c.submit(np.sum, chunks[0], workers=[b.address])
    assert await first == 0.0 and stats["requests"] == 2
    # Then the next ones of the group come at once, into segments named in the first request
    rest = c.submit(lambda p, q: (shm.in_segment(p), float(p.sum() + q.sum())),
                    chunks[1], chunks[2], workers=[b.address])
    in_seg, total = await rest
    assert in_seg and total == 3.0 * (3 * MiB // 8) and stats["requests"] == 3
    await until(lambda: shm.pool().stats()["leased"] == 0)


@gen_cluster(nworkers=1)
async def test_a_put_into_an_expired_lease_is_refused_and_the_worker_carries_on(c, s, a):
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(a.address)

        def ask(op):
            sock.send_multipart(protocol.encode([op]))
            assert sock.poll(10_000)
            return protocol.decode(sock.recv_multipart())[0][0]

        # Given a lease a peer got from the worker, written, but confirmed only after it ran out
        (desc,) = ask({"op": "lease", "id": 1, "sizes": [2 * MiB]})["items"]
        data = np.arange(2 * MiB // 8, dtype="f8")
        assert shm.write(desc, [data])
        shm.pool().expire(now=10**9)  # far in the future: every outstanding lease runs out
        # When the peer confirms the put
        reply = ask({"op": "put-data", "id": 2,
                     "items": [["late", b"h", 0, False, ["seg", desc[0], [data.nbytes]]]]})
        # Then the worker refuses it, saying why, and stores nothing
        assert reply["op"] == "error" and "unknown or expired" in reply["message"]
        assert "late" not in a.data
    finally:
        sock.close()
        ctx.term()
    # and goes on working, large values included
    f = c.submit(np.arange, 2 * MiB // 8, dtype="f8", workers=[a.address])
    np.testing.assert_array_equal(await f, np.arange(2 * MiB // 8, dtype="f8"))
