"""SSHCluster: the scheduler on the first host, a Nanny on each of the others, over OpenSSH.

The provider is a list of hosts; the launcher is the system's ``ssh`` client running
``PYTHON -m zfabric scheduler|nanny --stdin-lifeline ...`` on each. The system client, not a
library, because it is what the user's SSH set-up already works with: ``~/.ssh/config`` (host
aliases, ``User``, ``IdentityFile``), the ssh-agent, ``ProxyJump`` and ``ControlMaster``.
dask's ``connect_options`` (asyncssh's keys) are translated to ``ssh`` options by
:func:`ssh_options`; ``BatchMode`` is on, so a host that wants a password fails instead of
waiting for one.

Every remote process is tied to its ssh session: it reads its standard input, which is the
session's, and closes cleanly when it ends, which happens when :meth:`SSHCluster.close` closes
it, when the local ``ssh`` exits, or when the client process dies (its end of the pipe closes
with it). Workers whose scheduler is gone exit after ``death_timeout`` as well, so a session
that hangs instead of ending (a cut network) leaves nothing behind either.

A remote process that fails to start (host unreachable, no such Python, no zfabric there)
fails ``SSHCluster(...)`` within :data:`START_TIMEOUT_S` with an :class:`SSHError` naming the
host and what the remote side wrote on stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import shlex
import signal
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import ZFabricError
from .spec import DEATH_TIMEOUT_S, ProcessInterface, SpecCluster

logger = logging.getLogger("zfabric.cluster")

__all__ = ["SSHCluster", "SSHError", "ssh_options"]

#: Longest one remote process may take to start (ssh connecting included).
START_TIMEOUT_S = 60.0
#: How long a remote process has to close after its session's input ends, before it is killed.
CLOSE_GRACE_S = 20.0
#: ssh's own bounds: connecting, and how long a silent server is waited for.
CONNECT_TIMEOUT_S = 15
SERVER_ALIVE_INTERVAL_S = 5
SERVER_ALIVE_COUNT_MAX = 3
#: Lines of remote stderr an error quotes.
STDERR_LINES = 20


class SSHError(ZFabricError):
    """A process of an SSHCluster could not start on its host (the message says why)."""


# ---------------------------------------------------------------------- connect_options


def _yes_no(value: Any) -> str:
    return "yes" if value else "no"


def ssh_options(connect_options: dict | None) -> list[str]:
    """``ssh`` arguments for dask's (asyncssh's) ``connect_options``.

    Taken: ``username``, ``port``, ``client_keys`` (paths), ``known_hosts`` (a path, or None
    to check no host key), ``connect_timeout``, ``keepalive_interval``,
    ``keepalive_count_max``, ``agent_path``, ``agent_forwarding``, ``tunnel`` (a jump host,
    ``[user@]host[:port]``), ``config`` (ssh config files); and zfabric's ``ssh_options``, a
    dict of raw ``-o`` options (``{"ControlMaster": "auto"}``). Anything else (``password``,
    ``passphrase``, ...) raises ValueError: use keys or the ssh-agent.
    """
    opts = dict(connect_options or {})
    args = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}",
            "-o", f"ServerAliveInterval={SERVER_ALIVE_INTERVAL_S}",
            "-o", f"ServerAliveCountMax={SERVER_ALIVE_COUNT_MAX}"]
    extra: dict[str, Any] = {}

    def option(name: str, value: Any) -> None:
        extra[name] = value

    for key, value in opts.items():
        if key == "username":
            option("User", value)
        elif key == "port":
            option("Port", int(value))
        elif key == "client_keys":
            keys = [value] if isinstance(value, (str, os.PathLike)) else list(value or ())
            for k in keys:
                if not isinstance(k, (str, os.PathLike)):
                    raise ValueError("connect_options client_keys: give paths of key files"
                                     " (the system's ssh reads them)")
                args += ["-i", os.fspath(k)]
        elif key == "known_hosts":
            if value is None or value == ():
                option("StrictHostKeyChecking", "no")
                option("UserKnownHostsFile", "/dev/null")
                option("LogLevel", "ERROR")
            elif isinstance(value, (str, os.PathLike)):
                option("UserKnownHostsFile", os.fspath(value))
            else:
                raise ValueError("connect_options known_hosts: give a file path, or None to"
                                 " check no host key")
        elif key == "connect_timeout":
            option("ConnectTimeout", max(1, math.ceil(float(value))))
        elif key == "keepalive_interval":
            option("ServerAliveInterval", max(1, math.ceil(float(value))))
        elif key == "keepalive_count_max":
            option("ServerAliveCountMax", int(value))
        elif key == "agent_path":
            option("IdentityAgent", "none" if value is None else os.fspath(value))
        elif key == "agent_forwarding":
            option("ForwardAgent", _yes_no(value))
        elif key == "tunnel":
            option("ProxyJump", str(value))
        elif key == "config":
            files = [value] if isinstance(value, (str, os.PathLike)) else list(value or ())
            for f in files:
                args += ["-F", os.fspath(f)]
        elif key == "ssh_options":
            extra.update(value or {})
        else:
            raise ValueError(
                f"connect_options {key!r} is not supported: SSHCluster uses the system's ssh"
                " client (see docs/deploy.md); it takes username, port, client_keys,"
                " known_hosts, connect_timeout, keepalive_interval, keepalive_count_max,"
                " agent_path, agent_forwarding, tunnel, config and ssh_options (raw -o"
                " options). Passwords are not taken: use a key or the ssh-agent")
    for name, value in extra.items():
        args += ["-o", f"{name}={value}"]
    return args


# ---------------------------------------------------------------------- remote command lines


_SCHEDULER_FLAGS = {"port": "--port", "host": "--host", "dashboard_address":
                    "--dashboard-address", "log_level": "--log-level"}
_WORKER_FLAGS = {"nthreads": "--nthreads", "n_workers": "--nworkers", "nworkers": "--nworkers",
                 "memory_limit": "--memory-limit", "resources": "--resources",
                 "local_directory": "--local-directory", "log_level": "--log-level",
                 "memory_target_fraction": "--memory-target-fraction",
                 "memory_spill_fraction": "--memory-spill-fraction",
                 "memory_pause_fraction": "--memory-pause-fraction",
                 "memory_terminate_fraction": "--memory-terminate-fraction",
                 "preload": "--preload", "death_timeout": "--death-timeout"}


def _flags(options: dict, table: dict[str, str], what: str) -> list[str]:
    out: list[str] = []
    for key, value in options.items():
        if key == "dashboard":
            out.append("--dashboard" if value else "--no-dashboard")
            continue
        if key not in table:
            known = sorted(table) + (["dashboard"] if table is _SCHEDULER_FLAGS else [])
            raise ValueError(f"{what} {key!r} is not supported; it takes {known}")
        if value is None:
            continue
        if key == "resources" and isinstance(value, dict):
            value = ",".join(f"{k}={v}" for k, v in value.items())
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            out += [table[key], str(v)]
    return out


def remote_command(python: str, role: str, args: Sequence[str], env: dict | None = None) -> str:
    """The shell line ssh runs: print the pid, then exec zfabric with a lifeline on stdin.

    Without ``--host``, the scheduler listens on the address the ssh client reached its host
    by (the third field of ``$SSH_CONNECTION``): one the client, and likely the other hosts,
    can reach.
    """
    env_words = [f"{k}={shlex.quote(str(v))}" for k, v in (env or {}).items()]
    cmd = " ".join([shlex.quote(python), "-m", "zfabric", role, "--stdin-lifeline",
                    *(shlex.quote(a) for a in args)])
    host = ""
    if role == "scheduler" and "--host" not in args:
        host = ' --host "${3:-0.0.0.0}"'
    return (f'set -- $SSH_CONNECTION; echo "zfabric-pid $$";'
            f" exec env PYTHONUNBUFFERED=1 {' '.join(env_words)} {cmd}{host}")


# ---------------------------------------------------------------------- one remote process


class SSHProcess(ProcessInterface):
    """One ``zfabric`` process on ``host``, started through ssh (the scheduler or a Nanny)."""

    role = "nanny"
    ready_prefix = "Nanny started"

    def __init__(self, scheduler: str | None, name: str | None = None, *, host: str,
                 connect_options: dict | None = None, remote_python: str | None = None,
                 args: Sequence[str] = (), nworkers: int = 1, env: dict | None = None):
        super().__init__(scheduler, name)
        self.host = host
        self.connect_options = connect_options or {}
        self.remote_python = remote_python or sys.executable
        self.args = list(args)
        self.nworkers = nworkers
        self.env = env or {}
        self.proc: asyncio.subprocess.Process | None = None
        self.remote_pid: int | None = None
        self._stderr: list[str] = []

    def worker_names(self) -> list[str]:
        n = self.nworkers
        return [str(self.name)] if n == 1 else [f"{self.name}-{i}" for i in range(n)]

    def status_text(self) -> str:
        return f"{self.status} on {self.host}"

    def _argv(self, command: str) -> list[str]:
        return ["ssh", *ssh_options(self.connect_options), self.host, command]

    def _role_args(self) -> list[str]:
        return [self.scheduler or "", *self.args]

    async def start(self) -> None:
        command = remote_command(self.remote_python, self.role, self._role_args(), self.env)
        self.proc = await asyncio.create_subprocess_exec(
            *self._argv(command), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True)  # a Ctrl-C at the terminal is the cluster's to handle
        self._own(self._read_stderr())
        try:
            await asyncio.wait_for(self._read_until_ready(), START_TIMEOUT_S)
        except TimeoutError:
            raise SSHError(self._failure(f"did not start within {START_TIMEOUT_S:g} s")) from None
        self._own(self._read_stdout())

    async def _read_until_ready(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while True:
            raw = await self.proc.stdout.readline()
            if not raw:
                rc = await self.proc.wait()
                await asyncio.sleep(0.1)  # the stderr reader's last lines
                raise SSHError(self._failure(f"exited with status {rc} before it was ready",
                                             rc))
            line = raw.decode(errors="replace").rstrip()
            self._log(line)
            if line.startswith("zfabric-pid "):
                with contextlib.suppress(ValueError):
                    self.remote_pid = int(line.split()[1])
            elif self._ready(line):
                return

    def _ready(self, line: str) -> bool:
        return line.startswith(self.ready_prefix)

    def _failure(self, what: str, rc: int | None = None) -> str:
        err = "\n".join(f"    {line}" for line in self._stderr[-STDERR_LINES:]) or "    (nothing)"
        if rc == 255:  # ssh's own failure
            hint = (f"check that `ssh {self.host}` works from this host without a password"
                    " (a key or the ssh-agent) and that connect_options are right")
        elif rc == 127:
            hint = (f"no {self.remote_python} on {self.host}: pass remote_python= the path of"
                    " a Python that has zfabric there")
        else:
            hint = (f"check that {self.remote_python} on {self.host} can `import zfabric`"
                    " (pip install zfabric there, or pass remote_python=)")
        return (f"SSHCluster: the {self.role} on host {self.host!r} {what}. Its stderr:\n"
                f"{err}\n  ({hint})")

    async def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self._stderr.append(line)
            del self._stderr[:-200]
            self._log(line)

    async def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self._log(raw.decode(errors="replace").rstrip())
        rc = await self.proc.wait()
        if self.status == "running":
            self._ended(f"the {self.role} on {self.host} exited with status {rc}")

    async def _close(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        if proc.stdin is not None:  # the lifeline: the remote process closes cleanly
            with contextlib.suppress(Exception):
                proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), CLOSE_GRACE_S)
            return
        except TimeoutError:
            pass
        logger.warning("the %s on %s did not close within %g s; killing it", self.role,
                       self.host, CLOSE_GRACE_S)
        if self.remote_pid is not None:
            kill = await asyncio.create_subprocess_exec(
                *self._argv(f"kill -KILL {self.remote_pid}"), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(kill.wait(), CONNECT_TIMEOUT_S + 5)
            if kill.returncode is None:
                kill.kill()
                await kill.wait()
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        await proc.wait()


class SSHScheduler(SSHProcess):
    """``zfabric scheduler`` on the first host; ``address`` is what it printed."""

    role = "scheduler"
    ready_prefix = "Scheduler at: "

    def __init__(self, **kw: Any):
        super().__init__(None, "scheduler", **kw)

    def _role_args(self) -> list[str]:
        return list(self.args)

    def _ready(self, line: str) -> bool:
        if line.startswith(self.ready_prefix):
            self.address = line[len(self.ready_prefix):].strip()
            return True
        return False

    def _log(self, line: str) -> None:
        super()._log(line)
        if line.startswith("Dashboard at: "):
            self.dashboard_link = line[len("Dashboard at: "):].strip()


# ---------------------------------------------------------------------- the cluster


class SSHCluster(SpecCluster):
    """A scheduler on ``hosts[0]`` and a Nanny on each of ``hosts[1:]`` (a host may repeat).

    As dask.distributed's ``SSHCluster``: ``connect_options`` (one dict, or one per host) are
    asyncssh's keys, translated for OpenSSH (:func:`ssh_options`); ``worker_options``
    (``nthreads``, ``n_workers`` per host, ``memory_limit``, ``resources``, ...) and
    ``scheduler_options`` (``port``, ``dashboard_address``, ``host``) become the remote
    commands' flags; ``remote_python`` (one path, or one per host) runs them. ``scale(n)``
    adds or retires Nannies, taking the worker hosts in turn.
    """

    def __init__(self, hosts: Sequence[str], connect_options: dict | Sequence[dict] | None = None,
                 worker_options: dict | None = None, scheduler_options: dict | None = None,
                 worker_module: str = "deprecated", worker_class: str = "zfabric.Nanny",
                 remote_python: str | Sequence[str] | None = None, *,
                 asynchronous: bool = False, security=None, name: str | None = None,
                 death_timeout=DEATH_TIMEOUT_S, env: dict | None = None, **kwargs: Any):
        hosts = list(hosts)
        if len(hosts) < 2:
            raise ValueError("SSHCluster needs at least two hosts: the scheduler's first, then"
                             " one per Nanny (a host may be given twice)")
        if worker_module != "deprecated":
            raise ValueError("SSHCluster(worker_module=) is not supported (dask deprecated it)")
        if worker_class.rpartition(".")[2] != "Nanny":
            raise ValueError(f"SSHCluster runs a Nanny on each host; worker_class="
                             f"{worker_class!r} is not supported")
        if security is not None:
            raise ValueError("SSHCluster(security=) is not supported yet: run `zfabric"
                             " scheduler/nanny --security DIR` by hand (docs/security.md)")
        self.hosts = hosts
        self._connect = _per_host(connect_options, len(hosts), "connect_options", dict)
        self._pythons = _per_host(remote_python, len(hosts), "remote_python", str)
        worker_options = dict(worker_options or {})
        worker_options.setdefault("death_timeout", float(death_timeout))
        self._worker_args = _flags(worker_options, _WORKER_FLAGS, "worker_options")
        scheduler_options = {"port": 0, **(scheduler_options or {})}
        scheduler_args = _flags(scheduler_options, _SCHEDULER_FLAGS, "scheduler_options")
        nworkers = int(worker_options.get("n_workers", worker_options.get("nworkers", 1)))
        nthreads = worker_options.get("nthreads")
        self._processes_per_job = nworkers
        self._threads_per_process = int(nthreads) if nthreads else 1
        self._nworkers = nworkers
        self._env = dict(env or {})
        self._next_host = 0
        scheduler = {"cls": SSHScheduler,
                     "options": {"host": hosts[0], "connect_options": self._connect[0],
                                 "remote_python": self._pythons[0], "args": scheduler_args,
                                 "env": self._env}}
        workers = {}
        for i in range(1, len(hosts)):
            workers[str(i - 1)] = self._job_spec(i)
        super().__init__(workers=workers, scheduler=scheduler, worker=None,
                         asynchronous=asynchronous, name=name, death_timeout=death_timeout,
                         **kwargs)

    def _start_timeout(self) -> float | None:
        return START_TIMEOUT_S * 2 + 10

    def _job_spec(self, i: int) -> dict:
        return {"cls": SSHProcess,
                "options": {"host": self.hosts[i], "connect_options": self._connect[i],
                            "remote_python": self._pythons[i], "args": self._worker_args,
                            "nworkers": self._nworkers, "env": self._env}}

    def new_worker_spec(self) -> dict[str, dict]:
        """One more Nanny, on the next worker host in turn."""
        i = 1 + self._next_host % (len(self.hosts) - 1)
        self._next_host += 1
        while str(self._i) in self.worker_spec:
            self._i += 1
        name = str(self._i)
        self._i += 1
        return {name: self._job_spec(i)}


def _per_host(value, n: int, what: str, kind: type) -> list:
    """``value`` for each of ``n`` hosts: one value for all, or a list of ``n``."""
    if value is None or isinstance(value, kind):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{what} has {len(values)} entries for {n} hosts; give one for all"
                         " or one per host")
    return values
