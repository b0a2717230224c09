"""The Client: submit work, get Futures, gather results — dask.distributed's API on ZeroMQ.

``Client(address, asynchronous=True)`` lives in the caller's event loop and its methods return
awaitables; ``Client(address)`` runs its own loop in a background thread and its methods block.

A Client is its records and a few parts that work on them, each in a module of its own:

- :class:`~zfabric.client_core.ClientCore` (``client.core``): the lock, the state of every key
  (shared by its Futures), reference counts, the outbox, the submit window and the requests
  waiting for replies. Futures and zfabric's other client-side modules use it;
- :class:`~zfabric.session.Session`: the DEALER to the scheduler, what comes in, the flush of
  what goes out (one message per loop turn, ``map`` split into batches), liveness;
- :class:`~zfabric.submission.Submission`: ``submit`` and ``map`` turn calls into tasks;
- :class:`~zfabric.values.Values` (``client.values``): results, ``gather``, ``scatter`` and
  large arguments, straight from and to the workers (:class:`~zfabric.transfer.DataPool`);
- :class:`~zfabric.cluster_admin.ClusterAdmin`: requests about the cluster and commands for
  it; :class:`~zfabric.datasets.Datasets`, :class:`~zfabric.diagnostics.Diagnostics`,
  :class:`~zfabric.plugin_requests.PluginRequests`, :class:`~zfabric.topics.Topics` (events
  the scheduler pushes) and :class:`~zfabric.story.Stories` (``story``).

The Client's own methods below are its life cycle (connect, close, ``sync``), ``cancel``,
dask's ``get``/``compute``/``persist``, and one line per method a part carries out.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, overload

import zmq.asyncio

from . import current, dask, dask_scheduler, joblib_backend
from .client_core import ClientCore
from .cluster_admin import ClusterAdmin
from .config import Config, from_env, parse_timedelta
from .current import default_client
from .datasets import Datasets, DatasetsMapping
from .diagnostics import Diagnostics
from .errors import ClosedError
from .futures import Future, FutureState, futures_of
from .inspection import Inspection
from .lifecycle import LoopThread
from .metadata import Metadata
from .plugin_requests import PluginRequests
from .profiling import Profiling
from .reprs import render_client
from .security import SecurityError, as_security
from .session import Session
from .story import Stories
from .submission import Submission, funcname  # noqa: F401  (funcname: public there)
from .topics import Topics
from .transfer import DataPool
from .values import Values

logger = logging.getLogger(__name__)

__all__ = ["Client", "default_client"]

P = ParamSpec("P")
R = TypeVar("R")

#: A blocking call waits for its result in slices this long (see :meth:`Client.sync`).
_WAIT_SLICE_S = 0.5


class _ByPart(Generic[P, R]):
    """A Client method that one of its parts carries out: ``submit = _ByPart("_submission",
    Submission.submit)`` has the part's signature and docstring. The first use on a client
    keeps the part's bound method in the client's ``__dict__``, so later calls cost nothing
    more than a method of the Client's own."""

    def __init__(self, part: str, method: Callable[Concatenate[Any, P], R]):
        self.part = part
        self.method = method
        self.name = method.__name__
        functools.update_wrapper(self, method)  # type: ignore[arg-type]

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None,
                owner: type | None = None) -> Callable[Concatenate[Any, P], R]: ...

    @overload
    def __get__(self, obj: object, owner: type | None = None) -> Callable[P, R]: ...

    def __get__(self, obj, owner=None):
        if obj is None:  # on the class: the part's function (signature, docstring)
            return self.method
        bound = getattr(getattr(obj, self.part), self.method.__name__)
        obj.__dict__[self.name] = bound
        return bound


