"""The worker's side of the bulk channel (zfabric/bulk.py): its bulk port, the sessions of
the requesters on it, and its own sessions with the peers it fetches from.

Part of :class:`~zfabric.worker.data.DataPort` (a base class of it, for its size): run on
the worker's loop thread, which calls :meth:`BulkPort.drain_bulk` each turn once a bulk
socket exists. With security off, or ``BULK_CHANNEL`` off, or without ``cryptography``,
nothing here runs.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import zmq

from .. import _zmq, bulk, protocol, streams
from ..config import Config
from ..errors import RemoteProtocolError
from ..intake import Intake

logger = logging.getLogger("zfabric.worker.core")

_EVENTS, _POLLIN, _SRCFD = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.SRCFD)
#: How often data connections are checked for unfinished messages, at most.
INTAKE_CHECK_S = 0.05


def waiting(sock: zmq.Socket, copy: bool = True) -> Iterator[Any]:
    """Every message waiting on ``sock`` now, without blocking (between messages it asks
    ``EVENTS``, which is cheaper than the ``Again`` a last receive would raise)."""
    while True:
        try:
            yield sock.recv_multipart(zmq.NOBLOCK, copy=copy)
        except zmq.Again:
            return
        if not int(sock.getsockopt(_EVENTS)) & _POLLIN:
            return


class BulkPort:
    """The bulk channel's part of a worker's data port (see the module docstring)."""

    config: Config
    poller: Any
    keyring: Any
    on_fetched: Any

    def _handle(self, peer: bytes, ops: list, buffers: list, first: Any = None,
                settle: bool = True) -> None:
        raise NotImplementedError

    def _answers(self, addr: str, ops: list, buffers: list, table, expected) -> None:
        raise NotImplementedError

    def _reply_data(self, peer: bytes, ops: list, frames: Sequence = (),
                    out: Sequence = ()) -> None:
        raise NotImplementedError

    def _init_bulk(self, config: Config, security: Any) -> None:
        # the bulk channel (zfabric/bulk.py): with security on, large buffers go sealed on
        # a plain port of their own. As server: the port (bound on the first bulk-open),
        # its sessions by token and by data peer; as requester: a session per peer address
        self.bulk_on = bulk.enabled(config, security)
        self.bulk: Any = None
        self.bulk_host = ""
        self.bulk_intake: Any = None
        self.sessions: dict[bytes, bulk.Session] = {}
        self.session_of: dict[bytes, bulk.Session] = {}
        self.links: dict[str, bulk.Session | None] = {}  # None: the peer has no bulk port
        self.bulk_socks: dict[Any, str] = {}  # every bulk socket to drain -> its peer ("": ours)
        self.bulk_dropped = 0  # bulk messages refused (no session, from another connection)
        self.next_bulk = 0.0
        self.expected: Any = ()  # the fetch ids awaited (as the last drain_peer was told)
        self.ring = bulk.Ring()  # what pieces are sealed into (its buffers made when used)
        self.backlogged: set[bulk.Session] = set()  # sessions with pieces waiting to leave
        # sessions with streams or held ops, whose clocks run (and the intake's checks)
        self.busy: set[bulk.Session] = set()

    # ------------------------------------------------------------------ bulk channel

    def _open_session(self, peer: bytes, op: dict) -> dict:
        """A requester's ``bulk-open``: its session, and the answer naming the bulk port."""
        if not self.bulk_on or self.keyring is None:
            raise RemoteProtocolError("this worker has no bulk channel")
        why = bulk.check_secrets(op)
        if why is not None:
            raise RemoteProtocolError(why)
        if self.bulk is None:
            self._bind_bulk()
        old = self.session_of.pop(peer, None)
        if old is not None:
            self.sessions.pop(old.token, None)
        if len(self.sessions) >= 10_000:
            self.sessions.clear()  # (a forgotten requester's next bulk send fails; it falls back)
            self.session_of.clear()
        cfg = self.config
        session = bulk.Session(op, requester=False, idle_s=cfg.BULK_IDLE_S,
                               frame_limit=cfg.MAX_MESSAGE_BYTES, max_streams=cfg.MAX_FRAMES,
                               peer=peer)
        self.sessions[session.token] = self.session_of[peer] = session
        return {"op": "bulk-port", "id": op["id"],
                "port": int(self.bulk.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])}

    def _bind_bulk(self) -> None:
        """Bind the bulk port next to the data port (same interface, a free port)."""
        cfg = self.config
        sock: zmq.Socket = zmq.Context.instance().socket(zmq.ROUTER)
        # one message is one sealed piece: a larger frame ends its connection at once
        limit = streams.PIECE_BYTES + bulk.TAG_BYTES + 4096
        _zmq._common(sock, cfg.LINGER_MS, cfg.HWM_MESSAGES, limit)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        host = self.bulk_host
        try:
            sock.bind(host if "://" in host else f"tcp://{_zmq._bracket(host)}:*")
        except zmq.ZMQError:
            sock.close(0)
            raise
        self.bulk = sock
        self.bulk_socks[sock] = ""
        if cfg.INCOMPLETE_MESSAGE_BYTES > 0:
            self.bulk_intake = Intake(sock, curve=False, slack=limit + cfg.INCOMPLETE_MESSAGE_BYTES,
                                      frame_limit=limit, max_frames=2, name="bulk port")
        if self.poller is not None:
            self.poller.register(sock, zmq.POLLIN)

    def _send_bulk(self, peer: bytes, out: Sequence) -> bool:
        """Send the streams ``out`` to data peer ``peer`` on its bulk session; False (nothing
        sent) when it has none ready, or its connection is gone."""
        session = self.session_of.get(peer)
        if session is None or not session.ready:
            return False
        sock, route, ring = self.bulk, session.route, self.ring
        first = True
        for sid, view in out:
            for piece, slot in session.sealer.messages(sid, view, ring):
                if session.backlog:  # (its buffer goes back to the ring: a copy waits)
                    session.backlog.append([piece[0], bytes(piece[1])])
                    continue
                try:
                    ring.sent(slot, sock.send_multipart([route, *piece], zmq.NOBLOCK,
                                                        copy=False, track=True))
                except zmq.Again:
                    session.backlog = deque([[piece[0], bytes(piece[1])]])
                    self.backlogged.add(session)
                except zmq.ZMQError:  # its connection ended
                    session.ready = False
                    # nothing sent: over CurveZMQ instead; else the requester's wait for the
                    # rest fails, and it asks again
                    return not first
                first = False
        return True

    def drain_bulk(self, events: dict) -> None:
        """What the worker's loop calls each turn while there are bulk sockets: read the
        ready ones, retry queued pieces, and now and then end what waited too long."""
        socks = self.bulk_socks
        for sock in [s for s in events if s in socks]:
            addr = socks.get(sock)
            if addr:
                self._drain_link(addr, sock)
            elif addr is not None:
                self._drain_bulk_port(sock)
        if self.backlogged:
            for session in list(self.backlogged):
                self._retry_bulk(session)
        now = time.monotonic()
        if now >= self.next_bulk:
            self.next_bulk = now + INTAKE_CHECK_S
            self._expire_bulk(now)

    def _retry_bulk(self, session: bulk.Session) -> None:
        queue = session.backlog
        while queue:
            try:
                self.bulk.send_multipart([session.route, *queue[0]], zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            except zmq.ZMQError:
                queue.clear()
                session.ready = False
                break
            queue.popleft()
        self.backlogged.discard(session)

    def _drain_bulk_port(self, sock: zmq.Socket) -> None:
        """Pieces and hellos from requesters on our bulk port (see zfabric/bulk.py)."""
        intake = self.bulk_intake
        for frames in waiting(sock, copy=False):
            route = frames[0].bytes
            if intake is not None and len(frames) > 1:
                intake.received(frames[1].get(_SRCFD), route, frames[1:])
            try:
                ops, buffers = protocol.decode([frames[1].bytes, *frames[2:]], 2)
            except (RemoteProtocolError, IndexError):
                self.bulk_dropped += 1
                continue
            op = ops[0] if len(ops) == 1 else {"op": None}
            token = op.get("t")
            session = self.sessions.get(token) if type(token) is bytes else None
            if session is None or session.route != route:
                self.bulk_dropped += 1  # no session of this connection: never answered
                continue
            if op["op"] == "piece":
                self.busy.add(session)
                try:
                    whole = session.inbound.piece(op, buffers)
                except Exception:  # (MemoryError, ...): the loop serves others
                    logger.exception("bulk port: a piece could not be taken")
                    session.inbound.dropped += 1
                    continue
                if whole is not None and session.waiting:
                    for held, held_buffers in session.waiting.ready(session.inbound):
                        self._handle(session.peer, [held], held_buffers, settle=False)
            elif op["op"] == "bulk-hello":
                try:
                    sock.send_multipart([route, *bulk.READY], zmq.NOBLOCK)
                except zmq.ZMQError:
                    continue
                session.ready = True
            else:
                self.bulk_dropped += 1

    def _expire_bulk(self, now: float) -> None:
        idle_s = self.config.BULK_IDLE_S
        for session in list(self.busy):
            if session.requester:  # our session with peer ``session.peer`` (an address)
                addr = session.peer
                for op, _ in session.waiting.expired(session.inbound, now):
                    logger.warning("worker %s: pieces of a fetch stopped coming on the bulk"
                                   " channel for %g s; fetching over CurveZMQ from now on",
                                   addr, idle_s)
                    if self.links.get(addr) is session:
                        self._drop_link(addr)
                    if op.get("id") in self.expected:
                        self.on_fetched(op["id"], None)
            else:
                for op, _ in session.waiting.expired(session.inbound, now):
                    self._reply_data(session.peer, [{
                        "op": "error", "id": op.get("id"), "bulk": 1, "message":
                        f"{op['op']}: its pieces stopped coming on the bulk channel for"
                        f" {idle_s:g} s (BULK_IDLE_S)"}])
            session.inbound.expire(now, idle_s)
            if not session.waiting and not session.inbound.streams:
                self.busy.discard(session)
        if self.bulk_intake is not None:
            self.bulk_intake.review(now)

    # (as requester)

    def _open_link(self, addr: str, sock: zmq.Socket) -> None:
        """Ask peer ``addr`` for a bulk session (over ``sock``, its CurveZMQ connection)."""
        secrets = bulk.new_secrets()
        cfg = self.config
        self.links[addr] = bulk.Session(secrets, requester=True, idle_s=cfg.BULK_IDLE_S,
                                        frame_limit=cfg.MAX_MESSAGE_BYTES,
                                        max_streams=cfg.MAX_FRAMES, peer=addr)
        sock.send_multipart(protocol.encode([{"op": "bulk-open", "id": 0, **secrets}]))

    def _link_port(self, addr: str, op: dict) -> None:
        """Peer ``addr`` told its bulk port: connect to it and say hello."""
        link = self.links.get(addr)
        if link is None or link.sock is not None:
            return
        cfg = self.config
        sock: zmq.Socket = zmq.Context.instance().socket(zmq.DEALER)
        _zmq._common(sock, cfg.LINGER_MS, cfg.HWM_MESSAGES,
                          streams.PIECE_BYTES + bulk.TAG_BYTES + 4096)
        sock.setsockopt(zmq.ROUTING_ID, link.route)
        host = _zmq.normalize_address(addr).rsplit(":", 1)[0]
        try:
            sock.connect(f"{host}:{op['port']}")
        except zmq.ZMQError as exc:
            sock.close(0)
            logger.warning("worker %s: cannot reach its bulk port: %s", addr, exc)
            self.links[addr] = None
            return
        link.sock = sock
        self.bulk_socks[sock] = addr
        if self.poller is not None:
            self.poller.register(sock, zmq.POLLIN)
        sock.send_multipart(bulk.hello(link.token))

    def _drain_link(self, addr: str, sock: zmq.Socket) -> None:
        """Pieces (and the ready) from peer ``addr``'s bulk port."""
        link = self.links.get(addr)
        for frames in waiting(sock, copy=False):
            try:
                ops, buffers = protocol.decode([frames[0].bytes, *frames[1:]], 2)
            except RemoteProtocolError:
                self.bulk_dropped += 1
                continue
            if link is None:
                continue
            op = ops[0] if len(ops) == 1 else {"op": None}
            if op["op"] == "piece":
                self.busy.add(link)
                try:
                    whole = link.inbound.piece(op, buffers)
                except Exception:  # (MemoryError, ...): the loop serves others
                    logger.exception("worker %s: a piece could not be taken", addr)
                    link.inbound.dropped += 1
                    continue
                if whole is not None and link.waiting:
                    for held, held_buffers in link.waiting.ready(link.inbound):
                        self._answers(addr, [held], held_buffers, None, self.expected)
            elif op["op"] == "bulk-ready":
                link.ready = True
            else:
                self.bulk_dropped += 1

    def _drop_link(self, addr: str) -> None:
        link = self.links.get(addr)
        self.links[addr] = None  # from now on over CurveZMQ
        if link is not None and link.sock is not None:
            if self.poller is not None:
                self.poller.unregister(link.sock)
            self.bulk_socks.pop(link.sock, None)
            link.sock.close(0)

