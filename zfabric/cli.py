"""The ``zfabric`` command: ``scheduler``, ``worker``, ``nanny``, ``mpi``, ``info``, ``top``,
``demo``.

A thin typer app: it reads ``ZFABRIC_*`` settings (:func:`zfabric.config.from_env`), builds the
objects, and runs them until SIGINT or SIGTERM, which close them in order (the signal handling
lives in :mod:`zfabric.process`). Each command imports what it needs when it runs. The worker
processes a Nanny starts do not come through here at all (see ``__main__``).
Exit codes: 0 after a clean shutdown, 1 when something failed, 2 for bad arguments.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="zfabric",
    help="zfabric: a compute fabric on ZeroMQ with dask.distributed's API.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # plain help: every option name whole at 80 columns, no <str>/<bool> type column
    rich_markup_mode=None,
)

Address = Annotated[
    str | None, typer.Argument(help="The scheduler's address, e.g. tcp://10.0.0.5:8786.",
                               show_default=False)
]
SchedulerFile = Annotated[
    Path | None, typer.Option("--scheduler-file", help="Read the scheduler's address from this"
                              " JSON file (written by `zfabric scheduler --scheduler-file`).")
]
LogLevel = Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")]
TargetFraction = Annotated[float | None, typer.Option(
    min=0.0, max=1.0, help="Spill values to disk above this fraction of memory-limit held in"
    " values (default 0.6; 0 turns it off).", show_default=False)]
SpillFraction = Annotated[float | None, typer.Option(
    min=0.0, max=1.0, help="Spill more above this fraction of memory-limit of process memory"
    " (default 0.7; 0 turns it off).", show_default=False)]
PauseFraction = Annotated[float | None, typer.Option(
    min=0.0, max=1.0, help="Start no new task above this fraction of memory-limit of process"
    " memory (default 0.8; 0 turns it off).", show_default=False)]
LocalDirectory = Annotated[str | None, typer.Option(
    help="Where workers spill values (a directory of their own inside it; default: the"
    " system's temporary directory).", show_default=False)]
Preload = Annotated[list[str] | None, typer.Option(
    "--preload", help="A module name or .py file whose dask_setup(worker) runs in each worker"
    " as it starts (and dask_teardown(worker) as it closes); repeatable.")]
SecurityDir = Annotated[
    Path | None, typer.Option("--security", envvar="ZFABRIC_SECURITY", show_default=False,
                              help="Directory of CurveZMQ keys (from `zfabric keygen DIR`):"
                              " encrypt and authenticate every connection.")
]
RequireEncryption = Annotated[
    bool, typer.Option("--require-encryption", help="Refuse to start without --security.")
]
StdinLifeline = Annotated[
    bool, typer.Option("--stdin-lifeline", help="Close cleanly when standard input reaches its"
                       " end (how SSHCluster ties a remote process to its ssh session).")
]


def _stdin_lifeline() -> None:
    """SIGTERM this process (a clean close, see :mod:`zfabric.process`) once stdin ends."""
    import signal
    import threading

    def watch() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="zfabric-stdin-lifeline", daemon=True).start()


def _security(directory: Path | None, require: bool):
    """The Security of --security, or None; exits with a clear error when it is unusable."""
    from .security import Security, SecurityError

    try:
        return Security(directory, require_encryption=require) if (directory or require) \
            else None
    except SecurityError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(2) from None


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``zfabric`` command."""
    command = typer.main.get_command(app)
    _plain_metavars(command)
    command(args=argv, prog_name="zfabric")


