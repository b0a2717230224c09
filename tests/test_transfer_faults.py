"""Values that cross a socket as streams of pieces (zfabric/streams.py), under faults: a
worker killed while a peer or the client fetches from it, a value freed while its answer is
still on the wire, a stream cut off by its sender's connection ending, pieces that do not add
up. Each ends in the right result or a clear error, and the worker carries on.

The shared-memory path is off in every process here, so large values go over TCP (CurveZMQ
where keys are given).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys

import cloudpickle
import numpy as np
import pytest
import zmq
import zmq.asyncio

from zfabric import Client, Scheduler, Worker, _zmq, protocol, serialize, streams
from zfabric import config as zconfig
from zfabric.security import Security, keygen
from zfabric.testing import FakePeer, until
from zfabric.transfer import pack_values, unpack_values

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.timeout(60)

TCP_ENV = {"ZFABRIC_HEARTBEAT_INTERVAL_S": "0.2", "ZFABRIC_SAME_HOST_SHM": "0"}
#: A value that leaves in several pieces.
BIG = (streams.STREAM_MIN_BYTES + 3 * streams.PIECE_BYTES) // 8


def tcp(**overrides) -> zconfig.Config:
    return zconfig.from_env(HEARTBEAT_INTERVAL_S=0.2, SAME_HOST_SHM=False, **overrides)


def big(seed: int):
    return np.arange(BIG, dtype="f8") + seed


def negate_slowly(x, seconds: float = 0.0):
    import time

    time.sleep(seconds)
    return -x


@pytest.fixture
def keys(tmp_path):
    return keygen(tmp_path / "keys")


@pytest.fixture
def worker_process(keys):
    started: list[subprocess.Popen] = []

    def start(address: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-m", "zfabric", "worker", address, "--nthreads", "1",
             "--memory-limit", "0", "--log-level", "error", "--security", str(keys)],
            env={**os.environ, **TCP_ENV}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            start_new_session=True)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            if proc.poll() is None:
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)


async def holder(s: Scheduler, proc: subprocess.Popen):
    def find():
        return next((ws for ws in s.state.workers.values() if ws.pid == proc.pid), None)

    await until(lambda: find() is not None, 20, f"worker process {proc.pid} registered")
    return find()


async def test_a_worker_killed_while_a_peer_fetches_pieces_from_it(worker_process, keys):
    config, sec = tcp(WORKER_TTL_S=1.0), Security(keys)
    async with Scheduler(config=config, security=sec, dashboard=False) as s, \
            Client(s.address, asynchronous=True, config=config, set_as_default=False,
                   security=sec) as c, \
            Worker(s.address, nthreads=1, memory_limit=0, config=config, security=sec) as b:
        w = worker_process(s.address)
        ws = await holder(s, w)
        # Given a large value on a worker process
        x = c.submit(big, 1, workers=[ws.address], allow_other_workers=True)
        await asyncio.wait_for(x, 10)
        # When the process stops while the other worker's fetch of it is under way, then dies
        os.kill(w.pid, signal.SIGSTOP)
        y = c.submit(negate_slowly, x, workers=[b.address])
        await until(lambda: b._core.state.fetches.inflight, 10, "the fetch in flight")
        os.kill(w.pid, signal.SIGKILL)
        # Then the value is made again through its lineage and the dependent gets it whole
        np.testing.assert_array_equal(await asyncio.wait_for(y, 20), -big(1))


async def test_the_client_gets_the_right_value_when_its_holder_dies_mid_transfer(
        worker_process, keys):
    config, sec = tcp(WORKER_TTL_S=1.0), Security(keys)
    async with Scheduler(config=config, security=sec, dashboard=False) as s, \
            Client(s.address, asynchronous=True, config=config, set_as_default=False,
                   security=sec) as c, \
            Worker(s.address, nthreads=1, memory_limit=0, config=config, security=sec):
        w = worker_process(s.address)
        ws = await holder(s, w)
        x = c.submit(big, 2, workers=[ws.address], allow_other_workers=True)
        await asyncio.wait_for(x, 10)
        await until(lambda: x._state.who_has == [ws.address], 10, "x held")
        os.kill(w.pid, signal.SIGSTOP)
        got = asyncio.ensure_future(c.gather(x))
        await asyncio.sleep(0.3)  # the request waits on the stopped process
        os.kill(w.pid, signal.SIGKILL)
        # Either the fetch fails over to the recomputed value, or it says clearly why not
        try:
            value = await asyncio.wait_for(got, 30)
        except (ConnectionError, OSError, TimeoutError) as exc:
            assert str(exc)
            value = await asyncio.wait_for(c.gather(x), 20)
        np.testing.assert_array_equal(value, big(2))


async def test_a_value_freed_while_its_pieces_are_on_the_wire_arrives_whole(keys):
    config, sec = tcp(), Security(keys)
    async with Scheduler(config=config, security=sec, dashboard=False) as s, \
            Client(s.address, asynchronous=True, config=config, set_as_default=False,
                   security=sec) as c, \
            Worker(s.address, nthreads=1, memory_limit=0, config=config, security=sec) as a:
        x = c.submit(big, 3, pure=False)
        await asyncio.wait_for(x, 10)
        key = x.key
        sock = _zmq.dealer(zmq.asyncio.Context.instance(), a.address, security=sec,
                           role="client", server="worker")
        try:
            # Given an answer sent (as a stream) but not yet read
            await sock.send_multipart(protocol.encode([{"op": "get-data", "id": 1,
                                                        "keys": [key]}]))
            await asyncio.sleep(0.2)
            # When the value is freed on the worker meanwhile
            del x
            await until(lambda: key not in a.data, 10, "the value dropped")
            # Then the answer still holds all of it, joined again as its pieces come
            table = streams.Table()
            while True:
                ops, buffers = protocol.decode(
                    await asyncio.wait_for(sock.recv_multipart(copy=False), 10))
                if ops[0]["op"] == "piece":
                    table.piece(ops[0], buffers)
                elif ops[0]["op"] != "announce":
                    break
            [[k, _, n, _, where]] = ops[0]["items"]
            assert k == key and where[0] == "streams" and n == len(buffers) == 0
            [(_, h, bufs, _, _)] = list(unpack_values(ops[0]["items"], buffers, table=table))
            np.testing.assert_array_equal(serialize.loads_value(h, bufs), big(3))
            # and asked again, the worker says it no longer holds it
            await sock.send_multipart(protocol.encode([{"op": "get-data", "id": 2,
                                                        "keys": [key]}]))
            ops, _ = protocol.decode(await asyncio.wait_for(sock.recv_multipart(), 10))
            assert ops[0]["items"][0][1] is None
        finally:
            sock.close(0)


async def test_pieces_that_do_not_add_up_are_refused_and_the_worker_carries_on():
    config = tcp()
    async with Scheduler(config=config) as s, \
            Client(s.address, asynchronous=True, config=config, set_as_default=False) as c, \
            Worker(s.address, nthreads=1, memory_limit=0, config=config) as a:
        async with FakePeer(a.address, role="client") as peer:
            # A piece that does not follow the one before (a cut or forged stream)
            await peer.send({"op": "piece", "stream": 7, "off": 0, "total": 300},
                            buffers=[b"x" * 100])
            await peer.send({"op": "piece", "stream": 7, "off": 200, "total": 300},
                            buffers=[b"x" * 100])
            op = await peer.expect("error")
            assert "does not follow" in op["message"]
            # A put naming a stream that never came whole
            await peer.send({"op": "piece", "stream": 8, "off": 0, "total": 300},
                            buffers=[b"x" * 100])
            await peer.send({"op": "put-data", "id": 1, "items": [
                ["forged", b"h", 0, False, ["streams", [8]]]]})
            op = await peer.expect("error")
            assert "100 of 300 bytes came" in op["message"] and op["id"] == 1
        assert "forged" not in a.data
        f = c.submit(negate_slowly, big(4), workers=[a.address])
        np.testing.assert_array_equal(await asyncio.wait_for(f, 10), -big(4))


async def test_a_stream_cut_off_by_its_connection_is_dropped_and_the_value_sent_again_arrives():
    config = tcp()
    async with Scheduler(config=config) as s, \
            Client(s.address, asynchronous=True, config=config, set_as_default=False) as c, \
            Worker(s.address, nthreads=1, memory_limit=0, config=config) as a:
        value = big(5)
        items, frames, out = pack_values([("cut", *serialize.dumps_value(value), False)],
                                         stream=True)
        [(sid, view)] = out
        messages = streams.messages(sid, view)
        # Given a client that sent half of a value's pieces, then lost its connection
        async with FakePeer(a.address, role="client") as peer:
            for m in messages[:len(messages) // 2]:
                await peer.send_frames(m)
            port = a._core.port
            await until(lambda: any(len(t) for t in port.tables.values()), 10, "a stream open")
        # When a new connection sends the whole value
        async with FakePeer(a.address, role="client") as peer:
            for m in messages:
                await peer.send_frames(m)
            await peer.send({"op": "put-data", "id": 1, "items": items}, buffers=frames)
            assert (await peer.expect("reply", timeout=10))["id"] == 1
        # Then the worker holds it whole, and the cut stream goes once it stops coming
        np.testing.assert_array_equal(a.data["cut"], value)
        tables = [t for t in port.tables.values() if len(t)]
        assert len(tables) == 1
        tables[0].expire(asyncio.get_running_loop().time() + streams.IDLE_S + 1)
        assert not len(tables[0])
        f = c.submit(negate_slowly, big(6), workers=[a.address])
        np.testing.assert_array_equal(await asyncio.wait_for(f, 10), -big(6))


def two_big(seed: int):
    return {"a": big(seed), "b": np.ones(BIG) * seed}


async def test_values_of_several_streamed_buffers_cross_whole_every_way():
    config = tcp()
    async with Scheduler(config=config) as s, \
            Client(s.address, asynchronous=True, config=config, set_as_default=False) as c, \
            Worker(s.address, nthreads=1, memory_limit=0, config=config) as a, \
            Worker(s.address, nthreads=1, memory_limit=0, config=config) as b:
        # Given a value of two large buffers made on one worker, and one put by the client
        x = c.submit(two_big, 7, workers=[a.address], pure=False)
        [y] = await c.scatter([two_big(8)], workers=[b.address])
        # When the other worker fetches each, and the client gets them back
        both = c.submit(lambda p, q: {k: p[k] + q[k] for k in p}, x, y, workers=[b.address])
        got, gx, gy = await asyncio.wait_for(c.gather([both, x, y]), 20)
        # Then every buffer arrived whole, each where it belongs
        for k in "ab":
            np.testing.assert_array_equal(got[k], two_big(7)[k] + two_big(8)[k])
            np.testing.assert_array_equal(gx[k], two_big(7)[k])
            np.testing.assert_array_equal(gy[k], two_big(8)[k])
        assert not any(len(t) for t in a._core.port.tables.values())
