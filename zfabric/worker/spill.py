"""The worker's value store: values in memory, least recently used ones spilled to disk.

:class:`SpillStore` is the mapping a worker keeps its values in (``key -> value``). Beside the
values it counts *managed memory*: the sum of the sizes of the values it holds in memory (the
size of their pickle, out-of-band buffers included), borrowed copies of peers' values too.
:meth:`SpillStore.evict` writes the least recently used value to a file of its own in the
worker's local directory and drops it from memory; reading a spilled key brings it back.

How a value goes to disk: its pickle-5 form is ``(header, buffers)`` -- the buffers being the
raw memory of NumPy arrays and the like, uncopied views. The file holds the header, then each
buffer, written straight from those views (no pickled copy of the whole value is ever made).

Reading back maps the file copy-on-write (``mmap.ACCESS_COPY``) and rebuilds the value on the
mapping: no copy at all, pages come from the page cache (or the disk) when first touched, and
a task that writes into the value writes into private pages, never into the file. The file
stays while the value is in memory, as a *clean copy*: when the value is evicted again and its
bytes hash (xxh3-128, a few ms for 50 MB) as they did when written, nothing is written again;
only a value that changed is written anew. A value read back and evicted again -- the common
case when data larger than memory is read in order -- costs no disk write.

A peer asking for a spilled value gets the buffers as read-only mappings of the file itself
(:meth:`SpillStore.serialized_from_disk`), which ZeroMQ or a shared-memory ``pwrite`` read from
the page cache: the value is never loaded into this worker's heap, nor put back in memory here.

Why not ``zict`` (dask.distributed's choice)? Its ``File`` store would be handed a list of
frames to write and gives back ``bytearray`` frames, and its ``Buffer`` keeps sizes from a
``weight`` callback; we would still need our own layer for what matters here: reusing the
pickle a task thread made already (the worker keeps it to serve peers), serving spilled values
to peers straight from the file by ``mmap``, reading back into memory that is not zero-filled
first, thread-safety for task threads that read dependencies while the loop thread spills,
and a clear failure when the disk is full. That layer is most of the code; the LRU and the
file I/O under it are a few dozen lines, so an extra dependency would not pay.

Thread safety: the worker's loop thread writes and evicts; task threads read dependencies
(``store[key]``), which may read a value back from disk. One lock guards the tables; file
reads happen outside it and are committed only if the key was not changed meanwhile.
"""

from __future__ import annotations

import itertools
import logging
import mmap
import os
import shutil
import sys
import tempfile
import threading
from collections import OrderedDict
from collections.abc import MutableMapping

import xxhash

from .. import serialize

logger = logging.getLogger(__name__)

__all__ = ["SpillFailed", "SpillStore", "sizeof", "travel_error", "worker_directory"]

#: One ``os.write``/``readinto`` moves at most this much (Linux stops a single call near 2 GiB).
_CHUNK = 1 << 30


class SpillFailed(OSError):
    """Raised when a value cannot be written to the local directory (disk full, no
    permission); the value stays in memory."""


def worker_directory(base: str | None, identity: str) -> str:
    """The local directory of the worker process ``identity`` under ``base`` (default: the
    system's temporary directory). Unique per process incarnation, so several workers of one
    host never share one, and a Nanny can find (and remove) the directory of a worker it lost.
    """
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in identity)
    return os.path.join(base or tempfile.gettempdir(), f"zfabric-{safe}")


#: Items of a list, tuple, set or dict that :func:`sizeof` looks at (the rest are assumed
#: alike).
SIZEOF_SAMPLE = 16


def sizeof(value, _depth: int = 2) -> int:
    """Bytes a value holds, roughly: for values that arrive without a pickled size, and for a
    task's result that is kept unpickled until a peer asks for it. A few microseconds (never
    a pickle): the buffers of an array, a Series, an Index, a DataFrame's blocks; a sample of
    the items of a list, tuple, set or dict (two levels deep); ``sys.getsizeof`` otherwise."""
    t = type(value)
    if t is bytes or t is bytearray:
        return len(value)
    if t is memoryview:
        return value.nbytes
    if _depth and (t in _COLLECTIONS or isinstance(value, _COLLECTION_BASES)):
        n = len(value)
        own = 64 + 8 * n  # (not sys.getsizeof: a subclass's __sizeof__ may walk every item)
        if not n:
            return own
        total = seen = 0
        items = value.values() if isinstance(value, dict) else value
        for item in itertools.islice(items, SIZEOF_SAMPLE):
            total += sizeof(item, _depth - 1)
            seen += 1
        return own + total * n // seen
    if t in _SCALARS:
        return sys.getsizeof(value)
    if t is serialize.RawArgs:
        return serialize.nbytes(value.header, value.buffers)
    # Only what the value's class defines is asked for: an instance's __getattr__ may do
    # anything (an actor's handle calls its actor).
    try:
        if hasattr(t, "nbytes"):  # NumPy, pandas Series and Index, Arrow
            nbytes = value.nbytes
            if isinstance(nbytes, int):
                return nbytes
        pandas = sys.modules.get("pandas")
        if pandas is not None and isinstance(value, pandas.DataFrame):
            # its blocks' buffers (pandas' own memory_usage() takes 100 times as long)
            return sum(b.values.nbytes for b in value._mgr.blocks) + int(value.index.nbytes)
    except Exception:
        pass
    try:
        return sys.getsizeof(value)
    except Exception:
        return 64