def _plain_metavars(command) -> None:
    """Option values named as click names them (``TEXT``, ``INTEGER``, ``PATH``), not by
    typer's ``<str>``/``<int range>`` placeholders."""
    for sub in getattr(command, "commands", {}).values():
        _plain_metavars(sub)
    words = {str: "TEXT", int: "INTEGER", float: "FLOAT", Path: "PATH"}
    for param in getattr(command, "params", ()):
        if param.metavar is not None or getattr(param, "is_flag", False):
            continue
        kind = getattr(getattr(param, "type_descriptor", None), "annotation", None)
        for arg in getattr(kind, "__args__", ()):  # X | None, list[X]
            if arg in words:
                kind = arg
        if getattr(param, "is_flag", None) is None:  # an argument: its own name, no type
            param.metavar = str(param.name).upper()
            param.display_type_rich = lambda ctx: None
        elif kind in words:
            param.metavar = words[kind]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _setup_logging(level: str) -> None:
    from .process import setup_logging

    try:
        setup_logging(level)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--log-level") from None


def _run(coro) -> None:
    """Run a command's coroutine; turn a zfabric or OS error into a message and exit 1."""
    from .errors import ZFabricError

    try:
        code = asyncio.run(coro)
    except (ZFabricError, OSError, ValueError) as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from None
    raise typer.Exit(code or 0)


def _address(address: str | None, scheduler_file: Path | None, *, wait_s: float = 0.0) -> str:
    """The scheduler's address, given directly or in a scheduler file (waited for up to
    ``wait_s``: a worker may start before its scheduler has written the file)."""
    if address and scheduler_file:
        raise typer.BadParameter("give either ADDRESS or --scheduler-file, not both")
    if address:
        return address
    if scheduler_file is None:
        raise typer.BadParameter("give the scheduler's ADDRESS or --scheduler-file")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return json.loads(scheduler_file.read_text())["address"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError) as exc:
            if time.monotonic() >= deadline:
                raise typer.BadParameter(
                    f"cannot read a scheduler address from {scheduler_file}: {exc}",
                    param_hint="--scheduler-file",
                ) from None
            time.sleep(0.1)


