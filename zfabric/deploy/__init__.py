"""Start, scale and stop zfabric where users' clusters already are (see docs/deploy.md).

:class:`SpecCluster` (:mod:`zfabric.deploy.spec`) is the base: a scheduler and jobs of workers,
each a :class:`ProcessInterface`. Each back-end is one small module, a provider (where a block
of resources comes from) plus a launcher (how workers start in it): :mod:`.ssh`
(:class:`SSHCluster`), :mod:`.mpi` (``zfabric mpi``, :func:`zfabric.deploy.mpi.initialize`),
and the batch queues on :mod:`.jobqueue`: :mod:`.slurm` (:class:`SLURMCluster`) and :mod:`.pbs`
(:class:`PBSCluster`).
"""

from .jobqueue import JobFailedError, JobQueueCluster, JobSubmissionError
from .pbs import PBSCluster
from .slurm import SLURMCluster
from .spec import DEATH_TIMEOUT_S, InProcessScheduler, NannyJob, ProcessInterface, SpecCluster
from .ssh import SSHCluster, SSHError
from .subprocess import SubprocessCluster

__all__ = ["DEATH_TIMEOUT_S", "InProcessScheduler", "JobFailedError", "JobQueueCluster",
           "JobSubmissionError", "NannyJob", "PBSCluster", "ProcessInterface", "SLURMCluster",
           "SSHCluster", "SSHError", "SpecCluster", "SubprocessCluster"]
