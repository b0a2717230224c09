"""The bulk channel: large buffers under CurveZMQ sealed with AES-GCM on a plain connection.

With security on, a buffer streamed as pieces (zfabric/streams.py) costs libsodium's
XSalsa20-Poly1305 on both ends, in libzmq's one I/O thread: about 2.2 GB/s per core on the
machines measured, while AES-128-GCM (AES-NI, through the ``cryptography`` package) seals
and opens 1 MiB pieces at 9-11 GB/s on one core. So where ``cryptography`` is installed and
:data:`~zfabric.config.Config.BULK_CHANNEL` is on, the pieces go sealed by this module over a
plain ZeroMQ connection of their own; the ops, small values and every key stay on the CurveZMQ
connection, which alone authenticates the two ends.

A *session* is one requester's plain connection to one worker's bulk port (a ROUTER the
worker binds on the interface of its data port, on the first request for it). The requester
(a client, or a worker fetching from a peer) makes it: over its CurveZMQ connection to the
worker's data port it sends ``bulk-open`` with a random routing id, a random token and two
fresh random AES-128 keys, one for each direction; the worker answers with its bulk port.
The requester connects a DEALER with that routing id, sends ``bulk-hello`` naming the token,
and the worker answers ``bulk-ready`` on it; from then on the requester asks for bulk (a
``"bulk": 1`` in ``get-data`` and ``put-data``). Either end then sends each streamed buffer as
pieces ``[{"op": "piece", "t": token, "stream": sid, "off": off, "total": total}]`` whose one
frame is the piece sealed with its direction's key: nonce the stream id (unique in the
sending process, never reused) and the piece's index; associated data the token, stream id,
offset and total. The op naming the streams goes over CurveZMQ and may come before the last
piece: its receiver holds it (:class:`Waiting`) until its streams are whole, for as long as
pieces keep coming (:data:`~zfabric.config.Config.BULK_IDLE_S`).

The keys only ever travel inside CurveZMQ, so what reaches the bulk port is worth no more
than its key: a piece is taken only for a token of a live session, in order (each offset
once), of the size its place calls for, and only if its tag opens with the key; anything
else is dropped and counted (:attr:`Inbound.dropped`), never answered. A stream whose pieces
stop coming (a cut connection, a tampered piece) fails its op after ``BULK_IDLE_S``; the
requester then sends or asks again over CurveZMQ alone.

This module is the part without I/O: the cipher, the pieces sent (:class:`Sealer`), the
pieces taken (:class:`Inbound`) and the ops held for them (:class:`Waiting`).
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from typing import Any

import msgpack

from . import shm, streams

#: Bytes of a key (AES-128: the session's strength is CurveZMQ's Curve25519, about 128 bits;
#: AES-256 measured 15-20 % slower).
KEY_BYTES = 16
#: Bytes of a session's token and of a requester's routing id on the bulk port.
TOKEN_BYTES = 16
#: Bytes of the authentication tag after each sealed piece.
TAG_BYTES = 16
#: Buffers a sending thread seals pieces into, reused once sent (:class:`Ring`).
RING_BUFFERS = 16
#: Longest a sealer waits for a buffer of its ring to be sent (:class:`Ring`).
RING_WAIT_S = 0.005

_nonce = struct.Struct(">QI")  # stream id, piece index: 12 bytes
_aad = struct.Struct(">QQQ")  # stream id, offset, total (after the token)
_packer = msgpack.Packer(use_bin_type=True)
_SID_END = 1 << 63  # stream ids fit the nonce's 8 bytes
_TOTAL_END = 1 << 50  # (piece indexes fit its 4)

_AESGCM: Any = None  # the cipher's class once imported; False where it is not installed


def cipher_available() -> bool:
    """Whether ``cryptography`` (the optional ``security`` extra) can be imported."""
    global _AESGCM
    if _AESGCM is None:
        try:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        except ImportError:
            _AESGCM = False
        else:
            _AESGCM = AESGCM
    return _AESGCM is not False


def enabled(config, security) -> bool:
    """Whether this process uses the bulk channel: security on, ``BULK_CHANNEL`` on, and
    ``cryptography`` importable."""
    return security is not None and bool(config.BULK_CHANNEL) and cipher_available()


def new_secrets() -> dict:
    """A session's routing id, token and keys, as the requester sends them in ``bulk-open``."""
    return {"route": os.urandom(TOKEN_BYTES), "token": os.urandom(TOKEN_BYTES),
            "up": os.urandom(KEY_BYTES), "down": os.urandom(KEY_BYTES)}


def check_secrets(op: dict) -> str | None:
    """Why a ``bulk-open`` op's secrets are unusable (None when they are fine)."""
    for name, size in (("route", TOKEN_BYTES), ("token", TOKEN_BYTES), ("up", KEY_BYTES),
                       ("down", KEY_BYTES)):
        value = op.get(name)
        if type(value) is not bytes or len(value) != size:
            return f"bulk-open: {name} must be {size} bytes"
    return None


