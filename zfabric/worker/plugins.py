"""A worker's plugins and preloads: user code that sets a worker up, tears it down, and hears
its tasks' transitions, and keeps its transition log (``Client.story``).

:class:`WorkerPlugins` is owned by the worker's loop thread: ``plugin-add``/``plugin-remove``
ops from the scheduler (a client's ``register_plugin``, or a worker joining after it) call
``setup(worker)``/``teardown(worker)`` there, and the loop reports each task transition with
:meth:`WorkerPlugins.transition`. A plugin's error is answered to whoever registered it and
logged; it never stops the worker.

Preloads follow dask's convention: a module (by name) or a ``.py`` file whose ``dask_setup``
is called with the worker once it has started, and ``dask_teardown`` when it closes.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import logging
import os
import sys
import time

from .. import serialize
from ..plugins import WorkerPlugin
from ..transition_log import StoryLog

logger = logging.getLogger(__name__)


def _call(fn, *args, **kwargs):
    value = fn(*args, **kwargs)
    if inspect.isawaitable(value):
        async def wait():
            return await value

        value = asyncio.run(wait())
    return value


class WorkerPlugins:
    """The plugins of one worker, by name (see the module docstring)."""

    def __init__(self, loop):
        self.loop = loop
        self.plugins: dict[str, object] = {}
        self.hooked: list = []  # plugins with a transition method, in registration order
        self.preloads: list = []  # modules (dask_setup/dask_teardown) to set up at the welcome
        length = loop.config.WORKER_TRANSITION_LOG_LENGTH
        #: This worker's transition log (Client.story); None while its length is 0.
        self.story = StoryLog(length) if length > 0 else None

    def __bool__(self) -> bool:
        return bool(self.hooked) or self.story is not None

    @property
    def worker(self):
        """What setup and teardown receive: the Worker (or its loop, when run bare)."""
        return self.loop.owner or self.loop

    def add(self, name: str, payload: bytes) -> None:
        """Unpickle and set up a plugin; one of the same name is torn down first."""
        self.add_object(name, serialize.loads_value(payload))

    def start_preloads(self) -> None:
        """Run the preloads' ``dask_setup(worker)`` (at the first welcome, before any task)."""
        preloads, self.preloads = self.preloads, []
        for module in preloads:
            self.add_object(f"preload-{module.__name__}", Preload(module))

    def add_object(self, name: str, plugin) -> None:
        self.remove(name)
        _call(plugin.setup, self.worker) if hasattr(plugin, "setup") else None
        self.plugins[name] = plugin
        self._hooks()

    def remove(self, name: str) -> bool:
        plugin = self.plugins.pop(name, None)
        if plugin is None:
            return False
        self._hooks()
        if hasattr(plugin, "teardown"):
            _call(plugin.teardown, self.worker)
        return True

    def _hooks(self) -> None:
        base = _base_transition()
        self.hooked = [p for p in self.plugins.values()
                       if hasattr(p, "transition") and getattr(type(p), "transition", None)
                       not in (base, Preload.transition)]

    def transition(self, key: str, start: str, finish: str, **kwargs) -> None:
        if self.story is not None:
            self.story.add(key, start, finish, None, time.time())
        for plugin in self.hooked:
            try:
                plugin.transition(key, start, finish, **kwargs)
            except Exception:
                logger.exception("plugin %r failed in transition(%r, %r, %r)",
                                 plugin, key, start, finish)

    def teardown_all(self) -> None:
        for name in list(self.plugins):
            try:
                self.remove(name)
            except Exception:
                logger.exception("plugin %r failed in teardown", name)


def _base_transition():
    return WorkerPlugin.transition


def load_preload(spec: str):
    """The module a ``--preload`` names: an importable module name or a ``.py`` file."""
    if spec.endswith(".py") or os.sep in spec:
        path = os.path.abspath(spec)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"preload file {spec!r} does not exist")
        name = os.path.splitext(os.path.basename(path))[0]
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise ImportError(f"cannot load preload file {spec!r} as a module")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules.setdefault(name, module)
        module_spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(spec)
    except ImportError as exc:
        raise ImportError(f"cannot import preload module {spec!r}: {exc}; give an importable"
                          " module name or the path of a .py file") from exc


class Preload:
    """A preload module as a plugin: ``dask_setup(worker)`` and ``dask_teardown(worker)``."""

    def __init__(self, module):
        self.module = module

    def setup(self, worker):
        fn = getattr(self.module, "dask_setup", None)
        if fn is not None:
            _call(fn, worker)

    def teardown(self, worker):
        fn = getattr(self.module, "dask_teardown", None)
        if fn is not None:
            _call(fn, worker)

    def transition(self, *args, **kwargs):
        pass