def _resources(text: str | None) -> dict[str, float]:
    from .process import parse_resources

    try:
        return parse_resources(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--resources") from None


def _preloads(specs: list[str] | None) -> list[str]:
    """Preload specs with files made absolute (worker processes may start elsewhere); a
    missing file is a bad parameter now, not a worker that fails later."""
    out = []
    for spec in specs or ():
        if spec.endswith(".py") or os.sep in spec:
            if not os.path.isfile(spec):
                raise typer.BadParameter(f"no preload file {spec!r}", param_hint="--preload")
            spec = os.path.abspath(spec)
        out.append(spec)
    return out


# ---------------------------------------------------------------------- scheduler


@app.command()
def scheduler(
    host: Annotated[str, typer.Option(help="Interface to listen on; 0.0.0.0 is every interface"
                                      " (others are given this host's own address).")]
    = "0.0.0.0",
    port: Annotated[int | None, typer.Option(help="Port to listen on (0: any free port)."
                                             "  [default: 8786]", show_default=False)] = None,
    scheduler_file: Annotated[Path | None, typer.Option(
        help="Write the scheduler's address to this JSON file.")] = None,
    pid_file: Annotated[Path | None, typer.Option(help="Write this process's id here.")] = None,
    dashboard_address: Annotated[str | None, typer.Option(
        help="Where to serve the dashboard, e.g. :8787 or 0.0.0.0:8787 (a port in use falls"
        " back to a free one).  [default: :8787]", show_default=False)] = None,
    dashboard: Annotated[bool, typer.Option(help="Serve the web dashboard.")] = True,
    log_level: LogLevel = "info",
    security: SecurityDir = None,
    require_encryption: RequireEncryption = False,
    preload: Annotated[list[str] | None, typer.Option(
        "--preload", help="Not supported: the scheduler runs no user code (use it on"
        " `zfabric worker` or `zfabric nanny`).")] = None,
    stdin_lifeline: StdinLifeline = False,
) -> None:
    """Start a scheduler and print its address."""
    if preload:
        raise typer.BadParameter(
            "zfabric's scheduler runs no user code (it never unpickles anything), so it has no"
            " preloads and no scheduler plugins; pass --preload to `zfabric worker` or"
            " `zfabric nanny` to set workers up, or use client.register_plugin(WorkerPlugin)",
            param_hint="--preload")
    _setup_logging(log_level)
    sec = _security(security, require_encryption)
    if stdin_lifeline:
        _stdin_lifeline()
    _run(_scheduler_main(host, port, scheduler_file, pid_file,
                         dashboard_address if dashboard else None, dashboard, sec))


async def _scheduler_main(host, port, scheduler_file, pid_file, dashboard_address=None,
                          dashboard=True, security=None) -> int:
    from . import config
    from .process import serve, start_or_stop
    from .scheduler import Scheduler

    cfg = config.from_env()
    if dashboard_address is None and dashboard:
        dashboard_address = cfg.DASHBOARD_ADDRESS or None
    try:
        s = Scheduler(host=host, port=cfg.SCHEDULER_PORT if port is None else port, config=cfg,
                      dashboard_address=dashboard_address, security=security)
    except (TypeError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--dashboard-address") from None
    if not await start_or_stop(s):
        return 0
    written = []
    try:
        if pid_file is not None:
            pid_file.write_text(f"{os.getpid()}\n")
            written.append(pid_file)
        if scheduler_file is not None:
            tmp = scheduler_file.with_name(scheduler_file.name + ".tmp")
            tmp.write_text(json.dumps({"type": "Scheduler", "address": s.address, "id": s.id,
                                       "pid": os.getpid()}, indent=2))
            tmp.replace(scheduler_file)  # readers never see half a file
            written.append(scheduler_file)
        typer.echo(f"Scheduler at: {s.address}")
        if s.dashboard_link:
            typer.echo(f"Dashboard at: {s.dashboard_link}")
        reason = await serve(s)
        logging.getLogger("zfabric.cli").info("scheduler stopping: %s", reason)
    finally:
        await s.close()
        for path in written:
            path.unlink(missing_ok=True)
    return 0


# ---------------------------------------------------------------------- worker


@app.command()
def worker(
    address: Address = None,
    scheduler_file: SchedulerFile = None,
    nthreads: Annotated[int | None, typer.Option(min=1, help="Task threads (default: cores).",
                                                 show_default=False)] = None,
    name: Annotated[str | None, typer.Option(help="Worker name (default: its address).")] = None,
    memory_limit: Annotated[str, typer.Option(help="Bytes, e.g. 4GiB, or auto (a share of the"
                                              " RAM), or 0 (none).")] = "auto",
    resources: Annotated[str | None, typer.Option(help='Abstract resources, e.g. "GPU=2,MEM=10e9".'
                                                  )] = None,
    listen_address: Annotated[str | None, typer.Option(
        help="Where to listen for peers, e.g. tcp://0.0.0.0:0.")] = None,
    contact_address: Annotated[str | None, typer.Option(
        help="The address others should use to reach this worker, e.g. tcp://HOST:PORT.")]
    = None,
    death_timeout: Annotated[float | None, typer.Option(
        help="Seconds to keep trying to reach a scheduler before closing.")] = None,
    memory_target_fraction: TargetFraction = None,
    memory_spill_fraction: SpillFraction = None,
    memory_pause_fraction: PauseFraction = None,
    local_directory: LocalDirectory = None,
    log_level: LogLevel = "info",
    preload: Preload = None,
    nanny: Annotated[str | None, typer.Option(hidden=True)] = None,
    identity: Annotated[str | None, typer.Option(hidden=True)] = None,
    parent_pid: Annotated[int | None, typer.Option(hidden=True)] = None,
    ready_fd: Annotated[int | None, typer.Option(hidden=True)] = None,
    security: SecurityDir = None,
    require_encryption: RequireEncryption = False,
) -> None:
    """Start one worker that runs tasks for the scheduler at ADDRESS."""
    _setup_logging(log_level)
    sec = _security(security, require_encryption)
    addr = _address(address, scheduler_file, wait_s=death_timeout or 30.0)
    kw = dict(nthreads=nthreads, name=name, memory_limit=memory_limit,
              resources=_resources(resources), listen_address=listen_address,
              contact_address=contact_address, death_timeout=death_timeout, nanny=nanny,
              identity=identity, memory_target_fraction=memory_target_fraction,
              memory_spill_fraction=memory_spill_fraction,
              memory_pause_fraction=memory_pause_fraction, local_directory=local_directory,
              preload=_preloads(preload), security=sec)
    _run(_worker_main(addr, kw, parent_pid, ready_fd))


async def _worker_main(address: str, kw: dict, parent_pid: int | None,
                       ready_fd: int | None) -> int:
    from .worker_main import run_worker

    def announce(w) -> None:
        if kw["nanny"] is None:
            typer.echo(f"Worker at: {w.address} (scheduler {address})")

    return await run_worker(address, kw, parent_pid, ready_fd, announce=announce)


# ---------------------------------------------------------------------- nanny


@app.command("nanny")
def nanny_command(
    address: Address = None,
    scheduler_file: SchedulerFile = None,
    nworkers: Annotated[int, typer.Option(min=0, help="Worker processes to keep.")] = 1,
    nthreads: Annotated[int | None, typer.Option(min=1, help="Threads per worker (default: the"
                                                 " cores shared among the workers).",
                                                 show_default=False)] = None,
    memory_limit: Annotated[str, typer.Option(help="Per worker: bytes, e.g. 4GiB, auto, or 0."
                                              )] = "auto",
    resources: Annotated[str | None, typer.Option(help='Per worker, e.g. "GPU=2,MEM=10e9".')]
    = None,
    name: Annotated[str | None, typer.Option(help="Worker name (name-0, name-1... for several)."
                                             )] = None,
    death_timeout: Annotated[float | None, typer.Option(
        help="Seconds to keep trying to reach a scheduler before closing.")] = None,
    memory_target_fraction: TargetFraction = None,
    memory_spill_fraction: SpillFraction = None,
    memory_pause_fraction: PauseFraction = None,
    memory_terminate_fraction: Annotated[float | None, typer.Option(
        min=0.0, max=1.0, help="Terminate (and restart) a worker above this fraction of"
        " memory-limit of process memory (default 0.95; 0 turns it off).",
        show_default=False)] = None,
    local_directory: LocalDirectory = None,
    log_level: LogLevel = "info",
    security: SecurityDir = None,
    require_encryption: RequireEncryption = False,
    preload: Preload = None,
    stdin_lifeline: StdinLifeline = False,
) -> None:
    """Start worker processes for the scheduler at ADDRESS and keep them alive."""
    _setup_logging(log_level)
    sec = _security(security, require_encryption)
    addr = _address(address, scheduler_file, wait_s=death_timeout or 30.0)
    if stdin_lifeline:
        _stdin_lifeline()
    _run(_nanny_main(addr, dict(nworkers=nworkers, nthreads=nthreads, memory_limit=memory_limit,
                                resources=_resources(resources), name=name,
                                death_timeout=death_timeout, worker_log_level=log_level,
                                memory_target_fraction=memory_target_fraction,
                                memory_spill_fraction=memory_spill_fraction,
                                memory_pause_fraction=memory_pause_fraction,
                                memory_terminate_fraction=memory_terminate_fraction,
                                local_directory=local_directory,
                                preload=_preloads(preload), security=sec)))


async def _nanny_main(address: str, kw: dict) -> int:
    from .nanny import Nanny
    from .process import serve, start_or_stop

    n = Nanny(address, **kw)
    if not await start_or_stop(n):
        return 0
    typer.echo(f"Nanny started {n.nworkers} worker(s) for {address}:"
               f" {', '.join(n.worker_addresses)}")
    try:
        await serve(n)
    finally:
        await n.close()
    return 0


# ---------------------------------------------------------------------- mpi


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                               "allow_interspersed_args": False})
def mpi(
    ctx: typer.Context,
    script: Annotated[str | None, typer.Argument(
        help="The Python script rank 1 runs as the client (its arguments follow it).",
        show_default=False)] = None,
    scheduler_file: Annotated[Path, typer.Option(
        help="Where rank 0 writes the scheduler's address; on a filesystem every rank"
        " shares.")] = Path("scheduler.json"),
    no_client: Annotated[bool, typer.Option(
        "--no-client", help="Run no script: every rank but 0 is a worker, until a client of"
        " the scheduler file calls client.shutdown().")] = False,
    interface: Annotated[str | None, typer.Option(
        help="Network interface the scheduler listens on (default: every interface, giving"
        " workers this host's address).", show_default=False)] = None,
    host: Annotated[str | None, typer.Option(help="Address the scheduler listens on.",
                                             show_default=False)] = None,
    scheduler_port: Annotated[int, typer.Option(help="The scheduler's port (0: any free"
                                                " one).")] = 0,
    dashboard: Annotated[bool, typer.Option(help="Serve the scheduler's dashboard.")] = True,
    dashboard_address: Annotated[str, typer.Option(help="Where to serve it.")] = ":8787",
    nthreads: Annotated[int, typer.Option(min=1, help="Threads of each worker rank.")] = 1,
    memory_limit: Annotated[str, typer.Option(help="Per worker: bytes, auto or 0.")] = "auto",
    local_directory: LocalDirectory = None,
    death_timeout: Annotated[float, typer.Option(
        help="Seconds workers keep trying to reach a lost scheduler before exiting.")] = 60.0,
    name: Annotated[str | None, typer.Option(help="Worker name prefix (NAME-RANK).",
                                             show_default=False)] = None,
    log_level: LogLevel = "warning",
) -> None:
    """Run inside `mpirun -n N` or `srun -n N`: rank 0 the scheduler, rank 1 SCRIPT as the
    client (a plain Client() in it connects), the others workers; all exit when it ends."""
    _setup_logging(log_level)
    from .deploy.mpi import MPIError, run_rank

    if no_client and script is not None:
        raise typer.BadParameter("give a SCRIPT or --no-client, not both")
    try:
        code = run_rank(script, list(ctx.args), client=not no_client,
                        scheduler_file=scheduler_file, host=host, interface=interface,
                        port=scheduler_port,
                        dashboard_address=dashboard_address if dashboard else None,
                        nthreads=nthreads, memory_limit=memory_limit,
                        local_directory=local_directory, death_timeout=death_timeout,
                        name=name)
    except (MPIError, OSError, ValueError) as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from None
    raise typer.Exit(code)


