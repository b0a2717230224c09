"""dask's ``distributed.*`` settings, honoured where zfabric has an equivalent.

dask.distributed's processes read their settings from dask's config: YAML files
(``/etc/dask``, ``$PREFIX/etc/dask``, ``~/.config/dask``, ``$DASK_CONFIG``), ``DASK_*``
environment variables (``DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=0``) and, in a process
that imported dask, ``dask.config.set(...)``. Code written for dask.distributed sets them and
expects them honoured, so every zfabric process reads them too (:func:`settings`, called by
:func:`zfabric.config.from_env`): in a process where dask is imported, from dask's own config
(``dask.config.set`` included); elsewhere from the same files and variables, without
importing dask. ``ZFABRIC_*`` variables and explicit arguments win over them.

:data:`HONOURED` maps each key to its zfabric setting. A key that is set (differs from
dask.distributed's default) and has no zfabric equivalent gets one warning naming it, once
per process tree (a Nanny's worker processes do not repeat it: :data:`WARNED_VARIABLE`).

Nothing here imports dask or PyYAML unless dask is installed and a setting is read.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import site
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["HONOURED", "WARNED_VARIABLE", "settings"]

#: Set in a worker process's environment by its Nanny: the warnings were given already.
WARNED_VARIABLE = "ZFABRIC_DASK_CONFIG_WARNED"


def _seconds(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip().lower()
    units = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    for suffix in ("ms", "s", "m", "h", "d"):
        if text.endswith(suffix) and text[: -len(suffix)].strip().replace(".", "", 1).isdigit():
            return float(text[: -len(suffix)]) * units[suffix]
    return float(text)


def _fraction(value: Any) -> float:
    return 0.0 if value is False or value is None else float(value)


_LOG_LENGTHS = ("TRANSITION_LOG_LENGTH", "WORKER_TRANSITION_LOG_LENGTH")


#: ``distributed.*`` key (dask's spelling) -> (zfabric setting or settings, conversion).
HONOURED: dict[str, tuple[str | tuple[str, ...], Callable[[Any], Any]]] = {
    "distributed.scheduler.allowed-failures": ("ALLOWED_FAILURES", int),
    "distributed.scheduler.worker-ttl": ("WORKER_TTL_S", _seconds),
    "distributed.worker.memory.target": ("MEMORY_TARGET_FRACTION", _fraction),
    "distributed.worker.memory.spill": ("MEMORY_SPILL_FRACTION", _fraction),
    "distributed.worker.memory.pause": ("MEMORY_PAUSE_FRACTION", _fraction),
    "distributed.worker.memory.terminate": ("MEMORY_TERMINATE_FRACTION", _fraction),
    "distributed.comm.timeouts.connect": ("CONNECT_TIMEOUT_S", _seconds),
    "distributed.comm.timeouts.tcp": ("SCHEDULER_LOST_TIMEOUT_S", _seconds),
    "distributed.client-heartbeat": ("HEARTBEAT_INTERVAL_S", _seconds),
    # the length of the scheduler's and workers' transition logs (Client.story); the
    # first is dask's older name of the second
    "distributed.scheduler.transition-log-length": (_LOG_LENGTHS, int),
    "distributed.admin.low-level-log-length": (_LOG_LENGTHS, int),
}

_warned: set[str] = set()
_files_cache: dict | None = None
_defaults_cache: dict | None = None


def _canonical(key: str) -> str:
    return key.replace("_", "-").lower()


def _flatten(tree: Any, prefix: str, out: dict) -> None:
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            _flatten(v, f"{prefix}.{_canonical(str(k))}" if prefix else _canonical(str(k)),
                     out)
    else:
        out[prefix] = tree


def _yaml_files() -> dict:
    """The ``distributed.*`` leaves of dask's YAML config files (read once per process)."""
    global _files_cache
    if _files_cache is not None:
        return _files_cache
    out: dict = {}
    try:
        import yaml  # an optional dependency (dask's)
    except ImportError:
        _files_cache = out
        return out
    paths = [os.environ.get("DASK_ROOT_CONFIG", "/etc/dask"),
             os.path.join(sys.prefix, "etc", "dask"),
             *(os.path.join(p, "etc", "dask") for p in site.PREFIXES),
             os.path.join(os.path.expanduser("~"), ".config", "dask")]
    if "DASK_CONFIG" in os.environ:
        paths.append(os.environ["DASK_CONFIG"])
    seen: set[str] = set()
    for path in paths:
        files = ([os.path.join(path, f) for f in sorted(os.listdir(path))
                  if f.endswith((".yaml", ".yml"))] if os.path.isdir(path)
                 else [path] if os.path.isfile(path) else [])
        for name in files:
            if name in seen:
                continue
            seen.add(name)
            try:
                with open(name) as f:
                    _flatten(yaml.safe_load(f) or {}, "", out)
            except (OSError, yaml.YAMLError) as exc:
                warnings.warn(f"zfabric could not read the dask config file {name}: {exc}",
                              RuntimeWarning, stacklevel=3)
    _files_cache = {k: v for k, v in out.items() if k.startswith("distributed.")}
    return _files_cache