def _cipher(key: bytes):
    if not cipher_available():
        raise RuntimeError("the bulk channel needs the cryptography package:"
                           " pip install 'zfabric[security]'")
    return _AESGCM(key)


def _flat(view: memoryview) -> memoryview:
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


class Ring:
    """Buffers that pieces are sealed into, each reused once ZeroMQ has sent what it held
    (its :class:`zmq.MessageTracker` is done): a fresh 1 MiB buffer per piece costs page
    faults dearer than the cipher when many wait in ZeroMQ's queue (measured: 100 MB sealed
    and sent took the sender 60 ms of CPU with fresh buffers, 44 with the ring, 19 plain).
    The sealer waits up to :data:`RING_WAIT_S` for the oldest buffer to be sent (so the
    cipher runs at the wire's pace); once that wait fails, the rest of the stream takes
    fresh buffers (a receiver that does not read never holds the sender up). One per
    sending thread (a worker's loop, a client's event loop)."""

    __slots__ = ("bufs", "next", "patient", "trackers")

    def __init__(self, count: int = RING_BUFFERS):
        self.bufs: list[memoryview | None] = [None] * count
        self.trackers: list[Any] = [None] * count
        self.next = 0
        self.patient = True  # (for the stream being sealed)

    def take(self, size: int) -> tuple[memoryview, int]:
        """A buffer of ``size`` bytes and its slot (-1: a fresh one, not to be tracked)."""
        i = self.next
        tracker = self.trackers[i]
        if tracker is not None and not tracker.done:
            try:
                if not self.patient:
                    raise TimeoutError
                tracker.wait(RING_WAIT_S)
            except Exception:  # zmq.NotDone: the wire is slow, or nobody reads
                self.patient = False
                return memoryview(bytearray(size)), -1
        buf = self.bufs[i]
        if buf is None:
            buf = self.bufs[i] = memoryview(bytearray(streams.PIECE_BYTES + TAG_BYTES))
        self.trackers[i] = None
        self.next = (i + 1) % len(self.bufs)
        return buf[:size], i

    def sent(self, slot: int, tracker: Any) -> None:
        """The piece sealed into ``slot`` went to ZeroMQ (``tracker``: its last frame's)."""
        if slot >= 0:
            self.trackers[slot] = tracker


