"""Waiting for a scheduler's welcome, and saying why it did not come when security is why.

A CURVE handshake that fails is silent at the socket: libzmq drops the connection and tries
again, and the hello never gets an answer. The socket's monitor does see it, though, so the
wait watches the monitor and turns a failed handshake into a :class:`SecurityError` that says
what to do, at once rather than after the connect timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from .security import SecurityError

#: The monitor events of a refused handshake.
FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
          zmq.EVENT_HANDSHAKE_FAILED_AUTH)


async def wait(welcome: asyncio.Future, sock: zmq.Socket, monitor: str, timeout: float,
               address: str, security) -> object:
    """The welcome's result; TimeoutError after ``timeout``; SecurityError on a failed
    handshake. ``sock`` was made with ``monitor`` as its monitor endpoint."""
    loop = asyncio.get_running_loop()
    pair: zmq.Socket = zmq.Context.instance().socket(zmq.PAIR)
    pair.setsockopt(zmq.LINGER, 0)
    pair.connect(monitor)
    deadline = loop.time() + timeout
    try:
        while not welcome.done():
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError
            await asyncio.wait({welcome}, timeout=min(0.05, left))
            event = _failure(pair)
            if event is not None and not welcome.done():
                raise SecurityError(explain(event, address, security))
        return welcome.result()
    finally:
        with contextlib.suppress(zmq.ZMQError):
            sock.disable_monitor()
        pair.close(0)


def _failure(pair: zmq.Socket) -> dict[str, Any] | None:
    while True:
        try:
            event = dict(recv_monitor_message(pair, zmq.NOBLOCK))
        except zmq.Again:
            return None
        if event["event"] in FAILED:
            return event


def explain(event: dict, address: str, security) -> str:
    """What a failed handshake means for the one who connected, and what to do."""
    kind = event["event"]
    if security is None:
        return (f"the scheduler at {address} requires security (CurveZMQ) and this client has"
                " no keys: pass security=Security(DIR) with the keys `zfabric keygen DIR`"
                " wrote (or set ZFABRIC_SECURITY=DIR)")
    if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (f"the scheduler at {address} refused this client's key: it is not among the"
                " keys the scheduler authorizes (or was revoked). Use the cluster's client"
                " key, or have its administrator copy your public key into"
                " DIR/authorized")
    if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return (f"the scheduler at {address} does not speak CurveZMQ: it runs without"
                " security. Connect without security=, or start it with --security DIR")
    return (f"the CurveZMQ handshake with the scheduler at {address} failed: the scheduler's"
            " public key in this Security does not match it (keys of another cluster?). Use"
            " the scheduler.key of the directory its keys came from")


def explain_data_port(event: dict, address: str) -> str:
    """What a failed handshake with a worker's data port means, and what to do."""
    if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (f"the worker's data port at {address} refused this process's key: it is not in"
                " that worker's authorized keys (DIR/authorized on its host), or it was"
                " revoked. Copy your public key into DIR/authorized on the worker hosts too")
    if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return (f"the worker's data port at {address} does not speak CurveZMQ: that worker runs"
                " without security while its scheduler has keys; start it with --security DIR")
    return (f"the CurveZMQ handshake with the worker's data port at {address} failed: its key is"
            " not the one the scheduler announced or worker.key (keys of another cluster?)")
