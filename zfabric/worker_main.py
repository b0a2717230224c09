"""The worker process's entry point: ``zfabric worker`` and the processes a Nanny starts.

:func:`main_from_nanny` is what ``python -m zfabric worker ... --ready-fd N`` runs (``__main__``
sends a Nanny's command line here without loading the typer CLI); :func:`run_worker` runs one
:class:`~zfabric.worker.Worker` until a signal, its own close, or its Nanny's death, and tells
the Nanny on the pipe how it ended. The library parts (signals, the command line, the pipe)
live in :mod:`zfabric.process`, which the Nanny's side uses too.
"""

from __future__ import annotations

import asyncio
import sys

from .dask_scheduler import serve_tasks
from .process import (
    NannyPipe,
    die_with_parent,
    parent_alive,
    parse_resources,
    parse_worker_argv,
    serve,
    setup_logging,
    start_or_stop,
)
from .security import Security
from .spawn import read_keys
from .worker import Worker
from .worker.memory import tune_heap

__all__ = ["main_from_nanny", "run_worker"]


def main_from_nanny(argv: list[str]) -> int:
    """``python -m zfabric worker ...`` as a Nanny runs it (see the module docstring)."""
    args = parse_worker_argv(argv[1:])
    setup_logging(args["log_level"])
    kw = dict(nthreads=args["nthreads"], name=args["name"], memory_limit=args["memory_limit"],
              resources=parse_resources(args["resources"]),
              listen_address=args["listen_address"], contact_address=args["contact_address"],
              death_timeout=args["death_timeout"], nanny=args["nanny"],
              identity=args["identity"],
              memory_target_fraction=args["memory_target_fraction"],
              memory_spill_fraction=args["memory_spill_fraction"],
              memory_pause_fraction=args["memory_pause_fraction"],
              local_directory=args["local_directory"],
              preload=args["preload"])
    try:
        if args["keys_fd"] is not None:  # keys in memory: read once from the Nanny's pipe
            kw["security"] = read_keys(args["keys_fd"])
        else:  # the directory of the Nanny's keys, if any
            kw["security"] = Security.from_environ()
        return asyncio.run(run_worker(args["address"], kw, args["parent_pid"], args["ready_fd"]))
    except Exception as exc:
        print(f"zfabric worker: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


async def run_worker(address: str, kw: dict, parent_pid: int | None = None,
                     ready_fd: int | None = None, *, announce=None) -> int:
    """Run a Worker until a signal, its own close, or (with ``parent_pid``) its Nanny's death."""
    pipe = NannyPipe(ready_fd)
    tune_heap()
    if parent_pid is not None and not die_with_parent(parent_pid):
        return 0  # the Nanny that started us is gone already
    serve_tasks()  # dask.compute() inside a task runs on this worker's client
    w = Worker(address, **kw)
    if not await start_or_stop(w):
        return 0
    pipe.ready(w.address)
    if announce is not None:
        announce(w)

    async def parent_gone():
        while parent_alive(parent_pid):
            await asyncio.sleep(w.config.HEARTBEAT_INTERVAL_S)
        return "its nanny is gone"

    try:
        reason = await serve(w, stop_when=parent_gone() if parent_pid is not None else None,
                             parent_pid=parent_pid)
        if reason == "closed" and w._core is not None and w._core.close_reason:
            reason = w._core.close_reason
        # A worker that stopped itself with an exit code (a task passed its task_timeout under
        # a Nanny: a thread cannot be killed) wants a fresh process; otherwise it is done.
        # A loop that crashed says nothing: its Nanny sees a death (and restarts it), and
        # the scheduler counts it against what was running here.
        if w._core is not None and w._core.crashed:
            pass
        elif w.exit_code is not None:
            pipe.restarting(reason)
        else:
            pipe.closing(reason)
    finally:
        await w.close()
    return w.exit_code or 0