def _environment(environ: Mapping[str, str]) -> dict:
    """``DASK_*`` variables, read as dask reads them (``__`` nests, values are literals)."""
    out: dict = {}
    for name, raw in environ.items():
        if not name.startswith("DASK_") or name.startswith("DASK_INTERNAL"):
            continue
        key = _canonical(name[5:].replace("__", "."))
        if not key.startswith("distributed."):
            continue
        try:
            out[key] = ast.literal_eval(raw)
        except (SyntaxError, ValueError):
            out[key] = raw
    return out


def _defaults() -> dict:
    """dask.distributed's defaults (its distributed.yaml), if it is installed: keys equal to
    them are not "set"."""
    global _defaults_cache
    if _defaults_cache is None:
        _defaults_cache = {}
        spec = importlib.util.find_spec("distributed")
        if spec is not None and spec.origin:
            path = os.path.join(os.path.dirname(spec.origin), "distributed.yaml")
            try:
                import yaml  # an optional dependency (dask's)

                with open(path) as f:
                    _flatten(yaml.safe_load(f) or {}, "", _defaults_cache)
            except (ImportError, OSError):
                pass
    return _defaults_cache


def _dask_installed() -> bool:
    return "dask" in sys.modules or importlib.util.find_spec("dask") is not None


def set_keys(environ: Mapping[str, str] | None = None) -> dict:
    """Every ``distributed.*`` key that is set (not dask.distributed's default), with its
    value: from dask's own config where dask is imported, else from its files and
    ``environ``'s ``DASK_*`` variables."""
    if not _dask_installed():
        return {}
    config = sys.modules.get("dask.config")
    found: dict = {}
    if config is not None and hasattr(config, "config") and environ is None:
        _flatten(config.config.get("distributed") or {}, "distributed", found)
    else:
        found.update(_yaml_files())
        found.update(_environment(os.environ if environ is None else environ))
    defaults = _defaults()
    return {k: v for k, v in found.items() if k not in defaults or defaults[k] != v}


def settings(environ: Mapping[str, str] | None = None, *, warn: bool = True) -> dict:
    """zfabric settings (``{"ALLOWED_FAILURES": 0, ...}``) from the dask config this process
    sees; with ``warn``, one warning per set key that zfabric does not honour."""
    out: dict = {}
    ignored = []
    for key, value in set_keys(environ).items():
        honoured = HONOURED.get(key)
        if honoured is None:
            ignored.append(key)
            continue
        names, convert = honoured
        try:
            for name in (names,) if isinstance(names, str) else names:
                out[name] = convert(value)
        except (TypeError, ValueError):
            warnings.warn(f"dask config {key}={value!r} is not a valid value; zfabric ignores"
                          " it", RuntimeWarning, stacklevel=3)
    env = os.environ if environ is None else environ
    if warn and not env.get(WARNED_VARIABLE):
        for key in sorted(set(ignored) - _warned):
            _warned.add(key)
            warnings.warn(f"dask config {key} is set, but zfabric has no equivalent and ignores"
                          " it (docs/coming-from-dask.md lists the keys it honours)",
                          RuntimeWarning, stacklevel=3)
    return out
