"""A real SLURM cluster for the tests, built from Debian's packages inside network namespaces.

:class:`SlurmLab` builds a :class:`netns.Lan` of ``1 + nodes`` hosts. Host 0 (``ctl``) runs
``slurmctld`` and is where the tests' client scripts run (and ``sbatch``/``squeue``/``scancel``
with them); hosts 1.. run one ``slurmd`` each, a compute node of one CPU named ``node1``,
``node2``, ... Debian's SLURM cannot run several ``slurmd`` on one host by name, so each node's
``slurmd`` also gets a UTS namespace of its own whose hostname is the node's name. The daemons
are started with ``nsenter --net`` into the host's namespace rather than ``ip netns exec``,
which remounts ``/sys`` and hides the cgroup mounts (this container has cgroup v1 only, so the
lab uses ``proctrack/linuxproc`` and ``task/none``: nothing of SLURM touches the cgroups).

Everything lives in a temporary directory: the munge key, ``munged``'s socket (a path, so the
one ``munged`` serves every namespace), ``slurm.conf``, the state and spool directories and
the daemons' logs. A job runs on a node, so it reaches ``ctl`` only over the namespace network:
the loopback of a node is its own. Three partitions: ``debug`` (the default), ``down`` (its
state is DOWN, so a job sent there stays PENDING) and none other, so ``-p nosuch`` is refused
by ``sbatch``.

:meth:`SlurmLab.close` cancels every job, stops the daemons, kills every process left in the
namespaces, deletes them and removes the directory. :func:`unavailable_reason` says why no lab
can be built here (not root, no namespaces, a program missing).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import netns

#: The programs the lab runs; Debian's packages ``slurm-wlm`` (slurmctld, slurmd and the
#: client commands) and ``munge``.
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol",
            "nsenter", "unshare")
#: How long the lab may take to come up (both nodes idle).
START_TIMEOUT_S = 60.0
#: How long one SLURM client command may take.
COMMAND_TIMEOUT_S = 30.0
#: The CPUs and memory each node announces.
NODE_CPUS = 1
NODE_MEMORY_MB = 4000


def unavailable_reason() -> str | None:
    """Why a SLURM lab cannot be built here, or None."""
    reason = netns.unavailable_reason()
    if reason:
        return reason
    missing = [p for p in PROGRAMS if shutil.which(p) is None]
    if missing:
        return (f"SLURM's programs are missing: {', '.join(missing)} "
                "(apt-get install slurm-wlm munge)")
    return None


class SlurmLabError(RuntimeError):
    """Raised when the lab cannot be brought up; carries the daemons' logs."""


class SlurmLab:
    """``slurmctld`` + ``nodes`` single-CPU ``slurmd`` nodes in network namespaces."""

    def __init__(self, nodes: int = 2):
        self.lan = netns.Lan(1 + nodes)
        self.node_names = [f"node{i + 1}" for i in range(nodes)]
        self.dir = Path(tempfile.mkdtemp(prefix="zf-slurm-"))
        self.conf = self.dir / "slurm.conf"
        self.daemons: list[subprocess.Popen] = []
        self._munged_pid: int | None = None

    # ------------------------------------------------------------------ addresses

    @property
    def ctl_ip(self) -> str:
        """The controller's (and the client's) address on the namespace network."""
        return self.lan.ips[0]

    @property
    def node_ips(self) -> list[str]:
        return self.lan.ips[1:]

    @property
    def env(self) -> dict[str, str]:
        """The environment a SLURM client command (and a job, which inherits it) needs."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        return env

    # ------------------------------------------------------------------ life cycle

    def start(self) -> SlurmLab:
        """Bring everything up and wait until both nodes are idle; undo it all on failure."""
        try:
            self.dir.chmod(0o700)
            self.lan.create()
            self._start_munged()
            self._write_conf()
            self.daemons.append(self._spawn(0, ["slurmctld", "-D", "-c", "-f", str(self.conf)],
                                            "slurmctld.out"))
            for i, name in enumerate(self.node_names, start=1):
                self.daemons.append(self._spawn(
                    i, ["unshare", "--uts", "--", "sh", "-c",
                        'hostname "$0" && exec slurmd -D -f "$1"', name, str(self.conf)],
                    f"slurmd-{name}.out"))
            self._wait_idle()
        except BaseException:
            self.close()
            raise
        return self

    def _start_munged(self) -> None:
        key = self.dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        d = self.dir
        # In ctl's namespace (its socket is a path, so every namespace reaches it), where a
        # later run's netns.sweep_stale kills it if this run was killed before its close().
        subprocess.run(
            ["nsenter", f"--net=/var/run/netns/{self.lan.hosts[0]}", "--",
             "munged", "--force", f"--key-file={key}", f"--socket={d / 'munge.sock'}",
             f"--pid-file={d / 'munged.pid'}", f"--log-file={d / 'munged.log'}",
             f"--seed-file={d / 'munged.seed'}"],
            check=True, capture_output=True, timeout=COMMAND_TIMEOUT_S)
        self._munged_pid = int((d / "munged.pid").read_text().split()[0])

    def _write_conf(self) -> None:
        d = self.dir
        for sub in ("state", *(f"spool-{n}" for n in self.node_names)):
            (d / sub).mkdir()
        nodes = "\n".join(
            f"NodeName={n} NodeAddr={ip} CPUs={NODE_CPUS} RealMemory={NODE_MEMORY_MB} "
            "State=UNKNOWN" for n, ip in zip(self.node_names, self.node_ips, strict=True))
        all_nodes = ",".join(self.node_names)
        self.conf.write_text(f"""\
