"""Implementation adapters: how to import each library's client API, start its scheduler and
worker processes, and the sizes of every row for it. A missing implementation shows ``n/a``."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import REPO_ROOT, SCRIPTS_DIR, SetupError


def with_pythonpath(env: dict[str, str], *paths: Path) -> dict[str, str]:
    """``env`` with ``paths`` first on its PYTHONPATH."""
    parts = [*map(str, paths), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    return env


@dataclass(frozen=True)
class Impl:
    """How to reach one implementation of the dask.distributed API."""

    name: str  # used on the command line and as the JSON key
    title: str  # column header
    package: str  # module exporting Client, LocalCluster, ...
    required: bool  # False: a missing install is a note, not a failure
    full_sizes: dict[str, int]
    quick_sizes: dict[str, int]

    def available(self) -> bool:
        try:
            return importlib.util.find_spec(self.package) is not None
        except (ImportError, ValueError):
            return False

    def api(self) -> Any:
        return importlib.import_module(self.package)

    def sizes(self, quick: bool) -> dict[str, int]:
        return dict(self.quick_sizes if quick else self.full_sizes)

    def env(self) -> dict[str, str]:
        """Environment for this implementation's child processes (``scripts/`` importable:
        the task functions live in this package)."""
        return with_pythonpath(dict(os.environ), SCRIPTS_DIR)

    def scheduler_cmd(self, scheduler_file: Path) -> list[str]:
        raise NotImplementedError

    def worker_cmd(self, address: str) -> list[str]:
        raise NotImplementedError

    def client_kwargs(self) -> dict[str, Any]:
        return {}

    def cluster_kwargs(self) -> dict[str, Any]:
        return {}

    async def worker_addresses(self, client: Any) -> list[str]:
        info = client.scheduler_info()
        if inspect.isawaitable(info):
            info = await info
        return list(info.get("workers", {}))


class ZfabricImpl(Impl):
    def _cli(self) -> list[str]:
        if importlib.util.find_spec("zfabric.__main__") is not None:
            return [sys.executable, "-m", "zfabric"]
        script = shutil.which(
            "zfabric", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        )
        if script is None:
            raise SetupError("neither `python -m zfabric` nor a `zfabric` command is available")
        return [script]

    def scheduler_cmd(self, scheduler_file: Path) -> list[str]:
        return [
            *self._cli(),
            "scheduler",
            "--port",
            "0",
            "--scheduler-file",
            str(scheduler_file),
            "--host",
            "127.0.0.1",
            *self.dashboard_args(),
        ]

    def dashboard_args(self) -> list[str]:
        return ["--no-dashboard"]  # as dask runs with --no-dashboard

    def worker_cmd(self, address: str) -> list[str]:
        return [*self._cli(), "worker", address, "--nthreads", "1"]

    def env(self) -> dict[str, str]:
        env = self._env()
        env.pop("ZFABRIC_SECURITY", None)  # plain zfabric: no keys, whatever we were given
        return env

    def _env(self) -> dict[str, str]:
        # Make the in-tree package importable without installing it.
        return with_pythonpath(dict(os.environ), REPO_ROOT, SCRIPTS_DIR)


_CURVE_KEYS: list[str] = []  # the key directory of this run (made once, in the parent)


class ZfabricCurveImpl(ZfabricImpl):
    """zfabric with CurveZMQ on every socket: the CLI processes read ZFABRIC_SECURITY, the
    client and LocalCluster are given the keys."""

    def env(self) -> dict[str, str]:
        env = self._env()
        keys = os.environ.get("ZFABRIC_SECURITY") or (_CURVE_KEYS[0] if _CURVE_KEYS else None)
        if keys is None:
            from zfabric.security import keygen

            keys = tempfile.mkdtemp(prefix="zfabric-bench-keys-")
            keygen(keys)
            _CURVE_KEYS.append(keys)
        env["ZFABRIC_SECURITY"] = keys
        return env

    def client_kwargs(self) -> dict[str, Any]:
        security = importlib.import_module("zfabric.security").Security
        return {"security": security(os.environ["ZFABRIC_SECURITY"])}

    def cluster_kwargs(self) -> dict[str, Any]:
        return {"security": True}


class ZfabricDashboardImpl(ZfabricImpl):
    """zfabric with its dashboard on and one live-stream reader (the dashboard-cost runs)."""

    def dashboard_args(self) -> list[str]:
        return ["--dashboard-address", "127.0.0.1:0"]


class DaskImpl(Impl):
    def scheduler_cmd(self, scheduler_file: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "distributed.cli.dask_scheduler",
            "--port",
            "0",
            "--scheduler-file",
            str(scheduler_file),
            "--host",
            "127.0.0.1",
            "--no-dashboard",
        ]

    def worker_cmd(self, address: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "distributed.cli.dask_worker",
            address,
            "--nthreads",
            "1",
            "--no-nanny",
            "--no-dashboard",
            "--host",
            "127.0.0.1",
        ]

    async def worker_addresses(self, client: Any) -> list[str]:
        # An asynchronous dask Client's scheduler_info() is a cache without
        # per-worker entries, so ask the scheduler directly.
        info = await client.scheduler.identity(n_workers=-1)
        return list(info["workers"])


_TLS_FILES: list[str] = []  # the certificate directory of this run (made once, in the parent)


class DaskTlsImpl(DaskImpl):
    """dask.distributed with TLS on every connection (certificates from
    ``distributed.Security.temporary()``, written to files for the CLI processes)."""

    def env(self) -> dict[str, str]:
        env = super().env()
        if not _TLS_FILES:
            from distributed.security import Security

            tmp = Security.temporary()
            where = Path(tempfile.mkdtemp(prefix="zfabric-bench-tls-"))
            for name, pem in (("ca.pem", tmp.tls_ca_file), ("cert.pem", tmp.tls_scheduler_cert),
                              ("key.pem", tmp.tls_scheduler_key)):
                (where / name).write_text(pem)
            _TLS_FILES.append(str(where))
        env["ZFABRIC_BENCH_TLS"] = _TLS_FILES[0]
        return env

    @staticmethod
    def _files() -> list[str]:
        where = Path(os.environ["ZFABRIC_BENCH_TLS"])
        return ["--tls-ca-file", str(where / "ca.pem"), "--tls-cert", str(where / "cert.pem"),
                "--tls-key", str(where / "key.pem")]

    def scheduler_cmd(self, scheduler_file: Path) -> list[str]:
        return [*super().scheduler_cmd(scheduler_file), "--protocol", "tls", *self._files()]

    def worker_cmd(self, address: str) -> list[str]:
        return [*super().worker_cmd(address), *self._files()]

    def client_kwargs(self) -> dict[str, Any]:
        from distributed.security import Security

        where = Path(os.environ["ZFABRIC_BENCH_TLS"])
        return {"security": Security(tls_ca_file=str(where / "ca.pem"),
                                     tls_client_cert=str(where / "cert.pem"),
                                     tls_client_key=str(where / "key.pem"),
                                     require_encryption=True)}


# The dask-collection rows run the same sizes on both implementations (side by side).
DASK_FULL = dict(dask_sum_n=10_000_000, dask_xxt_n=4_000, dask_df_days=16,
                 dask_persist_n=100_000, move_n=4_000, move_matmul_n=3_000, move_df_days=30,
                 move_tree_leaves=64, threads_sum_chunks=1_000)
DASK_QUICK = dict(dask_sum_n=200_000, dask_xxt_n=1_000, dask_df_days=2, dask_persist_n=2_000,
                  move_n=1_000, move_matmul_n=1_000, move_df_days=2, move_tree_leaves=8,
                  threads_sum_chunks=100)

IMPLS: dict[str, Impl] = {
    "zfabric": ZfabricImpl(
        name="zfabric",
        title="zfabric",
        package="zfabric",
        required=True,
        full_sizes=dict(
            rtt_warmup=20,
            rtt_iters=300,
            actor_warmup=200,
            actor_iters=2000,
            noop_tasks=20_000,
            tree_leaves=8_192,
            echo_mb=100,
            pending_tasks=100_000,
            done_tasks=20_000,
            **DASK_FULL,
            spill_tasks=20,
        ),
        quick_sizes=dict(
            rtt_warmup=10,
            rtt_iters=100,
            actor_warmup=50,
            actor_iters=300,
            noop_tasks=2_000,
            tree_leaves=1_024,
            echo_mb=10,
            pending_tasks=10_000,
            done_tasks=2_000,
            **DASK_QUICK,
            spill_tasks=8,
        ),
    ),
    "dask": DaskImpl(
        name="dask",
        title="dask.distributed",
        package="distributed",
        required=False,
        full_sizes=dict(
            rtt_warmup=20,
            rtt_iters=300,
            actor_warmup=200,
            actor_iters=2000,
            noop_tasks=2_000,
            tree_leaves=1_024,
            echo_mb=100,
            pending_tasks=10_000,
            done_tasks=2_000,
            **DASK_FULL,
            spill_tasks=20,
        ),
        quick_sizes=dict(
            rtt_warmup=5,
            rtt_iters=50,
            actor_warmup=50,
            actor_iters=300,
            noop_tasks=500,
            tree_leaves=256,
            echo_mb=10,
            pending_tasks=2_000,
            done_tasks=500,
            **DASK_QUICK,
            spill_tasks=8,
        ),
    ),
}
# With security on, every row runs at the sizes it has without (side by side).
IMPLS["zfabric-curve"] = ZfabricCurveImpl(
    name="zfabric-curve",
    title="zfabric+CURVE",
    package="zfabric",
    required=True,
    full_sizes=IMPLS["zfabric"].full_sizes,
    quick_sizes=IMPLS["zfabric"].quick_sizes,
)
IMPLS["dask-tls"] = DaskTlsImpl(
    name="dask-tls",
    title="dask.distributed+TLS",
    package="distributed",
    required=False,
    full_sizes=IMPLS["dask"].full_sizes,
    quick_sizes=IMPLS["dask"].quick_sizes,
)


#: Implementations that are no column of the table: the dashboard-cost runs.
EXTRA_IMPLS: dict[str, Impl] = {
    "zfabric+dashboard": ZfabricDashboardImpl(
        name="zfabric+dashboard",
        title="zfabric, dashboard on",
        package="zfabric",
        required=True,
        full_sizes=IMPLS["zfabric"].full_sizes,
        quick_sizes=IMPLS["zfabric"].quick_sizes,
    ),
}
#: Rows the dashboard-cost runs alternate (dashboard off, then on, each a fresh cluster).
DASHBOARD_COST_ROWS = ("noop_tasks_per_s", "rtt_p50_ms")
