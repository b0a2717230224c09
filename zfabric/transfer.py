"""The client's side of the data plane: fetch values from, and place values on, workers.

One ``zmq.asyncio`` DEALER per worker address, each with exactly one reader task (cancelling a
pending ``recv`` can lose a message, so requests never race a receive against a timeout; they
wait on a future the reader settles).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from . import _zmq, bulk, handshake, protocol, serialize, shm, streams
from .errors import CommTimeoutError, RemoteProtocolError
from .security import SecurityError

logger = logging.getLogger(__name__)

#: Values with at least this many bytes of buffers go through shared memory on one host.
SHM_THRESHOLD_BYTES = 1 << 20
def pack_values(values, *, ask: bool = False, into: dict | None = None,
                srcfd: int | None = None, stream: bool = False) -> tuple[list, list, list]:
    """Wire form of stored values: ``items`` for the op, ``frames`` to send after it, and
    ``streams`` (``(sid, view)`` pairs) to send before it.

    ``values`` holds ``(key, header, buffers, raw)``; each item is
    ``[key, header, nframes, raw, where]``, where ``where`` is None (the buffers are the next
    ``nframes`` frames), ``["streams", ids]`` (given ``stream``: buffer ``i`` is the next
    frame where ``ids[i]`` is 0, else it comes first as stream ``ids[i]``; see
    :mod:`zfabric.streams`), ``["seg", lease, sizes]`` (written into the receiver's segment
    ``into[key]``), or ``["sizes", sizes]`` (``ask``: too large for a frame, or for the
    segment named; ask again with a segment of that size).
    ``srcfd``: our end of the asker's connection; a segment of another process is not written
    (see :func:`zfabric.shm.write`).
    """
    items: list = []
    frames: list = []
    out: list = []
    for key, header, bufs, raw in values:
        where = None
        if bufs and (ask or (into and key in into)):
            sizes = [memoryview(b).nbytes for b in bufs]
            desc = into.get(key) if into else None
            if desc is not None and shm.write(desc, bufs, srcfd=srcfd):
                where = ["seg", desc[0], sizes]
            elif ask and sum(sizes) >= SHM_THRESHOLD_BYTES:
                where = ["sizes", sizes]  # (a segment named with a guess may be too small)
        if where is not None:
            items.append([key, header, 0, raw, where])
            continue
        ids = None
        start = len(frames)
        for i, b in enumerate(bufs):
            view = memoryview(b)
            if not stream or not streams.streamable(view):
                frames.append(b)
                if ids is not None:
                    ids.append(0)
                continue
            if ids is None:
                ids = [0] * i
            sid = streams.new_id()
            out.append((sid, view))
            ids.append(sid)
        items.append([key, header, len(frames) - start, raw,
                      ["streams", ids] if ids is not None else None])
    return items, frames, out


def _streamed(frames: list, ids, table: streams.Table | None) -> list:
    """Buffers from frames and, where ``ids`` names one, from a stream of ``table``."""
    if type(ids) is not list or table is None:
        raise RemoteProtocolError(f"bad stream ids {ids!r:.80}")
    out, pos = [], 0
    for sid in ids:
        if sid == 0:
            if pos >= len(frames):
                raise RemoteProtocolError(f"stream ids {ids!r:.80} name more frames than came")
            out.append(frames[pos])
            pos += 1
        else:
            out.append(table.take(sid))
    if pos != len(frames):
        raise RemoteProtocolError(f"stream ids {ids!r:.80} do not match {len(frames)} frames")
    return out


def claim(ops: list, table: streams.Table) -> streams.Table:
    """The streams of ``table`` that the items of ``ops`` name, moved to a table of their
    own (for an op handled later than the next message is read)."""
    got = streams.Table()
    for sid in streams.named(ops):
        entry = table.streams.pop(sid, None) if type(sid) is int else None
        if entry is not None:
            got.streams[sid] = entry
    return got


def unpack_values(items: list, frames: list, owner=None, table: streams.Table | None = None):
    """Yield ``(key, header, buffers, raw, sizes)`` from an op's items and the frames after it.

    A missing value has ``header`` None. ``sizes`` is set (and ``buffers`` None) when the
    sender asks for a segment to write the value into (see :func:`pack_values`). Values
    written into segments are taken only from leases made for ``owner``; streamed buffers
    from ``table``, the streams of the connection the op came on.
    """
    pos = 0
    for item in items:
        if type(item) is not list or len(item) < 3:
            raise RemoteProtocolError(f"bad value item {item!r:.80}")
        key, header, n = item[0], item[1], item[2]
        raw = bool(item[3]) if len(item) > 3 else False
        where = item[4] if len(item) > 4 else None
        if not where:
            bufs = [f.buffer if hasattr(f, "buffer") else f for f in frames[pos : pos + n]]
            pos += n
            yield key, header, bufs, raw, None
        elif where[0] == "streams" and len(where) == 2:
            got = [f.buffer if hasattr(f, "buffer") else f for f in frames[pos : pos + n]]
            pos += n
            yield key, header, _streamed(got, where[1], table), raw, None
        elif where[0] == "sizes" and len(where) == 2 and type(where[1]) is list:
            yield key, header, None, raw, where[1]
        elif where[0] == "seg" and len(where) == 3 and type(where[2]) is list:
            try:
                bufs = shm.pool().adopt(where[1], where[2], owner)
            except (ValueError, OSError) as exc:
                raise RemoteProtocolError(f"value {key!r}: {exc}") from None
            yield key, header, bufs, raw, None
        else:
            raise RemoteProtocolError(f"value {key!r}: unknown location {where!r:.80}")


def lease_for(keys_sizes, owner=None) -> dict:
    """Leases in this process's pool for ``(key, sizes)`` pairs; keys that got none are left
    out (their values come over the socket)."""
    into = {}
    if shm.available():
        pool = shm.pool()
        for key, sizes in keys_sizes:
            desc = pool.lease(sum(sizes), owner=owner)
            if desc is not None:
                into[key] = desc
    return into


def cancel_leases(into: dict) -> None:
    """Give up leases whose writes were not confirmed (no-op for adopted ones)."""
    if into:
        pool = shm.pool()
        for desc in into.values():
            pool.cancel(desc[0])


#: Longest a client waits, once per worker, for its bulk connection (zfabric/bulk.py) to
#: answer before it sends its large values over CurveZMQ instead.
BULK_OPEN_S = 3.0
#: Ops of the messages that carry streams (and say what comes): not answers.
_STREAMING = ("piece", "announce")


class _BulkLost(ConnectionError):
    """An answer's pieces stopped coming on the bulk channel (the request is made again
    over CurveZMQ alone)."""


class _Conn:
    def __init__(self, ctx: zmq.asyncio.Context, address: str, security=None,
                 max_frame_bytes: int = -1):
        self.address = address
        # with keys, a monitor turns a refused handshake into an error at once (a CURVE
        # failure is otherwise silent: libzmq retries, and requests wait for their timeout)
        monitor = f"inproc://zfabric-data-{id(self):x}-{os.getpid()}" if security else None
        self.sock = _zmq.dealer(ctx, address, security=security, role="client", server="worker",
                                max_frame_bytes=max_frame_bytes, monitor=monitor)
        self.pending: dict[int, asyncio.Future] = {}
        self.failed: Exception | None = None  # the handshake was refused: why
        self.table = streams.Table(max_frame_bytes)  # streams arriving (zfabric/streams.py)
        # a request's messages (its streams, then its op) leave together
        self.send_lock = asyncio.Lock()
        self.reader = asyncio.ensure_future(self._read())
        # the bulk channel (zfabric/bulk.py): opened on the first request, None when off
        self.link: bulk.Session | None = None
        self.opening: asyncio.Future | None = None
        self.bulk_reader: asyncio.Future | None = None
        self.events: zmq.asyncio.Socket | None = None
        self.watcher: asyncio.Future | None = None
        if monitor is not None:
            events = self.events = ctx.socket(zmq.PAIR)  # now: events before it connects are lost
            events.setsockopt(zmq.LINGER, 0)
            events.connect(monitor)
            self.watcher = asyncio.ensure_future(self._watch(events))

    async def _watch(self, events: zmq.asyncio.Socket) -> None:
        while True:
            event = dict(parse_monitor_message(await events.recv_multipart()))
            if event["event"] in handshake.FAILED:
                self.failed = SecurityError(handshake.explain_data_port(event, self.address))
                for fut in self.pending.values():
                    if not fut.done():
                        fut.set_exception(self.failed)
                self.pending.clear()

    async def _read(self) -> None:
        table = self.table
        while True:
            frames = await self.sock.recv_multipart(copy=False)
            try:
                ops, buffers = protocol.decode([frames[0].bytes, *frames[1:]])
                if len(ops) == 1 and ops[0]["op"] in _STREAMING:
                    if ops[0]["op"] == "piece":
                        table.piece(ops[0], buffers)
                    continue  # (an announcement is for servers' guards)
            except RemoteProtocolError as exc:
                logger.warning("bad data message from %s: %s", self.address, exc)
                continue
            claimed = claim(ops, table) if table.streams else None
            table.settle()
            for op in ops:
                if op["op"] == "error" and op.get("id") is None:
                    self._fail_all(op)  # about the connection, not one request
                    continue
                if op.get("bulk") and op["op"] == "data":
                    self._bulk_answer(op, buffers)
                    continue
                fut = self.pending.pop(op.get("id", -1), None)
                if fut is not None and not fut.done():
                    fut.set_result((op, buffers, claimed))

    def _bulk_answer(self, op: dict, buffers: list) -> None:
        """An answer whose streams come on the bulk channel: settled once they are whole."""
        link = self.link
        if link is None:
            fut = self.pending.pop(op.get("id", -1), None)
            if fut is not None and not fut.done():
                fut.set_exception(_BulkLost("the bulk channel closed"))
            return
        needed = bulk.stream_ids([op])
        loop = asyncio.get_running_loop()
        link.inbound.expire(loop.time(), link.waiting.idle_s)  # (streams nobody claimed)
        if all(link.inbound.whole(sid) for sid in needed):
            self._settle_bulk(op, buffers)
        else:
            if not link.waiting:  # its clock: looked at while anything waits
                loop.call_later(link.waiting.idle_s / 4, self._check_bulk, link)
            link.waiting.hold(needed, (op, buffers), loop.time())

    def _check_bulk(self, link: bulk.Session) -> None:
        if link is self.link and link.waiting:
            self._expire_bulk(link, asyncio.get_running_loop().time())
            if link.waiting:
                asyncio.get_running_loop().call_later(link.waiting.idle_s / 4, self._check_bulk,
                                                      link)

    def _settle_bulk(self, op: dict, buffers: list) -> None:
        fut = self.pending.pop(op.get("id", -1), None)
        claimed = claim([op], self.link.inbound) if self.link is not None else None
        if fut is not None and not fut.done():
            fut.set_result((op, buffers, claimed))

    async def open_link(self, idle_s: float, timeout_s: float, request) -> None:
        """Open a bulk session with the worker (``request``: the pool's, over CurveZMQ);
        on any failure there is none, and everything goes over CurveZMQ."""
        secrets = bulk.new_secrets()
        link = bulk.Session(secrets, requester=True, idle_s=idle_s,
                            frame_limit=self.table.frame_limit)
        try:
            op, _, _ = await request({"op": "bulk-open", **secrets})
            if op["op"] != "bulk-port" or type(op.get("port")) is not int:
                return
            sock = link.sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
            _zmq._common(sock, 0, 100_000, streams.PIECE_BYTES + bulk.TAG_BYTES + 4096)
            sock.setsockopt(zmq.ROUTING_ID, link.route)
            host = _zmq.normalize_address(self.address).rsplit(":", 1)[0]
            sock.connect(f"{host}:{op['port']}")
            self.link = link
            ready = asyncio.get_running_loop().create_future()
            self.bulk_reader = asyncio.ensure_future(self._read_bulk(link, ready))
            await sock.send_multipart(bulk.hello(link.token))
            await asyncio.wait_for(asyncio.shield(ready), timeout_s)
            link.ready = True
        except Exception as exc:
            logger.info("no bulk channel to %s (%s): large values go over CurveZMQ",
                        self.address, exc)
            self.drop_link()

    async def _read_bulk(self, link: bulk.Session, ready: asyncio.Future) -> None:
        sock = link.sock
        while True:
            try:
                frames = await sock.recv_multipart(copy=False)
                ops, buffers = protocol.decode([frames[0].bytes, *frames[1:]], 2)
            except RemoteProtocolError:
                link.inbound.dropped += 1
                continue
            op = ops[0] if len(ops) == 1 else {"op": None}
            if op["op"] == "piece":
                try:
                    whole = link.inbound.piece(op, buffers)
                except Exception:  # (MemoryError, ...): the reader carries on
                    logger.exception("bulk channel of %s: a piece could not be taken",
                                     self.address)
                    link.inbound.dropped += 1
                    continue
                if whole is not None and link.waiting:
                    for held, held_buffers in link.waiting.ready(link.inbound):
                        self._settle_bulk(held, held_buffers)
            elif op["op"] == "bulk-ready":
                if not ready.done():
                    ready.set_result(None)
            else:
                link.inbound.dropped += 1

    def _expire_bulk(self, link: bulk.Session, now: float) -> None:
        for op, _ in link.waiting.expired(link.inbound, now):
            fut = self.pending.pop(op.get("id", -1), None)
            if fut is not None and not fut.done():
                fut.set_exception(_BulkLost(
                    f"the pieces of an answer from {self.address} stopped coming on the bulk"
                    f" channel for {link.waiting.idle_s:g} s"))
        link.inbound.expire(now, link.waiting.idle_s)

    def drop_link(self) -> None:
        """No bulk channel from now on (its answers still awaited fail, and are asked for
        again over CurveZMQ)."""
        link, self.link = self.link, None
        if self.bulk_reader is not None:
            self.bulk_reader.cancel()
            self.bulk_reader = None
        if link is not None:
            for op, _ in link.waiting.clear():
                fut = self.pending.pop(op.get("id", -1), None)
                if fut is not None and not fut.done():
                    fut.set_exception(_BulkLost("the bulk channel closed"))
            link.inbound.clear()
            if link.sock is not None:
                link.sock.close(linger=0)

    def _fail_all(self, op: dict) -> None:
        message = protocol.short(op.get("message"), 500)
        exc: Exception
        if op.get("refused"):
            exc = self.failed = SecurityError(
                f"the worker's data port at {self.address} refused this process's key"
                f" ({message}): have it added to DIR/authorized on the worker hosts")
        else:
            exc = ConnectionError(f"worker {self.address}: {message}")
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self.pending.clear()

    def close(self) -> None:
        self.reader.cancel()
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError(f"connection to {self.address} closed"))
        if self.watcher is not None:
            self.watcher.cancel()
            with contextlib.suppress(zmq.ZMQError):
                self.sock.disable_monitor()
        if self.events is not None:
            self.events.close(0)
        self.sock.close(linger=0)
        self.table.clear()
        if self.opening is not None:
            self.opening.cancel()
        self.drop_link()


class DataPool:
    """Requests to workers' data ports, one connection per worker."""

    def __init__(self, ctx: zmq.asyncio.Context, timeout_s: float = 30.0, use_shm: bool = False,
                 security=None, max_frame_bytes: int = -1, config=None):
        self.ctx = ctx
        # the bulk channel's idle limit (zfabric/bulk.py); None: no bulk channel
        self.bulk_idle_s = (config.BULK_IDLE_S if config is not None
                            and bulk.enabled(config, security) else None)
        self.ring = bulk.Ring()  # what pieces are sealed into (its buffers made when used)
        self.security = security
        self.max_frame_bytes = max_frame_bytes  # MAXMSGSIZE of each data connection
        self.use_shm = use_shm and shm.available()
        self.timeout_s = timeout_s
        self.conns: dict[str, _Conn] = {}
        self._seq = 0

    async def request(self, address: str, op: dict, frames: Sequence = (),
                      out: Sequence = ()) -> tuple[dict, list, streams.Table | None]:
        """Send ``op`` (with ``frames``, after the streams ``out`` of
        :func:`pack_values`) and wait for its answer: the op, its frames, and the streams
        it names. With a bulk channel, large values come (``get-data``) and go
        (``put-data``) on it; where that fails, the request is made again without."""
        conn = self.conns.get(address)
        if conn is not None and conn.failed is not None:
            self.drop(address)  # refused: say so now; the next request tries afresh
            raise conn.failed
        if conn is None:
            conn = self.conns[address] = _Conn(self.ctx, address, self.security,
                                               self.max_frame_bytes)
        if self.bulk_idle_s is not None and op["op"] in ("get-data", "put-data"):
            if conn.opening is None:
                conn.opening = asyncio.ensure_future(conn.open_link(
                    self.bulk_idle_s, min(self.timeout_s, BULK_OPEN_S),
                    lambda o: self._request(conn, address, o)))
            if not conn.opening.done():
                await asyncio.wait([conn.opening])
            link = conn.link
            if link is not None and link.ready and (out or op["op"] == "get-data"):
                try:
                    answer = await self._request(conn, address, {**op, "bulk": 1}, frames,
                                                 out, link)
                except _BulkLost:
                    answer = None
                if answer is not None and not (answer[0]["op"] == "error"
                                               and answer[0].get("bulk")):
                    return answer
                logger.warning("large values to and from %s go over CurveZMQ from now on:"
                               " the bulk channel failed", address)
                conn.drop_link()
                if self.conns.get(address) is not conn:
                    raise ConnectionError(f"connection to {address} closed")
        return await self._request(conn, address, op, frames, out)

    async def _request(self, conn: _Conn, address: str, op: dict, frames: Sequence = (),
                       out: Sequence = (), link: bulk.Session | None = None
                       ) -> tuple[dict, list, streams.Table | None]:
        """One request on ``conn`` (``link``: its streams go on that bulk session)."""
        if conn.failed is not None:  # refused while the bulk channel was being opened
            if self.conns.get(address) is conn:
                self.drop(address)
            raise conn.failed
        self._seq += 1
        op = {**op, "id": self._seq}
        fut = asyncio.get_running_loop().create_future()
        conn.pending[self._seq] = fut
        message = protocol.encode([op], frames)
        notice = protocol.announcement(message)
        async with conn.send_lock:
            try:
                if link is not None and out:
                    for sid, view in out:
                        for piece, slot in link.sealer.messages(sid, view, self.ring):
                            self.ring.sent(slot, await link.sock.send_multipart(
                                piece, copy=False, track=True))
                    out = ()
                for sid, view in out:
                    for piece in streams.messages(sid, view):
                        await conn.sock.send_multipart(piece, copy=False)
                if notice is not None:  # a large message is announced (zfabric/intake.py)
                    await conn.sock.send_multipart(notice)
                await conn.sock.send_multipart(message, copy=False)
            except BaseException:
                # cut off halfway (cancelled): the worker holds an unfinished stream of ours,
                # which the next one would be refused behind; start afresh
                conn.pending.pop(op["id"], None)
                if self.conns.get(address) is conn:
                    self.drop(address)
                raise
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.timeout_s)
        except TimeoutError:
            conn.pending.pop(op["id"], None)
            self.drop(address)
            raise CommTimeoutError(
                f"worker {address} did not answer {op['op']} within {self.timeout_s:g} s"
            ) from None

    def drop(self, address: str) -> None:
        conn = self.conns.pop(address, None)
        if conn is not None:
            conn.close()

    async def get(self, address: str, keys: list[str]) -> dict:
        """Values of ``keys`` held at ``address``; missing keys are absent from the result.

        On one host, values too large for a frame come in a second request that names
        segments of this process to write them into (see :mod:`zfabric.shm`).
        """
        local = self.use_shm and shm.is_local(address)
        answer = await self.request(address, {"op": "get-data", "keys": keys, "shm": local})
        out: dict = {}
        later = self._take(address, *answer, out)
        if later:
            into = lease_for(later, owner=address)
            try:
                answer = await self.request(address, {
                    "op": "get-data", "keys": [k for k, _ in later], "shm": False, "into": into})
                self._take(address, *answer, out)
            finally:
                cancel_leases(into)
        return out

    @staticmethod
    def _take(address: str, op: dict, buffers: list, table: streams.Table | None,
              out: dict) -> list:
        if op["op"] != "data":
            raise ConnectionError(f"worker {address}: {op.get('message', op['op'])}")
        later = []
        for key, header, bufs, raw, sizes in unpack_values(op["items"], buffers, address,
                                                           table):
            if sizes is not None:
                later.append((key, sizes))
            elif header is not None:
                out[key] = (serialize.RawArgs(header, bufs) if raw
                            else serialize.loads_value(header, bufs))
        return later

    async def put(self, address: str, items: list[tuple[str, bytes, list]], raw: bool = False):
        """Place values on a worker. ``raw``: keep them pickled there (task arguments).

        On one host, large values are written into segments the worker leases out first.
        """
        values = [(k, h, b, raw) for k, h, b in items]
        into = {}
        if self.use_shm and shm.is_local(address):
            big = [(k, [memoryview(x).nbytes for x in b]) for k, _, b, _ in values]
            big = [(k, s) for k, s in big if sum(s) >= SHM_THRESHOLD_BYTES]
            if big:
                into = await self._leases(address, big)
        if into:
            spec, frames, out = await asyncio.to_thread(pack_values, values, into=into,
                                                        stream=True)
        else:
            spec, frames, out = pack_values(values, stream=True)
        op, _, _ = await self.request(address, {"op": "put-data", "items": spec}, frames, out)
        if op["op"] != "reply" and into:
            # A lease that ran out before the data came: send it all over the socket.
            spec, frames, out = pack_values(values, stream=True)
            op, _, _ = await self.request(address, {"op": "put-data", "items": spec}, frames,
                                          out)
        if op["op"] != "reply":
            raise ConnectionError(f"worker {address} refused data: {op.get('message')}")

    async def _leases(self, address: str, keys_sizes: list) -> dict:
        op, _, _ = await self.request(address, {"op": "lease",
                                             "sizes": [sum(s) for _, s in keys_sizes]})
        descs = op.get("items") if op["op"] == "leases" else None
        if type(descs) is not list:
            return {}
        return {k: d for (k, _), d in zip(keys_sizes, descs, strict=False)
                if type(d) is list and len(d) == 6}

    def close(self) -> None:
        for address in list(self.conns):
            with contextlib.suppress(Exception):
                self.drop(address)


def dispatch(frames: list, handle, *, who: str, heard=None, lock=None) -> None:
    """Decode one message from the scheduler at the protocol's door and hand its ops to
    ``handle(op)`` one by one (under ``lock`` when given); ``heard()`` runs for every message,
    good or bad. A malformed message or an op that ``handle`` fails on is logged and skipped.
    """
    if heard is not None:
        heard()
    try:
        ops, _ = protocol.decode(frames)
    except RemoteProtocolError as exc:
        logger.warning("%s: malformed message from the scheduler: %s", who, exc)
        return
    with lock if lock is not None else contextlib.nullcontext():
        for op in ops:
            try:
                handle(op)
            except Exception:
                logger.exception("%s could not handle %r", who, op.get("op"))


async def read_ops(sock: zmq.asyncio.Socket, handle, *, who: str, heard=None, lock=None):
    """The one reader of an asyncio socket linked to the scheduler, forever (see
    :func:`dispatch`)."""
    while True:
        frames = await sock.recv_multipart()
        dispatch(frames, handle, who=who, heard=heard, lock=lock)
