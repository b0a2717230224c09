"""joblib's ``"zfabric"`` backend: ``Parallel`` runs its batches on a zfabric cluster.

>>> with joblib.parallel_config(backend="zfabric"):                    # doctest: +SKIP
...     Parallel(n_jobs=-1)(delayed(f)(x) for x in range(100))

The backend is registered with joblib as soon as both exist: creating a Client calls
:func:`register_on_import`, which registers at once when joblib is imported already, and
otherwise waits for joblib's first import (an import hook that removes itself), so neither
``import zfabric`` nor ``Client()`` imports joblib.

Each joblib batch becomes one task. Large arguments (arrays, data frames, bytes of at least
:data:`SCATTER_BYTES`) are scattered once per ``Parallel`` call and passed to every batch that
uses them as top-level Futures, which the worker resolves from its store (fetching them from
a peer once). joblib's callbacks run on a thread of the backend's own, never on the client's
I/O thread, so a callback may dispatch the next batch (and scatter). When joblib aborts (a
batch failed), every batch still pending is cancelled on the cluster.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import itertools
import logging
import threading

from .current import default_client
from .executor import SUBMIT_OPTIONS, ExecutorFuture, mirror
from .import_hooks import after_import

logger = logging.getLogger(__name__)

__all__ = ["register", "register_on_import"]  # and ZFabricBackend, made on first access

#: Arguments at least this large are scattered once rather than pickled into every batch.
SCATTER_BYTES = 64 * 1024



# ---------------------------------------------------------------------- registration


def register() -> None:
    """Register the ``"zfabric"`` backend with joblib (imports joblib)."""
    from joblib import register_parallel_backend

    register_parallel_backend("zfabric", _factory())


@functools.cache
def _factory():
    return _make_backend_class()


def register_on_import() -> None:
    """Register now if joblib is imported; else on its first import. Never imports joblib."""
    after_import("joblib", register)


# ---------------------------------------------------------------------- running batches


class _Ref:
    """Stands for the ``index``-th scattered argument of a batch."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index

    def __reduce__(self):
        return (_Ref, (self.index,))


def _run_batch(tasks: list, nested, *values):
    """On a worker: run joblib's calls with the scattered arguments put back."""
    import joblib

    def put(x):
        return values[x.index] if type(x) is _Ref else x

    backend, n_jobs = nested
    with joblib.parallel_config(backend=backend, n_jobs=n_jobs):
        return [func(*[put(a) for a in args], **{k: put(v) for k, v in kwargs.items()})
                for func, args, kwargs in tasks]


def _nbytes(obj, depth: int = 0) -> int:
    """Roughly how many bytes ``obj`` holds: arrays, data frames and bytes, and (one level
    down, the first 1,000 items) lists, tuples and dicts of them; 0 for anything else."""
    if isinstance(obj, bytes | bytearray | memoryview):
        return memoryview(obj).nbytes
    if depth == 0 and isinstance(obj, list | tuple | dict):
        items = obj.values() if isinstance(obj, dict) else obj
        return sum(_nbytes(x, 1) for x in itertools.islice(items, 1000))
    n = getattr(obj, "nbytes", None)
    if isinstance(n, int):
        return n
    usage = getattr(obj, "memory_usage", None)  # pandas DataFrame
    if callable(usage) and type(obj).__name__ == "DataFrame":
        try:
            return int(usage(deep=False).sum())
        except Exception:
            return 0
    return 0