class Client:
    """Connects to a scheduler and turns calls into Futures.

    ``address`` may be a ``tcp://host:port`` string, a Scheduler, or a LocalCluster; with no
    address a LocalCluster sized to this machine starts and closes with the client.
    ``timeout`` bounds how long connecting may take.
    """

    def __init__(self, address=None, *, asynchronous: bool = False, timeout=None,
                 name: str | None = None, set_as_default: bool = True,
                 config: Config | None = None, scheduler_file=None, security=None,
                 direct_to_workers=None, heartbeat_interval=None, serializers=None,
                 deserializers=None, connection_limit=None, _for_worker: str | None = None,
                 **kwargs):
        self.asynchronous = asynchronous
        self._loop_thread: LoopThread | None = None
        self.config = config or from_env()
        if heartbeat_interval is not None:
            beat = parse_timedelta(heartbeat_interval, name="heartbeat_interval")
            assert beat is not None
            self.config = dataclasses.replace(self.config, HEARTBEAT_INTERVAL_S=beat)
        #: The client's records (keys, outbox, window, requests): zfabric's own modules use
        #: them (see zfabric.client_core); not part of dask's API.
        self.core = ClientCore(self.config)  # first: __del__ reads its status
        self.security = as_security(security)  # True: fresh keys (for its own cluster)
        for kw, value in (("serializers", serializers), ("deserializers", deserializers)):
            if value is not None:
                raise ValueError(f"Client({kw}=...): zfabric always uses pickle protocol 5"
                                 " with cloudpickle for what cannot be imported; leave it out")
        if direct_to_workers is False:
            raise ValueError("Client(direct_to_workers=False): zfabric's scheduler never"
                             " carries values; data always moves directly to and from workers")
        if connection_limit is not None:
            raise ValueError("Client(connection_limit=...): zfabric keeps one connection per"
                             " worker and needs no limit; leave it out")
        if address is None and scheduler_file is None and not kwargs:
            address = self.config.SCHEDULER_ADDRESS or None  # zfabric mpi's job scheduler
        if scheduler_file is not None:
            if address is not None:
                raise ValueError("give either an address or scheduler_file, not both")
            address = _read_scheduler_file(scheduler_file, parse_timedelta(timeout) or 10.0)
        timeout = parse_timedelta(timeout)
        self.timeout = float(timeout if timeout is not None else self.config.CONNECT_TIMEOUT_S)
        self.cluster: Any = None
        self._own_cluster = False
        self._cluster_kwargs: dict = {}
        if address is None:
            self._own_cluster = True
            self._cluster_kwargs = kwargs
            if security is not None:
                kwargs["security"] = security if security is not True else self.security
        elif kwargs:
            raise TypeError(f"Client got unexpected arguments: {', '.join(sorted(kwargs))} (they"
                            " are LocalCluster's, which a client starts only without an"
                            " address)")
        elif hasattr(address, "scheduler_address"):
            self.cluster = address
            address = address.scheduler_address
        elif hasattr(address, "address") and not isinstance(address, str):
            address = address.address
        if self.security is None and getattr(self.cluster or address, "security", None):
            # Client(cluster) and Client(scheduler) use the keys they were made with
            self.security = as_security(getattr(self.cluster or address, "security", None))
        if self.security is None and self.config.REQUIRE_ENCRYPTION and not self._own_cluster:
            raise SecurityError("REQUIRE_ENCRYPTION is set but this client has no keys: pass"
                                " security=Security(DIR) (`zfabric keygen DIR`)")
        self.scheduler_address: str | None = address
        self.id = name or f"client-{uuid.uuid4().hex[:12]}"
        self.data: DataPool | None = None  # made on connecting (the keys may come then)
        core = self.core
        core.address = address
        # the client of a worker's tasks says whose: its leases go when that worker dies
        self._session = Session(core, name=self.id,
                                hello={"worker": _for_worker} if _for_worker else {})
        #: Results, gather, scatter and large arguments (zfabric.values): zfabric's own
        #: modules use it; not part of dask's API.
        self.values = Values(self, core, self._session, self.timeout)
        self._submission = Submission(self, core, self.values.ship_args)
        self._admin = ClusterAdmin(self, core)
        self._datasets = Datasets(self)
        self._diagnostics = Diagnostics(self, core, self._admin.run_on_workers)
        self._plugins = PluginRequests(self, core)
        self._topics = Topics(self, core)
        self._metadata = Metadata(self)
        self._inspection = Inspection(self, core, self._admin.run_on_workers)
        self._profiling = Profiling(self, core, self._admin.run_on_workers)
        self._stories = Stories(self, core, self._admin.run_on_workers)
        self._is_default = set_as_default
        if set_as_default:
            current.add_default(self)
            dask_scheduler.install(self)
        if not asynchronous:
            self._loop_thread = LoopThread("zfabric-client-loop")
            core.loop = self._loop_thread.loop
            try:
                self.sync(self._start)
            except BaseException:
                self.close()
                raise

    def __repr__(self) -> str:
        return f"<Client: scheduler={self.scheduler_address!r} status={self.status}>"

    def _repr_html_(self) -> str:
        info = None
        if self.status == "running" and not self.asynchronous:
            with contextlib.suppress(Exception):
                info = self.scheduler_info(n_workers=-1)
        cluster = type(self.cluster).__name__ if self.cluster is not None else None
        return render_client(name=self.id, scheduler_address=self.scheduler_address,
                             status=self.status, dashboard_link=self.dashboard_link,
                             cluster=cluster, info=info)

    @property
    def status(self) -> str:
        """created, connecting, running, closing or closed."""
        return self.core.status

    @property
    def epoch(self) -> str | None:
        """The scheduler's id once it welcomed this client; None while not connected."""
        return self.core.epoch

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the client runs on."""
        return self.core.loop

    @classmethod
    def current(cls, allow_global: bool = True) -> Client:
        """The client of the innermost ``with client.as_current():`` block, else (with
        ``allow_global``) the default client. Raises ``ValueError`` when there is none."""
        c = current.as_current_client()
        if c is not None:
            return c
        if allow_global:
            return default_client()
        raise ValueError("No client is current; use `with client.as_current():`")

    @contextlib.contextmanager
    def as_current(self) -> Iterator[Client]:
        """Make this the client that Futures and ``get_client()`` use within the block."""
        with current.using_client(self):
            yield self

    # ------------------------------------------------------------------ sync / async plumbing

    def sync(self, func, *args, **kwargs):
        """Run a coroutine function on the client's loop: awaitable if asynchronous, else
        blocking until it is done."""
        if self.asynchronous:
            return func(*args, **kwargs)
        loop = self.core.loop
        if loop is None or self._loop_thread is None:
            raise ClosedError("this client is closed; create a new Client")
        if threading.current_thread() is self._loop_thread.thread:
            raise RuntimeError("a blocking Client cannot be used from its own loop thread")
        fut = asyncio.run_coroutine_threadsafe(func(*args, **kwargs), loop)
        try:
            while True:
                # waited in slices: a signal (Ctrl-C, a test's alarm) that the kernel hands to
                # another thread (the loop's, libzmq's) only runs its handler once this thread
                # wakes, and an untimed wait never does
                try:
                    return fut.result(timeout=_WAIT_SLICE_S)
                except TimeoutError:
                    if fut.done():
                        raise  # the call's own TimeoutError
        except KeyboardInterrupt:
            fut.cancel()
            raise

    def __await__(self):
        return self._start_async().__await__()

    async def _start_async(self):
        if self.status == "created":
            await self._start()
        return self

    async def __aenter__(self):
        return await self

    async def __aexit__(self, *exc):
        await self._close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ connect

    async def _start(self) -> None:
        core = self.core
        core.status = "connecting"
        core.loop = asyncio.get_running_loop()
        if self._own_cluster:  # the factory the cluster layer installed (zfabric.current)
            self.cluster = await current.start_local_cluster(asynchronous=True,
                                                             **self._cluster_kwargs)
            if not self.asynchronous:  # client.cluster.scale(3) from the user's thread
                self.cluster.serve_blocking_calls(core.loop)
            self.scheduler_address = core.address = self.cluster.scheduler_address
            self.security = self.cluster.security
        if not self.scheduler_address:
            raise ValueError("Client needs a scheduler address such as tcp://127.0.0.1:8786")
        current.set_process_keys(self.security)  # actor handles of this process connect with it
        self.data = DataPool(zmq.asyncio.Context.instance(), use_shm=self.config.SAME_HOST_SHM,
                             max_frame_bytes=self.config.MAX_MESSAGE_BYTES,
                             security=self.security, config=self.config)
        try:
            await self._session.connect(self.data, self.security, self.timeout)
        except BaseException:  # refused (e.g. protocol mismatch) or cancelled: leave nothing open
            await self._close()
            raise
        core.status = "running"
        joblib_backend.register_on_import()  # without importing joblib (see there)

    # ------------------------------------------------------------------ futures

    def refcount(self, key: str) -> int:
        return self.core.refcount.get(key, 0)

    @property
    def futures(self) -> dict[str, FutureState]:
        return self.core.states

    # ------------------------------------------------------------------ submitting work

    submit = _ByPart("_submission", Submission.submit)
    map = _ByPart("_submission", Submission.map)

    # ------------------------------------------------------------------ values

    gather = _ByPart("values", Values.gather)
    scatter = _ByPart("values", Values.scatter)

    # ------------------------------------------------------------------ dask collections

    def get(self, dsk, keys, **kwargs):
        """Run a dask graph on the cluster and return the values of ``keys`` (nested lists
        as given); dask calls this as its scheduler. See :mod:`zfabric.dask`."""
        self.core.check_open()
        return dask.get(self, dsk, keys, **kwargs)

    def compute(self, collections, sync: bool = False, **kwargs):
        """Start computing dask collections: a Future per collection (values with
        ``sync=True``). Keywords as dask.distributed's (``workers``, ``retries``,
        ``priority``, ``resources``, ``allow_other_workers``, ``optimize_graph``, ...)."""
        self.core.check_open()
        return dask.compute(self, collections, sync=sync, **kwargs)

    def persist(self, collections, **kwargs):
        """The same dask collections, now computed (or computing) and held on the cluster."""
        self.core.check_open()
        return dask.persist(self, collections, **kwargs)

    def normalize_collection(self, collection):
        """``collection`` taken from the Futures this client holds for its keys (see
        :func:`zfabric.dask.normalize_collection`)."""
        return dask.normalize_collection(self, collection)

    # ------------------------------------------------------------------ cancel

    def cancel(self, futures, asynchronous=None, force: bool = False, reason: str | None = None,
               msg: str | None = None):
        """Stop these futures' tasks (and what depends on them); their results are gone.

        ``result()`` then raises a ``CancelledError`` naming the key and ``reason`` (or
        ``msg``). Without ``force`` a key another client also wants is only released for this
        one; with it, it is cancelled for every client.
        """
        flat = futures_of(futures) if not isinstance(futures, Future) else [futures]
        keys = [f._wkey for f in flat]
        why = reason or msg
        op: dict[str, Any] = {"op": "cancel", "keys": keys}
        if why:
            op["reason"] = str(why)
        if force:
            op["force"] = True
        core = self.core
        core.send(op)
        core.on_loop(lambda: core.cancel_states([f._state for f in flat],
                                                str(why) if why else None))
        if self.asynchronous:
            return _noop()
        return None

    # ------------------------------------------------------------------ the cluster

    scheduler_info = _ByPart("_admin", ClusterAdmin.scheduler_info)
    who_has = _ByPart("_admin", ClusterAdmin.who_has)
    has_what = _ByPart("_admin", ClusterAdmin.has_what)
    processing = _ByPart("_admin", ClusterAdmin.processing)
    nthreads = _ByPart("_admin", ClusterAdmin.nthreads)
    ncores = _ByPart("_admin", ClusterAdmin.nthreads)
    nbytes = _ByPart("_admin", ClusterAdmin.nbytes)
    run = _ByPart("_admin", ClusterAdmin.run)
    run_on_scheduler = _ByPart("_admin", ClusterAdmin.run_on_scheduler)
    register_scheduler_plugin = _ByPart("_admin", ClusterAdmin.register_scheduler_plugin)
    unregister_scheduler_plugin = _ByPart("_admin", ClusterAdmin.unregister_scheduler_plugin)
    rebalance = _ByPart("_admin", ClusterAdmin.rebalance)
    restart = _ByPart("_admin", ClusterAdmin.restart)
    wait_for_workers = _ByPart("_admin", ClusterAdmin.wait_for_workers)
    get_versions = _ByPart("_admin", ClusterAdmin.get_versions)
    write_scheduler_file = _ByPart("_admin", ClusterAdmin.write_scheduler_file)
    retry = _ByPart("_admin", ClusterAdmin.retry)
    get_executor = _ByPart("_admin", ClusterAdmin.get_executor)
    replicate = _ByPart("_admin", ClusterAdmin.replicate)
    retire_workers = _ByPart("_admin", ClusterAdmin.retire_workers)
    restart_workers = _ByPart("_admin", ClusterAdmin.restart_workers)

    # ------------------------------------------------------------------ datasets

    publish_dataset = _ByPart("_datasets", Datasets.publish_dataset)
    get_dataset = _ByPart("_datasets", Datasets.get_dataset)
    list_datasets = _ByPart("_datasets", Datasets.list_datasets)
    unpublish_dataset = _ByPart("_datasets", Datasets.unpublish_dataset)

    @property
    def datasets(self) -> DatasetsMapping:
        """The published datasets as a mapping: ``client.datasets["x"] = value`` publishes
        (replacing), ``del client.datasets["x"]`` unpublishes. Blocking clients only."""
        return DatasetsMapping(self)

    # ------------------------------------------------------------------ diagnostics

    @property
    def dashboard_link(self) -> str | None:
        """The URL of the scheduler's dashboard (its host's contact address), or None when the
        scheduler serves none."""
        return self._session.dashboard_link

    get_task_stream = _ByPart("_diagnostics", Diagnostics.get_task_stream)
    get_scheduler_logs = _ByPart("_diagnostics", Diagnostics.get_scheduler_logs)
    get_worker_logs = _ByPart("_diagnostics", Diagnostics.get_worker_logs)
    log_event = _ByPart("_diagnostics", Diagnostics.log_event)
    get_events = _ByPart("_diagnostics", Diagnostics.get_events)
    dump_cluster_state = _ByPart("_inspection", Inspection.dump_cluster_state)
    benchmark_hardware = _ByPart("_inspection", Inspection.benchmark_hardware)
    profile = _ByPart("_profiling", Profiling.profile)
    call_stack = _ByPart("_profiling", Profiling.call_stack)
    story = _ByPart("_stories", Stories.story)
    subscribe_topic = _ByPart("_topics", Topics.subscribe_topic)
    unsubscribe_topic = _ByPart("_topics", Topics.unsubscribe_topic)
    forward_logging = _ByPart("_topics", Topics.forward_logging)
    unforward_logging = _ByPart("_topics", Topics.unforward_logging)

    # ------------------------------------------------------------------ metadata

    set_metadata = _ByPart("_metadata", Metadata.set_metadata)
    get_metadata = _ByPart("_metadata", Metadata.get_metadata)

    # ------------------------------------------------------------------ plugins

    register_plugin = _ByPart("_plugins", PluginRequests.register_plugin)
    register_worker_plugin = _ByPart("_plugins", PluginRequests.register_worker_plugin)
    unregister_worker_plugin = _ByPart("_plugins", PluginRequests.unregister_worker_plugin)
    upload_file = _ByPart("_plugins", PluginRequests.upload_file)
    register_worker_callbacks = _ByPart("_plugins", PluginRequests.register_worker_callbacks)

    # ------------------------------------------------------------------ close

    def shutdown(self):
        """Close the scheduler, its workers and this client (and the LocalCluster)."""
        if self.asynchronous:
            return self._shutdown()
        self.sync(self._shutdown)
        self.close()  # and the client's loop thread
        return None

    async def _shutdown(self):
        try:
            await asyncio.wait_for(self.core.request("shutdown"), 5)
        except Exception:
            pass
        await self._close()
        cluster = self.cluster
        if cluster is not None and not self._own_cluster and \
                getattr(cluster, "status", "") != "closed":
            # As dask.distributed: the cluster closes too, and says so. A blocking cluster
            # runs on a loop thread of its own: close it through its public close().
            try:
                if getattr(cluster, "asynchronous", False):
                    await cluster.close()
                else:
                    await asyncio.to_thread(cluster.close)
            except Exception:
                logger.warning("closing %r after shutdown failed", cluster, exc_info=True)

    def close(self, timeout=None):
        """Release every future and disconnect; closes a LocalCluster the client started."""
        if self.asynchronous:
            return self._close()
        if self._loop_thread is None:
            return None
        loop = self.core.loop
        if loop is not None and loop.is_running() and self.status != "closed":
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._close(), loop).result(30)
        self._loop_thread.stop()
        self._loop_thread = None
        # wait for a running callback, unless this is it closing us
        self.core.stop_callbacks(
            wait=not threading.current_thread().name.startswith("zfabric-callbacks"))
        return None

    async def _close(self) -> None:
        core = self.core
        if core.status in ("closing", "closed"):
            return
        core.status = "closing"
        current.drop_default(self)
        core.stop_callbacks(wait=False)
        await self._topics.close()
        await self._session.close()
        with core.lock:
            for st in list(core.states.values()):
                if not st.done():
                    st.cancel()
        core.fail_requests(lambda: ClosedError("the client was closed"))
        if self.data is not None:
            self.data.close()
        actor = sys.modules.get("zfabric.actor")
        if actor is not None:  # the helper thread of asynchronous actor calls
            await asyncio.to_thread(actor.close_async_calls)
        self._session.close_link()
        if self._own_cluster and self.cluster is not None:
            await self.cluster.close()
        core.status = "closed"
        if self._is_default:
            dask_scheduler.closed()

    def __del__(self):
        core = self.__dict__.get("core")
        if core is not None and core.status == "running" and not self.asynchronous and \
                self._loop_thread is not None:
            with contextlib.suppress(Exception):
                self.close()


async def _noop():
    return None


def _read_scheduler_file(path, timeout_s: float) -> str:
    """The address in a scheduler file, waiting up to ``timeout_s`` for the file to appear."""
    path = os.fspath(path)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with open(path) as f:
                return json.load(f)["address"]
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise FileNotFoundError(f"no scheduler file at {path} after {timeout_s:g} s;"
                                        " start the scheduler with --scheduler-file") from None
            time.sleep(0.05)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path} is not a scheduler file (JSON with an 'address'):"
                             f" {exc}") from None

