"""Making the default client dask's scheduler, without importing dask.

Clients created with ``set_as_default=True`` stack up (:func:`zfabric.client.default_client`);
the newest open one is dask's scheduler. Closing it hands over to the previous open one, and
when none is left, dask's configuration goes back to what it was before any zfabric client.

dask's configuration gets one value, :func:`dask_get` (a module-level function, so that a
``copy.deepcopy`` of the config keeps it), which runs each graph on the current default client.
When dask is not imported yet, a finder on ``sys.meta_path`` sets the configuration right after
``import dask`` finishes, so that ``import zfabric`` and ``Client()`` never import dask
themselves. While a zfabric client is dask's scheduler, ``dataframe.shuffle.method`` and
``array.rechunk.method`` are ``"tasks"`` unless the user set them (:data:`TASK_METHODS`):
without a dask.distributed client dask would pick ``"disk"`` for shuffles, which writes partd
files on the client's host and breaks across hosts.
"""

from __future__ import annotations

import inspect
import sys
import threading
import weakref

from . import dask as zfabric_dask
from .current import client as any_client
from .current import current_task, default_client
from .import_hooks import after_import

__all__ = ["closed", "current", "dask_get", "install", "serve_tasks"]

_lock = threading.RLock()
_MISSING = object()
_saved: dict | None = None  # dask config before the first zfabric client, once installed
_for_tasks = False  # a worker process: keep dask's config on zfabric (see serve_tasks)


def install(client=None) -> None:
    """A default client was created: dask's scheduler is now the newest open default client
    (set now if dask is imported, else when it is). ``client`` garbage-collected without
    being closed counts as closed."""
    with _lock:
        _install()
    if client is not None:
        weakref.finalize(client, closed)


def closed() -> None:
    """A default client closed: without another open one, dask's config goes back."""
    with _lock:
        if current() is None and not _for_tasks:
            _restore()


def current():
    """The newest open default client (see :func:`zfabric.client.default_client`), or None."""
    try:
        return default_client()
    except ValueError:
        return None


def serve_tasks() -> None:
    """This is a worker process: a dask computation started inside a task runs on the
    worker's own client (``get_client()``), so dask's config points at :func:`dask_get` here
    even with no default client (set now if dask is imported, else when it is)."""
    global _for_tasks
    with _lock:
        _for_tasks = True
        _install()


def _in_task() -> bool:
    return current_task()[1] is not None


def _client_for_dask():
    if _in_task():  # inside a task: the worker's client
        return any_client()
    c = current()
    if c is None:
        raise RuntimeError("no zfabric client is open to run this dask computation; create"
                           " one with zfabric.Client(address)")
    if c.asynchronous:
        # the error dask (and dask.distributed) give for an asynchronous default client
        raise RuntimeError("Attempting to use an asynchronous Client in a synchronous context"
                           " of `dask.compute`; use `await client.compute(x)` instead")
    return c


#: The keywords :func:`dask_get` hands on to ``Client.get``: its own, and those of dask's
#: local schedulers that it takes (and ignores) there.
_GET_KEYWORDS = frozenset(
    name for name, p in inspect.signature(zfabric_dask.get).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY) | zfabric_dask.IGNORED_KEYWORDS


def dask_get(dsk, keys, **kwargs):
    """dask's scheduler while a zfabric client is the default: runs on that client. Inside a
    task it runs on the worker's client, the task giving its slot back meanwhile (so a
    one-thread worker does not wait for itself).

    As every dask scheduler does, it ignores keywords meant for other schedulers
    (``dask.compute(x, bogus=1)`` hands them to whichever scheduler runs); ``Client.get``
    and ``Client.compute`` themselves still raise on unknown keywords."""
    kwargs = {k: v for k, v in kwargs.items() if k in _GET_KEYWORDS}
    key, executor = current_task()
    if executor is not None:  # as worker_client(): the slot is given back meanwhile
        client = any_client()
        executor.secede(key)
        try:
            return client.get(dsk, keys, **kwargs)
        finally:
            executor.rejoin(key)
    return _client_for_dask().get(dsk, keys, **kwargs)


def _dask_persist(collections, **kwargs):
    return _client_for_dask().persist(collections, **kwargs)


# dask.persist asks the scheduler for a ``persist`` to keep results on the cluster.
vars(dask_get)["persist"] = _dask_persist


# ---------------------------------------------------------------------------- dask's config


def _install() -> None:
    """Make dask's config point at :func:`dask_get`: now if dask is imported, else on import."""
    config = sys.modules.get("dask.config")
    if config is None or "dask" not in sys.modules or not hasattr(sys.modules["dask"], "config"):
        _add_hook()
        return
    _apply(config)


#: dask settings that default to dask.distributed's P2P extension (or to files on the client's
#: host) when left unset; while a zfabric client is the scheduler they are "tasks" unless the
#: user set them. Leaving them unset would also make dask import dask.distributed to ask
#: whether one of its clients is open.
TASK_METHODS = (("dataframe", "shuffle", "method"), ("array", "rechunk", "method"))


def _apply(config) -> None:
    global _saved
    if _saved is None:
        _saved = {"scheduler": config.config.get("scheduler", _MISSING)}
        for path in TASK_METHODS:
            _saved[path] = _get(config.config, path)
    config.config["scheduler"] = dask_get
    for path in TASK_METHODS:
        if _saved[path] is _MISSING:
            _set(config.config, path, "tasks")


def _get(tree: dict, path: tuple):
    for name in path[:-1]:
        tree = tree.get(name) or {}
    value = tree.get(path[-1], _MISSING)
    return _MISSING if value is None else value


def _set(tree: dict, path: tuple, value) -> None:
    for name in path[:-1]:
        if not isinstance(tree.get(name), dict):
            tree[name] = {}
        tree = tree[name]
    tree[path[-1]] = value


def _restore() -> None:
    global _saved
    config = sys.modules.get("dask.config")
    if _saved is None or config is None:
        _saved = None
        return
    if config.config.get("scheduler") is dask_get:
        if _saved["scheduler"] is _MISSING:
            config.config.pop("scheduler", None)
        else:
            config.config["scheduler"] = _saved["scheduler"]
    for path in TASK_METHODS:
        if _saved[path] is _MISSING and _get(config.config, path) == "tasks":
            _set(config.config, path, None)
    _saved = None


_waiting = False  # a callback waits for dask's first import (see _add_hook)


def _add_hook() -> None:
    global _waiting
    if not _waiting:
        _waiting = True
        after_import("dask", _dask_imported)


def _dask_imported() -> None:
    global _waiting
    _waiting = False
    with _lock:
        if current() is not None or _for_tasks:
            _install()
