"""Plugin base classes, with dask.distributed's names: WorkerPlugin, NannyPlugin, UploadFile.

A plugin is pickled by the client (``client.register_plugin``, :mod:`zfabric.plugin_requests`)
and kept by the scheduler (as opaque bytes: the scheduler runs no user code), which hands it to
every current worker (or Nanny) and to every one that joins later. The workers and nannies run
it: this module is on the ground floor so that they import it without the client.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import sys
import tempfile

logger = logging.getLogger(__name__)

__all__ = ["NannyPlugin", "SchedulerPlugin", "UploadFile", "WorkerPlugin"]


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


class SchedulerPlugin:
    """dask.distributed's name, so that code defining one imports; registering one raises:
    zfabric's scheduler runs no user code. Subclass :class:`zfabric.TransitionListener`
    instead to follow task transitions in your own process (or use
    ``client.subscribe_topic`` for events you log)."""


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