_COLLECTIONS = frozenset({list, tuple, set, frozenset, dict})
_COLLECTION_BASES = (list, tuple, set, frozenset, dict)
_MISSING = object()
_SCALARS = frozenset({type(None), bool, int, float, complex, str})


def travel_error(key, exc: BaseException, where: str) -> str:
    """Why the value of ``key`` cannot leave worker ``where`` (it cannot be pickled)."""
    return (f"the result of {key!r} cannot be pickled ({exc}), so it cannot leave worker"
            f" {where}: only tasks on that worker can use it. Return a picklable value (a list"
            " rather than a generator) to use it elsewhere")


class _OnDisk:
    """Where a spilled value is: its file, the header length, the buffer sizes."""

    __slots__ = ("digest", "header_len", "nbytes", "path", "raw", "sizes")

    def __init__(self, path: str, header_len: int, sizes: list[int], raw: bool, digest: bytes):
        self.path = path
        self.header_len = header_len
        self.sizes = sizes
        self.raw = raw
        self.digest = digest
        self.nbytes = header_len + sum(sizes)


class SpillStore(MutableMapping):
    """``key -> value`` with managed-memory accounting and LRU spilling (module docstring).

    ``serialized`` is the worker's cache of values' pickles (``key -> (header, buffers,
    nbytes)``); spilling uses and drops a cached pickle rather than pickling again.
    """

    def __init__(self, directory: str, *, serialized: dict | None = None,
                 inline_bytes: int = 64 * 1024):
        self.directory = directory
        self.serialized = serialized if serialized is not None else {}
        self.inline_bytes = inline_bytes
        self.fast: OrderedDict[str, object] = OrderedDict()  # least recently used first
        self.weights: dict[str, int] = {}
        self.slow: dict[str, _OnDisk] = {}
        self.clean: dict[str, _OnDisk] = {}  # in memory, with an unchanged copy on disk
        self.managed = 0  # bytes of the values in memory
        self.spilled = 0  # bytes of the values on disk
        self.counters = {"spilled": 0, "spilled_bytes": 0, "unspilled": 0,
                         "unspilled_bytes": 0, "served_from_disk": 0, "failed": 0,
                         "rewrites_saved": 0}
        # values that cannot be pickled: why (they stay in memory; a peer gets the reason)
        self.travel_errors: dict[str, str] = {}
        self.where = ""  # the worker's address, for those messages
        self._lock = threading.RLock()
        self._seq = 0
        self._made_dir = False

    # ------------------------------------------------------------------ directory

    def open(self) -> None:
        """Create the local directory (an existing one of ours is emptied first)."""
        if os.path.isdir(self.directory):
            shutil.rmtree(self.directory, ignore_errors=True)
        os.makedirs(self.directory, exist_ok=True)
        self._made_dir = True

    def close(self) -> None:
        """Forget everything and remove the local directory."""
        with self._lock:
            self.fast.clear()
            self.weights.clear()
            self.slow.clear()
            self.clean.clear()
            self.travel_errors.clear()
            self.managed = self.spilled = 0
        if self._made_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    # ------------------------------------------------------------------ mapping

    def put(self, key: str, value, nbytes: int | None = None) -> None:
        """Hold ``value`` in memory as the most recently used, weighing ``nbytes``."""
        weight = sizeof(value) if nbytes is None else int(nbytes)
        with self._lock:
            self._drop(key)
            self.fast[key] = value
            self.weights[key] = weight
            self.managed += weight

    def __setitem__(self, key: str, value) -> None:
        self.put(key, value)

    def __getitem__(self, key: str):
        with self._lock:
            if key in self.fast:
                self.fast.move_to_end(key)
                return self.fast[key]
            where = self.slow.get(key)
        if where is None:
            raise KeyError(key)
        header, bufs = self._map(where)  # outside the lock: it may take a while
        if where.raw:
            value = serialize.RawArgs(header, bufs)
        else:
            value = serialize.loads_value(header, bufs)
        with self._lock:
            if self.slow.get(key) is where:  # still the same spilled value: bring it back
                del self.slow[key]
                self.spilled -= where.nbytes
                self.clean[key] = where  # the file stays: a clean copy
                self.fast[key] = value
                self.weights[key] = where.nbytes
                self.managed += where.nbytes
                self.counters["unspilled"] += 1
                self.counters["unspilled_bytes"] += where.nbytes
            elif key in self.fast:
                return self.fast[key]
        return value

    def __delitem__(self, key: str) -> None:
        with self._lock:
            if not self._drop(key):
                raise KeyError(key)

    def pop(self, key: str, default=None):
        """Drop ``key`` without reading a spilled value back: returns the value if it was in
        memory, else ``default``."""
        with self._lock:
            value = self.fast.get(key, default)
            self._drop(key)
        return value

    def __contains__(self, key) -> bool:
        return key in self.fast or key in self.slow

    def __iter__(self):
        return iter(list(self.fast) + list(self.slow))

    def __len__(self) -> int:
        return len(self.fast) + len(self.slow)

    def clear(self) -> None:
        with self._lock:
            for key in [*self.slow, *self.clean]:
                self._drop(key)
            self.fast.clear()
            self.weights.clear()
            self.travel_errors.clear()
            self.managed = 0

    def is_spilled(self, key: str) -> bool:
        return key in self.slow

    def _drop(self, key: str) -> bool:
        if key in self.fast:
            del self.fast[key]
            self.managed -= self.weights.pop(key, 0)
            if self.travel_errors:
                self.travel_errors.pop(key, None)
            copy = self.clean.pop(key, None)
            if copy is not None:
                self._unlink(copy)
            return True
        where = self.slow.pop(key, None)
        if where is not None:
            self.spilled -= where.nbytes
            self._unlink(where)
            return True
        return False

    # ------------------------------------------------------------------ pickles

    def cannot_travel(self, key: str, why: str) -> None:
        """The value of ``key`` (in memory) cannot be pickled: it is never spilled, and a
        peer that asks for it gets ``why`` (:meth:`pickled`)."""
        with self._lock:
            if key in self.fast:
                self.travel_errors[key] = why

    def pickled(self, key: str) -> tuple[bytes, list, int] | None:
        """``(header, buffers, nbytes)`` of a stored value, for a peer or a client that asks
        for it; None if ``key`` is not held.

        A task's large result is kept unpickled (most are used only by tasks of this
        worker); it is pickled here, on the first request, and the pickle kept for the next
        (and for spilling). A spilled value is served from its file. A value that cannot be
        pickled gives the pickle of an :class:`~zfabric.serialize.Undecodable` that says why,
        which fails the task that asked for it with that reason; the value stays here, in
        memory, for this worker's tasks. Called from the worker's loop thread only.
        """
        ser = self.serialized.get(key)
        if ser is not None:
            return ser
        with self._lock:
            value = self.fast.get(key, _MISSING)
            why = self.travel_errors.get(key)
            spilled = key in self.slow
        if spilled:
            return self.serialized_from_disk(key)  # not back into memory
        if value is _MISSING:
            return None
        if isinstance(value, serialize.RawArgs):
            return value.header, value.buffers, serialize.nbytes(value.header, value.buffers)
        if why is None:
            try:
                header, bufs = serialize.dumps_value(value, self.inline_bytes,
                                                     serialize.SMALL_BUFFER_BYTES)
            except Exception as exc:
                why = travel_error(key, exc, self.where)
                logger.warning("worker %s: %s", self.where, why)
                with self._lock:
                    # (a RuntimeError is a task changing the value meanwhile: not for good)
                    if self.fast.get(key, _MISSING) is value and \
                            not isinstance(exc.__cause__, RuntimeError):
                        self.travel_errors[key] = why
            else:
                ser = (header, bufs, serialize.nbytes(header, bufs))
                with self._lock:
                    if self.fast.get(key) is value:  # (still the same value)
                        self.serialized[key] = ser
                return ser
        header, _ = serialize.dumps_value(serialize.Undecodable(key, why), 1 << 62)
        return header, [], len(header)

    # ------------------------------------------------------------------ spilling

    def evict(self, skip=()) -> int:
        """Spill the least recently used value in memory (not one of ``skip``); returns the
        bytes freed, 0 when nothing is left to spill. Raises :class:`SpillFailed` when the
        value cannot be written (it then stays in memory)."""
        while True:
            with self._lock:
                unmovable = self.travel_errors
                key = next((k for k in self.fast if k not in skip and k not in unmovable),
                           None)
                if key is None:
                    return 0
                value = self.fast[key]
                weight = self.weights[key]
                ser = self.serialized.get(key)
                copy = self.clean.get(key)
            raw = isinstance(value, serialize.RawArgs)
            if isinstance(value, serialize.RawArgs):
                header, bufs = value.header, value.buffers
            elif ser is not None:
                header, bufs = ser[0], ser[1]
            else:
                try:
                    header, bufs = serialize.dumps_value(value, self.inline_bytes,
                                                         serialize.SMALL_BUFFER_BYTES)
                except Exception as exc:  # it stays in memory; the next value spills
                    why = travel_error(key, exc, self.where)
                    logger.warning("worker %s: cannot spill: %s", self.where, why)
                    with self._lock:
                        if self.fast.get(key, _MISSING) is value:
                            self.travel_errors[key] = why
                    continue
            break
        value = None
        digest = _digest(header, bufs)
        if copy is not None and copy.digest == digest and copy.raw == raw:
            where = copy  # unchanged since it was read back: the file still holds it
            self.counters["rewrites_saved"] += 1
        else:
            self._seq += 1
            path = os.path.join(self.directory, f"{self._seq}.spill")
            try:
                sizes = _write(path, header, bufs)
            except OSError as exc:
                self.counters["failed"] += 1
                raise SpillFailed(exc.errno, f"cannot spill to {self.directory}: {exc.strerror}"
                                  ) from exc
            where = _OnDisk(path, len(header), sizes, raw, digest)
        del header, bufs, ser  # no reference to the value's pickle is kept while it spills
        with self._lock:
            if self.fast.get(key, _MISSING) is _MISSING or key in self.slow:
                if where is not copy:
                    self._unlink(where)  # freed or replaced while we wrote
                return 0
            del self.fast[key]
            self.managed -= self.weights.pop(key, 0)
            self.serialized.pop(key, None)
            old = self.clean.pop(key, None)
            if old is not None and old is not where:
                self._unlink(old)
            self.slow[key] = where
            self.spilled += where.nbytes
            self.counters["spilled"] += 1
            self.counters["spilled_bytes"] += where.nbytes
        return max(weight, 1)

    def serialized_from_disk(self, key: str) -> tuple[bytes, list, int] | None:
        """A spilled value's ``(header, buffers, nbytes)`` with the buffers as read-only
        mappings of its file (module docstring); None if ``key`` is not spilled."""
        with self._lock:
            where = self.slow.get(key)
        if where is None:
            return None
        try:
            fd = os.open(where.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            header = os.pread(fd, where.header_len, 0)
            bufs: list[memoryview | bytes] = []
            if sum(where.sizes):
                mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
                view = memoryview(mm)
                off = where.header_len
                for n in where.sizes:
                    bufs.append(view[off:off + n])
                    off += n
            else:
                bufs = [b"" for _ in where.sizes]
        finally:
            os.close(fd)
        self.counters["served_from_disk"] += 1
        return header, bufs, where.nbytes

    def _map(self, where: _OnDisk) -> tuple[bytes, list]:
        """The header, and the buffers as views of a copy-on-write mapping of the file."""
        fd = os.open(where.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            header = os.pread(fd, where.header_len, 0)
            if len(header) != where.header_len:
                raise OSError(f"spill file {where.path} is shorter than expected")
            bufs: list = []
            if sum(where.sizes):
                view = memoryview(mmap.mmap(fd, 0, access=mmap.ACCESS_COPY))
                off = where.header_len
                for n in where.sizes:
                    bufs.append(view[off:off + n])
                    off += n
            else:
                bufs = [bytearray() for _ in where.sizes]
        finally:
            os.close(fd)
        return header, bufs

    @staticmethod
    def _unlink(where: _OnDisk) -> None:
        try:
            os.unlink(where.path)
        except OSError:
            pass


def _digest(header: bytes, bufs: list) -> bytes:
    h = xxhash.xxh3_128(header)
    for b in bufs:
        h.update(b)
    return h.digest()


def _write(path: str, header: bytes, bufs: list) -> list[int]:
    """Write ``header`` and ``bufs`` back to back into a new file; the buffers' sizes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    sizes = []
    try:
        for part in (header, *bufs):
            view = memoryview(part).cast("B")
            if part is not header:
                sizes.append(view.nbytes)
            while view.nbytes:
                n = os.write(fd, view[:_CHUNK])
                view = view[n:]
    except OSError:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass
        raise
    os.close(fd)
    return sizes
