"""Running one zfabric role as an OS process: signals, clean shutdown, the link to a Nanny.

The ``zfabric`` command (:mod:`zfabric.cli`) uses :func:`serve` and :func:`start_or_stop` to run a
scheduler, worker or nanny until SIGINT or SIGTERM. A worker process started by a Nanny takes a
shorter road: ``python -m zfabric worker ... --ready-fd N`` is recognised by ``__main__`` and
parsed here by :func:`parse_worker_argv` without loading typer (which costs ~0.2 s of start-up on
every restart); the worker process's entry point itself is :mod:`zfabric.worker_main`.
:func:`worker_command` writes that command line (and :func:`worker_environ` its
environment); the two are kept together so they cannot drift apart.

The worker's end of the Nanny link (see :mod:`zfabric.nanny`): it writes ``ready ADDRESS``, then
``closing REASON`` or ``restarting REASON`` lines to the pipe ``--ready-fd``; it asks Linux to
SIGTERM it when its parent dies (``PR_SET_PDEATHSIG``, set in the child itself after ``exec``, so
no ``preexec_fn`` runs in a parent that has threads) and polls its parent's pid each heartbeat as
a portable second line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading

from . import logs
from ._zmq import INSECURE_WARNED_VARIABLE

__all__ = [
    "NannyPipe", "die_with_parent", "is_nanny_worker_argv", "parent_alive", "parse_resources",
    "parse_worker_argv", "serve", "setup_logging", "start_or_stop", "worker_command",
    "worker_environ",
]

#: Environment every worker process gets: one thread per BLAS call (the worker already runs
#: ``nthreads`` tasks at once). (Its C heap is tuned in the process:
#: :func:`zfabric.worker.memory.tune_heap`.)
WORKER_ENVIRON = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    # the Nanny (or the cluster) warned already when it listens without security
    INSECURE_WARNED_VARIABLE: "1",
}
#: After SIGINT/SIGTERM a process that has not closed within this long exits anyway.
HARD_EXIT_S = 10.0


# ---------------------------------------------------------------------- signals


async def serve(obj, *, stop_when=None, parent_pid: int | None = None) -> str:
    """Wait until SIGINT/SIGTERM, ``obj`` closing by itself, or the awaitable ``stop_when``
    finishing (its result is the reason). Returns why it stopped. The caller closes ``obj``.

    A second signal exits at once, except after the death of ``parent_pid``: the kernel sends
    ``PR_SET_PDEATHSIG`` again each time a thread of the dying parent exits."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    why = {"reason": "closed"}

    def on_signal(signum: int) -> None:
        if stop.is_set():
            if parent_pid is not None and not parent_alive(parent_pid):
                return
            os._exit(1)
        why["reason"] = f"received {signal.Signals(signum).name}"
        stop.set()
        hard_exit_later()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(obj.finished())]
    if stop_when is not None:
        waits.append(asyncio.ensure_future(stop_when))
    done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for w in pending:
        w.cancel()
    if stop_when is not None and waits[2] in done and not stop.is_set():
        return waits[2].result()
    return why["reason"]


def hard_exit_later(after_s: float = HARD_EXIT_S) -> None:
    """Exit the process in ``after_s`` seconds unless it has exited by then."""
    timer = threading.Timer(after_s, os._exit, args=(1,))
    timer.daemon = True
    timer.start()


async def start_or_stop(obj) -> bool:
    """Start ``obj``, unless SIGINT/SIGTERM comes first (then close it). True if it started."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    start = asyncio.ensure_future(obj._start_once())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait([start, stopper], return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if not stop.is_set():
        start.result()  # raises if it failed
        return True
    hard_exit_later()
    start.cancel()
    with contextlib.suppress(BaseException):
        await start
    await obj.close()
    return False


# ---------------------------------------------------------------------- the worker's Nanny link


def die_with_parent(parent_pid: int) -> bool:
    """Ask for SIGTERM when the parent dies (Linux); False if it has died already."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - exotic libc
            pass
    return parent_alive(parent_pid)


def parent_alive(parent_pid: int) -> bool:
    """True while the process that started us is still our parent."""
    return os.getppid() == parent_pid


class NannyPipe:
    """The worker's end of the pipe to its Nanny: ``ready ADDRESS`` and ``closing REASON``."""

    def __init__(self, fd: int | None):
        self.fd = fd
        if fd is not None:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)  # not into processes the user's tasks start

    def _write(self, line: str) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, (line.replace("\n", " ") + "\n").encode())
        except OSError:
            pass  # the Nanny is gone; we are about to go too

    def ready(self, address: str) -> None:
        self._write(f"ready {address}")

    def closing(self, reason: str) -> None:
        """We close on purpose: the Nanny should not start us again."""
        self._write(f"closing {reason}")

    def restarting(self, reason: str) -> None:
        """We leave so that the Nanny starts a fresh process at once (we said goodbye to the
        scheduler ourselves, so nothing we ran is to blame)."""
        self._write(f"restarting {reason}")


# ---------------------------------------------------------------------- the worker command