# ---------------------------------------------------------------------- info


@app.command()
def keygen(
    directory: Annotated[Path, typer.Argument(help="Where to write the keys.")],
    role: Annotated[str | None, typer.Option(
        help="Add one key of this role (client, worker, nanny, admin) to an existing"
        " directory, authorized at once; needs --name.")] = None,
    name: Annotated[str | None, typer.Option(help="File name of the added key.")] = None,
) -> None:
    """Write CurveZMQ keys: one certificate per role, public halves authorized.

    Give every host the secret files of the roles it runs plus scheduler.key and worker.key;
    the scheduler's and workers' hosts also need DIR/authorized. Delete a file from
    DIR/authorized to revoke that key (live sessions end within a heartbeat).
    """
    from .security import SecurityError
    from .security import keygen as write_keys

    if (role is None) != (name is None):
        typer.echo("Error: --role and --name go together", err=True)
        raise typer.Exit(2)
    try:
        roles = (role,) if role else ("worker", "client", "nanny", "admin")
        root = write_keys(directory, roles, name=name)
    except SecurityError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"Keys written to {root} (secret files are readable by you only)")


@app.command()
def info(
    address: Address = None,
    scheduler_file: SchedulerFile = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the scheduler.")] = 5.0,
    security: SecurityDir = None,
) -> None:
    """Show the scheduler's workers and its tasks by state."""
    addr = _address(address, scheduler_file)
    sec = _security(security, False)
    from .client import Client
    from .errors import ZFabricError

    try:
        with Client(addr, timeout=timeout, set_as_default=False, security=sec) as client:
            report = client.scheduler_info()
    except (ZFabricError, OSError) as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(format_info(report))


