"""User data on the wire: functions, arguments, results and exceptions.

- A task payload is ``<4-byte length><pickled function><pickled args and kwargs>``. The function
  is pickled once per function object (cached) and unpickled once per distinct pickle on the
  worker (cached), so ``map`` over a lambda pays for cloudpickle once, not per item.
- Futures inside arguments pickle as :class:`Dep` markers; pickling records their keys (the
  task's dependencies) and unpickling on the worker swaps each marker for the dependency's
  value. One pickle pass finds every dependency, however deeply nested.
- Plain pickle first (fast for plain data); anything whose pickle refers to ``__main__``, or to a
  module of the user's own beside their script (which a worker cannot import), is pickled again
  by value with cloudpickle, as dask.distributed does. That holds for every place user data is
  pickled: arguments, results, scattered values, exceptions and ``run``.
- A value a worker receives but cannot unpickle is stored as :class:`Undecodable`: the tasks that
  use it fail with the reason and the key, and the worker's loop carries on.
- Values use pickle protocol 5. Buffers of at least ``inline_bytes`` (NumPy arrays, bytes-like
  objects) travel out of band as separate frames without a copy; smaller ones stay in the pickle.
- Exceptions travel pickled, with their traceback as (file, line, function) frames, rebuilt into
  a real traceback object on the client.
"""

from __future__ import annotations

import contextlib
import functools
import linecache
import os
import pickle
import struct
import sys
import sysconfig
import threading
import traceback as tb_module
import types
import weakref
from collections import OrderedDict
from collections.abc import Iterator

import cloudpickle
import xxhash

from .errors import SerializationError

__all__ = [
    "Dep",
    "KeyHandle",
    "Undecodable",
    "dumps_object",
    "dumps_task",
    "dumps_value",
    "exception_payload",
    "loads_task",
    "loads_value",
    "rebuild_exception",
]

_local = threading.local()
_LEN = struct.Struct("!I")


class KeyHandle:
    """Base of objects that stand for a key's value on the cluster (zfabric's Future).

    Inside a task's arguments (or their lists, tuples, sets and dicts) one is swapped for a
    :class:`Dep` marker, which the worker replaces by the key's value; pickled anywhere else
    it pickles as its subclass's ``__reduce__`` says."""

    __slots__ = ()
    _wkey: str  # the key's wire form (zfabric.keys), set by the subclass


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
    if values is None:  # not a task's argument (a pickle read again on the client): a marker
        return Dep(key)
    return resolve(values, key)


def resolve(values: dict, key: str):
    """The value of dependency ``key`` among a task's ``values`` (see :func:`task_values`);
    SerializationError when it is missing or could not be unpickled."""
    try:
        value = values[key]
    except KeyError:
        raise SerializationError(f"dependency {key!r} is missing on this worker") from None
    if type(value) is Undecodable:
        raise SerializationError(f"dependency {key!r}: {value.reason}")
    return value


def task_values() -> dict | None:
    """The dependency values of the task whose arguments are being unpickled on this thread
    (:func:`loads_args`), else None."""
    return getattr(_local, "values", None)


def collecting() -> list[str] | None:
    """The list that Future.__reduce__ should append its key to, while a task is pickled."""
    return getattr(_local, "collect", None)


@contextlib.contextmanager
def collect_keys(keys: list[str]) -> Iterator[list[str]]:
    """Within the block, pickling a Future (or a :class:`Dep`) on this thread appends its key
    to ``keys`` (and it unpickles as a Future of the reader's client, or a task's value)."""
    _local.collect = keys
    try:
        yield keys
    finally:
        _local.collect = None


def is_direct(future) -> bool:
    """Should ``future`` be pickled as a dependency (replaced by its value on the worker)?
    Not while a task's arguments are pickled again with their direct Futures already swapped
    for :class:`Dep` markers: a Future left then sits inside another object and stays one."""
    return not getattr(_local, "nested", False)


