"""What every part of the benchmark shares: constants, errors, a row, a measurement."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .cluster import Cluster

SCRIPTS_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = SCRIPTS_DIR.parent
RUN_MARKER_ENV = "ZFABRIC_BENCH_RUN"  # set in every process this run starts
CHILD_LINE_PREFIX = "@@bench "  # child -> parent result lines on stdout
N_WORKERS = 2
CLIENT_CLOSE_TIMEOUT = 10.0
PROCESS_STOP_GRACE = 3.0


class BenchError(Exception):
    """A benchmark produced a wrong result or could not measure."""


class SetupError(BenchError):
    """The cluster could not be started; later cluster rows are skipped."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise BenchError(message)


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def last_line(path: Path) -> str:
    lines = [line.strip() for line in tail(path, 50).splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def is_loopback(address: str) -> bool:
    """True for addresses that cannot leave this machine."""
    scheme, sep, rest = address.partition("://")
    if not sep:
        rest = scheme
    elif scheme in ("inproc", "ipc"):
        return True
    host = rest.rsplit(":", 1)[0] if ":" in rest else rest
    host = host.strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")



@dataclass
class Measurement:
    value: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Row:
    name: str
    unit: str
    higher_is_better: bool
    # a row measured on the running benchmark cluster (scheduler + 2 workers + client) ...
    run: Callable[[Cluster], Awaitable[Measurement]] | None = None
    fresh_cluster: bool = False  # start a new cluster for every repetition
    # ... or one that makes its own LocalCluster, in a fresh process for every repetition:
    # ``local(impl, timeout, sizes)``
    local: Callable[..., Measurement] | None = None
    # environment of the row's child process and of the cluster processes it starts
    env: tuple[tuple[str, str], ...] = ()



def fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"
