"""The sans-IO core imports neither zmq nor asyncio and never reads the clock (STYLE habit 1)."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

import zfabric

PURE = ["zfabric.protocol", "zfabric.scheduler.state",
        "zfabric.scheduler.policy", "zfabric.scheduler.records", "zfabric.config",
        "zfabric.scheduler.observe", "zfabric.scheduler.retire", "zfabric.scheduler.peers",
        "zfabric.scheduler.queries", "zfabric.scheduler.shared_state",
        "zfabric.scheduler.candidates", "zfabric.scheduler.liveness"]

FORBIDDEN = {"zmq", "asyncio", "socket", "threading", "time", "selectors"}


def test_pure_modules_import_with_zmq_and_asyncio_blocked():
    # No zfabric module of the core may load asyncio, and zmq may not be loaded at all.
    code = f"""
import sys, builtins
sys.modules["zmq"] = None
sys.modules["zmq.asyncio"] = None
real_import = builtins.__import__
def guarded(name, globals=None, locals=None, fromlist=(), level=0):
    caller = (globals or {{}}).get("__name__", "")
    if name.split(".")[0] == "asyncio" and caller.startswith("zfabric"):
        raise ImportError(f"{{caller}} imported asyncio")
    return real_import(name, globals, locals, fromlist, level)
builtins.__import__ = guarded
import importlib
for name in {PURE!r}:
    importlib.import_module(name)
from zfabric.scheduler.state import SchedulerState
SchedulerState().tick(1.0)
assert sys.modules.get("zmq") is None
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok"


@pytest.mark.parametrize("module", PURE)
def test_pure_module_source_imports_no_io(module):
    path = pathlib.Path(zfabric.__file__).parent.joinpath(*module.split(".")[1:]).with_suffix(".py")
    tree = ast.parse(path.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    # config may use os (environment, at the edges) and psutil lazily; nothing may do I/O
    assert not imported & FORBIDDEN, f"{module} imports {imported & FORBIDDEN}"


def test_dask_stays_optional_and_unimported():
    # Given dask made unimportable, zfabric and its roles still import, and a Client module
    # load (which installs dask's import hook lazily) does not import dask.
    code = """
import sys
import zfabric
from zfabric import Client, Future, LocalCluster, Worker, futures_of
import zfabric.client, zfabric.worker, zfabric.dask_scheduler
assert "dask" not in sys.modules, sorted(m for m in sys.modules if m.startswith("dask"))
sys.modules["dask"] = None
import importlib
importlib.reload(zfabric.dask_scheduler)
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_watching_stays_optional_at_import():
    # The dashboard's HTTP server, prometheus_client, rich and the browser test's selenium load
    # only when used: a Client and a LocalCluster do not pull them in.
    code = """
import sys
import zfabric
from zfabric import Client, LocalCluster, progress, performance_report  # noqa: F401
zfabric.Client.dashboard_link
heavy = [m for m in ("prometheus_client", "rich", "selenium", "ipywidgets") if m in sys.modules]
print(heavy)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
