"""User data on the wire: functions, arguments, results and exceptions.

- A task payload is ``<4-byte length><pickled function><pickled args and kwargs>``. The function
  is pickled once per function object (cached) and unpickled once per distinct pickle on the
  worker (cached), so ``map`` over a lambda pays for cloudpickle once, not per item.
- Futures inside arguments pickle as :class:`Dep` markers; pickling records their keys (the
  task's dependencies) and unpickling on the worker swaps each marker for the dependency's
  value. One pickle pass finds every dependency, however deeply nested.
- Values use pickle protocol 5. Buffers of at least ``inline_bytes`` (NumPy arrays, bytes-like
  objects) travel out of band as separate frames without a copy; smaller ones stay in the pickle.
- Exceptions travel pickled, with their traceback as (file, line, function) frames, rebuilt into
  a real traceback object on the client.
"""

from __future__ import annotations

import pickle
import struct
import threading
import traceback as tb_module
import types
import weakref
from collections import OrderedDict

import cloudpickle
import xxhash

from .errors import SerializationError

__all__ = [
    "Dep",
    "dumps_task",
    "dumps_value",
    "exception_payload",
    "loads_task",
    "loads_value",
    "rebuild_exception",
]

_local = threading.local()
_LEN = struct.Struct("!I")


class Dep:
    """Stands for a dependency's value inside a pickled task."""

    __slots__ = ("key",)

    def __init__(self, key: str):
        self.key = key

    def __reduce__(self):
        collected = getattr(_local, "collect", None)
        if collected is not None:
            collected.append(self.key)
        return (_resolve, (self.key,))


def _resolve(key: str):
    values = getattr(_local, "values", None)
    if values is None:
        return Dep(key)
    try:
        return values[key]
    except KeyError:
        raise SerializationError(f"dependency {key!r} is missing on this worker") from None


def collecting() -> list[str] | None:
    """The list that Future.__reduce__ should append its key to, while a task is pickled."""
    return getattr(_local, "collect", None)


# ---------------------------------------------------------------------------- tasks

_func_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_func_lock = threading.Lock()


def _dumps(obj) -> bytes:
    try:
        return pickle.dumps(obj, protocol=5)
    except Exception:
        return cloudpickle.dumps(obj, protocol=5)


def dumps_function(func) -> tuple[str, bytes]:
    """``(function id, pickle)`` of a function, cached per function object."""
    try:
        return _func_cache[func]
    except (KeyError, TypeError):
        pass
    try:
        data = cloudpickle.dumps(func, protocol=5)
    except Exception as exc:
        raise SerializationError(
            f"cannot pickle the function {func!r}: {type(exc).__name__}: {exc}. Define it at"
            " module level or make what it closes over picklable"
        ) from exc
    entry = (xxhash.xxh3_64_hexdigest(data), data)
    try:
        with _func_lock:
            _func_cache[func] = entry
    except TypeError:
        pass  # not weak-referenceable (a builtin): no caching
    return entry


def dumps_call(func, args: tuple, kwargs: dict, inline_bytes: int | None = None):
    """Pickle a call in two parts: ``(function id, function pickle, arguments pickle,
    dependency keys, out-of-band buffers)``.

    The function's pickle is cached per function object and named by a content hash, so a
    scheduler and its workers keep one copy per function, not one per task. With
    ``inline_bytes``, argument buffers at least that large (NumPy arrays and the like) are
    left out of the pickle and returned separately, uncopied; the caller ships them to a
    worker (see :class:`ArgsRef`) instead of through the scheduler.
    """
    fid, fbytes = dumps_function(func)
    deps: list[str] = []
    buffers: list = []
    callback = None
    if inline_bytes is not None:
        def callback(pb: pickle.PickleBuffer):
            try:
                raw = pb.raw()
            except BufferError:
                return True
            if raw.nbytes < inline_bytes:
                return True
            buffers.append(raw)
            return False

    _local.collect = deps
    try:
        body = (args, kwargs or None)
        try:
            abytes = pickle.dumps(body, protocol=5, buffer_callback=callback)
        except Exception:
            del deps[:]
            del buffers[:]
            try:
                abytes = cloudpickle.dumps(body, protocol=5, buffer_callback=callback)
            except Exception as exc:
                raise SerializationError(
                    f"cannot pickle the arguments of {getattr(func, '__name__', func)!r}:"
                    f" {type(exc).__name__}: {exc}"
                ) from exc
    finally:
        _local.collect = None
    return fid, fbytes, abytes, deps, buffers


def dumps_task(func, args: tuple, kwargs: dict, inline_bytes: int | None = None):
    """Pickle a whole call into one payload: ``(payload, dependency keys, buffers)``."""
    _, fbytes, abytes, deps, buffers = dumps_call(func, args, kwargs, inline_bytes)
    return join_payload(fbytes, abytes), deps, buffers


def split_payload(payload: bytes) -> tuple[bytes, bytes]:
    """``(function pickle, arguments pickle)`` of a payload."""
    (n,) = _LEN.unpack_from(payload)
    return payload[4 : 4 + n], payload[4 + n :]


def join_payload(fbytes: bytes, abytes: bytes) -> bytes:
    return _LEN.pack(len(fbytes)) + fbytes + abytes


class ArgsRef:
    """Stands for a task's arguments that were shipped to a worker under ``key``."""

    __slots__ = ("key",)

    def __init__(self, key: str):
        self.key = key

    def __reduce__(self):
        return (ArgsRef, (self.key,))