def _make_backend_class():
    from joblib._parallel_backends import AutoBatchingMixin, ParallelBackendBase

    class ZFabricBackend(AutoBatchingMixin, ParallelBackendBase):
        """joblib backend running batches on a zfabric cluster (see the module docstring).

        ``client``: the Client to use (default: the current default client);
        ``wait_for_workers_timeout``: how long to wait for a first worker (seconds);
        other keywords go to ``client.submit`` for every batch (``workers=``,
        ``resources=``, ``retries=``, ``priority=``).
        """

        MIN_IDEAL_BATCH_DURATION = 0.2
        MAX_IDEAL_BATCH_DURATION = 1.0
        supports_retrieve_callback = True
        default_n_jobs = -1

        def __init__(self, client=None, wait_for_workers_timeout: float = 10.0,
                     nesting_level=None, inner_max_num_threads=None, **submit_kwargs):
            super().__init__(nesting_level=nesting_level,
                             inner_max_num_threads=inner_max_num_threads)
            unknown = set(submit_kwargs) - SUBMIT_OPTIONS
            if unknown:
                raise TypeError(f"the zfabric joblib backend got unknown options"
                                f" {sorted(unknown)}; it passes {sorted(SUBMIT_OPTIONS)} to"
                                " client.submit")
            if client is None:
                try:
                    client = default_client()
                except ValueError:
                    raise ValueError(
                        "the zfabric joblib backend needs a zfabric Client: create one first,"
                        " e.g. client = zfabric.Client() or Client('tcp://host:8786')"
                    ) from None
            if client.asynchronous:
                raise ValueError("the zfabric joblib backend needs a blocking Client"
                                 " (asynchronous=False)")
            self.client = client
            self.wait_for_workers_timeout = wait_for_workers_timeout
            self.submit_kwargs = {"pure": False, **submit_kwargs}
            # _lock guards _pending and is taken on the client's loop thread (when a batch is
            # done): never hold it while waiting for the client. Scattering waits for the
            # client, under a lock of its own.
            self._lock = threading.Lock()
            self._scatter_lock = threading.Lock()
            self._scattered: dict[int, tuple[object, object]] = {}  # id -> (arg, Future)
            self._pending: dict[str, object] = {}  # key -> zfabric Future not done
            self._callbacks: cf.ThreadPoolExecutor | None = None

        def __reduce__(self):
            raise TypeError("the zfabric joblib backend lives in the client's process and is"
                            " not sent to workers")

        def configure(self, n_jobs=1, parallel=None, **backend_kwargs):
            self.parallel = parallel
            return self.effective_n_jobs(n_jobs)

        def effective_n_jobs(self, n_jobs):
            if n_jobs == 0:
                raise ValueError("n_jobs == 0 in Parallel has no meaning")
            total = self._threads()
            if not total and self.wait_for_workers_timeout:
                self.client.wait_for_workers(1, timeout=self.wait_for_workers_timeout)
                total = self._threads()
            if n_jobs is None or n_jobs < 0:
                return max(1, total + 1 + (n_jobs if n_jobs is not None else -1))
            return n_jobs

        def _threads(self) -> int:
            return sum(self.client.nthreads().values())

        def start_call(self):
            self._callbacks = cf.ThreadPoolExecutor(1, thread_name_prefix="zfabric-joblib")

        def stop_call(self):
            with self._scatter_lock:
                self._scattered.clear()
            pool, self._callbacks = self._callbacks, None
            if pool is not None:
                pool.shutdown(wait=False)

        def terminate(self):
            self.stop_call()
            self.reset_batch_stats()

        def _scatter(self, arg):
            """The Future of ``arg`` scattered (once per Parallel call), or None if small."""
            if _nbytes(arg) < SCATTER_BYTES:
                return None
            with self._scatter_lock:
                hit = self._scattered.get(id(arg))
                if hit is not None and hit[0] is arg:
                    return hit[1]
                # in a list: scatter would take a list or dict argument as many values
                [future] = self.client.scatter([arg], hash=False)
                self._scattered[id(arg)] = (arg, future)  # the arg is kept: its id stays valid
                return future

        def submit(self, func, callback=None):
            items = getattr(func, "items", None)
            if items is None:  # not a joblib BatchedCalls: run it as it is
                zf = self.client.submit(func, **self.submit_kwargs)
            else:
                futures, index, tasks = [], {}, []

                def ref(x):
                    f = self._scatter(x)
                    if f is None:
                        return x
                    if f.key not in index:
                        index[f.key] = len(futures)
                        futures.append(f)
                    return _Ref(index[f.key])

                for fn, args, kwargs in items:
                    tasks.append((fn, [ref(a) for a in args],
                                  {k: ref(v) for k, v in kwargs.items()}))
                nested = (getattr(func, "_backend", None), getattr(func, "_n_jobs", None))
                zf = self.client.submit(_run_batch, tasks, nested, *futures,
                                        **self.submit_kwargs)
            with self._lock:
                self._pending[zf.key] = zf
            out = ExecutorFuture(zf)
            out.get = out.result  # joblib's AsyncResult interface
            pool = self._callbacks

            def done(fut):
                with self._lock:
                    self._pending.pop(zf.key, None)
                if callback is None:
                    return
                try:
                    pool.submit(callback, fut)  # off the client's I/O thread
                except (RuntimeError, AttributeError):  # the call ended (aborted)
                    pass

            cf.Future.add_done_callback(out, done)  # quick: may run on the I/O loop
            mirror(self.client, zf, out)
            return out

        def retrieve_result_callback(self, out):
            return out.result()

        def abort_everything(self, ensure_ready=True):
            """A batch failed: cancel every batch still pending on the cluster."""
            with self._lock:
                pending, self._pending = list(self._pending.values()), {}
            if pending:
                self.client.cancel(pending)
            if not ensure_ready:
                self.stop_call()

    globals()["ZFabricBackend"] = ZFabricBackend
    return ZFabricBackend


def __getattr__(name):
    if name == "ZFabricBackend":  # importing joblib only when asked for the class
        return _factory()
    raise AttributeError(name)
