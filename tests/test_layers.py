"""The package's layers, kept one-way: every import in zfabric/, function-level ones included,
goes to the same layer or a lower one.

    ground floor  errors, config, keys, current, logs, plugin base classes, ...
    wire          protocol, serialize, security, zap, links, transfer, intake, shm, streams
    scheduler     the pure scheduler state (zfabric.scheduler.*, not its server shell)
    servers       the scheduler's shell, worker, nanny, spawn, dashboard
    client        Client and its parts, futures, collections, shared-state handles
    task API      what a task calls (context)
    top           cluster managers, cli, demo, testing, the package itself

An import that goes up is one refactor away from an ImportError at run time, and a cycle
nobody sees. The test reads the source (nothing is imported), so it is a pure unit test.
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "zfabric"

#: Layers from the bottom up. A module named exactly takes that layer; otherwise the layer of
#: the first pattern that matches it.
LAYERS: list[tuple[str, list[str]]] = [
    ("ground", [
        "zfabric._version", "zfabric.errors", "zfabric.config", "zfabric.keys",
        "zfabric.current", "zfabric.logs", "zfabric.plugins", "zfabric.lifecycle",
        "zfabric.import_hooks", "zfabric.dask_config", "zfabric.reprs",
        "zfabric.worker_plugins", "zfabric.transition_log",
    ]),
    ("wire", [
        "zfabric._zmq", "zfabric.protocol", "zfabric.reports", "zfabric.serialize",
        "zfabric.security",
        "zfabric.zap", "zfabric.link", "zfabric.transfer", "zfabric.intake", "zfabric.shm",
        "zfabric.handshake", "zfabric.streams", "zfabric.bulk",
    ]),
    ("scheduler", ["zfabric.scheduler.*"]),
    ("servers", [
        "zfabric.scheduler", "zfabric.scheduler.server", "zfabric.worker", "zfabric.worker.*",
        "zfabric.nanny", "zfabric.spawn", "zfabric.supervision", "zfabric.process",
        "zfabric.dashboard",
        "zfabric.dashboard.*",
    ]),
    ("client", [
        "zfabric.client", "zfabric.client_core", "zfabric.cluster_admin",
        "zfabric.plugin_requests", "zfabric.futures", "zfabric.session", "zfabric.submission",
        "zfabric.values", "zfabric.replay", "zfabric.datasets",
        "zfabric.diagnostics", "zfabric.dask", "zfabric.dask_*", "zfabric.executor",
        "zfabric.actor", "zfabric.coordination", "zfabric.progressbar", "zfabric.report",
        "zfabric.joblib_backend", "zfabric.window", "zfabric.replies", "zfabric.topics",
        "zfabric.metadata", "zfabric.inspection", "zfabric.multilock", "zfabric.transitions",
        "zfabric.span", "zfabric.profiling", "zfabric.story",
    ]),
    ("task API", ["zfabric.context", "zfabric.task_output"]),
    ("top", [
        "zfabric", "zfabric.__main__", "zfabric.cluster", "zfabric.cluster_manager",
        "zfabric.adaptive",
        "zfabric.deploy", "zfabric.deploy.*", "zfabric.cli", "zfabric.demo", "zfabric.top",
        "zfabric.testing", "zfabric.worker_main",
    ]),
]

#: Imports that may go up, each with its reason. Only optional dependencies and the CLI's
#: start-up time qualify.
ALLOWED_UP: dict[tuple[str, str], str] = {}

#: Function-level imports of zfabric modules that are allowed, with the reason; every other
#: import of a zfabric module is at the top of its module.
ALLOWED_LAZY: dict[str, str] = {
    "zfabric.cli": "start-up time: `zfabric --help` imports no role it does not run",
    "zfabric.__main__": "start-up time of `python -m zfabric`",
    "zfabric": "the package's lazy attributes: `import zfabric` loads no role",
    "zfabric.scheduler": "lazy `Scheduler`: the pure state imports without zmq",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    for index, (_, patterns) in enumerate(LAYERS):
        if module in patterns:
            return index
    for index, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, pattern) for pattern in patterns):
            return index
    raise AssertionError(f"{module} has no layer: add it to LAYERS in tests/test_layers.py")


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def _is_module(name: str) -> bool:
    return name in MODULES


def imports_of(module: str, path: Path):
    """(target module, line, inside a function, type-checking only) for each zfabric import."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []

    def visit(node, in_function, type_only):
        for child in ast.iter_child_nodes(node):
            fn = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            tc = type_only
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for sub in child.body:
                    visit_stmt(sub, fn, True)
                for sub in child.orelse:
                    visit_stmt(sub, fn, type_only)
                continue
            visit_stmt(child, fn, tc)

    def visit_stmt(child, in_function, type_only):
        if isinstance(child, ast.ImportFrom):
            if child.level:
                base = package.split(".")
                base = base[: len(base) - (child.level - 1)]
                origin = ".".join(base + ([child.module] if child.module else []))
            else:
                origin = child.module or ""
            if origin.split(".")[0] == "zfabric":
                for alias in child.names:
                    sub = f"{origin}.{alias.name}"
                    target = sub if _is_module(sub) else origin
                    out.append((target, child.lineno, in_function, type_only))
        elif isinstance(child, ast.Import):
            for alias in child.names:
                if alias.name.split(".")[0] == "zfabric":
                    out.append((alias.name, child.lineno, in_function, type_only))
        visit(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef),
              type_only)

    visit(tree, False, False)
    return out


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_import_goes_up_a_layer():
    wrong = []
    for module, path in sorted(MODULES.items()):
        mine = layer_of(module)
        for target, line, _, type_only in imports_of(module, path):
            if type_only or target not in MODULES:
                continue
            theirs = layer_of(target)
            if theirs > mine and (module, target) not in ALLOWED_UP:
                wrong.append(f"{path.relative_to(ROOT.parent)}:{line}: {module} "
                             f"({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]})")
    assert not wrong, "imports that go up a layer:\n" + "\n".join(wrong)


def test_imports_inside_functions_only_where_allowed():
    lazy = []
    for module, path in sorted(MODULES.items()):
        if module in ALLOWED_LAZY:
            continue
        for target, line, in_function, type_only in imports_of(module, path):
            if in_function and not type_only:
                lazy.append(f"{path.relative_to(ROOT.parent)}:{line}: {module} imports "
                            f"{target} inside a function")
    assert not lazy, ("move these imports to the top of their module (or, for an optional "
                      "dependency's sake, say why in ALLOWED_LAZY):\n" + "\n".join(lazy))


@pytest.mark.parametrize("example", [
    ("zfabric.errors", 0), ("zfabric.protocol", 1), ("zfabric.scheduler.state", 2),
    ("zfabric.scheduler.server", 3), ("zfabric.client", 4), ("zfabric.context", 5),
    ("zfabric.cli", 6),
])
def test_layer_map_reads_as_documented(example):
    module, layer = example
    assert layer_of(module) == layer
