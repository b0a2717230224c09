"""The ZAP handler (ZeroMQ's authentication protocol, RFC 27) and the authorized-key sets.

libzmq asks ``inproc://zeromq.zap.01`` of a server socket's context about every new CURVE
connection, before any of its messages is read. One :class:`_Handler` thread per context
answers, shared by every server in the process (each names its cluster by ZAP domain); it is
started by the first server that needs it and stopped with the last (:func:`acquire`,
:func:`release`), so that a closed cluster leaves no thread or socket behind.

The handler accepts a key listed in its cluster's :class:`Keyring` and answers with the user id
``"ROLE Z85KEY"``, which ZeroMQ attaches to every message of the connection.
"""

from __future__ import annotations

import logging
import threading

import zmq
from zmq.utils import z85

from .security import ZAP_ENDPOINT, Security

logger = logging.getLogger(__name__)


class Keyring:
    """The keys that may connect to one cluster, read again when their directory changes."""

    def __init__(self, security: Security):
        self.security = security
        self.version = object()
        self.keys: dict[bytes, str] = {}
        #: How many times the set changed. One Keyring serves every server of a process and
        #: its ZAP handler, so each server compares this with the count it last acted on:
        #: whoever reloads first, every one of them sees the change.
        self.changes = 0
        self.refresh()

    def refresh(self) -> bool:
        """Reload the set if it may have changed; whether it did (in this call)."""
        version = self.security.authorized_version()
        if version == self.version:
            return False
        self.version = version
        keys = self.security.authorized()
        changed = keys != self.keys
        self.keys = dict(keys)
        if changed:
            self.changes += 1
            logger.info("authorized keys: %d (%s)", len(keys),
                        ", ".join(sorted(set(keys.values()))) or "none")
        return changed

    def role(self, key: bytes) -> str | None:
        return self.keys.get(key)


def keyring(security: Security) -> Keyring:
    """The one Keyring of ``security`` (made on first use)."""
    ring = security.__dict__.get("_keyring")
    if ring is None:
        ring = security.__dict__["_keyring"] = Keyring(security)
    return ring


class _Handler(threading.Thread):
    def __init__(self, ctx: zmq.Context):
        super().__init__(name="zfabric-zap", daemon=True)
        self.ctx = ctx
        self.domains: dict[bytes, list] = {}  # domain -> [Keyring, users]
        self.lock = threading.Lock()
        self.stopping = False
        self.sock = ctx.socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(ZAP_ENDPOINT)

    def run(self) -> None:
        try:
            while not self.stopping:
                if not self.sock.poll(100):
                    continue
                try:
                    request = self.sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    continue
                try:
                    answer = self._answer(request)
                except Exception:  # one bad request: refuse it, keep serving
                    logger.exception("ZAP request failed")
                    answer = [request[0], request[1] if len(request) > 1 else b"", b"500",
                              b"internal error", b"", b""]
                self.sock.send_multipart(answer)
        except Exception:
            logger.exception("ZAP handler failed; new connections will be refused")
        finally:
            self.sock.close(0)

    def _answer(self, request: list[bytes]) -> list[bytes]:
        if len(request) < 6:
            return [b"1.0", b"", b"500", b"malformed ZAP request", b"", b""]
        version, rid, domain, address, _identity, mechanism = request[:6]
        creds = request[6:]
        who = address.decode(errors="replace")
        with self.lock:
            entry = self.domains.get(domain)
        if entry is None:
            logger.warning("refused %s: unknown ZAP domain %r", who, domain)
            return [version, rid, b"400", b"unknown domain", b"", b""]
        if mechanism != b"CURVE" or not creds or len(creds[0]) != 32:
            logger.warning("refused %s: mechanism %s, CURVE required", who,
                           mechanism.decode(errors="replace"))
            return [version, rid, b"400", b"CURVE required", b"", b""]
        ring = entry[0]
        ring.refresh()
        key = z85.encode(creds[0])
        role = ring.role(key)
        if role is None:
            logger.warning("refused %s: its key %s is not authorized", who, key[:8].decode())
            return [version, rid, b"400", b"key not authorized", b"", b""]
        return [version, rid, b"200", b"OK", f"{role} {key.decode()}".encode(), b""]


_handlers: dict[int, _Handler] = {}
_lock = threading.Lock()


def acquire(ctx: zmq.Context, security: Security) -> Keyring:
    """Make sure ``ctx`` has a ZAP handler that knows ``security``'s cluster."""
    ring = keyring(security)
    with _lock:
        handler = _handlers.get(id(ctx))
        if handler is None or not handler.is_alive():
            handler = _handlers[id(ctx)] = _Handler(ctx)
            handler.start()
        with handler.lock:
            entry = handler.domains.get(security.domain)
            if entry is None:
                handler.domains[security.domain] = [ring, 1]
            else:
                entry[1] += 1
    return ring


def release(ctx: zmq.Context, security: Security) -> None:
    """One server of ``security``'s cluster in ``ctx`` closed; the last one stops the handler."""
    with _lock:
        handler = _handlers.get(id(ctx))
        if handler is None:
            return
        with handler.lock:
            entry = handler.domains.get(security.domain)
            if entry is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    del handler.domains[security.domain]
            empty = not handler.domains
        if empty:
            del _handlers[id(ctx)]
            handler.stopping = True
    if empty:
        handler.join(2)
