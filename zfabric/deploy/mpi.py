"""zfabric inside an MPI job (or any launcher that starts N copies): ``zfabric mpi`` and
:func:`initialize`, as dask-mpi's command and ``initialize()``.

The provider is the job the launcher (``mpirun -n N``, ``srun -n N``) already has; the launcher
starts the same command N times and each copy takes its part from its rank:

- rank 0 runs the scheduler and writes its address to a scheduler file;
- rank 1 runs the user's script as the client: inside it a plain ``Client()`` connects to the
  job's scheduler (``ZFABRIC_SCHEDULER_ADDRESS`` is set); when the script ends, the scheduler
  and every worker are shut down, so each rank exits 0 and the job ends;
- every other rank runs a Nanny with one worker process (a worker that dies is started again
  inside its rank: MPI launchers abort the whole job when a rank dies);
- with ``--no-client`` (``client=False``) every rank but 0 is a worker and the job runs until
  a later client (``Client(scheduler_file=...)``) calls ``client.shutdown()``.

Ranks come from the launcher's environment (``OMPI_COMM_WORLD_RANK``, ``PMIX_RANK``,
``PMI_RANK``, ``SLURM_PROCID``), so mpi4py is not needed. The address travels in the scheduler
file, which must be on a filesystem every rank sees (the job's working directory usually is).
The file names the job (from ``PMIX_NAMESPACE``, ``OMPI_MCA_ess_base_jobid`` or
``SLURM_JOB_ID``), so a file left by an earlier job is never read as this job's.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import runpy
import sys
import time
from pathlib import Path
from typing import Any

from ..client import Client
from ..cluster import _host
from ..errors import ZFabricError
from ..nanny import Nanny
from ..process import serve
from ..scheduler import Scheduler
from .spec import DEATH_TIMEOUT_S

logger = logging.getLogger("zfabric.cluster")

__all__ = ["MPIError", "initialize", "job_key", "rank_and_size", "run_rank"]

#: Environment variables that carry a process's rank, and the job's size, by launcher.
RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID")
SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")
#: How long ranks wait for the scheduler file.
FILE_TIMEOUT_S = 60.0
#: How long the client rank waits for the scheduler to close after the script.
SHUTDOWN_TIMEOUT_S = 10.0


class MPIError(ZFabricError):
    """zfabric cannot take its part in this MPI job (the message says why)."""


def rank_and_size(environ: dict[str, str] | None = None) -> tuple[int, int | None]:
    """This process's rank and the job's size (None when unknown), from the launcher's
    environment, or from mpi4py where the environment says nothing."""
    env = os.environ if environ is None else environ
    for name in RANK_VARIABLES:
        if env.get(name, "").strip().isdigit():
            size = next((int(env[s]) for s in SIZE_VARIABLES
                         if env.get(s, "").strip().isdigit()), None)
            return int(env[name]), size
    try:
        from mpi4py import MPI  # optional
    except ImportError:
        raise MPIError(
            "no MPI rank in the environment (OMPI_COMM_WORLD_RANK, PMIX_RANK, PMI_RANK or"
            " SLURM_PROCID) and no mpi4py: start this under `mpirun -n N` or `srun -n N`"
        ) from None
    comm = MPI.COMM_WORLD
    return comm.Get_rank(), comm.Get_size()


def job_key(environ: dict[str, str] | None = None) -> str | None:
    """What names this job, the same on every rank (None when the launcher says nothing)."""
    env = os.environ if environ is None else environ
    for name in ("PMIX_NAMESPACE", "OMPI_MCA_ess_base_jobid"):
        if env.get(name):
            return f"{name}={env[name]}"
    if env.get("SLURM_JOB_ID"):
        return f"slurm={env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '')}"
    return None


def _write_scheduler_file(path: Path, address: str, key: str | None) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"type": "Scheduler", "address": address, "pid": os.getpid(),
                               "job": key}, indent=2))
    tmp.replace(path)  # readers never see half a file


def read_scheduler_file(path: Path, key: str | None, timeout: float = FILE_TIMEOUT_S,
                        not_before: float | None = None) -> str:
    """The address in this job's scheduler file, waited for up to ``timeout``. A file of
    another job (another ``job`` key, or without a key: written before ``not_before``) is
    stale and waited past."""
    deadline = time.monotonic() + timeout
    seen = None
    while True:
        try:
            info = json.loads(path.read_text())
            stat = path.stat()
            fresh = info.get("job") == key if key else stat.st_mtime >= (not_before or 0)
            if fresh and info.get("address"):
                return str(info["address"])
            seen = f"a file of another job ({info.get('job')})"
        except FileNotFoundError:
            seen = "no file"
        except (json.JSONDecodeError, OSError) as exc:
            seen = f"an unreadable file ({exc})"
        if time.monotonic() > deadline:
            raise MPIError(
                f"no scheduler file of this job at {path} after {timeout:g} s (found {seen}):"
                " is rank 0 running, and is the file on a filesystem every rank shares? See"
                " docs/deploy.md")
        time.sleep(0.1)


# ---------------------------------------------------------------------- the ranks' parts


async def _scheduler_rank(path: Path, key: str | None, options: dict) -> int:
    s = Scheduler(**options)
    await s
    try:
        _write_scheduler_file(path, s.address, key)
        logger.info("zfabric mpi: scheduler at %s (file %s)", s.address, path)
        reason = await serve(s)
        logger.info("zfabric mpi: scheduler stopping: %s", reason)
    finally:
        await s.close()
        path.unlink(missing_ok=True)
    return 0


async def _worker_rank(address: str, options: dict) -> int:
    n = Nanny(address, **options)
    await n
    try:
        await serve(n)
    finally:
        await n.close()
    return 0


def _shutdown(address: str, path: Path | None = None) -> None:
    """Close the job's scheduler and workers (what ends the other ranks), unless the script
    did (rank 0 removes the scheduler file as it ends)."""
    if path is not None and not path.exists():
        return
    try:
        with Client(address, timeout=SHUTDOWN_TIMEOUT_S, set_as_default=False) as client:
            client.shutdown()
    except Exception as exc:  # already gone: the other ranks end by their death timeout
        logger.warning("zfabric mpi: shutting the job's scheduler down failed: %r", exc)


def _setup(scheduler_file: str | os.PathLike, *, host: str | None, interface: str | None,
           port: int, dashboard_address: str | None, nthreads: int | None,
           memory_limit: Any, local_directory: str | None, death_timeout: float,
           worker_options: dict | None, name: str | None,
           rank: int) -> tuple[Path, str | None, dict, dict]:
    path = Path(scheduler_file).absolute()
    scheduler = {"host": _host(host or "0.0.0.0", None, interface), "port": port,
                 "dashboard_address": dashboard_address}
    worker = {"nworkers": 1, "nthreads": nthreads, "memory_limit": memory_limit,
              "local_directory": local_directory, "death_timeout": death_timeout,
              "name": f"{name or 'rank'}-{rank}", **(worker_options or {})}
    return path, job_key(), scheduler, worker


def run_rank(script: str | None, args: list[str], *, client: bool = True,
             scheduler_file: str | os.PathLike = "scheduler.json", host: str | None = None,
             interface: str | None = None, port: int = 0,
             dashboard_address: str | None = ":8787", nthreads: int | None = 1,
             memory_limit: Any = "auto", local_directory: str | None = None,
             death_timeout: float = DEATH_TIMEOUT_S, worker_options: dict | None = None,
             name: str | None = None) -> int:
    """Take this rank's part (see the module docstring); returns the exit status."""
    started = time.time()
    rank, size = rank_and_size()
    if script is None:
        client = False
    if client and size is not None and size < 3:
        raise MPIError(f"this job has {size} ranks; running a script needs 3 or more (0: the"
                       " scheduler, 1: the script, 2...: workers)")
    path, key, scheduler_kw, worker_kw = _setup(
        scheduler_file, host=host, interface=interface, port=port,
        dashboard_address=dashboard_address, nthreads=nthreads, memory_limit=memory_limit,
        local_directory=local_directory, death_timeout=death_timeout,
        worker_options=worker_options, name=name, rank=rank)
    if rank == 0:
        return asyncio.run(_scheduler_rank(path, key, scheduler_kw))
    address = read_scheduler_file(path, key, not_before=started - 1)
    if rank == 1 and client:
        assert script is not None
        return _client_rank(address, script, args, path)
    return asyncio.run(_worker_rank(address, worker_kw))


