"""Start, scale and stop zfabric where users' clusters already are (see docs/deploy.md).

:class:`SpecCluster` (:mod:`zfabric.deploy.spec`) is the base: a scheduler and jobs of workers,
each a :class:`ProcessInterface`. Each back-end is one small module, a provider (where a block
of resources comes from) plus a launcher (how workers start in it): :mod:`.ssh`
(:class:`SSHCluster`) and :mod:`.mpi` (``zfabric mpi``, :func:`zfabric.deploy.mpi.initialize`).
"""

from .spec import DEATH_TIMEOUT_S, InProcessScheduler, NannyJob, ProcessInterface, SpecCluster
from .ssh import SSHCluster, SSHError
from .subprocess import SubprocessCluster

__all__ = ["DEATH_TIMEOUT_S", "InProcessScheduler", "NannyJob", "ProcessInterface",
           "SSHCluster", "SSHError", "SpecCluster", "SubprocessCluster"]
