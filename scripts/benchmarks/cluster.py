"""The benchmark cluster: a scheduler and two one-thread workers as processes (through each
library's CLI), an asynchronous client in the benchmarking process; and process hygiene (every
process this run starts carries a marker in its environment and is killed at the end)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import (
    CLIENT_CLOSE_TIMEOUT,
    N_WORKERS,
    PROCESS_STOP_GRACE,
    RUN_MARKER_ENV,
    SetupError,
    is_loopback,
    last_line,
    log,
    tail,
)
from .impls import Impl


def spawn(cmd: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own process group, output to ``log_path``."""
    with open(log_path, "wb") as out:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def signal_group(proc: subprocess.Popen[Any], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def stop_processes(procs: list[subprocess.Popen[Any]], grace: float = PROCESS_STOP_GRACE) -> None:
    """SIGTERM every process group, wait up to ``grace`` s, then SIGKILL."""
    for proc in procs:
        if proc.poll() is None:
            signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    for proc in procs:
        signal_group(proc, signal.SIGKILL)  # also stragglers whose leader already left
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1.0)


def kill_marked_processes(marker: str) -> int:
    """Kill every process whose environment carries this run's marker."""
    try:
        import psutil
    except ImportError:
        return 0
    killed = 0
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get(RUN_MARKER_ENV) == marker:
                proc.kill()
                killed += 1
        except (psutil.Error, OSError):
            continue
    return killed


def tree_rss(pid: int) -> int:
    """Resident memory of a process plus all of its descendants, in bytes."""
    import psutil

    root = psutil.Process(pid)
    total = root.memory_info().rss
    for child in root.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += child.memory_info().rss
    return total


# ---------------------------------------------------------------------------
# A running cluster: scheduler + 2 worker subprocesses + an async client
# ---------------------------------------------------------------------------


@dataclass
class Cluster:
    api: Any
    client: Any
    scheduler_pid: int
    sizes: dict[str, int]
    timeout: float


async def read_scheduler_address(
    path: Path, proc: subprocess.Popen[Any], log_path: Path, deadline: float
) -> str:
    while True:
        if path.exists():
            try:
                address = json.loads(path.read_text()).get("address")
            except (OSError, ValueError):
                address = None  # still being written
            if address:
                return str(address)
        if proc.poll() is not None:
            raise SetupError(f"scheduler exited with code {proc.returncode}: {last_line(log_path)}")
        if time.monotonic() > deadline:
            raise SetupError(
                f"scheduler wrote no address to {path.name} in time; "
                f"last output: {last_line(log_path)}"
            )
        await asyncio.sleep(0.05)


async def start_client(client: Any) -> None:
    await client  # a dask-style Client connects when awaited


async def close_client(client: Any) -> None:
    closing = client.close()
    if inspect.isawaitable(closing):
        await closing


@contextlib.asynccontextmanager
async def running_cluster(impl: Impl, sizes: dict[str, int], timeout: float):
    api = impl.api()
    env = impl.env()
    procs: list[subprocess.Popen[Any]] = []
    logs: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="zfabric-bench-") as tmp:
        workdir = Path(tmp)
        deadline = time.monotonic() + timeout

        def check_alive() -> None:
            for proc, path in zip(procs, logs, strict=True):
                if proc.poll() is not None:
                    raise SetupError(
                        f"{path.stem} exited with code {proc.returncode}: {last_line(path)}"
                    )

        def dump_logs() -> None:
            for path in logs:
                log(f"--- last lines of {path.stem} log ({impl.name}) ---\n{tail(path)}")

        client = None
        try:
            sched_file = workdir / "scheduler.json"
            logs.append(workdir / "scheduler.log")
            procs.append(spawn(impl.scheduler_cmd(sched_file), logs[-1], env))
            address = await read_scheduler_address(sched_file, procs[0], logs[0], deadline)
            if not is_loopback(address):
                raise SetupError(
                    f"scheduler advertises non-loopback address {address!r}; "
                    "this benchmark only talks to 127.0.0.1"
                )
            for i in range(N_WORKERS):
                logs.append(workdir / f"worker-{i}.log")
                procs.append(spawn(impl.worker_cmd(address), logs[-1], env))

            client = api.Client(address, asynchronous=True, **impl.client_kwargs())
            try:
                await asyncio.wait_for(start_client(client), max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                raise SetupError(f"client could not connect to {address} in time")

            while True:
                workers = await asyncio.wait_for(impl.worker_addresses(client), timeout)
                if len(workers) >= N_WORKERS:
                    break
                check_alive()
                if time.monotonic() > deadline:
                    raise SetupError(
                        f"only {len(workers)}/{N_WORKERS} workers registered in {timeout:.0f}s"
                    )
                await asyncio.sleep(0.05)
            if not all(is_loopback(w) for w in workers):
                raise SetupError(f"workers advertise non-loopback addresses {workers}")

            yield Cluster(
                api=api, client=client, scheduler_pid=procs[0].pid, sizes=sizes, timeout=timeout
            )
        except BaseException:
            dump_logs()
            raise
        finally:
            if client is not None:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(close_client(client), CLIENT_CLOSE_TIMEOUT)
            stop_processes(procs[1:])  # workers first, while the scheduler still listens
            stop_processes(procs[:1])



async def settled_rss(
    pid: int,
    *,
    window: int = 5,
    interval: float = 0.2,
    tolerance: float = 0.005,
    max_wait: float = 10.0,
) -> int:
    """RSS of ``pid`` once ``window`` samples in a row agree within ``tolerance``."""
    samples: list[int] = []
    deadline = time.monotonic() + max_wait
    while True:
        samples.append(tree_rss(pid))
        recent = samples[-window:]
        if len(recent) == window and max(recent) - min(recent) <= tolerance * max(recent):
            return recent[-1]
        if time.monotonic() > deadline:
            return samples[-1]
        await asyncio.sleep(interval)
