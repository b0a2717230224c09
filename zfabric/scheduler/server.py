"""The scheduler's shell: one ROUTER, one thread, frames in and out of :class:`SchedulerState`.

Each turn of the loop drains the socket (non-blocking receives until empty, up to a bound),
hands every message to the state, lets time pass with ``tick``, then sends what the state
queued: one message per peer. A send to a full peer is kept in a per-peer backlog (with byte
accounting) and retried; a peer whose backlog passes ``PEER_BACKLOG_BYTES`` (it does not read)
is dropped as gone, with an error logged and an event, so one stuck peer cannot grow the
scheduler without bound; a send to a peer that has gone is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import zmq

try:
    import resource
except ImportError:  # not POSIX
    resource = None  # type: ignore[assignment]

from .. import _zmq, logs, protocol, zap
from ..config import Config, from_env
from ..dashboard import Dashboard, parse_address
from ..errors import RemoteProtocolError
from ..intake import Intake
from ..lifecycle import LifeCycle, call_from_thread
from ..security import SecurityError, as_security, role_of
from .outbox import encode_bounded
from .state import SchedulerState

logger = logging.getLogger(__name__)

# plain ints: enum arithmetic is slow
_EVENTS, _POLLIN, _RCVMORE = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.RCVMORE)
_NOBLOCK, _SRCFD = int(zmq.NOBLOCK), int(zmq.SRCFD)

#: Messages taken from the socket before the state's replies are sent.
DRAIN_MAX = 2000
#: ... or this many seconds of handling them, whichever comes first: a flood of large submit
#: messages must not hold back ticks, heartbeats and replies (peers would look silent, and
#: think the scheduler silent, for as long as one turn lasted).
TURN_MAX_S = 0.05
#: How often connections are checked for unfinished messages (zfabric/intake.py), at most.
INTAKE_CHECK_S = 0.05
#: The connection of a revoked key ends this long after it was told (so that it hears why).
REVOKED_GRACE_S = 0.5
#: Longest wait in poll, which is also how often ``tick`` runs at least.
TICK_MS = 50
#: Sockets a context may hold (pyzmq's default is 1,023): the scheduler's takes this many.
MAX_SOCKETS = 65536
#: Descriptors the scheduler keeps for itself (files, the dashboard, ZAP, monitors) beyond
#: one per peer connection.
SPARE_FDS = 64


def raise_limits(ctx: zmq.Context) -> int:
    """Raise this process's soft limit of open files to its hard limit (as ``dask
    scheduler`` does) and the context's MAX_SOCKETS, so that one connection per peer fits
    for thousands of peers. Returns how many peers fit (each takes one descriptor); logs
    a warning saying what to do when that is fewer than a thousand."""
    try:
        if ctx.get(zmq.MAX_SOCKETS) < MAX_SOCKETS:
            ctx.set(zmq.MAX_SOCKETS, MAX_SOCKETS)  # counts before the context's first socket
    except zmq.ZMQError as exc:
        logger.warning("could not raise the ZeroMQ context's MAX_SOCKETS: %s", exc)
    if resource is None:  # not POSIX
        return 1 << 20
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as exc:
            logger.warning("could not raise the open-file limit from %d to %d: %s", soft,
                           want, exc)
    fit = (1 << 20 if soft == resource.RLIM_INFINITY else soft) - SPARE_FDS
    if fit < 1000:
        logger.warning("this scheduler can hold about %d peers (workers, nannies and clients:"
                       " one open file each; the open-file limit is %d). Raise it for more,"
                       " with `ulimit -n` (soft) or in /etc/security/limits.conf (hard)",
                       fit, soft)
    return fit


class Scheduler(LifeCycle):
    """The broker: ``async with Scheduler() as s`` and point workers and clients at ``s.address``.

    ``host`` defaults to 127.0.0.1 and ``port`` to 0 (a free port). With ``host="0.0.0.0"`` it
    listens on every interface and gives out this host's own address.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, config: Config | None = None,
                 dashboard_address: str | int | None = "default", dashboard: bool = True,
                 security=None, **kwargs):
        if kwargs:
            raise TypeError(f"Scheduler got unexpected arguments: {', '.join(sorted(kwargs))}")
        self.host = host
        self.port = port
        self.config = config or from_env()
        self.security = as_security(security)
        if self.security is None and self.config.REQUIRE_ENCRYPTION:
            raise SecurityError("REQUIRE_ENCRYPTION is set but this scheduler has no keys:"
                                " pass security=Security(DIR) (`zfabric keygen DIR`)")
        self._keys: dict[bytes, bytes] = {}  # peer -> the public key it connected with
        if dashboard_address == "default":
            dashboard_address = self.config.DASHBOARD_ADDRESS or None
        #: ``(host, port)`` of the dashboard to start, or None (see :mod:`zfabric.dashboard`)
        # The dashboard is unauthenticated HTTP: with security on, an address that names no
        # interface (":8787") means loopback only
        self.dashboard_bind = (
            parse_address(dashboard_address, "127.0.0.1" if self.security else host)
            if dashboard and dashboard_address is not None else None)
        self.dashboard: Dashboard | None = None
        self.address = ""
        self.state = SchedulerState(config=self.config, versions=protocol.versions())
        self.state.key_of = lambda peer: self._keys.get(peer)  # read now: _keys is rebound
        self.state.secured = self.security is not None
        self.state.started = time.time()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._backlog: dict[bytes, deque[bytes]] = {}  # messages a full peer queue refused
        self._peer_bytes: dict[bytes, int] = {}
        self.backlog_bytes = 0
        #: the dashboard's publish(snapshot), once it serves
        self._publish: Callable[[dict], None] | None = None
        self._intake: Intake | None = None
        self.peers_fit = 1 << 20  # how many peer connections the open-file limit allows
        self._full_told = False
        self.state.observe.wall_offset = time.time() - time.monotonic()
        self.state.log_source = logs.recent
        logs.install()

    def __repr__(self) -> str:
        return f"<Scheduler {self.address or 'not started'} workers={len(self.state.workers)}>"

    @property
    def tasks(self) -> dict:
        """The keys the scheduler holds, as ``{key: TaskState}`` (read-only, live)."""
        return self.state.tasks

    @property
    def workers(self) -> dict:
        return {ws.address: ws for ws in list(self.state.workers.values())}

    @property
    def id(self) -> str:
        return self.state.epoch

    def identity(self) -> dict:
        return self.state.info()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        self._loop = loop

        def report(result):
            if not ready.done():
                if isinstance(result, BaseException):
                    ready.set_exception(result)
                else:
                    ready.set_result(result)

        self._thread = threading.Thread(
            target=self._main, args=(lambda r: call_from_thread(loop, report, r),),
            name="zfabric-scheduler", daemon=True,
        )
        self._thread.start()
        self.address = await ready
        self.state.address = self.address
        logger.info("scheduler at %s", self.address)
        if self.dashboard_bind is not None:
            # after the scheduler is ready; a failure to serve the page must not stop it
            host, port = self.dashboard_bind
            d = Dashboard(host, port, contact_host=self.address.rsplit(":", 1)[0][6:])
            try:
                d.start()
            except OSError as exc:
                logger.error("could not start the dashboard on %s:%d: %s", host, port, exc)
            else:
                self.dashboard = d
                self.state.dashboard_link = d.link
                self._publish = d.publish

    @property
    def dashboard_link(self) -> str | None:
        return self.dashboard.link if self.dashboard is not None else None

    async def _close(self) -> None:
        self._stop = True
        if self._thread is not None and self._thread.is_alive():
            await asyncio.to_thread(self._thread.join, 10)
        if self.dashboard is not None:
            await asyncio.to_thread(self.dashboard.close)

    def _main(self, report) -> None:
        self.peers_fit = raise_limits(zmq.Context.instance())
        try:
            sock, address = _zmq.router(
                zmq.Context.instance(), self.host, self.port, linger_ms=self.config.LINGER_MS,
                hwm=self.config.HWM_MESSAGES,
                sndhwm=min(self.config.HWM_MESSAGES, self.config.SEND_QUEUE_MESSAGES),
                max_frame_bytes=self.config.SCHEDULER_FRAME_BYTES, security=self.security,
                role="scheduler")
        except Exception as exc:
            report(exc)
            return
        self.state.address = address
        report(address)
        try:
            self._serve(sock)
        except Exception:
            logger.exception("scheduler loop crashed")
        finally:
            self._goodbye(sock)
            if self._intake is not None:
                self._intake.close()
            sock.close(linger=self.config.LINGER_MS)
            if self.security is not None:
                zap.release(zmq.Context.instance(), self.security)
            if self.status not in ("closing", "closed"):
                call_from_thread(self._loop, self._closed_from_inside)

    def _closed_from_inside(self) -> None:
        self._closing_task = asyncio.ensure_future(self.close())

    def _serve(self, sock: zmq.Socket) -> None:
        state = self.state
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        recv = sock.recv
        getsockopt: Callable[[int], int] = sock.getsockopt  # type: ignore[assignment]
        decode = protocol.decode
        intake = self._intake = self._make_intake(sock)
        next_intake = 0.0
        conn = None
        max_frames = self.config.MAX_FRAMES
        next_tick = next_publish = time.monotonic()
        obs = state.observe
        publish_s = self.config.DASHBOARD_INTERVAL_S
        secure = self.security is not None
        if self.security is not None:
            ring = zap.keyring(self.security)
            next_keys = 0.0
            seen_changes = ring.changes
        while not self._stop and not state.closing:
            if poller.poll(TICK_MS):
                now = start = time.monotonic()
                nin = bin_ = 0
                for i in range(DRAIN_MAX):
                    if i:
                        if not getsockopt(_EVENTS) & _POLLIN:
                            break  # asking is cheaper than an Again raised
                        if not i & 15:  # the clock every 16 messages is enough
                            now = time.monotonic()
                            if now - start > TURN_MAX_S:
                                break
                    try:
                        peer = recv(_NOBLOCK)
                    except zmq.Again:
                        break
                    # the first data frame as a Frame: it knows its connection and key
                    first = recv(_NOBLOCK, copy=False)
                    frames = [first.bytes]
                    while getsockopt(_RCVMORE):
                        frames.append(recv(_NOBLOCK))
                    if intake is not None:
                        conn = intake.received(first.get(_SRCFD), peer, frames)
                    role = None
                    if secure:
                        role = self._authenticated(peer, first, ring)
                        if role is None:
                            continue
                    errors: list = []
                    nin += 1
                    for f in frames:
                        bin_ += len(f)
                    try:
                        # a bad op is left out (and answered), not the good ops beside it
                        ops, _ = decode(frames, max_frames, errors)
                    except RemoteProtocolError as exc:
                        logger.warning("malformed message from %r: %s", peer, exc)
                        state.send(peer, {"op": "error", "message": f"malformed message: {exc}"})
                        continue
                    if len(ops) == 1 and ops[0]["op"] == "announce":
                        self._announced(peer, conn, ops[0])  # conn: None without an intake
                        continue
                    if errors:
                        text = "; ".join(str(e) for e in errors[:5])
                        logger.warning("malformed ops from %r: %s", peer, text)
                        state.send(peer, {"op": "error", "message": f"malformed message: {text}"})
                    self._answer_heartbeats(peer, ops)
                    try:
                        state.handle(peer, ops, now, role)
                    except Exception:  # a bug of ours: log it, keep serving everyone else
                        logger.exception("scheduler state failed on ops from %r", peer)
                        state.send(peer, {"op": "error", "message": "internal scheduler error"
                                          " (see the scheduler's log)"})
                obs.messages_in += nin
                obs.bytes_in += bin_
            now = time.monotonic()
            if secure and now >= next_keys:
                next_keys = now + self.config.HEARTBEAT_INTERVAL_S / 2
                ring.refresh()
                if ring.changes != seen_changes:  # (the ZAP handler may have reloaded it)
                    seen_changes = ring.changes
                    self._revoke(ring, now)
            if intake is not None and now >= next_intake:
                next_intake = now + INTAKE_CHECK_S
                self._check_intake(intake, now)
            if now >= next_tick:
                try:
                    state.tick(now)
                except Exception:
                    logger.exception("scheduler tick failed")
                if not self._full_told and \
                        len(state.workers) + len(state.nannies) + len(state.clients) - 2 \
                        >= self.peers_fit:
                    self._full_told = True
                    logger.error("%d peers: this scheduler's open-file limit allows no more"
                                 " connections; more workers cannot join. Raise the limit"
                                 " (`ulimit -n`, or the hard limit in"
                                 " /etc/security/limits.conf) and restart it", self.peers_fit)
                next_tick = now + TICK_MS / 1000
                if self._publish is not None and now >= next_publish:
                    next_publish = now + publish_s
                    try:
                        self._publish(obs.delta(state, now))
                    except Exception:
                        logger.exception("publishing a snapshot to the dashboard failed")
            gone = self._send(sock, state.flush())
            while gone:  # ends: each pass drops peers, and only sends to those left
                now = time.monotonic()
                for peer, why in gone.items():
                    state.peer_gone(peer, now, why)
                gone = self._send(sock, state.flush())

    def _authenticated(self, peer: bytes, first: zmq.Frame, ring) -> str | None:
        """The role of a message on a CURVE socket (``first``: its first data frame); None
        for a message whose key was revoked since its connection was accepted."""
        try:
            role, key = role_of(first)
        except zmq.ZMQError:
            return None
        if ring.keys.get(key) != role:
            logger.warning("dropping a message from %r: its key was revoked", peer)
            if self._intake is not None:
                self._intake.shut_peer_later(peer, time.monotonic() + REVOKED_GRACE_S)
            return None
        if peer not in self._keys:
            if len(self._keys) > 100_000:
                self._keys = {p: k for p, k in self._keys.items() if self._known(p)}
            self._keys[peer] = key
        return role

    def _make_intake(self, sock: zmq.Socket) -> Intake | None:
        limit = self.config.INCOMPLETE_MESSAGE_BYTES
        if limit <= 0:
            return None
        return Intake(sock, curve=self.security is not None, slack=limit,
                      frame_limit=self.config.SCHEDULER_FRAME_BYTES,
                      max_frames=self.config.MAX_FRAMES, name="scheduler")

    def _announced(self, peer: bytes, conn, op: dict) -> None:
        """An ``announce`` op: the peer's next message is this large (zfabric/intake.py)."""
        if conn is None or self._intake is None:
            return
        error = self._intake.announced(conn, op)
        if error is not None:
            logger.warning("peer %r: %s", peer, error)
            self.state.send(peer, {"op": "error", "message": f"refused announcement: {error}"})

    def _check_intake(self, intake: Intake, now: float) -> None:
        """End connections too far ahead of their complete messages (their peers are gone:
        see zfabric/intake.py), and those of revoked keys whose time came."""
        for conn, why in intake.review(now):
            peer = conn.peer
            self.state.event(f"connection from {conn.peer_address or '?'} shut down: {why}",
                              "connection-shut-down")
            if peer is not None and self._known(peer):
                self.state.peer_gone(peer, now, why)

    def _known(self, peer: bytes) -> bool:
        st = self.state
        return peer in st.workers or peer in st.clients or peer in st.nannies

    def _revoke(self, ring, now: float) -> None:
        """Keys were removed from the authorized set: end the sessions that used them."""
        for peer, key in list(self._keys.items()):
            if key in ring.keys:
                continue
            del self._keys[peer]
            if self._intake is not None:  # a ROUTER cannot close one connection itself
                self._intake.shut_peer_later(peer, now + REVOKED_GRACE_S)
            if self._known(peer):
                st = self.state
                if peer in st.clients:
                    st.send(peer, {"op": "error", "fatal": True,
                                   "message": "this client's key was revoked"})
                else:
                    st.send(peer, {"op": "close", "reason": "its key was revoked"})
                st.peer_gone(peer, now, "its key was revoked")

    def _answer_heartbeats(self, peer: bytes, ops: list) -> None:
        for op in ops:
            if op["op"] == "heartbeat":
                self.state.send(peer, {"op": "heartbeat"})
                return

    def _send(self, sock: zmq.Socket, out: dict) -> dict[bytes, str]:
        """Send each peer its ops; returns the peers to drop, with why: gone
        (``EHOSTUNREACH``) or not reading (more than ``PEER_BACKLOG_BYTES`` waiting)."""
        gone: dict[bytes, str] = {}
        if self._backlog:
            self._retry_backlog(sock, gone)
        limit = self.config.SEND_MESSAGE_BYTES
        obs = self.state.observe
        for peer, ops in out.items():
            if peer in gone:
                continue
            frame = protocol.encode(ops)[0]
            # ZeroMQ's queue counts messages: keep each about SEND_MESSAGE_BYTES, so that
            # SEND_QUEUE_MESSAGES of them bound its bytes too
            frames = ([frame] if len(frame) <= limit
                      else encode_bounded(ops, limit, lambda o: protocol.encode(o)[0]))
            for frame in frames:
                if peer in gone:
                    break
                obs.messages_out += 1
                obs.bytes_out += len(frame)
                if peer in self._backlog:
                    self._queue(peer, frame, gone)
                    continue
                try:
                    sock.send_multipart([peer, frame], zmq.NOBLOCK)
                except zmq.Again:
                    self._queue(peer, frame, gone)
                except zmq.ZMQError as exc:  # EHOSTUNREACH: the peer is gone
                    logger.debug("dropping %d ops for gone peer %r: %s", len(ops), peer, exc)
                    gone[peer] = "its connection is gone"
                    break
        return gone

    def _queue(self, peer: bytes, frame: bytes, gone: dict) -> None:
        """Keep a message the peer's full queue refused, in order, to retry next turn.

        Not for a peer that is no client, worker or nanny (one dropped already, or a stranger
        answered with an error or ``reregister``): nothing waits on those answers, and a
        peer that does not read must not make the scheduler keep them."""
        st = self.state
        if peer not in st.clients and peer not in st.workers and peer not in st.nannies:
            logger.debug("not keeping %d bytes for unregistered peer %r", len(frame), peer)
            return
        queue = self._backlog.get(peer)
        if queue is None:
            queue = self._backlog[peer] = deque()
            self._peer_bytes[peer] = 0
        queue.append(frame)
        self._peer_bytes[peer] += len(frame)
        self.backlog_bytes += len(frame)
        waiting = self._peer_bytes[peer]
        if waiting > self.config.PEER_BACKLOG_BYTES:
            logger.error("peer %r does not read its messages: %d bytes wait for it, more than"
                         " PEER_BACKLOG_BYTES (%d); dropping it", peer, waiting,
                         self.config.PEER_BACKLOG_BYTES)
            self._drop_backlog(peer)
            gone[peer] = (f"it did not read its messages ({waiting:,} bytes waited, more than"
                          " PEER_BACKLOG_BYTES)")

    def _drop_backlog(self, peer: bytes) -> None:
        self._backlog.pop(peer, None)
        self.backlog_bytes -= self._peer_bytes.pop(peer, 0)

    def _retry_backlog(self, sock: zmq.Socket, gone: dict) -> None:
        for peer in list(self._backlog):
            queue = self._backlog[peer]
            while queue:
                try:
                    sock.send_multipart([peer, queue[0]], zmq.NOBLOCK)
                except zmq.Again:
                    break
                except zmq.ZMQError:
                    self._drop_backlog(peer)
                    gone[peer] = "its connection is gone"
                    break
                n = len(queue.popleft())
                self._peer_bytes[peer] -= n
                self.backlog_bytes -= n
            else:
                self._drop_backlog(peer)

    def _goodbye(self, sock: zmq.Socket) -> None:
        """Tell everyone we are closing so they do not wait for heartbeats.

        After a shutdown request (``client.shutdown()``) workers and nannies close, as in
        dask.distributed; otherwise they keep trying to reach a scheduler at this address.
        """
        again = protocol.encode([{"op": "reregister", "reason": "scheduler closed",
                                  "closed": True}])[0]  # (not a restart: clients fail now)
        close = protocol.encode([{"op": "close", "reason": "scheduler shut down"}])[0]
        servers = [*self.state.workers, *self.state.nannies]
        for peer in [*servers, *self.state.clients]:
            frame = close if self.state.closing and peer in servers else again
            try:
                sock.send_multipart([peer, frame], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
