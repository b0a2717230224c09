"""The worker: runs tasks in threads, keeps their results, serves them to peers.

:class:`Worker` is the async life cycle; the work happens in :mod:`.core` (the loop thread
that owns the sockets) and :mod:`.execute` (the task threads).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import MutableMapping
from typing import Any

from .. import current
from ..config import Config, from_env, memory_limit_bytes
from ..errors import CommTimeoutError, ZFabricError
from ..lifecycle import LifeCycle, call_from_thread
from ..security import SecurityError, as_security, use_for_process
from .core import WorkerLoop
from .memory import memory_fractions
from .plugins import load_preload

logger = logging.getLogger(__name__)

__all__ = ["Worker"]


class Worker(LifeCycle):
    """A worker process's engine: ``async with Worker(scheduler.address) as w``.

    ``nthreads`` defaults to the number of cores; ``memory_limit`` takes bytes, a size string
    such as ``"2GiB"``, or ``"auto"`` (this worker's share of the machine's memory).
    ``death_timeout`` is how long it waits for a scheduler (at start, and after losing it)
    before it closes.

    Memory (see docs/memory.md): above ``memory_target_fraction`` of ``memory_limit`` in
    values held, least recently used values spill to a file each in ``local_directory``
    (default: the system's temporary directory; the worker makes a directory of its own there
    and removes it when it exits); above ``memory_spill_fraction`` of RSS, more spill; above
    ``memory_pause_fraction`` the worker starts no new task until memory falls again. Each is
    a fraction, ``0`` turns it off, None takes the setting (``MEMORY_*_FRACTION``).
    """

    def __init__(
        self,
        scheduler_ip: str | None = None,
        *,
        scheduler_address: str | None = None,
        nthreads: int | None = None,
        name: str | None = None,
        resources: dict | None = None,
        memory_limit: int | str | None = "auto",
        nanny: str | None = None,
        host: str | None = None,
        listen_address: str | None = None,
        contact_address: str | None = None,
        death_timeout: float | None = None,
        config: Config | None = None,
        identity: str | bytes | None = None,
        memory_target_fraction: float | None = None,
        memory_spill_fraction: float | None = None,
        memory_pause_fraction: float | None = None,
        local_directory: str | None = None,
        preload: str | list[str] | None = None,
        security=None,
        **kwargs,
    ):
        if kwargs:
            raise TypeError(f"Worker got unexpected arguments: {', '.join(sorted(kwargs))}")
        address = scheduler_address or scheduler_ip
        if not address:
            raise ValueError("Worker needs the scheduler's address, e.g. Worker('tcp://host:8786')")
        if hasattr(address, "address"):
            address = address.address
        self.scheduler_address = address
        self.config = config or from_env()
        self.security = as_security(security)
        use_for_process(self.security)  # actor handles in its tasks connect with it
        if self.security is None and self.config.REQUIRE_ENCRYPTION:
            raise SecurityError("REQUIRE_ENCRYPTION is set but this worker has no keys: pass"
                                " security=Security(DIR) (`zfabric keygen DIR`)")
        self.nthreads = int(nthreads or os.cpu_count() or 1)
        if self.nthreads < 1:
            raise ValueError(f"nthreads must be at least 1, got {nthreads}")
        self.name = None if name is None else str(name)
        self.resources = dict(resources or {})
        self.memory_limit = memory_limit_bytes(memory_limit, self.nthreads)
        self.memory_fractions = memory_fractions(
            self.config, target=memory_target_fraction, spill=memory_spill_fraction,
            pause=memory_pause_fraction)
        if local_directory is not None and not os.path.isdir(local_directory):
            raise ValueError(f"local_directory {local_directory!r} is not a directory; create"
                             " it first or leave it out (the system's temporary directory)")
        self.local_directory = local_directory
        self.nanny = nanny
        self._identity = identity.encode() if isinstance(identity, str) else identity
        listen = listen_address or host
        if listen and listen.startswith("tcp://") and listen.endswith(":0"):
            listen = listen[len("tcp://") : -2]
        self._listen = listen
        self._contact = contact_address
        self.death_timeout = float(
            death_timeout if death_timeout is not None else self.config.RECONNECT_TIMEOUT_S
        )
        self.address = ""
        self._core: WorkerLoop | None = None
        self._closed_by_core: asyncio.Event | None = None
        self._task_client = None  # made by get_client() in a task (zfabric.context)
        # dask's --preload: modules or .py files whose dask_setup(worker) runs at the start
        specs = [preload] if isinstance(preload, str) else list(preload or ())
        self._preloads = [load_preload(spec) for spec in specs]

    def __repr__(self) -> str:
        return f"<Worker {self.name or ''} {self.address or 'not started'} threads={self.nthreads}>"

    @property
    def id(self) -> str:
        return self._core.identity.decode() if self._core else ""

    @property
    def exit_code(self) -> int | None:
        """Set when the worker stopped itself and its process should exit with this code
        (a task passed its task_timeout under a Nanny, which then starts a fresh process)."""
        return self._core.exit_code if self._core else None

    @property
    def data(self) -> MutableMapping[str, Any]:
        """The values this worker holds, by key."""
        return self._core.store if self._core else {}

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        self._closed_by_core = asyncio.Event()

        def on_ready(address, err):
            def settle():
                if ready.done():
                    return
                if err is not None:
                    ready.set_exception(err)
                else:
                    ready.set_result(address)
            call_from_thread(loop, settle)

        def on_closed():
            call_from_thread(loop, self._core_closed)

        self._core = WorkerLoop(
            scheduler_address=self.scheduler_address, nthreads=self.nthreads, name=self.name,
            resources=self.resources, memory_limit=self.memory_limit, nanny=self.nanny,
            listen=self._listen or "", contact=self._contact, config=self.config,
            death_timeout_s=self.death_timeout, on_ready=on_ready, on_closed=on_closed,
            identity=self._identity, memory_fractions=self.memory_fractions,
            local_directory=self.local_directory, security=self.security,
        )
        self._core.owner = self
        self._core.plugins.preloads = list(self._preloads)
        self._core.start()
        try:
            self.address = await asyncio.wait_for(ready, self.death_timeout)
        except TimeoutError:
            raise CommTimeoutError(
                f"worker could not register with a scheduler at {self.scheduler_address}"
                f" within {self.death_timeout:g} s; is the scheduler running there?"
            ) from None
        except ZFabricError:
            raise
        self.name = self._core.name
        # what an operator needs from a fresh worker, as dask.distributed's first lines
        logger.info("worker %s started at %s, registered with %s", self.name, self.address,
                    self.scheduler_address)
        memory = f"{self.memory_limit / 2**30:.2f} GiB" if self.memory_limit else "no limit"
        logger.info("worker %s: %d thread%s, memory %s, directory %s", self.name,
                    self.nthreads, "" if self.nthreads == 1 else "s", memory,
                    self._core.local_directory)

    def _core_closed(self) -> None:
        if self._closed_by_core is not None:
            self._closed_by_core.set()
        if self.status == "running":
            self._closing_task = asyncio.ensure_future(self.close())

    async def _close(self) -> None:
        core = self._core
        if core is None:
            return
        if getattr(self, "_task_client", None) is not None:
            await asyncio.to_thread(current.close_task_client, self)
        core.stop("closed")
        if core.thread.is_alive():
            await asyncio.to_thread(core.thread.join, 10)
