"""Every row of the table, in its order, from the family modules."""

from __future__ import annotations

from .actors import bench_actor
from .common import Row
from .dask_collections import (
    bench_dask_array_sum,
    bench_dask_groupby,
    bench_dask_persist,
    bench_dask_xxt_mean,
)
from .data import bench_echo
from .data_moving import (
    bench_move_delayed_tree,
    bench_move_matmul,
    bench_move_merge,
    bench_move_rechunk,
    bench_move_set_index,
    bench_move_xxt,
    bench_threads_array_sum,
    bench_threads_groupby,
)
from .memory import bench_sched_done, bench_sched_pending
from .roundtrip import bench_rtt
from .spill import bench_spill
from .startup import bench_localcluster
from .tasks import bench_noop, bench_tree

#: The echo over TCP: zfabric's same-host shared-memory path off (dask.distributed has none).
TCP_ONLY = (("ZFABRIC_SAME_HOST_SHM", "0"),)

#: Two one-thread workers against two threads: BLAS's own threads (which spin while they
#: wait) would otherwise multiply both, and starve the other processes on a small machine.
ONE_BLAS_THREAD = (("OPENBLAS_NUM_THREADS", "1"), ("OMP_NUM_THREADS", "1"),
                   ("MKL_NUM_THREADS", "1"))

ROWS: dict[str, Row] = {
    row.name: row
    for row in [
        Row("rtt_p50_ms", "ms", False, bench_rtt),
        Row("actor_call_p50_ms", "ms", False, bench_actor),
        Row("noop_tasks_per_s", "tasks/s", True, bench_noop),
        Row("tree_tasks_per_s", "tasks/s", True, bench_tree),
        Row("echo_mb_per_s", "MB/s", True, bench_echo),
        Row("echo_tcp_mb_per_s", "MB/s", True, bench_echo, env=TCP_ONLY),
        Row("localcluster_first_result_s", "s", False, local=bench_localcluster),
        Row(
            "sched_bytes_per_task_pending", "B/task", False, bench_sched_pending, fresh_cluster=True
        ),
        Row("sched_bytes_per_task_done", "B/task", False, bench_sched_done, fresh_cluster=True),
        Row("dask_array_sum_s", "s", False, bench_dask_array_sum),
        Row("dask_xxT_mean_s", "s", False, bench_dask_xxt_mean),
        Row("dask_groupby_mean_s", "s", False, bench_dask_groupby),
        Row("dask_persist_100k_s", "s", False, bench_dask_persist),
        Row("spill_mb_per_s", "MB/s", True, local=bench_spill),
        Row("move_xxT_mean_s", "s", False, bench_move_xxt),
        Row("move_matmul_s", "s", False, bench_move_matmul, env=ONE_BLAS_THREAD),
        Row("move_rechunk_s", "s", False, bench_move_rechunk),
        Row("move_merge_s", "s", False, bench_move_merge),
        Row("move_set_index_s", "s", False, bench_move_set_index),
        Row("move_delayed_tree_s", "s", False, bench_move_delayed_tree),
        Row("threads_array_sum_s", "s", False, bench_threads_array_sum),
        Row("threads_groupby_mean_s", "s", False, bench_threads_groupby),
    ]
}
ROW_ALIASES = {
    "move": ["move_xxT_mean_s", "move_matmul_s", "move_rechunk_s", "move_merge_s",
             "move_set_index_s", "move_delayed_tree_s"],
    "threads": ["threads_array_sum_s", "threads_groupby_mean_s"],
    "sched_bytes_per_task": ["sched_bytes_per_task_pending", "sched_bytes_per_task_done"]
}
