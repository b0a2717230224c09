"""A ZeroMQ socket driven by the asyncio loop's own selector, for the latency-bound links.

``zmq.asyncio`` wraps every ``recv`` and ``send`` in a future and re-arms the socket's events
through several loop turns; on the client's link to the scheduler that costs more than the
round trip itself. :class:`Link` keeps a plain non-blocking socket, registers its file
descriptor with ``loop.add_reader`` and, when it fires, reads every waiting message at once.
Sends go out at once; a send the socket refuses (high-water mark) waits in ``backlog``, in
order, and leaves as soon as the socket takes messages again. Nothing is dropped.

ZeroMQ's descriptor is edge-triggered and reflects the socket's ``EVENTS``, not the kernel's
buffers: messages that arrive while we send do not make it fire again. So after every send,
and after every read, ``EVENTS`` is checked and a read scheduled if one is due.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable

import zmq

from .protocol import announcement

logger = logging.getLogger(__name__)

#: Messages read per loop turn before the loop gets to run other callbacks.
READ_BATCH = 1000
# Plain ints: pyzmq's flags are enums, and enum arithmetic costs microseconds per message.
_EVENTS, _POLLIN, _POLLOUT = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.POLLOUT)


class Link:
    """One socket, read and written on the loop thread only."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: zmq.Socket,
                 on_message: Callable[[list], None]):
        self.loop = loop
        self.sock = sock
        self.on_message = on_message
        self.backlog: deque[list] = deque()
        self._fd: int = sock.getsockopt(zmq.FD)  # type: ignore[assignment]
        self._scheduled = False
        self.closed = False
        loop.add_reader(self._fd, self._ready)

    def send(self, frames: list) -> None:
        """Send one message now, or after those that wait (never blocks, never drops)."""
        if self.closed:
            raise zmq.ZMQError(zmq.ENOTSOCK, "the link is closed")
        notice = announcement(frames)
        if notice is not None:  # a large message is announced (zfabric/intake.py)
            self._send(notice)
        self._send(frames)
        self._check()

    def _send(self, frames: list) -> None:
        if not self.backlog:
            try:
                self.sock.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                self.backlog.append(frames)
        else:
            self.backlog.append(frames)

    def _check(self) -> None:
        if self._scheduled or self.closed:
            return
        events: int = self.sock.getsockopt(_EVENTS)  # type: ignore[assignment]
        if events & _POLLIN or (self.backlog and events & _POLLOUT):
            self._scheduled = True
            self.loop.call_soon(self._ready)

    def _ready(self) -> None:
        self._scheduled = False
        if self.closed:
            return
        sock = self.sock
        for _ in range(READ_BATCH):
            events: int = sock.getsockopt(_EVENTS)  # type: ignore[assignment]
            if self.backlog and events & _POLLOUT and self._drain_backlog():
                continue  # ask again: the sends may have taken in what the descriptor signalled
            if not events & _POLLIN:
                return
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self.on_message(frames)
            except Exception:
                logger.exception("could not handle a message")
            if self.closed:
                return
        self._check()  # more than a batch waits: come back after other callbacks ran

    def _drain_backlog(self) -> bool:
        """Send what waits, in order, until the socket refuses; whether anything left."""
        sent = False
        while self.backlog:
            try:
                self.sock.send_multipart(self.backlog[0], zmq.NOBLOCK)
            except zmq.Again:
                break
            self.backlog.popleft()
            sent = True
        return sent

    def poke(self) -> None:
        """Look at the socket again (a periodic safety net for the edge-triggered descriptor)."""
        if not self.closed:
            self._ready()

    def close(self, linger: int) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self._fd)
        self.sock.close(linger=linger)
