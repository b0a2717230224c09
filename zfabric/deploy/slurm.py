"""SLURMCluster: zfabric workers in SLURM batch jobs, with dask-jobqueue's parameters.

``sbatch --parsable`` reads each job script on stdin, ``scancel`` ends jobs, ``squeue`` says
how they are (one call for all of them), ``sinfo`` names the compute nodes' addresses (the
scheduler's address is this host's on the route to them). Everything else is the generic
layer, :mod:`zfabric.deploy.jobqueue`.
"""

from __future__ import annotations

import math
import subprocess

from .jobqueue import JobQueueCluster, format_walltime

__all__ = ["SLURMCluster"]

#: Longest ``sinfo`` may take when the cluster looks for the compute nodes' addresses.
SINFO_TIMEOUT_S = 20.0


class SLURMCluster(JobQueueCluster):
    """A scheduler here and workers in SLURM jobs (``cluster.scale(jobs=N)``, ``adapt``).

    Each job runs ``processes`` worker processes sharing ``cores`` threads and ``memory``
    (``#SBATCH --cpus-per-task``, ``--mem``), for at most ``walltime``; ``queue`` is the
    partition. See :mod:`zfabric.deploy.jobqueue` for what happens around the jobs.
    """

    submit_command = ("sbatch", "--parsable")
    cancel_command = ("scancel",)
    directive_prefix = "#SBATCH"
    job_id_regexp = r"^\s*(\d+)"
    job_id_placeholder = "%j"
    pending_states = frozenset({"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD",
                                "REQUEUE_FED", "RESV_DEL_HOLD", "SPECIAL_EXIT"})
    running_states = frozenset({"RUNNING", "SUSPENDED", "STOPPED", "SIGNALING",
                                "STAGE_OUT", "RESIZING"})

    def _directives(self, name: str) -> list[str]:
        d = [f"-J {self.job_name_prefix}-{name}", f"-o {self._log_pattern(name)}"]
        if self.queue:
            d.append(f"-p {self.queue}")
        if self.account:
            d.append(f"-A {self.account}")
        d += ["-n 1", f"--cpus-per-task={self.cores}"]
        if self.memory:
            d.append(f"--mem={math.ceil(self.memory / 2**20)}M")
        if self.walltime_s is not None:
            d.append(f"-t {format_walltime(self.walltime_s)}")
        return d

    def _status_command(self, job_ids: list[str]) -> list[str]:
        return ["squeue", "-h", "--states=all", "-o", "%i|%T|%r", "-j", ",".join(job_ids)]

    def _parse_status(self, out: str) -> dict[str, tuple[str, str]]:
        states = {}
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) >= 2:
                states[parts[0]] = (parts[1], parts[2] if len(parts) > 2 else "")
        return states

    def _status_means_gone(self, stderr: str) -> bool:
        return "Invalid job id" in stderr

    def _node_addresses(self) -> list[str]:
        argv = ["sinfo", "-h", "-N", "-o", "%o"]
        if self.queue:
            argv += ["-p", self.queue]
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=SINFO_TIMEOUT_S,
                                 stdin=subprocess.DEVNULL).stdout
        except (OSError, subprocess.TimeoutExpired):
            return []
        return [a for a in dict.fromkeys(out.split()) if a and a != "(null)"]
