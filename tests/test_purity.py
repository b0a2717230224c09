"""The sans-IO core imports neither zmq nor asyncio and never reads the clock (STYLE habit 1)."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

import zfabric

PURE = ["zfabric.protocol", "zfabric.heartbeat", "zfabric.scheduler.state",
        "zfabric.scheduler.policy", "zfabric.scheduler.records", "zfabric.config"]

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
