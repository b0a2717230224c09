"""Same-host fast path: large buffers handed over through shared memory instead of TCP.

The receiver owns the memory. It keeps a pool of memfd segments and, to receive a value,
*leases* one and names it to the sender as ``[lease, pid, fd, dev, ino, size]``. The sender
opens ``/proc/<pid>/fd/<fd>``, checks that it is the same inode, and writes the buffers with
``pwrite`` (one copy; no page-table work on its side). The receiver then *adopts* the lease:
it maps the segment and rebuilds the value on the mapping without a copy. When the last
object using that mapping is gone the segment goes back to the pool, so steady traffic
reuses pages that are already allocated (a fresh 100 MB allocation costs more than the copy).

A lease that is never confirmed is *cancelled*: its segment is closed, never reused, since
a slow sender may still write into it (into an orphan inode that vanishes with its fd).

Segments are memfds: they have no name in any filesystem, so a SIGKILL leaks nothing; the
kernel frees them with the last descriptor and mapping.

Whether two ends share a host is decided by network address (the peer's address is one of
this host's interface addresses), never by hostname or a shared filesystem: network
namespaces share both and are different hosts to us. Opening the receiver's descriptor
through ``/proc`` is the second check: where it fails (another pid namespace, no ``/proc``)
the value goes over the socket.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import itertools
import logging
import mmap
import os
import socket
import threading
import time
import weakref

import psutil

logger = logging.getLogger(__name__)

#: Name given to every segment peers write into (``/memfd:zfabric-pool`` in
#: ``/proc/<pid>/maps``).
MEMFD_NAME = "zfabric-pool"
#: Name of the segments a process joins what it received over a socket into (see
#: :func:`scratch`); no peer is ever given one to write into.
SCRATCH_NAME = "zfabric-scratch"
#: Segment sizes are multiples of this.
GRANULE = 1 << 20
#: Descriptors kept open for reuse, free and adopted segments together; past this an adopted
#: segment's descriptor is closed at once (its mapping lives on, it just is not reused).
MAX_KEPT_FDS = 128
#: Leases outstanding at once; past this a request gets none (the value goes over the socket),
#: so a peer that asks and never writes cannot use up this process's descriptors.
MAX_LEASES = 256
#: One ``pwrite`` writes at most this much (Linux stops a single write near 2 GiB).
_CHUNK = 1 << 30
#: How a leased segment is mapped by its receiver.
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


@functools.cache
def local_addresses() -> frozenset[str]:
    """Every address of this host's (this network namespace's) interfaces."""
    out = {"127.0.0.1", "::1", "localhost"}
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                out.add(a.address.split("%")[0])
    return frozenset(out)


def is_local(address: str) -> bool:
    """Whether ``tcp://host:port`` is on this host, by network address."""
    if not address.startswith("tcp://"):
        return address.startswith(("ipc://", "inproc://"))
    host = address[len("tcp://") :].rpartition(":")[0].strip("[]")
    return host.startswith("127.") or host in local_addresses()


@functools.cache
def available() -> bool:
    """Whether this process can lease segments (Linux: memfd and ``/proc/<pid>/fd``)."""
    return hasattr(os, "memfd_create") and os.path.isdir(f"/proc/{os.getpid()}/fd")


def in_segment(array, name: str = MEMFD_NAME) -> bool:
    """Whether a NumPy-like array's memory lies in a mapping of a zfabric segment, i.e. it was
    received through shared memory (``name``: :data:`SCRATCH_NAME` asks instead whether it
    was joined from a stream; a diagnostic: it reads ``/proc/self/maps``)."""
    start = array.__array_interface__["data"][0]
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            lo, hi = (int(v, 16) for v in fields[0].split("-"))
            if lo <= start < hi:
                return len(fields) == 6 and fields[5].startswith(f"/memfd:{name}")
    return False


def nbytes(buffers) -> int:
    return sum(memoryview(b).nbytes for b in buffers)


# ---------------------------------------------------------------------------- sender


