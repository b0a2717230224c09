"""How far each connection of a server socket has run ahead of its complete messages.

libzmq hands a multipart message to the application only once its last frame has arrived,
and keeps every frame until then: high-water marks count whole messages, and an empty frame
costs about 64 bytes of memory for 2 on the wire. So a peer that sends frames that all say
"more" grows the process without bound, and the application never sees a byte of it.

What the application can see is the kernel's count of bytes received on each TCP connection
(``TCP_INFO``) and, per complete message, the connection it came on (``zmq.SRCFD``). Their
difference, less what waits unread in the kernel and the ZMTP framing of each frame (computed
exactly, with or without CURVE), is what libzmq holds for an unfinished message. A connection
may run ahead by :data:`~zfabric.config.Config.INCOMPLETE_MESSAGE_BYTES` on its own, and by the
size of the next message when it announced it: a sender puts an ``announce`` op, in a message
of its own, before any message larger than :data:`zfabric.protocol.ANNOUNCE_ABOVE` (see
:func:`zfabric.protocol.announcement`). An announcement can name no more than the port takes
in one message; one ``announce`` with ``messages`` covers that many messages, each of the
size named (the pieces of a stream, zfabric/streams.py). A connection further ahead than that
is shut down (``shutdown(2)`` on its descriptor, which libzmq then closes, freeing what it
held).

The check counts only when the socket has nothing to read: then no complete message waits in
libzmq's queues, so everything counted ahead is unfinished (an owner too busy to drain its
socket checks nothing until it catches up). It looks only at the connections bytes arrived on
since they were last looked at: each accepted descriptor is also in an edge-triggered epoll
set of the intake's own (see :data:`_EDGES`), which names them, so a review costs
O(connections that sent something), not O(connections). :class:`Ledger` is the bookkeeping
(pure, given the kernel's counts); :class:`Intake` is the shell around one ROUTER: its socket
monitor (``ACCEPTED``/``DISCONNECTED`` give each connection's descriptor) and the syscalls.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import socket
import struct
import termios
from dataclasses import dataclass, field
from typing import cast

import zmq
from zmq.utils.monitor import recv_monitor_message

logger = logging.getLogger(__name__)

#: Bytes of a connection's handshake (ZMTP greeting and READY, or CURVE's HELLO and
#: INITIATE with its metadata), which no message accounts for.
HANDSHAKE_BYTES = 4096
#: Most framing bytes one frame can cost on the wire (a CURVE MESSAGE command with a long
#: size): what an announced frame is allowed beyond its payload.
FRAME_OVERHEAD_MAX = 9 + 33
#: Offset of ``tcpi_bytes_received`` in Linux's ``struct tcp_info`` (Linux 4.1 and later).
_BYTES_RECEIVED = 128
_SIOCINQ = termios.FIONREAD


#: What the intake's epoll set asks of each descriptor. Edge-triggered: an arrival of bytes
#: wakes it once. EPOLLOUT as well as EPOLLIN, because epoll reports an edge only if the
#: descriptor is still ready when it is read, and libzmq has read the bytes by then; a
#: connection is (nearly) always writable, so the edge is kept. (Room freed in a full send
#: buffer wakes it too: a connection looked at for nothing, now and then.)
_EDGES = select.EPOLLIN | select.EPOLLOUT | select.EPOLLET


def wire_bytes(frames, curve: bool) -> int:
    """Bytes the data frames of one message took on the wire, framing included (exact)."""
    total = 0
    for f in frames:
        n = len(f)
        if curve:  # each frame is a MESSAGE command: name, nonce, MAC and flags around it
            n += 33
        total += n + (2 if n <= 255 else 9)
    return total


@dataclass(slots=True)
class Connection:
    """One accepted TCP connection, as the ledger knows it."""
    ino: int = 0  # the socket's inode: a descriptor number is reused, an inode is not
    peer_address: str = ""
    complete: int = 0  # wire bytes of the complete messages received on it
    announced: int = 0  # wire bytes the next message may take, as announced
    announced_for: int = 0  # messages the announcement holds for (a stream's pieces)
    peer: bytes | None = None  # routing id its messages came with
    #: it took over the descriptor of a connection whose DISCONNECTED is still to be read
    replaced: bool = False
    #: it was found too far ahead once: the next check that finds it so shuts it down
    suspect: bool = False


@dataclass
class Ledger:
    """Per-connection counts, and the rule for what is too far ahead (no I/O)."""

    curve: bool
    slack: int  # INCOMPLETE_MESSAGE_BYTES
    frame_limit: int  # MAXMSGSIZE of the port (-1: none)
    max_frames: int
    conns: dict[int, Connection] = field(default_factory=dict)

    def accepted(self, fd: int, ino: int, peer_address: str) -> Connection:
        conn = self.conns.get(fd)
        if conn is None or (conn.ino and conn.ino != ino):
            conn = self.conns[fd] = Connection()
        conn.ino, conn.peer_address = ino, peer_address
        return conn

    def closed(self, fd: int, in_events: bool = False) -> None:
        """Connection ``fd`` closed (``in_events``: its DISCONNECTED event was read)."""
        conn = self.conns.get(fd)
        if in_events and conn is not None and conn.replaced:
            conn.replaced = False  # the event of the connection it replaced (see received)
            return
        self.conns.pop(fd, None)

    def received(self, fd: int, peer: bytes, frames) -> Connection:
        """A complete message (its data frames) came on ``fd`` from ``peer``."""
        conn = self.conns.get(fd)
        if conn is None:
            if fd < 0:  # no descriptor (not TCP): nothing to check it against
                return Connection(peer=peer)
            conn = self.conns[fd] = Connection()  # its ACCEPTED event is not read yet
        elif conn.peer is not None and peer != conn.peer:
            # A descriptor is reused at once: a connection closed and another was accepted
            # on its number, whose messages come before the monitor's events say so (two
            # connections never share a routing id). The old one's DISCONNECTED, read later,
            # must not drop the counts of the new one.
            conn = self.conns[fd] = Connection(replaced=True)
        conn.complete += wire_bytes(frames, self.curve)
        conn.peer = peer
        if conn.announced_for > 1:
            conn.announced_for -= 1
        else:
            conn.announced = conn.announced_for = 0
        return conn

    def announce(self, conn: Connection, nbytes: int, nframes: int,
                 messages: int = 1) -> str | None:
        """Each of the next ``messages`` messages on ``conn`` takes up to ``nbytes`` in
        ``nframes`` frames (a stream's pieces: zfabric/streams.py); an error (and nothing
        allowed) when that is more than the port takes in one message."""
        if type(nbytes) is not int or type(nframes) is not int or nbytes < 0 \
                or not 0 < nframes <= self.max_frames or type(messages) is not int \
                or messages < 1:
            return (f"bad announcement ({nbytes!r} bytes in {nframes!r} frames,"
                    f" {messages!r} messages)")
        if self.frame_limit >= 0 and nbytes > nframes * self.frame_limit:
            return (f"announced {nbytes:,} bytes in {nframes} frames, more than the port takes"
                    f" ({self.frame_limit:,} bytes per frame)")
        conn.announced = nbytes + nframes * FRAME_OVERHEAD_MAX
        conn.announced_for = messages
        return None

    def ahead(self, conn: Connection, kernel_bytes: int, unread: int) -> int:
        """Bytes ``conn`` is beyond what it may be: positive means shut it down."""
        held = kernel_bytes - unread - conn.complete
        return held - HANDSHAKE_BYTES - self.slack - conn.announced


def _tcp_counts(fd: int) -> tuple[int, int] | None:
    """The kernel's bytes received on ``fd`` and bytes waiting unread; None if ``fd`` is not
    a TCP socket (any more)."""
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fileno=fd)
    except OSError:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        if len(info) < _BYTES_RECEIVED + 8:
            return None
        received = struct.unpack_from("Q", info, _BYTES_RECEIVED)[0]
        unread = struct.unpack("i", fcntl.ioctl(fd, _SIOCINQ, b"\0\0\0\0"))[0]
        return received, unread
    except OSError:
        return None
    finally:
        sock.detach()  # libzmq owns the descriptor


def _identity(fd: int) -> tuple[int, str]:
    try:
        ino = os.fstat(fd).st_ino
        sock = socket.socket(fileno=fd)  # its own family: getpeername needs it
    except OSError:
        return 0, ""
    try:
        host, port = sock.getpeername()[:2]
        return ino, f"{host}:{port}"
    except OSError:
        return ino, ""
    finally:
        sock.detach()


class Intake:
    """The guard of one ROUTER (used on its owner's thread only).

    Call :meth:`received` with every complete message's descriptor (``SRCFD`` of a data
    frame), :meth:`announced` with each ``announce`` op, and :meth:`check` now and then; it
    shuts down the connections too far ahead and returns them.
    """

    def __init__(self, sock: zmq.Socket, *, curve: bool, slack: int, frame_limit: int,
                 max_frames: int, name: str):
        self.sock = sock
        self.name = name
        self.ledger = Ledger(curve, slack, frame_limit, max_frames)
        self.shut_down = 0  # connections shut down, for tests and the logs
        self.doomed: dict[bytes, float] = {}  # peer -> when to end its connection
        # Connections that received bytes since they were last checked: the epoll set's
        # edges name them (see the module docstring), and a check that had to skip one
        # keeps it here.
        self._epoll = select.epoll()
        self._active: set[int] = set()
        self.looked_at = 0  # connections checked (with syscalls) so far, for tests
        endpoint = f"inproc://zfabric-intake-{id(self):x}-{os.getpid()}"
        sock.monitor(endpoint, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self.events = sock.context.socket(zmq.PAIR)
        self.events.setsockopt(zmq.LINGER, 0)
        self.events.connect(endpoint)

    def received(self, fd: int, peer: bytes, frames) -> Connection:
        if fd >= 0 and fd not in self.ledger.conns:
            self._watch(fd)  # its ACCEPTED event is not read yet
        return self.ledger.received(fd, peer, frames)

    def _watch(self, fd: int) -> None:
        try:
            self._epoll.register(fd, _EDGES)
        except FileExistsError:
            self._epoll.modify(fd, _EDGES)
        except OSError:
            pass  # closed already (its DISCONNECTED follows)
        self._active.add(fd)  # whatever came before it was watched

    def _forget(self, fd: int, in_events: bool = False) -> None:
        self.ledger.closed(fd, in_events)
        self._active.discard(fd)
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass  # closed: the kernel dropped it from the set

    def announced(self, conn: Connection, op: dict) -> str | None:
        return self.ledger.announce(conn, op["bytes"], op["frames"],  # the door checked them
                                    op.get("messages", 1))

    def _read_events(self) -> None:
        ledger = self.ledger
        while True:
            try:
                event = recv_monitor_message(self.events, zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:
                return
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_ACCEPTED:
                ledger.accepted(fd, *_identity(fd))
                self._watch(fd)
            else:
                self._forget(fd, in_events=True)

    def review(self, now: float) -> list[tuple[Connection, str]]:
        """What the owner calls now and then: end the connections :meth:`shut_peer_later`
        named whose time came, then :meth:`check` (a failure of which is logged, not
        raised: the owner's loop serves others)."""
        if self.doomed:
            self.expire(now)
        try:
            return self.check()
        except Exception:
            logger.exception("%s: checking connections for unfinished messages failed",
                             self.name)
            return []

    def check(self) -> list[tuple[Connection, str]]:
        """Shut down every connection too far ahead; returns them, each with why. Looks at
        the connections that received bytes since they were last looked at only."""
        self._read_events()
        active = self._active
        for fd, _ in self._epoll.poll(0):
            active.add(fd)
        if not active or self._readable():
            return []  # complete messages wait: what is ahead is not all unfinished
        out = []
        ledger = self.ledger
        for fd in list(active):
            conn = ledger.conns.get(fd)
            if conn is None:
                active.discard(fd)
                continue
            self.looked_at += 1
            counts = _tcp_counts(fd)
            if counts is None:  # not TCP (ipc://), or closed (its DISCONNECTED may be read)
                active.discard(fd)
                if _identity(fd)[0] != conn.ino:
                    self._forget(fd)  # gone, or another file now: forget it
                continue
            over = ledger.ahead(conn, *counts)
            if over <= 0:
                conn.suspect = False
                active.discard(fd)  # looked at: nothing new until bytes come again
                continue
            # Complete messages may have arrived since the socket was drained: only a
            # connection found too far ahead with nothing complete waiting is shut down.
            if self._readable():
                continue  # (it stays active: looked at again next time)
            if not conn.suspect:
                # libzmq may hold a complete message (an announcement) that the socket does
                # not offer yet, while the large message after it comes in: a connection is
                # shut down when a second check finds it too far ahead
                conn.suspect = True
                continue  # (it stays active)
            active.discard(fd)
            ino, address = _identity(fd)
            if not conn.ino:
                conn.ino, conn.peer_address = ino, address
            if ino != conn.ino:  # the descriptor is another socket now
                self._forget(fd)
                continue
            why = (f"it sent {over + ledger.slack + conn.announced:,} bytes beyond its last"
                   f" complete message, more than INCOMPLETE_MESSAGE_BYTES"
                   f" ({ledger.slack:,})" + (f" plus the {conn.announced:,} it announced"
                                             if conn.announced else ""))
            logger.error("%s: shutting down the connection from %s: %s", self.name,
                         conn.peer_address or "?", why)
            self.shut(fd)
            out.append((conn, why))
        return out

    def _readable(self) -> bool:
        """Whether complete messages wait in the socket."""
        return bool(cast(int, self.sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN)

    def shut(self, fd: int) -> None:
        """End connection ``fd`` (libzmq sees it closed and frees what it holds)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fileno=fd)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError as exc:
            if exc.errno not in (errno.ENOTCONN, errno.EBADF, errno.ENOTSOCK):
                raise
        finally:
            sock.detach()
        self._forget(fd)
        self.shut_down += 1

    def shut_peer_later(self, peer: bytes, when: float) -> None:
        """End ``peer``'s connection at ``when`` (after what was sent to it has gone out)."""
        self.doomed.setdefault(peer, when)

    def expire(self, now: float) -> None:
        """End the connections :meth:`shut_peer_later` named whose time came."""
        for peer, when in list(self.doomed.items()):
            if when <= now:
                del self.doomed[peer]
                self.shut_peer(peer)

    def shut_peer(self, peer: bytes) -> bool:
        """End the connection whose messages come from routing id ``peer`` (a revoked key)."""
        self._read_events()
        for fd, conn in list(self.ledger.conns.items()):
            if conn.peer == peer:
                ino, _ = _identity(fd)
                if ino and ino == conn.ino:
                    self.shut(fd)
                    return True
        return False

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.events.close(0)
        self._epoll.close()
