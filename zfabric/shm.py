"""Same-host fast path: large buffers handed over through shared memory instead of TCP.

The sender copies the buffers of one value into a fresh file in ``/dev/shm`` (one copy, pages
populated up front) and sends only its name and the buffer sizes; the receiver maps it, unlinks
the name at once (the mapping lives on while the value uses it) and rebuilds the value on
the mapping without a copy.

Whether two ends share a host is decided by network address (the peer's address is one of
this host's interface addresses), never by hostname or a shared filesystem: network
namespaces share both and are different hosts to us. Segment names carry the creator's pid;
:func:`sweep` removes segments whose creator is gone (a process killed between creating a
segment and the receiver unlinking it), so a SIGKILL leaks nothing for long.
"""

from __future__ import annotations

import functools
import logging
import mmap
import os
import socket
import uuid

import psutil

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
PREFIX = "zfabric-"


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


def available() -> bool:
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


def write(buffers: list) -> list | None:
    """Copy buffers into a new segment: ``[name, [sizes]]``, or None when there is no room."""
    sizes = [memoryview(b).nbytes for b in buffers]
    total = sum(sizes)
    name = f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:16]}"
    path = os.path.join(SHM_DIR, name)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except OSError:
        return None
    try:
        os.posix_fallocate(fd, 0, max(total, 1))  # ENOSPC now rather than SIGBUS later
        mm = mmap.mmap(fd, max(total, 1), flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    except OSError as exc:
        os.close(fd)
        _unlink(path)
        logger.info("shared memory unavailable (%s); sending over the socket", exc)
        return None
    os.close(fd)
    try:
        off = 0
        for b, n in zip(buffers, sizes, strict=True):
            mm[off : off + n] = memoryview(b).cast("B")
            off += n
    except Exception:
        mm.close()
        _unlink(path)
        raise
    mm.close()
    return [name, sizes]


def read(descriptor: list) -> list[memoryview]:
    """Map a segment, unlink its name, and return one memoryview per buffer."""
    name, sizes = descriptor
    if not (isinstance(name, str) and name.startswith(PREFIX) and "/" not in name):
        raise ValueError(f"bad shared-memory name {name!r}")
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_RDWR)
    try:
        total = max(sum(sizes), 1)
        mm = mmap.mmap(fd, total, flags=mmap.MAP_SHARED)
    finally:
        os.close(fd)
        _unlink(path)
    view = memoryview(mm)
    out, off = [], 0
    for n in sizes:
        out.append(view[off : off + n])
        off += n
    return out


def discard(descriptor: list | None) -> None:
    """Remove a segment that was never read (the receiver failed)."""
    if descriptor:
        _unlink(os.path.join(SHM_DIR, descriptor[0]))


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def sweep() -> int:
    """Remove segments left by processes that no longer exist; returns how many."""
    if not os.path.isdir(SHM_DIR):
        return 0
    removed = 0
    for name in os.listdir(SHM_DIR):
        if not name.startswith(PREFIX):
            continue
        try:
            pid = int(name[len(PREFIX) :].split("-", 1)[0])
        except ValueError:
            continue
        if not psutil.pid_exists(pid):
            _unlink(os.path.join(SHM_DIR, name))
            removed += 1
    return removed
