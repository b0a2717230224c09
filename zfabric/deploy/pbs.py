"""PBSCluster: zfabric workers in PBS Pro / OpenPBS / Torque jobs (``qsub``, ``qdel``, ``qstat``).

The generic layer (:mod:`zfabric.deploy.jobqueue`) does the rest; only the commands, the
directives and the job states differ from SLURM's.
"""

from __future__ import annotations

import math
from pathlib import Path

from .jobqueue import JobQueueCluster, format_walltime

__all__ = ["PBSCluster"]


class PBSCluster(JobQueueCluster):
    """A scheduler here and workers in PBS jobs; the parameters are SLURMCluster's
    (``queue`` is the PBS queue, ``account`` its ``-A`` project)."""

    submit_command = ("qsub",)
    cancel_command = ("qdel",)
    directive_prefix = "#PBS"
    job_id_regexp = r"^\s*(\S+)"
    job_id_placeholder = "$PBS_JOBID"
    # qstat's one-letter states: Queued, Held, Waiting, Transit; Running, Exiting, Suspended.
    pending_states = frozenset({"Q", "H", "W", "T"})
    running_states = frozenset({"R", "E", "S", "U", "B"})

    def _log_pattern(self, name: str) -> str:
        # PBS names the output file itself; the job's own stdout goes there.
        return f"{self.log_directory}/{self.job_name_prefix}-{name}.out"

    def _log_path(self, name: str, job_id: str) -> Path:
        return Path(self._log_pattern(name))

    def _directives(self, name: str) -> list[str]:
        d = [f"-N {self.job_name_prefix}-{name}", f"-o {self._log_pattern(name)}", "-j oe"]
        if self.queue:
            d.append(f"-q {self.queue}")
        if self.account:
            d.append(f"-A {self.account}")
        select = f"select=1:ncpus={self.cores}"
        if self.memory:
            select += f":mem={math.ceil(self.memory / 2**20)}MB"
        d.append(f"-l {select}")
        if self.walltime_s is not None:
            d.append(f"-l walltime={format_walltime(self.walltime_s)}")
        return d

    def _status_command(self, job_ids: list[str]) -> list[str]:
        return ["qstat", *job_ids]

    def _parse_status(self, out: str) -> dict[str, tuple[str, str]]:
        # Job id, Name, User, Time Use, S, Queue; two header lines.
        states = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 6 and parts[4] in self.pending_states | self.running_states | {"F"}:
                states[parts[0]] = (parts[4], "")
        return states

    def _status_means_gone(self, stderr: str) -> bool:
        return "Unknown Job Id" in stderr or "Job has finished" in stderr
