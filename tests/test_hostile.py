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