def _size(n) -> str:
    """A byte count from a report, shown as such; anything else shown as it is."""
    from .reprs import format_bytes

    if type(n) in (int, float) and n == n and abs(n) != float("inf"):
        return format_bytes(n)
    return str(n)[:20]


def format_info(report: dict) -> str:
    """The text ``zfabric info`` prints for a scheduler_info() report."""
    from .top import text_bar

    header = ("NAME", "ADDRESS", "THREADS", "MEMORY", "", "SPILLED", "STATUS", "RUNNING",
              "HELD")
    rows = []
    for addr, w in sorted(report.get("workers", {}).items(), key=lambda kv: str(kv[1]["name"])):
        metrics = w.get("metrics") or {}
        mem = metrics.get("memory", 0)
        limit_bytes = w.get("memory_limit")
        used = _size(mem)
        limit = _size(limit_bytes) if limit_bytes else "-"
        numeric = all(type(v) in (int, float) for v in (mem, limit_bytes))
        bar = (f"{text_bar(mem / limit_bytes, 10)} {mem / limit_bytes * 100:3.0f}%"
               if limit_bytes and numeric else "")
        name = str(w.get("name", addr))
        rows.append(("-" if name == addr else name, addr, str(w.get("nthreads", "")),
                     f"{used} / {limit}", bar, _size(metrics.get("spilled", 0)),
                     str(w.get("status", "running")),
                     str(metrics.get("executing", w.get("processing", 0))),
                     str(w.get("in_memory", 0))))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    nthreads = sum(int(r[2]) for r in rows if r[2].isdigit())
    lines = [f"Scheduler {report.get('address', '')}: {_plural(len(rows), 'worker')},"
             f" {_plural(nthreads, 'thread')}", ""]
    for r in [header, *rows]:
        lines.append("  ".join(c.ljust(wd) for c, wd in zip(r, widths, strict=True)).rstrip())
    tasks = report.get("tasks") or {}
    lines.append("")
    if tasks:
        lines.append("Tasks: " + ", ".join(f"{state} {n}" for state, n in sorted(tasks.items())))
    else:
        lines.append("Tasks: none")
    dashboard = (report.get("services") or {}).get("dashboard")
    if dashboard:
        lines.append(f"Dashboard: {dashboard}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- top


@app.command()
def top(
    address: Address = None,
    scheduler_file: SchedulerFile = None,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between frames.")] = 1.0,
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the scheduler.")] = 5.0,
) -> None:
    """A live full-screen view of the cluster: workers, progress, throughput, events."""
    addr = _address(address, scheduler_file)
    from .errors import ZFabricError
    from .top import run

    try:
        run(addr, interval=interval, once=once, timeout=timeout)
    except (ZFabricError, OSError) as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


# ---------------------------------------------------------------------- demo


@app.command()
def demo(
    n_workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 2,
    tasks: Annotated[int, typer.Option(min=2, help="Sampling tasks (the reduction adds about as"
                                       " many).")] = 2000,
    samples: Annotated[int, typer.Option(min=1, help="Random points per task.")] = 1000,
    processes: Annotated[bool, typer.Option(help="Workers in processes (or threads).")] = True,
) -> None:
    """Estimate pi on a LocalCluster with a few thousand tasks and report what ran where."""
    from .demo import run_demo

    _setup_logging("warning")
    try:
        run_demo(n_workers=n_workers, tasks=tasks, samples=samples, processes=processes)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