def write(desc, buffers, *, srcfd: int | None = None) -> bool:
    """Write ``buffers`` back to back into the leased segment ``desc``.

    Returns False, having written nothing that matters, when the segment cannot be opened or
    is not the one named (the caller sends the buffers over the socket instead). The
    descriptor is a peer's word: only a zfabric segment is written, and, given ``srcfd`` (our
    end of the connection the request came on), only one of the process at its other end.
    """
    try:
        _lease, pid, fd, dev, ino, size = (int(x) for x in desc)
    except (TypeError, ValueError, OverflowError):
        return False
    if nbytes(buffers) > size or pid <= 0 or fd < 0:
        return False
    if srcfd is not None and not connection_from(srcfd, pid):
        logger.warning("refusing a shared-memory descriptor naming process %d, which did not"
                       " send the request", pid)
        return False
    path = f"/proc/{pid}/fd/{fd}"
    try:
        if not os.readlink(path).startswith(f"/memfd:{MEMFD_NAME}"):
            logger.warning("refusing a shared-memory descriptor that names %s, not a zfabric"
                           " segment", path)
            return False
        f = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = os.fstat(f)
        if (st.st_dev, st.st_ino) != (dev, ino) or st.st_size < size:
            return False
        off = 0
        for b in buffers:
            view = memoryview(b).cast("B")
            while view.nbytes:
                n = os.pwrite(f, view[:_CHUNK], off)
                off += n
                view = view[n:]
        return True
    except OSError as exc:
        logger.info("could not write into a shared-memory segment (%s); using the socket", exc)
        return False
    finally:
        os.close(f)


def connection_from(srcfd: int, pid: int) -> bool:
    """Whether process ``pid`` holds the other end of this process's connected socket
    ``srcfd`` (a TCP connection on this host, or a Unix socket).

    For TCP: the peer's socket inode is found in ``/proc/net/tcp[6]`` (its local end is our
    remote end), then looked for among ``pid``'s descriptors.
    """
    try:
        s = socket.socket(fileno=os.dup(srcfd))
    except OSError:
        return False
    try:
        if s.family == socket.AF_UNIX:
            import struct
            creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            return struct.unpack("3i", creds)[0] == pid
        if s.family not in (socket.AF_INET, socket.AF_INET6):
            return False
        peer, mine = s.getpeername(), s.getsockname()
    except OSError:
        return False
    finally:
        s.close()
    conn = (peer[:2], mine[:2], pid)
    known = _known_peers.get(conn)
    if known is not None:
        # Seen before: one readlink shows that ``pid`` still holds that socket (a connected
        # TCP socket never changes its addresses, so it is still our connection's other end).
        try:
            if os.readlink(f"/proc/{pid}/fd/{known[1]}") == f"socket:[{known[0]}]":
                return True
        except OSError:
            pass
        _known_peers.pop(conn, None)
    inode = _tcp_inode(peer[:2], mine[:2])
    if inode is None:
        return False
    target = f"socket:[{inode}]"
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for name in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == target:
                if len(_known_peers) >= 1024:
                    _known_peers.clear()
                _known_peers[conn] = (inode, name)
                return True
        except OSError:
            continue
    return False


#: Connections already traced to a process: (peer address, our address, pid) -> (the peer
#: socket's inode, its descriptor in ``pid``). Tracing scans ``/proc/net/tcp`` and the
#: process's descriptors (milliseconds with many connections); checking again is one readlink.
_known_peers: dict[tuple, tuple[int, str]] = {}


def _hexaddr(addr) -> str:
    ip, port = addr
    if ":" in ip:
        packed = socket.inet_pton(socket.AF_INET6, ip)
        words = [packed[i:i + 4][::-1].hex().upper() for i in range(0, 16, 4)]
        return "".join(words) + f":{port:04X}"
    packed = socket.inet_pton(socket.AF_INET, ip)
    return packed[::-1].hex().upper() + f":{port:04X}"