def _client_rank(address: str, script: str, args: list[str], path: Path) -> int:
    os.environ["ZFABRIC_SCHEDULER_ADDRESS"] = address  # a plain Client() connects to it
    old_argv = sys.argv
    sys.argv = [script, *args]
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int | None):
            print(exc.code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.argv = old_argv
        _shutdown(address, path)
    return code


def initialize(interface: str | None = None, nthreads: int = 1,
               local_directory: str | None = None, memory_limit: Any = "auto",
               nanny: bool = True, dashboard: bool = True,
               dashboard_address: str = ":8787", protocol: str | None = None,
               worker_class: str = "zfabric.Nanny", worker_options: dict | None = None,
               comm: Any = None, exit: bool = True, *,
               scheduler_file: str | os.PathLike = "scheduler.json",
               death_timeout: float = DEATH_TIMEOUT_S) -> bool:
    """dask-mpi's ``initialize()``: call it at the top of a script started by ``mpirun -n N
    python script.py``. Rank 0 runs the scheduler and rank 2 and above run workers, each until
    the job's client shuts them down, then exit (or, with ``exit=False``, return False); rank
    1 returns True and goes on with the script, where a plain ``Client()`` connects to the
    job's scheduler; when the script ends, the scheduler and the workers are shut down."""
    if protocol not in (None, "tcp", "tcp://"):
        raise ValueError(f"initialize(protocol={protocol!r}): zfabric speaks tcp only")
    if worker_class.rpartition(".")[2] not in ("Nanny", "Worker") or not nanny:
        raise ValueError("initialize(): zfabric runs each worker under a Nanny in its rank"
                         " (a worker that dies restarts there); leave nanny= and"
                         " worker_class= out")
    if comm is not None:
        os.environ.setdefault("OMPI_COMM_WORLD_RANK", str(comm.Get_rank()))
        os.environ.setdefault("OMPI_COMM_WORLD_SIZE", str(comm.Get_size()))
    started = time.time()
    rank, _size = rank_and_size()
    path, key, scheduler_kw, worker_kw = _setup(
        scheduler_file, host=None, interface=interface, port=0,
        dashboard_address=dashboard_address if dashboard else None, nthreads=nthreads,
        memory_limit=memory_limit, local_directory=local_directory,
        death_timeout=death_timeout, worker_options=worker_options, name=None, rank=rank)
    if rank == 1:
        address = read_scheduler_file(path, key, not_before=started - 1)
        os.environ["ZFABRIC_SCHEDULER_ADDRESS"] = address
        atexit.register(_shutdown, address, path)
        return True
    if rank == 0:
        code = asyncio.run(_scheduler_rank(path, key, scheduler_kw))
    else:
        address = read_scheduler_file(path, key, not_before=started - 1)
        code = asyncio.run(_worker_rank(address, worker_kw))
    if exit:
        sys.exit(code)
    return False
