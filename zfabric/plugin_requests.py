"""The Client's plugin requests: ``register_plugin``, ``unregister_worker_plugin`` and
``upload_file``, with dask.distributed's names (the plugin classes: :mod:`zfabric.plugins`).

A plugin is pickled here and kept by the scheduler as opaque bytes; it hands it to every
current worker (or Nanny) and to every one that joins later.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from . import serialize
from .client_core import ClientCore
from .cluster_admin import SCHEDULER_PLUGINS
from .plugins import NannyPlugin, UploadFile, WorkerPlugin
from .worker_plugins import WorkerCallback

__all__ = ["PluginRequests"]


def _name(plugin, name) -> str:
    if name is not None:
        return str(name)
    given = getattr(plugin, "name", None)
    if isinstance(given, str):
        return given
    return f"{type(plugin).__name__}-{uuid.uuid4().hex}"


class PluginRequests:
    """The Client's plugin methods (see the module docstring), for ``client``."""

    def __init__(self, client: Any, core: ClientCore):
        self.sync = client.sync
        self.request = core.request

    def register_plugin(self, plugin, name: str | None = None, idempotent: bool | None = None):
        """Register a WorkerPlugin (set up on every worker, current and later) or a
        NannyPlugin (on every Nanny); ``{name or address: {"status": "OK"}}``. A plugin of the
        same name replaces the old one (torn down first) unless ``idempotent``, which keeps
        the old one."""
        if _is_scheduler_plugin(plugin):
            raise TypeError(f"{type(plugin).__name__} is a SchedulerPlugin: {SCHEDULER_PLUGINS}")
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
        results = await self.request("register-plugin", role=kind, name=name, payload=payload,
                                      idempotent=idempotent)
        return _statuses(results)

    def unregister_worker_plugin(self, name: str, nanny: bool | None = None):
        """Tear a plugin down everywhere and forget it; ValueError for an unknown name."""
        kind = "nanny" if nanny else "worker"
        return self.sync(self._unregister_plugin, kind, str(name))

    async def _unregister_plugin(self, kind, name):
        results = await self.request("unregister-plugin", role=kind, name=name)
        if results is None:
            raise ValueError(f"there is no {kind} plugin named {name!r}")
        return _statuses(results)

    def register_worker_callbacks(self, setup=None):
        """Run ``setup()`` (or ``setup(dask_worker=worker)``) on every worker, current and
        later (a :class:`~zfabric.worker_plugins.WorkerCallback` plugin)."""
        if setup is None:
            return {}
        return self.register_plugin(WorkerCallback(setup))

    def upload_file(self, filename, load: bool = True):
        """Ship a ``.py``, ``.zip`` or ``.egg`` to every worker (and every later one), put it
        on their ``sys.path`` and (``load``, for a ``.py``) import it there."""
        filename = os.fspath(filename)
        if not filename.endswith((".py", ".zip", ".egg")):
            raise ValueError(f"upload_file takes a .py, .zip or .egg file, not {filename!r}")
        if not os.path.isfile(filename):
            raise FileNotFoundError(f"no file {filename!r} to upload")
        return self.register_plugin(UploadFile(filename, load=load))


def _is_scheduler_plugin(plugin) -> bool:
    """A ``SchedulerPlugin`` of dask.distributed (or zfabric's name for one), without
    importing dask.distributed."""
    return any(c.__name__ == "SchedulerPlugin" for c in type(plugin).__mro__)


def _statuses(results: dict) -> dict:
    out = {}
    for who, (_, error) in results.items():
        if error is not None:
            data, tb, text = error
            raise serialize.rebuild_exception(data, tb, text)
        out[who] = {"status": "OK"}
    return out