def _tcp_inode(local, remote) -> int | None:
    want_local, want_remote = _hexaddr(local), _hexaddr(remote)
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[1] == want_local and parts[2] == want_remote:
                        return int(parts[9])
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    return None


# ---------------------------------------------------------------------------- receiver


class _Segment:
    __slots__ = ("dev", "fd", "idle_since", "ino", "mm", "size")

    def __init__(self, fd: int, size: int):
        st = os.fstat(fd)
        self.fd, self.size, self.dev, self.ino = fd, size, st.st_dev, st.st_ino
        self.idle_since = 0.0
        self.mm: mmap.mmap | None = None  # this process's mapping, kept with the segment

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        mm, self.mm = self.mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # still in use (a cancelled lease's value): unmapped when it dies


class Pool:
    """This process's segments: free ones kept for reuse, leased ones awaiting a writer.

    Thread-safe: segments come back from whatever thread drops a value's last reference.
    """

    def __init__(self, keep_bytes: int = 256 << 20, lease_timeout_s: float = 60.0,
                 name: str = MEMFD_NAME, scratch: Pool | None = None):
        self.keep_bytes = keep_bytes
        self.lease_timeout_s = lease_timeout_s
        self.name = name
        # the process's own buffers (see :func:`scratch`), kept and capped alongside
        self.scratch = scratch
        self._lock = threading.Lock()
        self._free: list[_Segment] = []
        self._leased: dict[int, tuple[_Segment, float, object]] = {}  # seg, deadline, owner
        self._returned: collections.deque[_Segment] = collections.deque()  # from finalizers
        self._kept = 0  # open descriptors of free and adopted segments
        self._ids = itertools.count(1)

    # -- leasing ---------------------------------------------------------------------

    def lease(self, size: int, now: float | None = None, owner=None) -> list | None:
        """A segment of at least ``size`` bytes for a sender to write into, or None.

        ``owner`` (the connection it was leased to) must be named again to adopt it, so that
        one peer cannot claim the segments leased to another."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._take_returned(now)
            if len(self._leased) >= MAX_LEASES:
                return None
            seg = self._best_fit(size)
            if seg is None:
                try:
                    seg = self._create(size)
                except OSError as exc:
                    logger.info("no shared-memory segment of %d bytes: %s", size, exc)
                    return None
            lease = next(self._ids)
            self._leased[lease] = (seg, now + self.lease_timeout_s, owner)
        return [lease, os.getpid(), seg.fd, seg.dev, seg.ino, seg.size]

    def adopt(self, lease: int, sizes: list[int], owner=None) -> list[memoryview]:
        """The written buffers of ``lease``, as views of one mapping of its segment."""
        with self._lock:
            entry = self._leased.get(lease) if type(lease) is int else None
            if entry is None or entry[2] != owner:
                raise ValueError(f"unknown or expired shared-memory lease {lease!r}")
            del self._leased[lease]
            seg = entry[0]
            if (not all(type(n) is int and n >= 0 for n in sizes)) or sum(sizes) > seg.size:
                seg.close()
                raise ValueError(f"buffer sizes {sizes!r} do not fit lease {lease}")
            # The segment is mapped once, its page tables filled at once (touching 100 MB of
            # a fresh mapping page by page costs ~45 ms here, populated ~20 ms, and unmapping
            # it again ~5 ms), and the mapping stays with the segment for its next lease.
            mm = seg.mm
            if mm is None:
                mm = seg.mm = mmap.mmap(seg.fd, seg.size, flags=_MAP_FLAGS)
            # the value's memory: an object of its own over the mapping, whose death
            # returns the segment (the mapping itself lives on in the pool)
            used = max(sum(sizes), 1)
            value = (ctypes.c_ubyte * used).from_buffer(mm)
            if self._kept < MAX_KEPT_FDS:
                self._kept += 1
            else:  # not reusable: its descriptor is closed, the mapping goes with the value
                seg.mm = None
                os.close(seg.fd)
                seg.fd = -1
        fin = weakref.finalize(value, self._returned.append, seg)
        fin.atexit = False
        view = memoryview(value).cast("B")
        out, off = [], 0
        for n in sizes:
            out.append(view[off : off + n])
            off += n
        return out

    def cancel(self, lease: int) -> None:
        """Give up a lease that was not confirmed (a no-op once it was adopted)."""
        with self._lock:
            entry = self._leased.pop(lease, None)
        if entry is not None:
            entry[0].close()

    # -- housekeeping ----------------------------------------------------------------

    def expire(self, now: float, idle_s: float = 30.0) -> None:
        """Cancel leases past their deadline; close free segments idle for ``idle_s``."""
        if self.scratch is not None:
            self.scratch.expire(now, idle_s)
        with self._lock:
            self._take_returned(now)
            for lease in [k for k, (_, t, _) in self._leased.items() if t <= now]:
                seg = self._leased.pop(lease)[0]
                seg.close()
            keep = []
            for seg in self._free:
                if now - seg.idle_since > idle_s:
                    self._close_kept(seg)
                else:
                    keep.append(seg)
            self._free = keep

    def release_idle(self) -> int:
        """Close every free segment now (memory is short); returns the bytes released."""
        freed = self.scratch.release_idle() if self.scratch is not None else 0
        with self._lock:
            self._take_returned(time.monotonic())
            freed += sum(s.size for s in self._free)
            for seg in self._free:
                self._close_kept(seg)
            self._free = []
        return freed

    def cap_idle(self, keep_bytes: int) -> None:
        """Keep at most ``keep_bytes`` of free segments for reuse (a worker: 10 % of its
        memory limit, memory that nothing it holds accounts for)."""
        if self.scratch is not None:
            self.scratch.cap_idle(keep_bytes)
        with self._lock:
            self.keep_bytes = min(self.keep_bytes, max(0, int(keep_bytes)))

    def stats(self) -> dict:
        with self._lock:
            self._take_returned(time.monotonic())
            return {"free": len(self._free), "free_bytes": sum(s.size for s in self._free),
                    "leased": len(self._leased), "kept_fds": self._kept}

    # -- inside the lock -------------------------------------------------------------

    def _create(self, size: int) -> _Segment:
        size = max(GRANULE, -(-size // GRANULE) * GRANULE)
        fd = os.memfd_create(self.name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            return _Segment(fd, size)
        except OSError:
            os.close(fd)
            raise

    def _best_fit(self, size: int) -> _Segment | None:
        best = None
        for seg in self._free:
            if size <= seg.size <= 2 * size + GRANULE and (best is None or seg.size < best.size):
                best = seg
        if best is not None:
            self._free.remove(best)
            self._kept -= 1
        return best

    def _take_returned(self, now: float) -> None:
        while self._returned:
            seg = self._returned.popleft()
            if seg.fd < 0:
                continue
            if sum(s.size for s in self._free) + seg.size > self.keep_bytes:
                self._close_kept(seg)
            else:
                seg.idle_since = now
                self._free.append(seg)

    def _close_kept(self, seg: _Segment) -> None:
        seg.close()
        self._kept -= 1


def scratch(size: int) -> memoryview:
    """A writable buffer of ``size`` bytes for this process's own use (pieces of a value
    joined again): a mapping of a segment of the pool's own scratch pool where this process
    has a pool, so that steady traffic reuses pages already allocated; a ``bytearray``
    elsewhere."""
    if size >= GRANULE and available():
        p = pool().scratch
        assert p is not None
        desc = p.lease(size, owner=_SCRATCH)
        if desc is not None:
            return p.adopt(desc[0], [size], owner=_SCRATCH)[0]
    return memoryview(bytearray(size))


_SCRATCH = object()  # the owner of leases this process takes for itself
_pool: Pool | None = None
_pool_lock = threading.Lock()


def pool() -> Pool:
    """The process's one pool (clients and workers in one process share it)."""
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = Pool(scratch=Pool(name=SCRATCH_NAME))
    return _pool