class RawArgs:
    """A task's pickled arguments held on a worker (unpickled only when the task runs, so that
    the dependencies inside resolve then)."""

    __slots__ = ("buffers", "header")

    def __init__(self, header: bytes, buffers: list):
        self.header = header
        self.buffers = buffers


def task_hash(payload, buffers=()) -> str:
    """A fast, deterministic 128-bit digest (xxh3) of a payload and its buffers."""
    h = xxhash.xxh3_128(payload)
    for b in buffers:
        h.update(b)
    return h.hexdigest()


class _FunctionCache:
    """Recently unpickled functions, by their pickle."""

    def __init__(self, size: int = 512, max_bytes: int = 64 * 1024):
        self.size = size
        self.max_bytes = max_bytes
        self.items: OrderedDict[bytes, object] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, data: bytes):
        if len(data) > self.max_bytes:
            # a chunk of a dask graph (or a function closing over much data): the worker keeps
            # it under its id while tasks need it; caching it here would outlive that
            return pickle.loads(data)
        with self.lock:
            func = self.items.get(data)
            if func is not None:
                self.items.move_to_end(data)
                return func
        func = pickle.loads(data)
        with self.lock:
            self.items[data] = func
            if len(self.items) > self.size:
                self.items.popitem(last=False)
        return func


_functions = _FunctionCache()


def loads_function(fbytes: bytes):
    """A function from its pickle (recently used ones are cached)."""
    try:
        return _functions.get(fbytes)
    except Exception as exc:
        raise SerializationError(
            f"cannot unpickle a task's function: {type(exc).__name__}: {exc}. Is the same code"
            " installed on the client and the workers?"
        ) from exc


def loads_args(abytes, values: dict) -> tuple[tuple, dict]:
    """``(args, kwargs)``, with dependency markers replaced from ``values``."""
    _local.values = values
    try:
        body = pickle.loads(abytes)
        if type(body) is ArgsRef:
            raw = values[body.key]
            body = pickle.loads(raw.header, buffers=raw.buffers)
    finally:
        _local.values = None
    args, kwargs = body
    return args, kwargs or {}


def loads_task(payload: bytes, values: dict):
    """Rebuild ``(func, args, kwargs)`` from a whole-call payload."""
    (n,) = _LEN.unpack_from(payload)
    func = loads_function(payload[4 : 4 + n])
    args, kwargs = loads_args(memoryview(payload)[4 + n :], values)
    return func, args, kwargs


# ---------------------------------------------------------------------------- values


def dumps_value(obj, inline_bytes: int = 64 * 1024) -> tuple[bytes, list]:
    """Pickle a value; buffers of ``inline_bytes`` or more come back separately, uncopied."""
    buffers: list = []

    def keep(pb: pickle.PickleBuffer):
        try:
            raw = pb.raw()
        except BufferError:
            return True  # not contiguous: serialise in band
        if raw.nbytes < inline_bytes:
            return True
        buffers.append(raw)
        return False

    try:
        header = pickle.dumps(obj, protocol=5, buffer_callback=keep)
    except Exception:
        buffers.clear()
        try:
            header = cloudpickle.dumps(obj, protocol=5, buffer_callback=keep)
        except Exception as exc:
            raise SerializationError(
                f"cannot pickle a value of type {type(obj).__qualname__}: "
                f"{type(exc).__name__}: {exc}. Return or pass something picklable"
            ) from exc
    return header, buffers


def loads_value(header, buffers=()):
    try:
        return pickle.loads(header, buffers=buffers)
    except Exception as exc:
        raise SerializationError(
            f"cannot unpickle a value: {type(exc).__name__}: {exc}. Is the same code installed"
            " on the client and the workers?"
        ) from exc


def nbytes(header, buffers) -> int:
    return len(header) + sum(memoryview(b).nbytes for b in buffers)


# ---------------------------------------------------------------------------- exceptions


def exception_payload(exc: BaseException) -> tuple[bytes | None, bytes, str]:
    """(pickled exception or None, pickled traceback frames, one-line text)."""
    text = "".join(tb_module.format_exception_only(type(exc), exc)).strip()
    frames = [
        (f.filename, f.lineno or 0, f.name)
        for f in tb_module.extract_tb(exc.__traceback__)
    ]
    tb = pickle.dumps(frames)
    try:
        data = cloudpickle.dumps(exc.with_traceback(None), protocol=5)
        pickle.loads(data)  # an exception that pickles but cannot unpickle is useless
    except Exception:
        data = None
    return data, tb, text


class RemoteError(Exception):
    """Stands for a task's exception that could not be pickled; its text is the original's."""


def rebuild_exception(data: bytes | None, tb: bytes | None, text: str) -> BaseException:
    """The remote exception, with a traceback that points at the remote frames."""
    exc = None
    if data is not None:
        try:
            exc = pickle.loads(data)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = RemoteError(text)
    if tb:
        try:
            frames = pickle.loads(tb)
            exc = exc.with_traceback(build_traceback(frames))
        except Exception:
            pass
    return exc


def build_traceback(frames: list[tuple[str, int, str]]) -> types.TracebackType | None:
    """A real traceback object whose frames carry the remote file names and line numbers."""
    tb = None
    for filename, lineno, name in reversed(frames):
        code = compile("\n" * max(lineno - 1, 0) + "raise _E", filename, "exec")
        code = code.replace(co_name=name)
        try:
            exec(code, {"_E": RuntimeError, "__name__": "<remote>"})
        except RuntimeError as e:
            stub = e.__traceback__.tb_next
            if stub is None:
                continue
            tb = types.TracebackType(tb, stub.tb_frame, stub.tb_lasti, stub.tb_lineno)
    return tb
