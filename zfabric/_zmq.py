"""Every ZeroMQ socket zfabric makes is built here, with its traps disarmed.

- ROUTERs set ``ROUTER_MANDATORY`` so a send to a gone or full peer raises instead of
  vanishing (the caller decides what to do).
- Every socket sets ``LINGER`` so closing never hangs on unsent messages.
- Every DEALER gets an explicit routing id, fresh for each process incarnation.
- Buffers and high-water marks are set deliberately (they count messages, not bytes).
"""

from __future__ import annotations

import logging
import os
import socket as _socket
import uuid

import psutil
import zmq

from . import zap
from .config import DEFAULT
from .errors import ZFabricError

logger = logging.getLogger(__name__)


def _loopback(host: str) -> bool:
    h = host.split("://", 1)[-1].rpartition(":")[0] if "://" in host else host
    h = h.strip("[]")
    return (host.startswith(("ipc://", "inproc://")) or h.startswith("127.")
            or h in ("localhost", "::1"))


def new_identity(role: str) -> bytes:
    """A routing id unique to this process incarnation (role prefix, pid, random part)."""
    return f"{role}-{os.getpid()}-{uuid.uuid4().hex[:12]}".encode()


def _common(sock: zmq.Socket, linger_ms: int, hwm: int, max_frame_bytes: int = -1) -> None:
    # Messages queued per peer before sends block (a ROUTER raises zmq.Again instead).
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    # A larger frame closes the connection before libzmq allocates it (a peer cannot make
    # us hold more than this per frame); -1 means no limit.
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)


#: Set in the environment of a Nanny's worker processes: the Nanny (or the cluster) that
#: started them said already that the cluster runs without security.
INSECURE_WARNED_VARIABLE = "ZFABRIC_INSECURE_WARNED"
_warned_insecure: set[str] = set()


def router(ctx: zmq.Context, host: str, port: int = 0, *, linger_ms: int = DEFAULT.LINGER_MS,
           hwm: int = DEFAULT.HWM_MESSAGES, sndhwm: int | None = None,
           max_frame_bytes: int = -1, security=None, role: str = ""):
    """A bound ROUTER and the ``tcp://host:port`` address others should connect to.

    ``sndhwm``: messages queued toward one peer (default ``hwm``). ``security``: a
    :class:`zfabric.security.Security` with encryption on makes it a CURVE server whose
    peers are checked by the ZAP authenticator (``role``: whose port it is)."""
    sock = ctx.socket(zmq.ROUTER)
    _common(sock, linger_ms, hwm, max_frame_bytes)
    if sndhwm is not None:
        sock.setsockopt(zmq.SNDHWM, sndhwm)
    if security is not None:
        security.server_socket(sock, role)
    elif not _loopback(host) and host not in _warned_insecure and \
            not os.environ.get(INSECURE_WARNED_VARIABLE):
        _warned_insecure.add(host)  # once per process and host; a Nanny's workers never
        logger.warning("listening on %s without security: anyone reaching it can run code"
                       " (zfabric keygen; --require-encryption)", host)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    if security is not None:
        zap.acquire(ctx, security)  # before any peer can connect; the owner releases it
    try:
        if host.startswith(("tcp://", "ipc://", "inproc://")):
            sock.bind(host)
        else:
            sock.bind(f"tcp://{_bracket(host)}:{port or '*'}")
    except zmq.ZMQError as exc:
        sock.close(0)
        if security is not None:
            zap.release(ctx, security)
        raise ZFabricError(
            f"cannot listen on {host}:{port}: {exc}. Choose another port (0 picks a free one)"
            " or host"
        ) from None
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    return sock, contact_address(endpoint)


def dealer(ctx: zmq.Context, address: str, identity: bytes | None = None, *,
           linger_ms: int = DEFAULT.LINGER_MS, hwm: int = DEFAULT.HWM_MESSAGES,
           max_frame_bytes: int = -1, security=None, role: str = "",
           server: str = "scheduler", monitor: str | None = None, reconnect: bool = True):
    """A DEALER connected to ``address`` (``reconnect`` False: once its connection ends or
    fails, it stays down). ``security``: a :class:`zfabric.security.Security`
    with encryption on makes it a CURVE client with ``role``'s key pair, expecting
    ``server``'s public key. ``monitor``: an inproc endpoint that reports the connection's
    events (set up before connecting, so that a failed handshake is seen)."""
    sock = ctx.socket(zmq.DEALER)
    _common(sock, linger_ms, hwm, max_frame_bytes)
    if security is not None:
        try:
            security.client_socket(sock, role, server, normalize_address(address))
        except Exception:
            sock.close(0)
            raise
    if monitor is not None:
        sock.monitor(monitor, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                     | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                     | zmq.EVENT_HANDSHAKE_SUCCEEDED)
    if identity:
        sock.setsockopt(zmq.ROUTING_ID, identity)
    sock.setsockopt(zmq.RECONNECT_IVL, 100 if reconnect else -1)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    try:
        sock.connect(normalize_address(address))
    except zmq.ZMQError as exc:
        sock.close(0)
        raise ZFabricError(
            f"cannot connect to {address!r}: {exc}. Expected tcp://HOST:PORT"
        ) from None
    return sock


def normalize_address(address: str) -> str:
    """Accept ``host:port`` and ``tcp://host:port``; return the ZeroMQ endpoint."""
    if not isinstance(address, str) or not address:
        raise ZFabricError(f"invalid address {address!r}; expected tcp://HOST:PORT")
    if "://" not in address:
        address = "tcp://" + address
    return address


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def contact_address(endpoint: str) -> str:
    """Turn a bound endpoint into one other hosts can reach (0.0.0.0 -> this host's address)."""
    if not endpoint.startswith("tcp://"):
        return endpoint
    hostport = endpoint[len("tcp://") :]
    host, _, port = hostport.rpartition(":")
    if host in ("0.0.0.0", "*", "[::]", "::"):
        host = host_address()
    return f"tcp://{host}:{port}"


def host_address() -> str:
    """This host's primary non-loopback IPv4 address (127.0.0.1 when it has none)."""
    try:
        with _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM) as s:
            s.connect(("10.254.254.254", 1))  # no packet is sent: this only picks a route
            ip = s.getsockname()[0]
            if not ip.startswith("127."):
                return ip
    except OSError:
        pass
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == _socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return "127.0.0.1"


def host_of(address: str) -> str:
    """The host part of ``tcp://host:port``."""
    return normalize_address(address).split("://", 1)[1].rpartition(":")[0].strip("[]")


def local_address_for(address: str) -> str:
    """The address of this host's interface that routes to ``address``'s host."""
    host = host_of(address)
    if host.startswith("127.") or host == "localhost":
        return "127.0.0.1"
    try:
        with _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM) as s:
            s.connect((host, 1))
            return s.getsockname()[0]
    except OSError:
        return host_address()
