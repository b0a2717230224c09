"""A raw ZMTP 3 peer (NULL mechanism) over a plain TCP socket, for what libzmq will not send.

libzmq puts a multipart message on the wire only once its last frame is written, so a peer
that sends frames which all say "more" has to be written by hand. :class:`RawPeer` does the
greeting and READY handshake of a DEALER and then writes whatever frames it is told, at the
pace it is told (ZMTP 3.0, RFC 23).
"""

from __future__ import annotations

import socket
import struct
import time

MORE, LONG, COMMAND = 0x01, 0x02, 0x04


def frame(body: bytes, more: bool = False) -> bytes:
    flags = MORE if more else 0
    if len(body) > 255:
        return bytes([flags | LONG]) + struct.pack(">Q", len(body)) + body
    return bytes([flags, len(body)]) + body


def _command(body: bytes) -> bytes:
    if len(body) > 255:
        return bytes([COMMAND | LONG]) + struct.pack(">Q", len(body)) + body
    return bytes([COMMAND, len(body)]) + body


def _property(name: bytes, value: bytes) -> bytes:
    return bytes([len(name)]) + name + struct.pack(">I", len(value)) + value


class RawPeer:
    """``RawPeer("tcp://127.0.0.1:PORT")``: connected and past the handshake, as a DEALER."""

    def __init__(self, address: str, identity: bytes = b"", timeout: float = 5.0):
        host, port = address.removeprefix("tcp://").rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        greeting = (b"\xff" + b"\0" * 8 + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\0")
                    + b"\0" + b"\0" * 31)
        self.sock.sendall(greeting)
        self._read_exactly(64)  # the server's greeting
        ready = b"\x05READY" + _property(b"Socket-Type", b"DEALER")
        if identity:
            ready += _property(b"Identity", identity)
        self.sock.sendall(_command(ready))
        self._read_command()  # the server's READY
        self.sent = 0

    def _read_exactly(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("the server closed the connection")
            out += chunk
        return out

    def _read_command(self) -> bytes:
        flags = self._read_exactly(1)[0]
        size = (struct.unpack(">Q", self._read_exactly(8))[0] if flags & LONG
                else self._read_exactly(1)[0])
        return self._read_exactly(size)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.sent += len(data)

    def message(self, *frames: bytes) -> None:
        """One complete message of ``frames``."""
        self.send(b"".join(frame(f, more=i < len(frames) - 1) for i, f in enumerate(frames)))

    def trickle(self, data: bytes, chunk: int, pause: float, limit_s: float = 20.0) -> bool:
        """Send ``data`` in pieces of ``chunk`` bytes, ``pause`` seconds apart; False as soon
        as the server has closed the connection."""
        deadline = time.monotonic() + limit_s
        for i in range(0, len(data), chunk):
            try:
                self.send(data[i:i + chunk])
            except OSError:
                return False
            if self.closed_by_server():
                return False
            if time.monotonic() > deadline:
                break
            time.sleep(pause)
        return not self.closed_by_server()

    def closed_by_server(self) -> bool:
        """Whether the server has closed (or reset) this connection (what it sent is read
        and dropped)."""
        self.sock.setblocking(False)
        try:
            while True:
                if self.sock.recv(1 << 16) == b"":
                    return True
        except BlockingIOError:
            return False
        except OSError:
            return True
        finally:
            self.sock.setblocking(True)

    def close(self) -> None:
        self.sock.close()
