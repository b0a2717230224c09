"""Large buffers sent as a stream of piece messages, joined by the receiver as they arrive.

A buffer of more than :data:`STREAM_MIN_BYTES` does not travel as one frame of the message
that carries its value. The sender sends it first as ``piece`` messages of
:data:`PIECE_BYTES` (views of the buffer: no copy), each ``[{"op": "piece", "stream": sid,
"off": offset, "total": size}]`` and one frame; then the message of the op, whose item names
the stream by its id (see :func:`zfabric.transfer.pack_values`). The receiver copies each
piece into place as it comes, into a buffer of its shared-memory pool (pages that already
exist, back to the pool when the value dies), and drops the piece.

Why: libzmq hands a multipart message over only once all of it is in, so a 100 MB frame is
received into a fresh 100 MB allocation (page faults on every 4 KiB, as costly as the copy),
and over CurveZMQ it is encrypted whole, sent, then decrypted whole: three steps one after
another. Pieces as messages of their own keep libzmq's buffers small and reused, let the two
ends' I/O threads encrypt and decrypt piece after piece while the kernel moves the one
between, and let the receiver's copy overlap with the pieces still on the wire.

:class:`Table` is one connection's streams at the receiver (no I/O). It holds no more than
one message could: each stream at most the port's frame limit, at most ``max_streams``
streams, and one unfinished at a time (a sender sends its streams one after the other). A
stream that makes no progress for :data:`IDLE_S` is dropped (its sender went away); complete
streams that the next op message does not claim are dropped with it.
"""

from __future__ import annotations

import itertools
import time

import msgpack

from . import shm
from .errors import RemoteProtocolError

#: Bytes of one piece.
PIECE_BYTES = 1 << 20
#: Buffers larger than this leave as streams; smaller ones as frames of their message.
STREAM_MIN_BYTES = 4 << 20
#: A stream that got no piece for this long is dropped.
IDLE_S = 60.0
#: What one piece message may take on the wire beyond its data (for the announcement).
_HEAD_BYTES = 128

_packer = msgpack.Packer(use_bin_type=True)
_ids = itertools.count(1)


def streamable(view: memoryview) -> bool:
    """Whether buffer ``view`` leaves as a stream (large and contiguous)."""
    return view.nbytes > STREAM_MIN_BYTES and view.c_contiguous


def named(ops: list):
    """The stream ids that the items of ``ops`` name (``["streams", ids]``; unchecked: each
    is whatever the sender wrote)."""
    for op in ops:
        items = op.get("items")
        for item in items if type(items) is list else ():
            where = item[4] if type(item) is list and len(item) > 4 else None
            if type(where) is list and len(where) == 2 and where[0] == "streams" \
                    and type(where[1]) is list:
                yield from where[1]


def new_id() -> int:
    """A stream id, unique in this process."""
    return next(_ids)


def messages(sid: int, view: memoryview) -> list[list]:
    """The messages that carry buffer ``view`` as stream ``sid``: an announcement of their
    size (zfabric/intake.py), then the pieces (views of ``view``)."""
    view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    total = view.nbytes
    count = -(-total // PIECE_BYTES)
    out: list[list] = [[_packer.pack([{"op": "announce", "bytes": PIECE_BYTES + _HEAD_BYTES,
                                       "frames": 2, "messages": count}])]]
    for off in range(0, total, PIECE_BYTES):
        head = _packer.pack([{"op": "piece", "stream": sid, "off": off, "total": total}])
        out.append([head, view[off:off + PIECE_BYTES]])
    return out


class Table:
    """The streams arriving on one connection (see the module docstring)."""

    __slots__ = ("frame_limit", "max_streams", "streams")

    def __init__(self, frame_limit: int = -1, max_streams: int = 10_000):
        self.frame_limit = frame_limit
        self.max_streams = max_streams
        # sid -> [buffer, total, bytes received, last piece's time]
        self.streams: dict[int, list] = {}

    def __len__(self) -> int:
        return len(self.streams)

    def piece(self, op: dict, frames: list, now: float | None = None) -> None:
        """Copy one piece (``op`` and its one frame) into place; a piece at offset 0 starts
        the stream. Raises RemoteProtocolError when it does not fit."""
        sid, off, total = op["stream"], op["off"], op["total"]  # ints: the door checked them
        if len(frames) != 1:
            raise RemoteProtocolError(f"a piece comes in one frame, not {len(frames)}")
        frame = frames[0]
        data = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
        n = data.nbytes
        now = time.monotonic() if now is None else now
        entry = self.streams.get(sid)
        if off == 0:
            if total <= 0 or (self.frame_limit >= 0 and total > self.frame_limit):
                raise RemoteProtocolError(f"stream {sid}: {total:,} bytes is more than this"
                                          f" port takes in a frame ({self.frame_limit:,})")
            if entry is None and len(self.streams) >= self.max_streams:
                raise RemoteProtocolError(f"more than {self.max_streams} streams at once")
            if any(e[2] != e[1] for e in self.streams.values()):
                # a sender sends one stream after the other: at most one is unfinished
                self.streams.clear()
                raise RemoteProtocolError(f"stream {sid} starts before the last one ended")
            entry = self.streams[sid] = [shm.scratch(total), total, 0, now]
        elif entry is None:
            raise RemoteProtocolError(f"a piece of stream {sid}, which did not start")
        dest, want, got = entry[0], entry[1], entry[2]
        if total != want or off != got or n == 0 or off + n > want:
            del self.streams[sid]
            raise RemoteProtocolError(
                f"stream {sid}: a piece of {n:,} bytes at {off:,} of {total:,} does not follow"
                f" the {got:,} of {want:,} bytes received")
        dest[off:off + n] = data.cast("B") if data.format != "B" or data.ndim != 1 else data
        entry[2] = got + n
        entry[3] = now

    def take(self, sid) -> memoryview:
        """The whole buffer of stream ``sid`` (it leaves the table)."""
        entry = self.streams.pop(sid, None) if type(sid) is int else None
        if entry is None:
            raise RemoteProtocolError(f"stream {sid!r:.40} is unknown")
        if entry[2] != entry[1]:
            raise RemoteProtocolError(f"stream {sid}: {entry[2]:,} of {entry[1]:,} bytes came")
        return entry[0]

    def settle(self) -> None:
        """An op message was handled: complete streams it did not claim are dropped (its
        sender sends a value's pieces right before the message naming them)."""
        if self.streams:
            for sid in [s for s, e in self.streams.items() if e[2] == e[1]]:
                del self.streams[sid]

    def expire(self, now: float, idle_s: float = IDLE_S) -> None:
        """Drop the streams that got no piece for ``idle_s``."""
        for sid in [s for s, e in self.streams.items() if now - e[3] > idle_s]:
            del self.streams[sid]

    def clear(self) -> None:
        self.streams.clear()