class Sealer:
    """Seals the pieces of one direction of a session."""

    __slots__ = ("aead", "token")

    def __init__(self, key: bytes, token: bytes):
        self.aead = _cipher(key)
        self.token = token

    def messages(self, sid: int, view: memoryview, ring: Ring) -> Iterator[tuple[list, int]]:
        """The piece messages of buffer ``view`` as stream ``sid``, each sealed into a buffer
        of ``ring`` as it is taken, with its slot: send it with ``copy=False, track=True``
        and give the tracker to ``ring.sent(slot, tracker)``."""
        view = _flat(view)
        total = view.nbytes
        token, seal, step = self.token, self.aead.encrypt_into, streams.PIECE_BYTES
        ring.patient = True
        for off in range(0, total, step):
            head = _packer.pack([{"op": "piece", "t": token, "stream": sid, "off": off,
                                  "total": total}])
            data = view[off:off + step]
            body, slot = ring.take(data.nbytes + TAG_BYTES)
            seal(_nonce.pack(sid, off // step), data, token + _aad.pack(sid, off, total), body)
            yield [head, body], slot


class Inbound(streams.Table):
    """The streams arriving on one direction of a session: a :class:`zfabric.streams.Table`
    (so that :meth:`take` and :func:`zfabric.transfer.claim` work on it) whose pieces are
    opened into place, and where what does not fit is dropped and counted, not raised."""

    __slots__ = ("aead", "dropped", "token", "whole_streams")

    def __init__(self, key: bytes, token: bytes, frame_limit: int = -1,
                 max_streams: int = 10_000):
        super().__init__(frame_limit, max_streams)
        self.aead = _cipher(key)
        self.token = token
        self.dropped = 0  # pieces refused: unknown token, out of place, bad tag
        self.whole_streams = 0  # streams that came whole

    def piece(self, op: dict, frames: list, now: float | None = None) -> int | None:  # type: ignore[override]
        """Open one piece into place; returns its stream id when that made the stream
        whole, else None (also when it was dropped)."""
        sid, off, total = op["stream"], op["off"], op["total"]  # ints: the door checked them
        step = streams.PIECE_BYTES
        if op.get("t") != self.token or len(frames) != 1 or off % step \
                or not 0 < sid < _SID_END or not 0 < total < _TOTAL_END:
            self.dropped += 1
            return None
        frame = frames[0]
        data = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
        n = data.nbytes - TAG_BYTES
        now = time.monotonic() if now is None else now
        entry = self.streams.get(sid)
        if entry is None:
            if off != 0 or total <= 0 or (0 <= self.frame_limit < total) \
                    or len(self.streams) >= self.max_streams:
                self.dropped += 1
                return None
            dest, want, got = None, total, 0
        else:
            dest, want, got = entry[0], entry[1], entry[2]
        if total != want or off != got or n != min(step, want - off):
            self.dropped += 1  # a replay, a piece out of place or of the wrong size
            return None
        # a stream's first piece is opened aside (at most a piece): nothing of its size is
        # allocated unless it comes from the key's holder
        into = memoryview(bytearray(n)) if dest is None else dest[off:off + n]
        try:
            self.aead.decrypt_into(_nonce.pack(sid, off // step), data,
                                   self.token + _aad.pack(sid, off, total), into)
        except Exception:  # InvalidTag: forged or damaged; what it wrote is overwritten
            self.dropped += 1
            return None
        if entry is None:
            dest = shm.scratch(total)
            dest[:n] = into
            # one stream after the other from the one sender: an unfinished one was cut off
            for s in [s for s, e in self.streams.items() if e[2] != e[1]]:
                del self.streams[s]
            entry = self.streams[sid] = [dest, total, 0, now]
        entry[2] = got + n
        entry[3] = now
        if entry[2] != total:
            return None
        self.whole_streams += 1
        return sid

    def whole(self, sid) -> bool:
        entry = self.streams.get(sid)
        return entry is not None and entry[2] == entry[1]


def stream_ids(ops: list) -> set:
    """The stream ids the items of ``ops`` name (``["streams", ids]``)."""
    return {s for s in streams.named(ops) if type(s) is int and s}


class Waiting:
    """Messages that arrived before the bulk streams they name were whole, held until they
    are, or until ``idle_s`` passes without a piece of them (then they fail)."""

    __slots__ = ("held", "idle_s")

    def __init__(self, idle_s: float):
        self.idle_s = idle_s
        self.held: list[list] = []  # [needed sids, payload, last progress]

    def __len__(self) -> int:
        return len(self.held)

    def hold(self, needed: set, payload: Any, now: float) -> None:
        self.held.append([needed, payload, now])

    def hold_unless_whole(self, inbound: Inbound, op: dict, payload: Any, now: float) -> bool:
        """Hold ``payload`` unless every stream ``op`` names is whole in ``inbound``; whether
        it was held."""
        needed = stream_ids([op])
        if all(inbound.whole(sid) for sid in needed):
            return False
        self.hold(needed, payload, now)
        return True

    def ready(self, inbound: Inbound) -> list:
        """The payloads whose streams are all whole now (they leave)."""
        out = []
        keep = []
        for entry in self.held:
            if all(inbound.whole(s) for s in entry[0]):
                out.append(entry[1])
            else:
                keep.append(entry)
        self.held = keep
        return out

    def expired(self, inbound: Inbound, now: float) -> list:
        """The payloads that waited ``idle_s`` with no piece of their streams (they
        leave)."""
        if not self.held:
            return []
        out: list = []
        keep: list = []
        for entry in self.held:
            last = max([entry[2], *(inbound.streams[s][3] for s in entry[0]
                                    if s in inbound.streams)])
            (out if now - last > self.idle_s else keep).append(entry)
        if out:
            self.held = [e for e in keep]
        return [e[1] for e in out]

    def clear(self) -> list:
        out = [e[1] for e in self.held]
        self.held = []
        return out


class Session:
    """One session as one of its ends holds it: what it takes (:class:`Inbound`), what it
    sends (:class:`Sealer`), and the ops held for streams not yet whole. ``requester``: the
    end that opened it (it sends with ``up`` and takes with ``down``)."""

    __slots__ = ("backlog", "inbound", "peer", "ready", "requester", "route", "sealer", "sock",
                 "token", "waiting")

    def __init__(self, secrets: dict, *, requester: bool, idle_s: float,
                 frame_limit: int = -1, max_streams: int = 10_000, peer: Any = None):
        take, send = ("down", "up") if requester else ("up", "down")
        self.token: bytes = secrets["token"]
        self.route: bytes = secrets["route"]
        self.inbound = Inbound(secrets[take], self.token, frame_limit, max_streams)
        self.sealer = Sealer(secrets[send], self.token)
        self.waiting = Waiting(idle_s)
        self.requester = requester
        self.ready = False  # the bulk connection is up (its hello was answered)
        self.peer = peer  # the requester's CurveZMQ connection (at a server), or its address
        self.sock: Any = None  # the requester's: its DEALER on the bulk port
        self.backlog: Any = None  # the server's: pieces its full queue refused


def hello(token: bytes) -> list:
    """The requester's first message on its bulk connection."""
    return [_packer.pack([{"op": "bulk-hello", "t": token}])]


READY = [_packer.pack([{"op": "bulk-ready"}])]
