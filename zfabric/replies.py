"""Small results straight from the worker that ran a task to the client that waits for it.

A tiny task's round trip crossed four one-way hops: client → scheduler → worker → scheduler
→ client. A task a client submits while few of its tasks are in flight (a caller that waits
for each result: where latency is what matters) carries a ``reply`` option, this client's
token. The worker that runs it sends its result, when small (``INLINE_BYTES``), straight
back on the client's connection to its data port, as soon as the task ends and before its
``finished`` leaves for the scheduler (which learns of the task in the same batch as ever,
and still tells the client with ``memory``: whichever comes first finishes the future, the
other changes nothing).

The token is random and known only to the client, the scheduler and the workers; a worker
sends a result only to the connection that named the task's token first (``reply-to``).

It degrades to the scheduler's path: the client opens a reply link to a worker only after the
scheduler named that worker as the holder of such a task's result. Until then, and from a
worker it cannot reach, one that refuses ``reply-to`` (an older worker) or one that died,
results come through the scheduler as before. At most ``MAX_LINKS`` workers are linked.
``DIRECT_REPLIES`` (config, ``ZFABRIC_DIRECT_REPLIES=1``) turns it on; it is off by default
(see docs/performance.md, The hot path, for why).
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

import zmq

from . import _zmq, protocol
from .errors import RemoteProtocolError
from .link import Link

logger = logging.getLogger("zfabric.client")

#: Workers a client keeps a reply link to, at most.
MAX_LINKS = 64
#: A task gets the ``reply`` option when fewer of its client's tasks are in flight, and it is
#: submitted in a batch of at most this many.
FEW_TASKS = 4
#: Keys remembered as submitted with the option, whose holder is not known yet.
MAX_PENDING = 64


class DirectReplies:
    """One client's reply links to workers (see the module docstring); on its event loop."""

    def __init__(self, core: Any, security: Any, max_frame_bytes: int):
        self.core = core
        self.security = security
        self.max_frame_bytes = max_frame_bytes
        self.token = secrets.token_hex(16)
        self.option = {"reply": self.token}
        self.links: dict[str, Link] = {}
        self.refused: set[str] = set()  # workers that refused reply-to: not asked again
        self.pending: set[str] = set()  # keys sent with the option, holder not heard yet
        self.received = 0  # results that came straight from a worker
        self.closed = False

    def options(self, opts: dict | None, key: str) -> dict:
        """The options of a task submitted while few are in flight (lock held)."""
        pending = self.pending
        if len(pending) >= MAX_PENDING:
            pending.clear()  # (keys whose result never came: failed, cancelled)
        pending.add(key)
        return self.option if opts is None else {**opts, **self.option}

    def heard(self, items: list) -> None:
        """A ``memory`` op's items (key, value, who_has, nbytes): open a reply link to the
        holders of keys sent with the option (on the loop thread, lock held)."""
        pending = self.pending
        for item in items:
            key = item[0]
            if key in pending:
                pending.discard(key)
                who_has = item[2]
                if who_has and type(who_has[0]) is str:
                    self._link(who_has[0])

    def _link(self, address: str) -> None:
        if (self.closed or address in self.links or address in self.refused
                or len(self.links) >= MAX_LINKS):
            return
        loop = self.core.loop
        try:
            # no reconnecting: a link that ended (a revoked key, a worker gone) stays down, and
            # results come through the scheduler
            sock = _zmq.dealer(zmq.Context.instance(), address, security=self.security,
                               role="client", server="worker",
                               max_frame_bytes=self.max_frame_bytes, reconnect=False)
        except (zmq.ZMQError, ValueError) as exc:
            logger.debug("no reply link to %s: %s", address, exc)
            self.refused.add(address)
            return
        link = Link(loop, sock, lambda frames: self._on_message(address, frames))
        self.links[address] = link
        link.send(protocol.encode([{"op": "reply-to", "token": self.token}]))

    def _on_message(self, address: str, frames: list) -> None:
        """A worker's message on a reply link, decoded and checked at the protocol's door."""
        try:
            ops, _ = protocol.decode(frames)
        except RemoteProtocolError as exc:
            logger.warning("malformed message on the reply link to %s: %s", address, exc)
            return
        core = self.core
        for op in ops:
            if op["op"] == "results":
                try:
                    protocol.check_items(op)
                except RemoteProtocolError as exc:
                    logger.warning("bad results from %s: %s", address, exc)
                    continue
                states, window = core.states, core.window
                with core.lock:
                    for key, value, nbytes in op["items"]:
                        st = states.get(key)
                        if st is not None and st.status == "pending":
                            window.done(st)
                            st.finish(value, [address], nbytes)
                            self.received += 1
            elif op["op"] == "error":  # refused (an older worker, a revoked key): no more
                logger.debug("worker %s refused direct replies: %s", address,
                             protocol.short(op.get("message"), 200))
                self.refused.add(address)
                link = self.links.pop(address, None)
                if link is not None:
                    link.close(linger=0)

    def close(self) -> None:
        self.closed = True
        for link in self.links.values():
            link.close(linger=0)
        self.links.clear()