def _swap_futures(obj):
    """``obj`` with each Future in it, or in its lists, tuples, sets and dicts, swapped for a
    :class:`Dep` marker (containers are copied only where something changed)."""
    t = type(obj)
    if t in (list, tuple, set, frozenset):
        items = [_swap_futures(x) for x in obj]
        if all(a is b for a, b in zip(items, obj, strict=True)):
            return obj
        return items if t is list else t(items)
    if t is dict:
        out = {k: _swap_futures(v) for k, v in obj.items()}
        if all(out[k] is v for k, v in obj.items()):
            return obj
        return out
    if isinstance(obj, KeyHandle):
        return Dep(obj._wkey)
    return obj


# ---------------------------------------------------------------------------- tasks

_func_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_func_lock = threading.Lock()


# ---------------------------------------------------------------------------- by value

_local_cache: tuple = (None, -1, ())


def _installed_roots() -> list[str]:
    paths = sysconfig.get_paths()
    roots = {paths.get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    roots.update(p for p in sys.path if p.endswith(("site-packages", "dist-packages")))
    return [os.path.realpath(r) for r in roots if r]


@functools.cache
def _installed_top_levels() -> frozenset[str]:
    """Top-level names of installed distributions: a scan of every distribution's metadata
    (tens of milliseconds), done once per process; ``sys.modules`` growing does not change
    what is installed."""
    from importlib.metadata import packages_distributions

    return frozenset(packages_distributions())


def _is_zfabric_main(main) -> bool:
    spec = getattr(main, "__spec__", None)
    return getattr(spec, "name", "").startswith("zfabric.")


def local_modules() -> tuple[bytes, ...]:
    """Names (as bytes) of the modules the user's script imports from beside itself.

    A worker on another host, or started in another directory, cannot import these, so values
    that refer to them travel by value (they are registered with cloudpickle for that). Modules
    of installed distributions (editable ones too) and zfabric itself are left out. The answer
    is cached until ``sys.modules`` grows.
    """
    global _local_cache
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    n = len(sys.modules)
    if not path:
        return ()
    if _local_cache[0] == path and _local_cache[1] == n:
        return _local_cache[2]
    root = os.path.dirname(os.path.realpath(path))
    names: list[bytes] = []
    # (a worker or a zfabric command has no user script beside it)
    if not _is_zfabric_main(main) and not any(root == r or root.startswith(r + os.sep)
                                              for r in _installed_roots()):
        installed = None
        for name, mod in list(sys.modules.items()):
            if "." in name or name in ("__main__", "zfabric") or mod is None:
                continue
            f = getattr(mod, "__file__", None)
            if not f or not os.path.realpath(f).startswith(root + os.sep):
                continue
            if installed is None:
                installed = _installed_top_levels()
            if name in installed:
                continue
            try:
                cloudpickle.register_pickle_by_value(mod)
            except (ValueError, TypeError):
                continue
            names.append(name.encode())
    _local_cache = (path, n, tuple(names))
    return _local_cache[2]


#: Types whose plain pickle names no module, holds no Future and no out-of-band buffer: values
#: of these skip the by-value check (the common case of a tiny task's arguments and result).
PLAIN_TYPES = frozenset({type(None), bool, int, float, str, bytes})
_PLAIN_TYPES = PLAIN_TYPES


def _by_value_needed(data) -> bool:
    """Does a plain pickle refer to something a worker cannot import by name?"""
    if b"__main__" in data:
        return True
    names = local_modules()
    return bool(names) and any(n in data for n in names)


def _pickle(obj, buffer_callback=None, reset=None) -> bytes:
    """Plain pickle where it is safe, cloudpickle by value where it is not (module docstring).

    ``reset`` is called before the second attempt, to forget what the first one collected.
    """
    try:
        data = pickle.dumps(obj, protocol=5, buffer_callback=buffer_callback)
        if not _by_value_needed(data):
            return data
    except Exception:
        pass
    if reset is not None:
        reset()
    return cloudpickle.dumps(obj, protocol=5, buffer_callback=buffer_callback)


def dumps_object(obj, reset=None) -> bytes:
    """Pickle ``obj``: plainly where a worker can import everything it names (about twice as
    fast as cloudpickle for a chunk of a thousand dask nodes), by value with cloudpickle
    where it refers to the user's script or modules beside it (module docstring).
    ``reset`` is called before the second attempt."""
    return _pickle(obj, reset=reset)


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
    if not kwargs:
        for a in args:
            if type(a) not in _PLAIN_TYPES:
                break
        else:  # plain arguments (a tiny task's): no Future, no buffer, no module to name
            return fid, fbytes, pickle.dumps((args, None), protocol=5), [], []
    deps: list[str] = []
    buffers: list = []
    callback = None
    if inline_bytes is not None:
        callback = buffer_keeper(buffers, inline_bytes)

    def reset():
        del deps[:]
        del buffers[:]

    body = (args, kwargs or None)
    _local.collect = deps
    try:
        abytes = _pickle(body, callback, reset)
        if deps:
            # Futures among the arguments (or in their lists, tuples, sets and dicts) are
            # dependencies, replaced by their values on the worker; one inside any other
            # object stays a Future there (bound to the worker's client), as in dask.
            reset()
            _local.nested = True
            abytes = _pickle(_swap_futures(body), callback, reset)
    except Exception as exc:
        raise SerializationError(
            f"cannot pickle the arguments of {getattr(func, '__name__', func)!r}:"
            f" {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        _local.collect = None
        _local.nested = False
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


def loads_args(abytes, values: dict, key=None) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of task ``key``, with dependency markers replaced from ``values``.

    Raises :class:`SerializationError` naming the task (and the dependency, if one is to
    blame) when they cannot be unpickled here.
    """
    _local.values = values
    try:
        body = pickle.loads(abytes)
        if type(body) is ArgsRef:
            raw = values[body.key]
            body = pickle.loads(raw.header, buffers=raw.buffers)
    except Exception as exc:
        what = f"task {key!r}" if key is not None else "a task"
        if isinstance(exc, SerializationError):  # a dependency, which names itself
            raise SerializationError(f"cannot run {what}: {exc}") from exc
        raise SerializationError(
            f"cannot unpickle the arguments of {what}: {type(exc).__name__}: {exc}. Is the"
            " same code installed on the client and the workers?"
        ) from exc
    finally:
        _local.values = None
    args, kwargs = body
    return args, kwargs or {}


def loads_task(payload: bytes, values: dict, key=None):
    """Rebuild ``(func, args, kwargs)`` from a whole-call payload."""
    (n,) = _LEN.unpack_from(payload)
    func = loads_function(payload[4 : 4 + n])
    args, kwargs = loads_args(memoryview(payload)[4 + n :], values, key)
    return func, args, kwargs


# ---------------------------------------------------------------------------- values


#: A large value's buffers (a DataFrame's columns, a NumPy array) of at least this size travel
#: out of band even when under ``inline_bytes`` (see :func:`dumps_value`'s ``small_bytes``)...
SMALL_BUFFER_BYTES = 1024
#: ...up to this many of them per value: beyond, small buffers stay in the pickle, so that a
#: value made of thousands of small arrays never needs thousands of frames.
MAX_SMALL_BUFFERS = 256


def buffer_keeper(buffers: list, inline_bytes: int, small_bytes: int | None = None):
    """A pickle ``buffer_callback`` that keeps contiguous buffers of ``inline_bytes`` or more
    out of band (appended to ``buffers``, uncopied) and the rest in the pickle. With
    ``small_bytes``, buffers of that size or more go out of band too while fewer than
    :data:`MAX_SMALL_BUFFERS` are."""
    if small_bytes is None or small_bytes >= inline_bytes:
        def keep(pb: pickle.PickleBuffer) -> bool:
            try:
                raw = pb.raw()
            except BufferError:
                return True  # not contiguous: serialise in band
            if raw.nbytes < inline_bytes:
                return True
            buffers.append(raw)
            return False

        return keep

    def keep_small(pb: pickle.PickleBuffer) -> bool:
        try:
            raw = pb.raw()
        except BufferError:
            return True
        n = raw.nbytes
        if n < inline_bytes and (n < small_bytes or len(buffers) >= MAX_SMALL_BUFFERS):
            return True
        buffers.append(raw)
        return False

    return keep_small


def dumps_value(obj, inline_bytes: int = 64 * 1024,
                small_bytes: int | None = None) -> tuple[bytes, list]:
    """Pickle a value; buffers of ``inline_bytes`` or more come back separately, uncopied.

    ``small_bytes`` (for a value known to be large, whose pickle will not ride inline with a
    control message anyway): buffers from that size up come back separately as well (see
    :func:`buffer_keeper`). A pandas DataFrame's columns of a few thousand rows then travel
    as frames rather than being copied into the pickle, into the message and out again."""
    if type(obj) in _PLAIN_TYPES:
        return pickle.dumps(obj, protocol=5), []
    buffers: list = []
    try:
        header = _pickle(obj, buffer_keeper(buffers, inline_bytes, small_bytes), buffers.clear)
    except Exception as exc:
        raise SerializationError(
            f"cannot pickle a value of type {type(obj).__qualname__}: "
            f"{type(exc).__name__}: {exc}. Return or pass something picklable"
        ) from exc
    return header, buffers


def loads_value(header, buffers=(), key=None):
    try:
        return pickle.loads(header, buffers=buffers)
    except Exception as exc:
        of = f" of {key!r}" if key is not None else ""
        raise SerializationError(
            f"cannot unpickle the value{of}: {type(exc).__name__}: {exc}. Is the same code"
            " installed on the client and the workers?"
        ) from exc


def inband(header, buffers) -> bytes:
    """One pickle holding what ``header`` and its out-of-band ``buffers`` hold."""
    return _pickle(pickle.loads(header, buffers=buffers))


class Undecodable:
    """Stands in a worker's store for a value that arrived but could not be unpickled.

    Every task that uses it fails with :meth:`error`; nothing else is disturbed.
    """

    __slots__ = ("key", "reason")

    def __init__(self, key, reason: str):
        self.key = key
        self.reason = reason

    def error(self) -> SerializationError:
        return SerializationError(self.reason)


def loads_or_mark(key, header, buffers=()):
    """The value, or an :class:`Undecodable` that says why it could not be had."""
    try:
        return loads_value(header, buffers, key)
    except SerializationError as exc:
        return Undecodable(key, str(exc))


def nbytes(header, buffers) -> int:
    if not buffers:
        return len(header)
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


#: The file name cloudpickle gives the code of functions it pickles by value.
DYNAMIC_CODE = "<dynamic-code>"


def _source_file(name: str, lineno: int) -> str | None:
    """The file of this process where a function pickled by value came from (the script,
    or a module beside it: see :func:`local_modules`): the first whose line ``lineno`` lies
    in a function of that ``name`` (any line, for a lambda)."""
    main = sys.modules.get("__main__")
    files = [getattr(main, "__file__", None)]
    files += [getattr(sys.modules.get(n.decode()), "__file__", None) for n in local_modules()]
    for path in files:
        if not path:
            continue
        lines = linecache.getlines(path)
        if not 0 < lineno <= len(lines):
            continue
        if name == "<lambda>" and "lambda" in lines[lineno - 1]:
            return path
        for i in range(lineno - 1, -1, -1):  # the nearest def above the line
            text = lines[i].lstrip()
            if text.startswith(("def ", "async def ")):
                if text.split("def ", 1)[1].split("(", 1)[0].strip() == name:
                    return path
                break
    return None


def build_traceback(frames: list[tuple[str, int, str]]) -> types.TracebackType | None:
    """A real traceback object whose frames carry the remote file names and line numbers
    (a function that travelled by value, which cloudpickle names ``<dynamic-code>``, gets
    the name of its file here, when this process has it)."""
    tb = None
    for filename, lineno, name in reversed(frames):
        if filename == DYNAMIC_CODE:
            filename = _source_file(name, lineno) or filename
        code = compile("\n" * max(lineno - 1, 0) + "raise _E", filename, "exec")
        code = code.replace(co_name=name)
        try:
            exec(code, {"_E": RuntimeError, "__name__": "<remote>"})
        except RuntimeError as e:
            stub = e.__traceback__.tb_next if e.__traceback__ is not None else None
            if stub is None:
                continue
            tb = types.TracebackType(tb, stub.tb_frame, stub.tb_lasti, stub.tb_lineno)
    return tb
