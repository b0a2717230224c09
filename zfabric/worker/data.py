"""The worker's data plane: serving stored values to peers and clients, fetching dependencies.

A mixin of :class:`~zfabric.worker.core.WorkerLoop`, run on its loop thread like the rest:

- the ROUTER (data port) answers ``get-data`` (values as frames, or written into the asker's
  shared-memory segments on one host), ``put-data`` (values placed here by clients) and
  ``lease`` (segments of this process for a client on this host to write into);
- one DEALER per peer fetches dependencies with ``get-data`` (on one host in two requests: the
  second names segments for the large values; see :mod:`zfabric.shm`); a fetch with no answer
  within ``core.FETCH_TIMEOUT_S`` is reported ``missing`` to the scheduler. Dependencies to
  fetch wait in a queue per peer and leave once per loop turn, up to ``FETCH_BATCH_KEYS`` keys
  per request, with at most ``FETCHES_PER_PEER`` requests in flight to one peer and
  ``FETCHES_TOTAL`` in all, so a task with thousands of dependencies does not flood its peers.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque

import zmq

from .. import _zmq, protocol, serialize, shm
from ..errors import RemoteProtocolError
from ..security import role_of
from ..transfer import cancel_leases, lease_for, pack_values, unpack_values

logger = logging.getLogger("zfabric.worker.core")

#: Keys asked for in one ``get-data`` request.
FETCH_BATCH_KEYS = 64
#: Fetch requests in flight to one peer at once, and to all peers.
FETCHES_PER_PEER = 2
FETCHES_TOTAL = 16

# plain ints: enum arithmetic is slow
_EVENTS, _POLLIN, _SRCFD = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.SRCFD)
#: How often data connections are checked for unfinished messages, at most.
INTAKE_CHECK_S = 0.05
#: A revoked key's data connection ends this long after it was told (so that it hears why).
REVOKED_GRACE_S = 0.5


def waiting(sock: zmq.Socket, copy: bool = True):
    """Every message waiting on ``sock`` now, without blocking (between messages it asks
    ``EVENTS``, which is cheaper than the ``Again`` a last receive would raise)."""
    while True:
        try:
            yield sock.recv_multipart(zmq.NOBLOCK, copy=copy)
        except zmq.Again:
            return
        if not sock.getsockopt(_EVENTS) & _POLLIN:
            return


class DataPlane:
    """The data-plane methods of the worker loop (see the module docstring)."""

    def _drain_data(self) -> None:
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
            if len(ops) == 1 and ops[0]["op"] == "announce":
                error = intake.announced(conn, ops[0]) if conn is not None else None
                if error is not None:
                    self._reply_data(peer, [{"op": "error", "message": error}])
                continue
            srcfd = None
            for op in ops:
                try:
                    if op["op"] == "get-data" and op.get("into") and srcfd is None:
                        srcfd = frames[1].get(zmq.SRCFD)
                    self._on_data_op(peer, op, buffers, srcfd)
                except Exception as exc:
                    self._reply_data(peer, [{"op": "error", "message": f"{op['op']}: {exc}",
                                             "id": op.get("id")}])

    def _check_intake(self, now: float) -> None:
        """Every ``INTAKE_CHECK_S``: end connections too far ahead of their complete
        messages (zfabric/intake.py), and those of revoked keys whose time came."""
        if now < self.next_intake:
            return
        self.next_intake = now + INTAKE_CHECK_S
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

    def _revoke_data_peers(self, now: float) -> None:
        """The authorized keys changed: end the data connections of keys no longer in it."""
        ring = self.keyring
        for peer, key in list(self.data_keys.items()):
            if key not in ring.keys:
                del self.data_keys[peer]
                if self.intake is not None:
                    self.intake.shut_peer_later(peer, now)

    def _on_data_op(self, peer: bytes, op: dict, buffers: list, srcfd: int | None) -> None:
        match op["op"]:
            case "get-data":
                values = []
                for key in op["keys"]:
                    ser = self.serialized.get(key)
                    if ser is None and self.store.is_spilled(key):
                        ser = self.store.serialized_from_disk(key)  # not back into memory
                    if ser is None and key in self.store:
                        header, bufs = serialize.dumps_value(self.store[key],
                                                             self.config.INLINE_BYTES)
                        ser = self.serialized[key] = (header, bufs, serialize.nbytes(header, bufs))
                    if ser is None:
                        values.append((key, None, [], False))
                    else:
                        values.append((key, ser[0], ser[1], key in self.raw_keys))
                into = op.get("into") if self.use_shm else None
                # the segments named must belong to the process that asked (srcfd's peer)
                items, frames = pack_values(values, ask=bool(op.get("shm")) and self.use_shm,
                                            into=into if type(into) is dict else None,
                                            srcfd=srcfd)
                self._reply_data(peer, [{"op": "data", "id": op["id"], "items": items}], frames)
            case "lease":
                pool = shm.pool() if self.use_shm else None
                limit = self.config.MAX_MESSAGE_BYTES
                descs = [pool.lease(n, owner=peer) if pool and type(n) is int and 0 < n <= limit
                         else None for n in op["sizes"]]
                self._reply_data(peer, [{"op": "leases", "id": op["id"], "items": descs}])
            case "put-data":
                for key, header, bufs, raw, _ in unpack_values(op["items"], buffers, peer):
                    if header is not None and bufs is not None:
                        self.borrowed.pop(key, None)  # placed here: this worker's own
                        self._put(key, header, bufs, raw or bool(op.get("raw")))
                        self.unconfirmed[key] = time.monotonic()  # until the scheduler knows
                self._reply_data(peer, [{"op": "reply", "id": op["id"], "result": True}])
            case "actor-call":
                self.actors.call(peer, op)
            case "actor-ping":  # a caller waiting long: is the actor still here?
                self._reply_data(peer, [{"op": "actor-result", "id": op["id"],
                                         "alive": self.actors.holds(op["key"],
                                                                    op.get("worker"))}])
            case "heartbeat":
                pass
            case other:
                raise RemoteProtocolError(f"unexpected {other!r} on the data port")

    def _send_actor_replies(self) -> None:
        replies = self.actors.replies
        while replies:
            peer, op, frames = replies.popleft()
            self._reply_data(peer, [op], frames)

    def _reply_data(self, peer: bytes, ops: list, frames: list = ()) -> None:
        """Answer a data peer without ever blocking the loop: what its full queue refuses
        waits in a backlog of its own, retried each turn, within ``PEER_BACKLOG_BYTES``."""
        message = [peer, *protocol.encode(ops, frames)]
        if peer in self.data_backlog:
            self._queue_reply(peer, message)
            return
        try:
            self.data.send_multipart(message, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self._queue_reply(peer, message)
        except zmq.ZMQError as exc:
            logger.info("could not answer a data peer: %s", exc)

    def _queue_reply(self, peer: bytes, message: list) -> None:
        queue = self.data_backlog.get(peer)
        if queue is None:
            queue = self.data_backlog[peer] = deque()
            self.data_backlog_bytes[peer] = 0
        size = sum(memoryview(f).nbytes for f in message)
        queue.append((message, size))
        total = self.data_backlog_bytes[peer] = self.data_backlog_bytes[peer] + size
        if total > self.config.PEER_BACKLOG_BYTES:
            logger.warning("data peer %r does not read its answers: %d bytes wait for it, more"
                           " than PEER_BACKLOG_BYTES; dropping them", peer[:64], total)
            self.data_backlog.pop(peer, None)
            self.data_backlog_bytes.pop(peer, None)

    def _retry_replies(self) -> None:
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

    def _fetch(self, dep: str, addresses: list[str]) -> None:
        if not addresses:
            self._fetch_failed(dep, "")
            return
        addr = random.choice(addresses)
        queue = self.fetch_queue.get(addr)
        if queue is None:
            queue = self.fetch_queue[addr] = deque()
        queue.append(dep)

    def _start_fetches(self) -> None:
        """Send queued fetches, batched per peer, within the in-flight bounds."""
        inflight = self.fetch_inflight
        mem = self.memory
        if mem.paused:
            return  # memory is short: fetch nothing more until it resumes
        # Near the memory thresholds one value at a time: a batch of large values could
        # overshoot the limit before it can be spilled.
        tight = mem.near or mem.over_target()
        total, batch = (1, 1) if tight else (FETCHES_TOTAL, FETCH_BATCH_KEYS)
        for addr in list(self.fetch_queue):
            queue = self.fetch_queue[addr]
            while (queue and inflight.get(addr, 0) < FETCHES_PER_PEER
                   and len(self.inflight_fetch) < total):
                keys = [queue.popleft() for _ in range(min(len(queue), batch))]
                keys = [k for k in keys if k in self.fetching]  # not those nobody waits for now
                if keys:
                    self._send_fetch(addr, keys, {"shm": self.use_shm and shm.is_local(addr)})
            if not queue:
                del self.fetch_queue[addr]

    def _fetch_ended(self, addr: str) -> None:
        n = self.fetch_inflight.get(addr, 0) - 1
        if n > 0:
            self.fetch_inflight[addr] = n
        else:
            self.fetch_inflight.pop(addr, None)

    def _send_fetch(self, addr: str, keys: list[str], extra: dict, into: dict | None = None):
        sock = self.peers.get(addr)
        if sock is None:
            sock = _zmq.dealer(zmq.Context.instance(), addr,
                               max_frame_bytes=self.config.MAX_MESSAGE_BYTES,
                               security=self.security, role="worker", server="worker")
            self.peers[addr] = sock
            self.poller.register(sock, zmq.POLLIN)
        self._fetch_seq += 1
        self.inflight_fetch[self._fetch_seq] = (addr, keys, time.monotonic(), into or {})
        n = self.fetch_inflight[addr] = self.fetch_inflight.get(addr, 0) + 1
        self.fetch_stats["requests"] += 1
        self.fetch_stats["most_in_flight"] = max(self.fetch_stats["most_in_flight"], n)
        op = {"op": "get-data", "id": self._fetch_seq, "keys": keys, **extra}
        if into:
            op["into"] = into
        sock.send_multipart(protocol.encode([op]))

    def _drain_peer(self, addr: str, sock: zmq.Socket) -> None:
        for frames in waiting(sock, copy=False):
            try:
                ops, buffers = protocol.decode([frames[0].bytes, *frames[1:]])
            except RemoteProtocolError as exc:
                logger.warning("bad data message from %s: %s", addr, exc)
                continue
            for op in ops:
                if op["op"] == "error" and op.get("id") is None:  # the whole connection
                    logger.warning("data port %s: %s", addr, protocol.short(op["message"], 300))
                    for rid in [i for i, r in self.inflight_fetch.items() if r[0] == addr]:
                        self._fetch_ended(addr)
                        req = self.inflight_fetch.pop(rid)
                        cancel_leases(req[3])
                        for k in req[1]:
                            self._fetch_failed(k, addr)
                    continue
                req = self.inflight_fetch.pop(op.get("id"), None)
                if req is not None:
                    self._fetch_ended(addr)
                    try:
                        self._on_fetched(addr, req, op, buffers)
                    finally:
                        cancel_leases(req[3])

    def _on_fetched(self, addr: str, req: tuple, op: dict, buffers: list) -> None:
        keys = req[1]
        if op["op"] != "data":
            for k in keys:
                self._fetch_failed(k, addr)
            return
        later = []
        got = nkeys = 0
        try:
            for key, header, bufs, raw, sizes in unpack_values(op["items"], buffers, addr):
                if sizes is not None:
                    later.append((key, sizes))
                elif header is None:
                    self._fetch_failed(key, addr)
                elif key in self.borrowed or key in self.acquiring:  # else nobody wants it
                    got += serialize.nbytes(header, bufs)
                    nkeys += 1
                    self._put(key, header, bufs, raw)
                    self._got_dep(key)
                else:
                    self.fetching.pop(key, None)
        except RemoteProtocolError as exc:
            logger.warning("bad values from %s: %s", addr, exc)
            for k in keys:
                self._fetch_failed(k, addr)  # no-op for those already stored
            return
        if nkeys:
            self._log_transfer(addr, req[2], got, nkeys)
        if later:
            # Too large for a frame, on this host: ask again, naming segments to write into.
            self._send_fetch(addr, [k for k, _ in later], {"shm": False},
                             lease_for(later, owner=addr))

    def _confirm_placed(self, now: float) -> None:
        """Ask the scheduler about values placed here ``PUT_DATA_CONFIRM_S`` ago; those it
        does not list this worker for are dropped (see :meth:`_on_confirmed`)."""
        if self.confirming is not None or self.epoch is None:
            return
        due = now - self.config.PUT_DATA_CONFIRM_S
        keys = [k for k, t in self.unconfirmed.items() if t <= due][:10_000]
        if keys:
            self._fetch_seq += 1
            self.confirming = (self._fetch_seq, keys)
            self.outbox.append({"op": "request", "id": self._fetch_seq, "kind": "who-has",
                                "args": {"keys": keys}})

    def _on_confirmed(self, op: dict) -> None:
        if self.confirming is None or op.get("id") != self.confirming[0]:
            return
        keys, self.confirming = self.confirming[1], None
        result = op.get("result")
        if type(result) is not dict:
            return
        for key in keys:
            if self.unconfirmed.pop(key, None) is None:
                continue
            holders = result.get(key)
            if type(holders) is not list or self.address not in holders:
                logger.warning("dropping value %r placed here: the scheduler does not know it",
                               protocol.short(key))
                self._free(key)

    def _log_transfer(self, addr: str, sent: float, nbytes: int, nkeys: int) -> None:
        """Note a finished fetch for the scheduler's task stream (wall-clock times)."""
        now = time.monotonic()
        wall = time.time()
        if len(self.transfer_log) < 1000:  # heartbeats carry them; a burst is sampled
            self.transfer_log.append([addr, wall - (now - sent), wall, nbytes, nkeys])

    def _put(self, key: str, header: bytes, bufs: list, raw: bool) -> None:
        """Store a value that arrived pickled. Task arguments (``raw``) stay pickled until
        their task runs, so that the dependencies inside them resolve then."""
        size = serialize.nbytes(header, bufs)
        if raw:
            self.store.put(key, serialize.RawArgs(header, bufs), size)
            self.serialized[key] = (header, bufs, size)
            self.raw_keys.add(key)
        else:
            value = serialize.loads_or_mark(key, header, bufs)
            self.store.put(key, value, size)
            if type(value) is serialize.Undecodable:  # served on as it came; its tasks fail
                logger.warning("worker %s: %s", self.name, value.reason)
                self.serialized[key] = (header, bufs, size)
            else:
                self.serialized.pop(key, None)
            self.raw_keys.discard(key)

    def _got_dep(self, dep: str) -> None:
        if self.acquiring:
            self._acquire_ended(dep, True)
        for key in self.fetching.pop(dep, ()):
            w = self.waiting.get(key)
            if w is None:
                continue
            w[1].discard(dep)
            if not w[1]:
                del self.waiting[key]
                self.ready.append((key, w[0], w[2], w[3]))
                if self.plugins:
                    self.plugins.transition(key, "waiting", "ready")

    def _fetch_failed(self, dep: str, addr: str) -> None:
        if self.acquiring:
            self._acquire_ended(dep, False)
        for key in self.fetching.pop(dep, ()):
            if self.waiting.pop(key, None) is not None:
                self._release(key)
                self.outbox.append({"op": "missing", "key": key, "dep": dep, "address": addr})
