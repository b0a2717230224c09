"""Run something right after a module's first import, without importing it ourselves.

zfabric hooks into optional libraries (dask's scheduler config, joblib's backends) only when
the user imports them, so ``import zfabric`` and ``Client()`` stay lean.
:func:`after_import` runs a callback at once if the module is imported already, otherwise a
one-shot finder on ``sys.meta_path`` wraps that module's loader so the callback runs as soon
as the import finishes; then the finder removes itself.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys
import threading
from collections.abc import Callable

__all__ = ["after_import"]

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_hooks: dict[str, _AfterImport] = {}


def after_import(name: str, callback: Callable[[], None]) -> None:
    """Call ``callback()`` once module ``name`` is imported: now if it is, else right after its
    first import (a callback given twice before then runs once). An exception in the callback
    is logged, never raised into the import."""
    if name in sys.modules:
        _call(name, callback)
        return
    with _lock:
        hook = _hooks.get(name)
        if hook is None:
            hook = _hooks[name] = _AfterImport(name)
            sys.meta_path.insert(0, hook)
        if callback not in hook.callbacks:  # asked again before the import: once is enough
            hook.callbacks.append(callback)


def _call(name: str, callback: Callable[[], None]) -> None:
    try:
        callback()
    except Exception:
        logger.exception("after importing %s: %r failed", name, callback)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds ``name`` through the other finders and wraps its loader (see the module doc)."""

    def __init__(self, name: str):
        self.name = name
        self.callbacks: list[Callable[[], None]] = []

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _Loader(spec.loader, self)
        return spec

    def remove(self) -> list[Callable[[], None]]:
        with _lock:
            if _hooks.get(self.name) is self:
                del _hooks[self.name]
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            callbacks, self.callbacks = self.callbacks, []
        return callbacks


class _Loader(importlib.abc.Loader):
    def __init__(self, loader, hook: _AfterImport):
        self.loader = loader
        self.hook = hook

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__spec__.loader = module.__loader__ = self.loader  # as if we were never here
        self.loader.exec_module(module)
        for callback in self.hook.remove():
            _call(self.hook.name, callback)

    def __getattr__(self, name):
        return getattr(self.loader, name)
