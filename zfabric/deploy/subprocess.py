"""SubprocessCluster: a scheduler and workers on this host, each worker a process of its own,
as dask.distributed's ``SubprocessCluster``.

A :class:`~zfabric.deploy.spec.SpecCluster` whose scheduler runs in the cluster's event loop
(:class:`~zfabric.deploy.spec.InProcessScheduler`) and whose jobs are Nannies on this host
(:class:`~zfabric.deploy.spec.NannyJob`), each starting one worker process. Unlike
``LocalCluster`` it scales job by job through the SpecCluster interface, which makes it the
template for back-ends of one's own.
"""

from __future__ import annotations

import os
from typing import Any

from .spec import InProcessScheduler, NannyJob, SpecCluster

__all__ = ["SubprocessCluster"]


class SubprocessCluster(SpecCluster):
    """``n_workers`` worker processes (default: one per core, at most 4) of
    ``threads_per_worker`` threads each; ``scheduler_kwargs`` and ``worker_kwargs`` go to the
    Scheduler and each Nanny."""

    def __init__(self, host: str = "127.0.0.1", scheduler_port: int = 0,
                 scheduler_kwargs: dict | None = None, dashboard_address: str | None = ":0",
                 worker_class: str = "zfabric.Nanny", n_workers: int | None = None,
                 threads_per_worker: int | None = None, worker_kwargs: dict | None = None,
                 silence_logs: bool | int = False, **kwargs: Any):
        if worker_class.rpartition(".")[2] != "Nanny":
            raise ValueError(f"SubprocessCluster runs each worker under a Nanny; worker_class="
                             f"{worker_class!r} is not supported")
        if n_workers is None:
            n_workers = min(os.cpu_count() or 1, 4)
        self._threads_per_process = threads_per_worker or max(
            1, (os.cpu_count() or 1) // max(1, n_workers))
        scheduler = {"cls": InProcessScheduler,
                     "options": {"host": host, "port": scheduler_port,
                                 "dashboard_address": dashboard_address,
                                 **(scheduler_kwargs or {})}}
        worker = {"cls": NannyJob, "options": {"nthreads": self._threads_per_process,
                                               **(worker_kwargs or {})}}
        super().__init__(workers={str(i): worker for i in range(n_workers)},
                         scheduler=scheduler, worker=worker, silence_logs=silence_logs,
                         **kwargs)
