"""The worker's data plane: serving stored values to peers and clients, fetching dependencies.

:class:`DataPort` is a part of the worker's shell (:class:`~zfabric.worker.core.WorkerLoop`),
run on its loop thread:

- the ROUTER (data port) answers ``get-data`` (values as frames, or written into the asker's
  shared-memory segments on one host), ``put-data`` (values placed here by clients) and
  ``lease`` (segments of this process for a client on this host to write into);
- one DEALER per peer fetches dependencies with ``get-data`` (on one host in two requests: the
  second names segments for the large values; see :mod:`zfabric.shm`). *Which* keys to fetch
  from whom, when, in what batches, and what a fetch's end means are decided by the worker's
  state (:class:`~zfabric.worker.state.WorkerCore`): this module sends what it is told and
  reports each answer back through the loop.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from .. import _zmq, protocol, serialize, shm, streams, zap
from ..config import Config
from ..errors import RemoteProtocolError
from ..intake import Intake
from ..security import role_of
from ..transfer import cancel_leases, lease_for, pack_values, unpack_values
from .bulkport import INTAKE_CHECK_S, BulkPort, waiting
from .state import FETCH_BATCH_KEYS, FETCHES_PER_PEER, FETCHES_TOTAL

logger = logging.getLogger("zfabric.worker.core")

__all__ = ["FETCHES_PER_PEER", "FETCHES_TOTAL", "FETCH_BATCH_KEYS", "DataPort", "waiting"]

# plain ints: enum arithmetic is slow
_EVENTS, _POLLIN, _SRCFD = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.SRCFD)
#: A revoked key's data connection ends this long after it was told (so that it hears why).
REVOKED_GRACE_S = 0.5


class DataPort(BulkPort):
    """The data port and the fetch sockets of one worker (see the module docstring).

    ``values`` is the worker's store, ``serialized`` the pickles it keeps of them and
    ``raw_keys`` the values kept pickled (task arguments); ``on_placed(items)``,
    ``on_fetched(fid, items or None)`` and ``on_refused(address)`` take what peers sent to the
    worker's state."""

    def __init__(self, *, config: Config, values: Any, serialized: dict, raw_keys: set,
                 security: Any, use_shm: bool, on_placed: Callable[[list], None],
                 on_fetched: Callable[[int, list | None], None],
                 on_refused: Callable[[str], None]):
        self.config = config
        self.store = values
        self.serialized = serialized
        self.raw_keys = raw_keys
        self.security = security
        self.use_shm = use_shm
        self.on_placed = on_placed
        self.on_fetched = on_fetched
        self.on_refused = on_refused
        self.data: Any = None  # the ROUTER, bound by bind()
        self.poller: Any = None
        self.actors: Any = None
        self.keyring: Any = None
        self.intake: Any = None  # the data port's guard against unfinished messages
        self.next_intake = 0.0
        self.data_keys: dict[bytes, bytes] = {}  # data peer -> the key it connected with
        self.peers: dict[str, zmq.Socket] = {}  # fetch sockets by peer address
        self.leases: dict[int, dict] = {}  # fetch id -> shared-memory leases by key
        # answers a data peer's full queue refused, by peer, and their bytes
        self.data_backlog: dict[bytes, deque[tuple[list, int]]] = {}
        self.data_backlog_bytes: dict[bytes, int] = {}
        # direct replies (zfabric/replies.py): a client's token -> its data connection
        self.reply_peers: dict[str, bytes] = {}
        # large buffers arriving in pieces (zfabric/streams.py): from data peers, and on the
        # fetch sockets by peer address
        self.tables: dict[bytes, streams.Table] = {}
        self.peer_tables: dict[str, streams.Table] = {}
        self._init_bulk(config, security)

    def bind(self, ctx: zmq.Context, host: str, name: str | None) -> str:
        """Bind the data port on ``host`` (a free port); returns its address."""
        cfg = self.config
        self.bulk_host = host
        self.data, bound = _zmq.router(
            ctx, host, 0, linger_ms=cfg.LINGER_MS, hwm=cfg.HWM_MESSAGES,
            sndhwm=min(cfg.HWM_MESSAGES, cfg.SEND_QUEUE_MESSAGES),
            max_frame_bytes=cfg.MAX_MESSAGE_BYTES, security=self.security, role="worker")
        if self.security is not None:
            self.keyring = zap.keyring(self.security)
        if cfg.INCOMPLETE_MESSAGE_BYTES > 0:
            self.intake = Intake(self.data, curve=self.security is not None,
                                 slack=cfg.INCOMPLETE_MESSAGE_BYTES,
                                 frame_limit=cfg.MAX_MESSAGE_BYTES, max_frames=cfg.MAX_FRAMES,
                                 name=f"worker {name or bound}")
        return bound

    def close(self) -> None:
        if self.intake is not None:
            self.intake.close()
        if self.bulk_intake is not None:
            self.bulk_intake.close()
        for s in (self.data, *self.peers.values(), *self.bulk_socks):
            if s is not None:
                s.close(linger=self.config.LINGER_MS)
        self.bulk_socks.clear()
        self.sessions.clear()
        self.session_of.clear()
        self.links.clear()
        for into in self.leases.values():
            cancel_leases(into)
        self.leases.clear()
        self.tables.clear()
        self.peer_tables.clear()

    def drain(self) -> None:
        ring = self.keyring
        intake = self.intake
        conn = None
        for frames in waiting(self.data, copy=False):
            peer = frames[0].bytes
            if intake is not None:
                conn = intake.received(frames[1].get(_SRCFD), peer, frames[1:])
            if ring is not None and not self._data_peer_allowed(peer, frames, ring):
                continue
            try:
                ops, buffers = protocol.decode([frames[1].bytes, *frames[2:]],
                                               self.config.MAX_FRAMES)
            except (RemoteProtocolError, IndexError) as exc:
                self._reply_data(peer, [{"op": "error", "message": str(exc)}])
                continue
            if len(ops) == 1 and ops[0]["op"] == "piece":
                self._piece(peer, ops[0], buffers)
                continue
            if len(ops) == 1 and ops[0]["op"] == "announce":
                error = intake.announced(conn, ops[0]) if conn is not None else None
                if error is not None:
                    self._reply_data(peer, [{"op": "error", "message": error}])
                continue
            self._handle(peer, ops, buffers, frames[1])

    def _handle(self, peer: bytes, ops: list, buffers: list, first: Any = None,
                settle: bool = True) -> None:
        """The ops of one message from data peer ``peer`` (``first``: its first frame;
        ``settle`` False: an op held for its bulk streams, whose connection's own streams
        belong to messages not read yet)."""
        srcfd = None
        for op in ops:
            try:
                if op["op"] == "get-data" and op.get("into") and srcfd is None \
                        and first is not None:
                    srcfd = first.get(zmq.SRCFD)
                self._on_data_op(peer, op, buffers, srcfd)
            except Exception as exc:
                self._reply_data(peer, [{"op": "error", "message": f"{op['op']}: {exc}",
                                         "id": op.get("id")}])
        table = self.tables.get(peer) if settle else None
        if table is not None:
            table.settle()  # what the op did not claim is dropped
            if not table:
                del self.tables[peer]

    def _piece(self, peer: bytes, op: dict, buffers: list) -> None:
        """A piece of a large buffer from data peer ``peer``, copied into place."""
        table = self.tables.get(peer)
        if table is None:
            if len(self.tables) >= 10_000:
                self.tables.clear()  # (a piece of a stream forgotten so is refused, loudly)
            table = self.tables[peer] = streams.Table(self.config.MAX_MESSAGE_BYTES,
                                                      self.config.MAX_FRAMES)
        try:
            table.piece(op, buffers)
        except RemoteProtocolError as exc:
            self.tables.pop(peer, None)
            self._reply_data(peer, [{"op": "error", "message": str(exc)}])

    def check_intake(self, now: float) -> None:
        """Every ``INTAKE_CHECK_S``: end connections too far ahead of their complete
        messages (zfabric/intake.py), and those of revoked keys whose time came."""
        if now < self.next_intake:
            return
        self.next_intake = now + INTAKE_CHECK_S
        for tables in (self.tables, self.peer_tables):
            for table in tables.values():
                table.expire(now)
        for conn, _ in self.intake.review(now):
            if conn.peer is not None:
                self.data_backlog.pop(conn.peer, None)
                self.data_backlog_bytes.pop(conn.peer, None)

    def _data_peer_allowed(self, peer: bytes, frames: list, ring) -> bool:
        """With security on: workers and clients may ask for data; a revoked key may not
        (its connection ends, after it was told why)."""
        try:
            role, key = role_of(frames[1] if len(frames) > 1 else frames[0])
        except zmq.ZMQError:
            return False
        if role in ("worker", "client", "admin") and ring.keys.get(key) == role:
            if peer not in self.data_keys:
                if len(self.data_keys) > 100_000:
                    self.data_keys.clear()  # forgotten ones are noted again on their next message
                self.data_keys[peer] = key
            return True
        # no request id: it answers every request of the connection ("refused")
        self._reply_data(peer, [{"op": "error", "refused": True, "message": f"a {role} key"
                                 " may not use this worker's data port, or it was revoked"}])
        if self.intake is not None:
            self.intake.shut_peer_later(peer, time.monotonic() + REVOKED_GRACE_S)
        return False

    def revoke_peers(self, now: float) -> None:
        """The authorized keys changed: end the data connections of keys no longer in it."""
        ring = self.keyring
        for peer, key in list(self.data_keys.items()):
            if key not in ring.keys:
                del self.data_keys[peer]
                session = self.session_of.pop(peer, None)
                if session is not None:  # its bulk session ends with it
                    self.sessions.pop(session.token, None)
                if self.intake is not None:
                    self.intake.shut_peer_later(peer, now)

    def _on_data_op(self, peer: bytes, op: dict, buffers: list, srcfd: int | None) -> None:
        match op["op"]:
            case "get-data":
                values: list[tuple] = []
                for key in op["keys"]:
                    ser = self.store.pickled(key)  # (pickled now if kept unpickled)
                    if ser is None:
                        values.append((key, None, [], False))
                    else:
                        values.append((key, ser[0], ser[1], key in self.raw_keys))
                into = op.get("into") if self.use_shm else None
                # the segments named must belong to the process that asked (srcfd's peer)
                items, frames, out = pack_values(
                    values, ask=bool(op.get("shm")) and self.use_shm,
                    into=into if type(into) is dict else None, srcfd=srcfd, stream=True)
                reply = {"op": "data", "id": op["id"], "items": items}
                if out and op.get("bulk") and self._send_bulk(peer, out):
                    reply["bulk"], out = 1, []
                self._reply_data(peer, [reply], frames, out)
            case "lease":
                pool = shm.pool() if self.use_shm else None
                limit = self.config.MAX_MESSAGE_BYTES
                descs = [pool.lease(n, owner=peer) if pool and type(n) is int and 0 < n <= limit
                         else None for n in op["sizes"]]
                self._reply_data(peer, [{"op": "leases", "id": op["id"], "items": descs}])
            case "put-data":
                table: streams.Table | None = self.tables.get(peer)
                if op.get("bulk"):  # its streams come on the bulk channel
                    session = self.session_of.get(peer)
                    if session is None:  # (forgotten) the requester sends it again without
                        self._reply_data(peer, [{"op": "error", "id": op["id"], "bulk": 1,
                                                 "message": "put-data: no bulk session"}])
                        return
                    if session.waiting.hold_unless_whole(session.inbound, op, (op, buffers),
                                                         time.monotonic()):
                        self.busy.add(session)
                        return
                    table = session.inbound
                raw_op = bool(op.get("raw"))
                self.on_placed([(key, header, bufs, raw or raw_op) for key, header, bufs, raw, _
                                in unpack_values(op["items"], buffers, peer, table)
                                if header is not None and bufs is not None])
                self._reply_data(peer, [{"op": "reply", "id": op["id"], "result": True}])
            case "actor-call":
                self.actors.call(peer, op)
            case "actor-ping":  # a caller waiting long: is the actor still here?
                self._reply_data(peer, [{"op": "actor-result", "id": op["id"],
                                         "alive": self.actors.holds(op["key"],
                                                                    op.get("worker"))}])
            case "reply-to":  # send the small results of tasks that carry this token here
                token = op["token"]
                if not 0 < len(token) <= protocol.MAX_REPLY_TOKEN:
                    raise RemoteProtocolError("reply-to: the token must have 1 to"
                                              f" {protocol.MAX_REPLY_TOKEN} characters")
                if len(self.reply_peers) >= 10_000:
                    self.reply_peers.clear()  # gone clients' tokens: theirs say it again
                # the first connection to name a token keeps it (another naming it too would
                # only take the direct path from its owner; a gone owner's is forgotten when
                # a send to it fails)
                self.reply_peers.setdefault(token, peer)
            case "bulk-open":
                self._reply_data(peer, [self._open_session(peer, op)])
            case "heartbeat":
                pass
            case other:
                raise RemoteProtocolError(f"unexpected {other!r} on the data port")

    def send_results(self, peer: bytes, items: list) -> None:
        """Small results straight to the client on ``peer`` (``[key, pickle, nbytes]``). Only
        a shortcut (the scheduler tells the client as well): what the client's full queue
        refuses is dropped, and the token of a client gone is forgotten."""
        if peer in self.data_backlog:
            return
        try:
            self.data.send_multipart([peer, *protocol.encode([{"op": "results",
                                                                "items": items}])], zmq.NOBLOCK)
        except zmq.Again:
            pass
        except zmq.ZMQError:
            for token in [t for t, p in self.reply_peers.items() if p == peer]:
                del self.reply_peers[token]

    def send_actor_replies(self) -> None:
        replies = self.actors.replies
        while replies:
            peer, op, frames = replies.popleft()
            self._reply_data(peer, [op], frames)

    def _reply_data(self, peer: bytes, ops: list, frames: Sequence = (),
                    out: Sequence = ()) -> None:
        """Answer a data peer without ever blocking the loop: what its full queue refuses
        waits in a backlog of its own, retried each turn, within ``PEER_BACKLOG_BYTES``
        (the pieces of the streams ``out``, sent first, are views of values held here: only
        their heads count)."""
        for sid, view in out:
            for piece in streams.messages(sid, view):
                if not self._send_data(peer, [peer, *piece], len(piece[0])):
                    return
        self._send_data(peer, [peer, *protocol.encode(ops, frames)])

    def _send_data(self, peer: bytes, message: list, size: int | None = None) -> bool:
        """Send or queue one message to a data peer; False if the peer is gone."""
        if peer in self.data_backlog:
            return self._queue_reply(peer, message, size)
        try:
            self.data.send_multipart(message, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return self._queue_reply(peer, message, size)
        except zmq.ZMQError as exc:
            logger.info("could not answer a data peer: %s", exc)
            return False
        return True

    def _queue_reply(self, peer: bytes, message: list, size: int | None = None) -> bool:
        queue = self.data_backlog.get(peer)
        if queue is None:
            queue = self.data_backlog[peer] = deque()
            self.data_backlog_bytes[peer] = 0
        if size is None:
            size = sum(memoryview(f).nbytes for f in message)
        queue.append((message, size))
        total = self.data_backlog_bytes[peer] = self.data_backlog_bytes[peer] + size
        if total > self.config.PEER_BACKLOG_BYTES:
            logger.warning("data peer %r does not read its answers: %d bytes wait for it, more"
                           " than PEER_BACKLOG_BYTES; dropping them", peer[:64], total)
            self.data_backlog.pop(peer, None)
            self.data_backlog_bytes.pop(peer, None)
            return False
        return True

    def retry_replies(self) -> None:
        for peer in list(self.data_backlog):
            queue = self.data_backlog[peer]
            while queue:
                try:
                    self.data.send_multipart(queue[0][0], zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                except zmq.ZMQError:  # gone: nobody to answer
                    queue.clear()
                    break
                self.data_backlog_bytes[peer] -= queue.popleft()[1]
            if not queue:
                del self.data_backlog[peer]
                del self.data_backlog_bytes[peer]


    # ------------------------------------------------------------------ fetches

    def fetch(self, fid: int, addr: str, keys: list[str], sizes: list | None,
              guess: list | None = None) -> None:
        """Send fetch ``fid`` (``sizes``: ask again for values too large for a frame, naming
        segments of this process to write them into; ``guess``: sizes guessed for a first
        request, whose segments are named at once where the peer shares this host)."""
        sock = self.peers.get(addr)
        if sock is None:
            sock = _zmq.dealer(zmq.Context.instance(), addr,
                               max_frame_bytes=self.config.MAX_MESSAGE_BYTES,
                               security=self.security, role="worker", server="worker")
            self.peers[addr] = sock
            self.poller.register(sock, zmq.POLLIN)
            if self.bulk_on and addr not in self.links:
                self._open_link(addr, sock)
        op: dict[str, Any] = {"op": "get-data", "id": fid, "keys": keys}
        if self.links:
            link = self.links.get(addr)
            if link is not None and link.ready:
                op["bulk"] = 1
        if sizes is None:
            op["shm"] = local = self.use_shm and shm.is_local(addr)
            into = lease_for(guess, owner=addr) if guess and local else None
            if into:  # the peer writes what fits; a larger value is announced by its sizes
                self.leases[fid] = into
                op["into"] = into
        else:
            op["shm"] = False
            into = lease_for(sizes, owner=addr)
            if into:
                self.leases[fid] = into
                op["into"] = into
        sock.send_multipart(protocol.encode([op]))

    def end_fetch(self, fid: int) -> None:
        into = self.leases.pop(fid, None)
        if into:
            cancel_leases(into)

    def drain_peer(self, addr: str, sock: zmq.Socket, expected) -> None:
        """Answers from peer ``addr``; ``expected`` holds the fetch ids still awaited."""
        table = self.peer_tables.get(addr)
        self.expected = expected
        for frames in waiting(sock, copy=False):
            try:
                ops, buffers = protocol.decode([frames[0].bytes, *frames[1:]])
                if len(ops) == 1 and ops[0]["op"] == "announce":
                    continue  # (for servers' guards)
                if len(ops) == 1 and ops[0]["op"] == "piece":
                    if table is None:
                        table = self.peer_tables[addr] = streams.Table(
                            self.config.MAX_MESSAGE_BYTES, self.config.MAX_FRAMES)
                    table.piece(ops[0], buffers)
                    continue
            except RemoteProtocolError as exc:
                logger.warning("bad data message from %s: %s", addr, exc)
                continue
            self._answers(addr, ops, buffers, table, expected)
            if table is not None:
                table.settle()  # what the answer did not claim is dropped

    def _answers(self, addr: str, ops: list, buffers: list, table, expected) -> None:
        """The ops of one answer from peer ``addr`` (``table``: its streams)."""
        for op in ops:
            fid = op.get("id")
            if op["op"] == "error" and fid is None:  # the whole connection
                logger.warning("data port %s: %s", addr, protocol.short(op["message"], 300))
                self.on_refused(addr)
                continue
            if op["op"] == "bulk-port":
                self._link_port(addr, op)
                continue
            if type(fid) is not int or fid not in expected:
                continue
            if op["op"] != "data":
                self.on_fetched(fid, None)
                continue
            source = table
            if op.get("bulk"):  # its streams come on the bulk channel
                link = self.links.get(addr)
                if link is None:
                    self.on_fetched(fid, None)
                    continue
                if link.waiting.hold_unless_whole(link.inbound, op, (op, buffers),
                                                  time.monotonic()):
                    self.busy.add(link)
                    continue
                source = link.inbound
            items = []
            try:
                for key, header, bufs, raw, sizes in unpack_values(op["items"], buffers, addr,
                                                                   source):
                    nbytes = (serialize.nbytes(header, bufs)
                              if header is not None and bufs is not None else 0)
                    items.append((key, header, bufs, raw, sizes, nbytes))
            except RemoteProtocolError as exc:
                logger.warning("bad values from %s: %s", addr, exc)
                self.on_fetched(fid, None)
                continue
            self.on_fetched(fid, items)
