"""Plugins and code shipping: WorkerPlugin, NannyPlugin, ``register_plugin``,
``unregister_worker_plugin`` and ``upload_file``, with dask.distributed's names.

A plugin is pickled by the client and kept by the scheduler (as opaque bytes: the scheduler
runs no user code), which hands it to every current worker (or Nanny) and to every one that
joins later. :class:`PluginRequests` holds the Client's methods (the Client mixes it in).
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import sys
import tempfile
import uuid

from . import serialize

logger = logging.getLogger(__name__)

__all__ = ["NannyPlugin", "PluginRequests", "UploadFile", "WorkerPlugin"]


class WorkerPlugin:
    """Subclass and override what you need; register with ``client.register_plugin``.

    ``setup(worker)`` runs on each worker when registered (or when the worker joins later),
    ``teardown(worker)`` when unregistered or the worker closes, and
    ``transition(key, start, finish, **kwargs)`` on the worker's loop thread as each task moves
    (``waiting``, ``ready``, ``executing``, ``memory``, ``error``, ``released``): keep it quick.
    """

    name: str

    def setup(self, worker):
        pass

    def teardown(self, worker):
        pass

    def transition(self, key, start, finish, **kwargs):
        pass


class NannyPlugin:
    """A plugin for each Nanny, run before its worker processes start (environment variables,
    files). With ``restart = True`` the Nanny restarts its workers after ``setup`` so that
    they see what it set up."""

    name: str
    restart = False

    def setup(self, nanny):
        pass

    def teardown(self, nanny):
        pass


class UploadFile(WorkerPlugin):
    """``client.upload_file``: a ``.py``, ``.zip`` or ``.egg`` written on each worker and put
    on its ``sys.path``; a ``.py`` module is (re)imported when ``load``."""

    def __init__(self, path: str, load: bool = True):
        with open(path, "rb") as f:
            self.data = f.read()
        self.filename = os.path.basename(path)
        self.load = load
        self.name = f"upload-file-{self.filename}"

    def setup(self, worker):
        directory = getattr(worker, "_upload_dir", None)
        if directory is None:
            directory = tempfile.mkdtemp(prefix="zfabric-upload-")
            worker._upload_dir = directory
        path = os.path.join(directory, self.filename)
        with open(path, "wb") as f:
            f.write(self.data)
        entry = directory if self.filename.endswith(".py") else path
        if entry not in sys.path:
            sys.path.insert(0, entry)
        importlib.invalidate_caches()
        if self.load:
            module = os.path.splitext(self.filename)[0]
            if self.filename.endswith((".zip", ".egg")):
                return  # an archive of packages: imported by name when used
            if module in sys.modules:
                importlib.reload(sys.modules[module])
            else:
                importlib.import_module(module)

    def teardown(self, worker):
        directory = getattr(worker, "_upload_dir", None)
        if directory is not None:
            worker._upload_dir = None
            shutil.rmtree(directory, ignore_errors=True)


def _name(plugin, name) -> str:
    if name is not None:
        return str(name)
    given = getattr(plugin, "name", None)
    if isinstance(given, str):
        return given
    return f"{type(plugin).__name__}-{uuid.uuid4().hex}"


class PluginRequests:
    """The Client's plugin methods (see the module docstring)."""

    def register_plugin(self, plugin, name: str | None = None, idempotent: bool | None = None):
        """Register a WorkerPlugin (set up on every worker, current and later) or a
        NannyPlugin (on every Nanny); ``{name or address: {"status": "OK"}}``. A plugin of the
        same name replaces the old one (torn down first) unless ``idempotent``, which keeps
        the old one."""
        if isinstance(plugin, NannyPlugin):
            kind = "nanny"
        elif isinstance(plugin, WorkerPlugin) or hasattr(plugin, "setup"):
            kind = "worker"
        else:
            raise TypeError(f"register_plugin needs a WorkerPlugin or a NannyPlugin, got"
                            f" {type(plugin).__name__} (zfabric's scheduler runs no user code,"
                            " so there are no scheduler plugins)")
        header, _ = serialize.dumps_value(plugin, inline_bytes=1 << 62)
        return self.sync(self._register_plugin, kind, _name(plugin, name), header,
                         bool(idempotent))

    def register_worker_plugin(self, plugin, name: str | None = None, nanny: bool | None = None):
        """dask's older spelling of :meth:`register_plugin`."""
        if nanny is True and not isinstance(plugin, NannyPlugin):
            raise TypeError("nanny=True needs a NannyPlugin")
        return self.register_plugin(plugin, name=name)

    async def _register_plugin(self, kind, name, payload, idempotent):
        results = await self._request("register-plugin", role=kind, name=name, payload=payload,
                                      idempotent=idempotent)
        return _statuses(results)

    def unregister_worker_plugin(self, name: str, nanny: bool | None = None):
        """Tear a plugin down everywhere and forget it; ValueError for an unknown name."""
        kind = "nanny" if nanny else "worker"
        return self.sync(self._unregister_plugin, kind, str(name))

    async def _unregister_plugin(self, kind, name):
        results = await self._request("unregister-plugin", role=kind, name=name)
        if results is None:
            raise ValueError(f"there is no {kind} plugin named {name!r}")
        return _statuses(results)

    def upload_file(self, filename, load: bool = True):
        """Ship a ``.py``, ``.zip`` or ``.egg`` to every worker (and every later one), put it
        on their ``sys.path`` and (``load``, for a ``.py``) import it there."""
        filename = os.fspath(filename)
        if not filename.endswith((".py", ".zip", ".egg")):
            raise ValueError(f"upload_file takes a .py, .zip or .egg file, not {filename!r}")
        if not os.path.isfile(filename):
            raise FileNotFoundError(f"no file {filename!r} to upload")
        return self.register_plugin(UploadFile(filename, load=load))


def _statuses(results: dict) -> dict:
    out = {}
    for who, (_, error) in results.items():
        if error is not None:
            data, tb, text = error
            raise serialize.rebuild_exception(data, tb, text)
        out[who] = {"status": "OK"}
    return out


async def nanny_plugin_op(nanny, op: dict, restart: bool = True) -> dict:
    """A Nanny's ``plugin-add``/``plugin-remove``: set up (restarting its workers when the
    plugin asks) or tear down; the reply for whoever registered it."""
    import inspect

    plugins = nanny.__dict__.setdefault("plugins", {})
    reply = {"op": "reply", "id": op["id"]}
    try:
        old = plugins.pop(op["name"], None)
        if old is not None and hasattr(old, "teardown"):
            out = old.teardown(nanny)
            if inspect.isawaitable(out):
                await out
        if op["op"] == "plugin-add":
            plugin = serialize.loads_value(op["payload"])
            out = plugin.setup(nanny) if hasattr(plugin, "setup") else None
            if inspect.isawaitable(out):
                await out
            plugins[op["name"]] = plugin
            if restart and getattr(plugin, "restart", False):
                await nanny.restart_workers()
        reply["value"] = True
    except Exception as exc:
        logger.exception("nanny plugin %r failed", op["name"])
        reply["error"] = list(serialize.exception_payload(exc))
    return reply
