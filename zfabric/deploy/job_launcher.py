"""What a batch job of a job-queue cluster runs: check the scheduler, start a Nanny, retire on time.

The job script that :class:`~zfabric.deploy.jobqueue.JobQueueCluster` writes ends with
``python -m zfabric.deploy.job_launcher ADDRESS --name NAME ...`` (the *launcher* in Parsl's
sense). It

1. checks that this node reaches the scheduler's port, for up to ``--death-timeout`` seconds,
   and otherwise exits 1 with a message in the job's log that names the node, the address and
   what to do (``interface=``) instead of leaving a Nanny that waits silently;
2. starts ``zfabric nanny ADDRESS`` with the job's worker processes, passing the death timeout
   on (workers whose scheduler is gone that long exit, and so does the Nanny);
3. at ``--lifetime`` seconds after it started (the cluster computed it from the job's
   walltime, less a lead and a stagger), asks the scheduler to retire the job's workers:
   they take no new task, their data moves to other workers, then they close; the Nanny closes
   when all of them did, and the job ends by itself before its walltime. A retirement the
   scheduler refuses (no other worker to take the data yet) is asked again every few seconds;
4. forwards SIGTERM/SIGINT (``scancel``, ``qdel``) to the Nanny and exits with its exit code.

A job whose workers all left (retired, or their scheduler gone) thus ends itself, and the
slot returns to the batch system.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

from ..client import Client

#: Wait between two attempts to reach the scheduler's port at start.
CONNECT_RETRY_S = 1.0
#: Wait between two retirement requests the scheduler refused.
RETIRE_RETRY_S = 3.0


def _say(text: str) -> None:
    print(f"zfabric job launcher: {text}", file=sys.stderr, flush=True)


def host_port(address: str) -> tuple[str, int]:
    """``("10.0.0.5", 8786)`` from ``tcp://10.0.0.5:8786``."""
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    return host.strip("[]"), int(port)


def reach(address: str, timeout_s: float) -> str | None:
    """None once a TCP connection to ``address`` opens; else (after ``timeout_s``) why not."""
    host, port = host_port(address)
    if host.startswith("127.") or host in ("localhost", "::1"):
        return (f"the scheduler's address {address} is this node's own loopback, not the"
                " client's host")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, timeout_s or 5.0)):
                return None
        except OSError as exc:
            error = exc
        if time.monotonic() >= deadline:
            return f"{type(error).__name__}: {error}"
        time.sleep(CONNECT_RETRY_S)


def worker_names(name: str, nworkers: int) -> list[str]:
    """The names ``zfabric nanny --name NAME --nworkers N`` gives its workers."""
    return [name] if nworkers == 1 else [f"{name}-{i}" for i in range(nworkers)]


def retire(address: str, names: list[str], timeout_s: float) -> bool:
    """Ask the scheduler to retire these workers; True once none of them is left."""
    with Client(address, timeout=timeout_s, set_as_default=False) as client:
        client.retire_workers(names=names)
        left = {w.get("name") for w in client.scheduler_info()["workers"].values()}
    return not (set(names) & left)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m zfabric.deploy.job_launcher",
                                description=__doc__.splitlines()[0])
    p.add_argument("address")
    p.add_argument("--name", required=True)
    p.add_argument("--nworkers", type=int, default=1)
    p.add_argument("--nthreads", type=int, default=1)
    p.add_argument("--memory-limit", default="0")
    p.add_argument("--death-timeout", type=float, default=60.0)
    p.add_argument("--walltime", type=float, default=None,
                   help="The job's walltime in seconds, as the cluster wrote it.")
    p.add_argument("--lifetime", type=float, default=None,
                   help="Retire the job's workers this many seconds after the start.")
    p.add_argument("--local-directory", default=None)
    p.epilog = "Options after -- go to `zfabric nanny` as they are."
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = p.parse_args(argv)
    args.nanny_args = extra
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    node = socket.gethostname()
    _say(f"job {os.environ.get('SLURM_JOB_ID') or os.environ.get('PBS_JOBID') or '?'}"
         f" on {node}: scheduler {args.address}, walltime {args.walltime} s,"
         f" workers retire after {args.lifetime} s")
    why = reach(args.address, args.death_timeout)
    if why is not None:
        _say(f"ERROR: node {node} cannot reach the scheduler at {args.address} ({why})."
             " The cluster gave its workers this address; if the compute nodes reach the"
             " client's host on another network, pass interface= (the network interface they"
             " share, e.g. SLURMCluster(interface='ib0')) or scheduler_options={'host': ...};"
             " see docs/deploy.md, 'Workers cannot reach the scheduler'.")
        return 1
    extra = args.nanny_args
    argv = [sys.executable, "-m", "zfabric", "nanny", args.address, "--name", args.name,
            "--nworkers", str(args.nworkers), "--nthreads", str(args.nthreads),
            "--memory-limit", str(args.memory_limit),
            "--death-timeout", str(args.death_timeout)]
    if args.local_directory:
        argv += ["--local-directory", args.local_directory]
    nanny = subprocess.Popen([*argv, *extra], stdin=subprocess.DEVNULL)

    def forward(signum, _frame):
        with contextlib.suppress(ProcessLookupError):
            nanny.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    retire_at = None if args.lifetime is None else started + args.lifetime
    retired = False
    while True:
        try:
            rc = nanny.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            pass
        if retire_at is not None and not retired and time.monotonic() >= retire_at:
            names = worker_names(args.name, args.nworkers)
            _say(f"lifetime reached ({args.lifetime:g} s of walltime {args.walltime} s):"
                 f" retiring workers {names}")
            try:
                retired = retire(args.address, names, timeout_s=10.0)
            except Exception as exc:  # the scheduler may be gone: the death timeout acts
                _say(f"retiring failed: {type(exc).__name__}: {exc}")
            if retired:
                _say("workers retired; their data moved to other workers")
            else:
                retire_at = time.monotonic() + RETIRE_RETRY_S
    _say(f"nanny exited with code {rc}; the job ends")
    return 0 if rc in (0, -signal.SIGTERM) else rc


if __name__ == "__main__":
    sys.exit(main())