def worker_command(scheduler_address: str, *, identity: str, nthreads: int, memory_limit: int,
                   nanny: str, parent_pid: int, ready_fd: int, name: str | None = None,
                   resources: dict | None = None, listen_address: str | None = None,
                   contact_address: str | None = None, death_timeout_s: float | None = None,
                   log_level: str = "warning", memory_fractions: dict | None = None,
                   local_directory: str | None = None,
                   preload: list[str] | None = None, keys_fd: int | None = None) -> list[str]:
    """The argv of a worker process a Nanny starts: zfabric's own entry point, fresh. ``-P``:
    the current directory does not go on ``sys.path`` (a folder named like an installed
    package there would shadow it); the user's modules come through ``PYTHONPATH``
    (:func:`worker_environ`)."""
    cmd = [
        sys.executable, "-P", "-m", "zfabric", "worker", scheduler_address,
        "--nthreads", str(nthreads), "--memory-limit", str(memory_limit),
        "--nanny", nanny, "--identity", identity, "--parent-pid", str(parent_pid),
        "--ready-fd", str(ready_fd), "--log-level", log_level,
    ]
    if name is not None:
        cmd += ["--name", str(name)]
    if resources:
        cmd += ["--resources", ",".join(f"{k}={v}" for k, v in resources.items())]
    if listen_address:
        cmd += ["--listen-address", listen_address]
    if contact_address:
        cmd += ["--contact-address", contact_address]
    if death_timeout_s is not None:
        cmd += ["--death-timeout", repr(float(death_timeout_s))]
    for name in ("target", "spill", "pause"):
        if memory_fractions and name in memory_fractions:
            cmd += [f"--memory-{name}-fraction", repr(float(memory_fractions[name]))]
    if local_directory:
        cmd += ["--local-directory", local_directory]
    for spec in preload or ():
        cmd += ["--preload", spec]
    if keys_fd is not None:  # a pipe that holds its keys (zfabric.spawn)
        cmd += ["--keys-fd", str(keys_fd)]
    return cmd


def worker_environ(extra: dict | None = None, base: dict | None = None) -> dict[str, str]:
    """The environment of a worker process: ours, the fixed settings, this interpreter's
    extra import paths (so functions pickled by reference import there too), then ``extra``."""
    env = dict(os.environ if base is None else base)
    env.update(WORKER_ENVIRON)
    prefixes = tuple({sys.prefix, sys.base_prefix, sys.exec_prefix})
    paths = []
    for p in sys.path:
        p = os.path.abspath(p or os.curdir)
        if p.startswith(prefixes) or not os.path.isdir(p) or p in paths or _shadows_us(p):
            continue
        paths.append(p)
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update({k: str(v) for k, v in (extra or {}).items()})
    return env


#: The directory this zfabric package is imported from.
_HOME = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _shadows_us(path: str) -> bool:
    """Whether ``path`` holds a ``zfabric`` that is not this package (the parent of a clone,
    with zfabric installed from elsewhere): on a worker's path it would hide the package."""
    if os.path.realpath(path) == os.path.realpath(_HOME):
        return False
    return os.path.isdir(os.path.join(path, "zfabric")) or \
        os.path.isfile(os.path.join(path, "zfabric.py"))


def is_nanny_worker_argv(argv: list[str]) -> bool:
    """True for the arguments (after the program name) of a :func:`worker_command`."""
    return bool(argv) and argv[0] == "worker" and "--ready-fd" in argv and "--help" not in argv


def parse_worker_argv(argv: list[str]) -> dict:
    """Read the arguments of a :func:`worker_command` (after ``worker``) into a dict."""
    p = argparse.ArgumentParser(prog="zfabric worker", add_help=False)
    p.add_argument("address")
    p.add_argument("--nthreads", type=int, required=True)
    p.add_argument("--memory-limit", required=True)
    p.add_argument("--nanny", required=True)
    p.add_argument("--identity", required=True)
    p.add_argument("--parent-pid", type=int, required=True)
    p.add_argument("--ready-fd", type=int, required=True)
    p.add_argument("--log-level", default="warning")
    p.add_argument("--name")
    p.add_argument("--resources")
    p.add_argument("--listen-address")
    p.add_argument("--contact-address")
    p.add_argument("--death-timeout", type=float)
    p.add_argument("--memory-target-fraction", type=float)
    p.add_argument("--memory-spill-fraction", type=float)
    p.add_argument("--memory-pause-fraction", type=float)
    p.add_argument("--local-directory")
    p.add_argument("--preload", action="append", default=[])
    p.add_argument("--keys-fd", type=int)
    return vars(p.parse_args(argv))


def parse_resources(text: str | None) -> dict[str, float]:
    """``"GPU=2,MEM=10e9"`` -> ``{"GPU": 2.0, "MEM": 1e10}``; ValueError when malformed."""
    out: dict[str, float] = {}
    for part in (text or "").replace(" ", ",").split(","):
        if not part:
            continue
        name, sep, amount = part.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            out[name] = float(amount)
        except ValueError:
            raise ValueError(f"cannot read {part!r}; write resources like GPU=2,MEM=10e9"
                             ) from None
    return out


def setup_logging(level: str) -> None:
    """Log to stderr at ``level`` (a name such as ``info``); ValueError for an unknown one."""
    numeric = getattr(logging, level.upper(), None)
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}; use debug, info, warning or error")
    logging.basicConfig(level=numeric, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logs.install()  # for LocalCluster.get_logs
