"""Hostile and buggy peers (issue 15 §2): raw ZeroMQ peers on loopback against real
components. Each test names the defect it guards against; each failed before its fix."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import zmq
import zmq.asyncio

from zfabric import Client, protocol, shm
from zfabric.config import from_env
from zfabric.testing import FakePeer, cluster, until

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20


def inc(x):
    return x + 1


def raw_dealer(address: str, *, read: bool = True) -> zmq.asyncio.Socket:
    """A DEALER that, with ``read=False``, takes in as little as ZeroMQ lets it."""
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if not read:
        sock.setsockopt(zmq.RCVHWM, 1)
        sock.setsockopt(zmq.RCVBUF, 4096)
    sock.connect(address)
    return sock


async def ask(sock, *ops, buffers=()):
    await sock.send_multipart(protocol.encode(list(ops), buffers))
    assert await sock.poll(5000), f"no answer to {[o['op'] for o in ops]}"
    return protocol.decode(await sock.recv_multipart())


async def canary(c: Client) -> None:
    assert await asyncio.wait_for(c.submit(inc, 1, pure=False), 10) == 2


# ---------------------------------------------------------------------------- data port


async def test_worker_data_port_never_blocks_on_a_peer_that_does_not_read():
    # Given a worker whose data port queues few messages per peer, 1 MB of backlog at most
    cfg = from_env(HWM_MESSAGES=10, PEER_BACKLOG_BYTES=1_000_000)
    async with cluster(1, config=cfg) as (s, [w]), \
            Client(s.address, asynchronous=True, set_as_default=False) as c:
        blob = c.submit(bytes, 4000, key="blob")
        await blob
        sock = raw_dealer(w.address, read=False)
        try:
            # When a peer asks it for the value thousands of times and never reads
            for i in range(40):
                await sock.send_multipart(protocol.encode(
                    [{"op": "get-data", "id": i * 1000 + j, "keys": ["blob"]}
                     for j in range(200)]))
            await asyncio.sleep(0.5)
            # Then the worker keeps computing for everyone else and keeps its heartbeats
            for _ in range(3):
                await canary(c)
            ws = next(iter(s.state.workers.values()))
            await until(lambda: ws.last_seen > s.state.now - 1.0, 5, "worker heartbeats")
            # and keeps at most its byte budget for that peer
            assert sum(w._core.data_backlog_bytes.values()) <= cfg.PEER_BACKLOG_BYTES
        finally:
            sock.close(0)
        await canary(c)


# ---------------------------------------------------------------------------- shared memory

VICTIM = textwrap.dedent("""
    import json, os, sys
    from zfabric import shm
    path = sys.argv[1]
    f = open(path, "r+b")
    st = os.fstat(f.fileno())
    seg = shm.pool().lease(2 << 20)
    print(json.dumps({"file": [1, os.getpid(), f.fileno(), st.st_dev, st.st_ino, st.st_size],
                      "segment": seg}), flush=True)
    sys.stdin.readline()
    f.seek(0)
    seg_bytes = os.pread(seg[2], 16, 0)
    print(json.dumps({"file": f.read(16).hex(), "segment": seg_bytes.hex()}), flush=True)
""")


@pytest.mark.skipif(not shm.available(), reason="memfd segments are not available")
async def test_get_data_into_never_writes_another_process_memory_or_files(tmp_path):
    # Given a process that is not part of the cluster, with a file and a segment open
    target = tmp_path / "precious"
    target.write_bytes(b"\0" * (4 * MiB))
    victim = subprocess.Popen([sys.executable, "-c", VICTIM, str(target)], text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        descs = json.loads(await asyncio.to_thread(victim.stdout.readline))
        async with cluster(1) as (s, [w]), \
                Client(s.address, asynchronous=True, set_as_default=False) as c:
            big = c.submit(np.ones, MiB // 2, key="big")  # 4 MiB of buffers
            await big
            sock = raw_dealer(w.address)
            try:
                # When a peer asks for the value "into" the other process's descriptors
                for name in ("file", "segment"):
                    [op], frames = await ask(sock, {"op": "get-data", "id": 1, "keys": ["big"],
                                                    "into": {"big": descs[name]}})
                    # Then the value comes over the socket instead
                    assert op["op"] == "data" and op["items"][0][4] is None, op
                    assert sum(len(f) for f in frames) == 4 * MiB
            finally:
                sock.close(0)
            await canary(c)
        victim.stdin.write("\n")
        victim.stdin.flush()
        after = json.loads(await asyncio.to_thread(victim.stdout.readline))
        # and nothing of it was written there
        assert after == {"file": "00" * 16, "segment": "00" * 16}
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.skipif(not shm.available(), reason="memfd segments are not available")
async def test_a_lease_is_adopted_only_by_the_connection_it_was_leased_to():
    async with cluster(1) as (s, [w]):
        a, b = raw_dealer(w.address), raw_dealer(w.address)
        try:
            # Given a lease the worker granted to peer A
            [op], _ = await ask(a, {"op": "lease", "id": 1, "sizes": [2 * MiB]})
            [desc] = op["items"]
            assert desc is not None
            header = b"\x80\x05K\x01."  # pickle of 1
            item = ["stolen", header, 0, False, ["seg", desc[0], [16]]]
            # When peer B claims it in a put-data
            [op], _ = await ask(b, {"op": "put-data", "id": 2, "items": [item]})
            # Then B is refused and nothing is stored
            assert op["op"] == "error" and "lease" in op["message"], op
            assert "stolen" not in w.data
            # while A may still use it
            item[0] = "mine"
            [op], _ = await ask(a, {"op": "put-data", "id": 3, "items": [item]})
            assert op["op"] == "reply", op
            await until(lambda: "mine" in w.data, 5)
        finally:
            a.close(0)
            b.close(0)