ClusterName=zftest
SlurmctldHost={socket.gethostname()}({self.ctl_ip})
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d / 'munge.sock'}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool-%n'}
SlurmctldPidFile={d / 'slurmctld.pid'}
SlurmdPidFile={d / 'slurmd-%n.pid'}
SlurmctldLogFile={d / 'slurmctld.log'}
SlurmdLogFile={d / 'slurmd-%n.log'}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
InactiveLimit=0
KillWait=3
MinJobAge=60
SlurmdTimeout=30
SlurmctldTimeout=30
MessageTimeout=10
OverTimeLimit=0
PlugStackConfig={d / 'plugstack.conf'}
{nodes}
PartitionName=debug Nodes={all_nodes} Default=YES MaxTime=INFINITE State=UP
PartitionName=down Nodes={all_nodes} MaxTime=INFINITE State=DOWN
""")
        (d / "plugstack.conf").write_text("")

    def _spawn(self, host: int, argv: Sequence[str], log: str) -> subprocess.Popen:
        """``argv`` inside host ``host``'s network namespace only (``nsenter --net``)."""
        out = open(self.dir / log, "wb")  # noqa: SIM115 - the daemon holds it
        try:
            return subprocess.Popen(
                ["nsenter", f"--net=/var/run/netns/{self.lan.hosts[host]}", "--", *argv],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, env=self.env)
        finally:
            out.close()

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        states = ""
        while time.monotonic() < deadline:
            for p in self.daemons:
                if p.poll() is not None:
                    raise SlurmLabError(f"a SLURM daemon exited ({p.args}):\n{self.logs()}")
            proc = self.run(["sinfo", "-h", "-N", "-p", "debug", "-o", "%N %t"], check=False)
            states = proc.stdout.strip()
            lines = [ln.split() for ln in states.splitlines()]
            if len(lines) == len(self.node_names) and all(s == "idle" for _, s in lines):
                return
            time.sleep(0.5)
        raise SlurmLabError(f"the nodes are not idle after {START_TIMEOUT_S:.0f} s "
                            f"({states!r}):\n{self.logs()}")

    def logs(self) -> str:
        """The tail of every daemon log, for failure messages."""
        parts = []
        for path in sorted(self.dir.glob("*.log")) + sorted(self.dir.glob("*.out")):
            with contextlib.suppress(OSError):
                tail = path.read_text(errors="replace").splitlines()[-15:]
                parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def close(self) -> None:
        """Cancel every job, stop the daemons, delete the namespaces and the directory."""
        try:
            if self.daemons and self.daemons[0].poll() is None:
                self.run(["scancel", "--full", "-u", "root"], check=False)
            for p in self.daemons:
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(p.pid, signal.SIGTERM)
            for p in self.daemons:
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(p.pid, signal.SIGKILL)
                    p.wait(timeout=5)
            self.daemons.clear()
        finally:
            try:
                # slurmstepd and the jobs' processes run in sessions of their own inside the
                # nodes' namespaces: Lan.close kills whatever is left there.
                self.lan.close()
            finally:
                if self._munged_pid is not None:
                    _stop(self._munged_pid)
                    self._munged_pid = None
                shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SlurmLab:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ use

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` to be run on ``ctl`` (the client's host)."""
        return ["nsenter", f"--net=/var/run/netns/{self.lan.hosts[0]}", "--", *argv]

    def run(self, argv: Sequence[str], *, check: bool = True,
            timeout: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess:
        """Run a command (``sbatch``, ``squeue``, ...) on ``ctl`` and return its result."""
        proc = subprocess.run(self.argv(argv), capture_output=True, text=True, env=self.env,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise SlurmLabError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr}")
        return proc

    def popen(self, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start ``argv`` on ``ctl`` in a session of its own; :meth:`close` kills it."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("env", self.env)
        p = subprocess.Popen(self.argv(argv), start_new_session=True, **kw)
        self.lan.procs.append(p)
        return p

    def squeue(self) -> list[tuple[str, str, str]]:
        """``(job id, name, state)`` of every job SLURM still lists."""
        out = self.run(["squeue", "-h", "-o", "%i %j %T"]).stdout
        return [tuple(line.split()) for line in out.splitlines() if line.strip()]  # type: ignore[misc]

    def wait_queue_empty(self, timeout: float) -> list[tuple[str, str, str]]:
        """Wait until ``squeue`` lists no job; returns what it lists at the end."""
        deadline = time.monotonic() + timeout
        while True:
            jobs = self.squeue()
            if not jobs or time.monotonic() > deadline:
                return jobs
            time.sleep(0.5)


def _stop(pid: int, timeout: float = 5.0) -> None:
    """SIGTERM ``pid`` (a daemon, not our child) and wait until it is gone (it writes files
    as it exits), then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)


def lab_or_skip(nodes: int = 2):
    """A started :class:`SlurmLab`, or ``pytest.skip`` saying why none can be built (not root,
    no namespaces, SLURM's programs missing); with ``CI=true`` a missing program fails."""
    import pytest

    reason = netns.unavailable_reason()
    if reason:  # not root, or no namespaces: skipped, as the other multi-host tests
        pytest.skip(reason)
    reason = unavailable_reason()
    if reason:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but no SLURM lab can be built: {reason}")
        pytest.skip(reason)
    netns.sweep_stale()
    return SlurmLab(nodes).start()
