"""Ready-made plugins, with dask.distributed's names: ``Environ``, ``InstallPlugin``,
``PipInstall``, ``CondaInstall``, ``UploadDirectory``; and the plugins behind
``Client.forward_logging`` and ``Client.register_worker_callbacks``.

Each is a :class:`~zfabric.plugins.WorkerPlugin` or :class:`~zfabric.plugins.NannyPlugin`,
registered with ``client.register_plugin(plugin)``: it travels pickled and runs on the workers
(or nannies), current and later. This module is on the ground floor beside the base classes:
the workers run it without the client.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import inspect
import io
import logging
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from collections.abc import Callable, Sequence

from . import current
from .plugins import NannyPlugin, WorkerPlugin

logger = logging.getLogger(__name__)

__all__ = ["CondaInstall", "Environ", "ForwardLogging", "InstallPlugin", "PipInstall",
           "UploadDirectory", "WorkerCallback"]


class Environ(NannyPlugin):
    """Set environment variables in each Nanny, then restart its workers so that they start
    with them (as dask.distributed's). Needs workers under Nannies (``LocalCluster``,
    ``zfabric nanny``)."""

    restart = True

    def __init__(self, environ: dict | None = None):
        self.environ = {str(k): str(v) for k, v in (environ or {}).items()}
        self.name = "environ-" + hashlib.sha1(repr(sorted(self.environ.items())).encode(),
                                              usedforsecurity=False).hexdigest()[:12]

    def setup(self, nanny):
        os.environ.update(self.environ)


class InstallPlugin(WorkerPlugin):
    """Run ``install_fn()`` once per host (the first worker of a host runs it, the others
    wait for it and skip it), before the worker takes this plugin as set up.

    ``restart_workers=True`` is dask's way of having already-imported modules reloaded; in
    zfabric register the plugin, then call ``client.restart()``.
    """

    def __init__(self, install_fn: Callable[[], None], restart_workers: bool = False,
                 name: str | None = None):
        if restart_workers:
            raise ValueError("InstallPlugin(restart_workers=True) is not supported: register"
                             " the plugin, then call client.restart() so that the workers"
                             " start again with what it installed")
        self.install_fn = install_fn
        self.restart_workers = False
        self.name = name or f"install-{_token(install_fn)}"

    def setup(self, worker):
        marker = os.path.join(tempfile.gettempdir(), f"zfabric-{self.name}")
        with open(marker + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one worker of the host installs at a time
            try:
                if os.path.exists(marker + ".done"):
                    return
                self.install_fn()
                with open(marker + ".done", "w"):
                    pass
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _token(obj) -> str:
    return hashlib.sha1(repr(obj).encode(), usedforsecurity=False).hexdigest()[:12]


class _Command:
    """An installer that runs a command and raises with its output when it fails."""

    def __init__(self, argv: list[str], what: str):
        self.argv = argv
        self.what = what

    def __call__(self) -> None:
        done = subprocess.run(self.argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{self.what} failed on {os.uname().nodename} (exit"
                               f" {done.returncode}): {' '.join(self.argv)}\n"
                               f"{(done.stderr or done.stdout).strip()[-2000:]}")

    def __repr__(self) -> str:
        return " ".join(self.argv)


class PipInstall(InstallPlugin):
    """``pip install`` ``packages`` (with ``pip_options``) once per host, with the workers'
    own Python."""

    def __init__(self, packages: Sequence[str], pip_options: Sequence[str] | None = None,
                 restart_workers: bool = False):
        self.packages = list(packages)
        self.pip_options = list(pip_options or ())
        argv = [sys.executable, "-m", "pip", "install", *self.pip_options, *self.packages]
        super().__init__(_Command(argv, "pip install"), restart_workers,
                         name=f"pip-{_token(argv[3:])}")


class CondaInstall(InstallPlugin):
    """``conda install`` ``packages`` (with ``conda_options``) once per host. Where a host
    has no ``conda`` (nor ``$CONDA_EXE``), setting it up raises, saying so."""

    def __init__(self, packages: Sequence[str], conda_options: Sequence[str] | None = None,
                 restart_workers: bool = False):
        self.packages = list(packages)
        self.conda_options = list(conda_options or ())
        super().__init__(self._install, restart_workers,
                         name=f"conda-{_token([self.conda_options, self.packages])}")

    def _install(self) -> None:
        conda = os.environ.get("CONDA_EXE") or shutil.which("conda")
        if not conda:
            raise RuntimeError(f"CondaInstall: there is no conda on {os.uname().nodename}"
                               " (no `conda` on PATH, no $CONDA_EXE); install the packages"
                               " with PipInstall([...]) instead")
        _Command([conda, "install", "--yes", *self.conda_options, *self.packages],
                 "conda install")()


_SKIP = (".git", ".github", ".pytest_cache", "tests", "docs", "__pycache__")


class UploadDirectory(WorkerPlugin):
    """Copy a local directory to every worker (current and later), into the worker's own
    temporary directory; ``update_path=True`` puts the copy on the worker's ``sys.path``
    (so the modules and packages inside it import there), as dask.distributed's. Files
    under a part named in ``skip_words`` are left out.

    ``restart=True`` is dask's way of reloading modules already imported: in zfabric,
    register the plugin, then call ``client.restart()``.
    """

    def __init__(self, path, restart: bool = False, update_path: bool = False,
                 skip_words: Sequence[str] = _SKIP, skip: Sequence[Callable] = ()):
        if restart:
            raise ValueError("UploadDirectory(restart=True) is not supported: register the"
                             " plugin, then call client.restart()")
        path = os.path.abspath(os.path.expanduser(os.fspath(path)))
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no directory {path!r} to upload")
        self.path = path
        self.update_path = update_path
        self.dirname = os.path.basename(path.rstrip(os.sep))
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if d not in skip_words)
                for name in sorted(files):
                    full = os.path.join(root, name)
                    rel = os.path.relpath(full, os.path.dirname(path))
                    if any(word in rel.split(os.sep) for word in skip_words):
                        continue
                    if any(test(full) for test in skip):
                        continue
                    z.write(full, rel)
        self.data = buffer.getvalue()
        self.name = f"upload-directory-{self.dirname}"

    def setup(self, worker):
        parent = tempfile.mkdtemp(prefix="zfabric-upload-dir-")
        self._dir = parent
        with zipfile.ZipFile(io.BytesIO(self.data)) as z:
            z.extractall(parent)
        copy = os.path.join(parent, self.dirname)
        if self.update_path and copy not in sys.path:
            sys.path.insert(0, copy)
            importlib.invalidate_caches()

    def teardown(self, worker):
        parent = getattr(self, "_dir", None)
        if parent is not None:
            with contextlib.suppress(ValueError):
                sys.path.remove(os.path.join(parent, self.dirname))
            shutil.rmtree(parent, ignore_errors=True)


class WorkerCallback(WorkerPlugin):
    """``Client.register_worker_callbacks(setup)``: ``setup()`` (or ``setup(dask_worker=
    worker)`` when it takes that parameter) runs on every worker, current and later."""

    def __init__(self, setup: Callable):
        self.callback = setup
        self.name = f"worker-setup-{_token(getattr(setup, '__qualname__', setup))}"

    def setup(self, worker):
        try:
            takes_worker = "dask_worker" in inspect.signature(self.callback).parameters
        except (TypeError, ValueError):
            takes_worker = False
        return self.callback(dask_worker=worker) if takes_worker else self.callback()


class _Forwarder(logging.Handler):
    """Queues records as plain dicts; a thread of its own logs them as events through the
    worker's client (a record may come from the worker's loop thread, which must not wait
    for the scheduler)."""

    def __init__(self, worker, level: int, topic: str):
        super().__init__(level)
        self.worker = worker
        self.topic = topic
        self.records: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._send, name="zfabric-forward-logging",
                                       daemon=True)
        self.thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        if threading.current_thread() is self.thread:
            return  # what sending logs must not come back here
        try:
            self.records.put({"name": record.name, "levelno": record.levelno,
                              "levelname": record.levelname, "msg": self.format(record),
                              "args": None, "created": record.created,
                              "worker": getattr(self.worker, "address", "")})
        except Exception:
            self.handleError(record)

    def _send(self) -> None:
        while True:
            msg = self.records.get()
            if msg is None:
                return
            try:
                current.worker_client_of(self.worker).log_event(self.topic, msg)
            except Exception:  # the worker is closing: the record stays local
                pass

    def close(self) -> None:
        self.records.put(None)
        super().close()


class ForwardLogging(WorkerPlugin):
    """``Client.forward_logging``: records of one logger on each worker become events of
    ``topic``, which the client that asked emits again by its own logger of that name."""

    def __init__(self, logger_name: str | None, level: int, topic: str):
        self.logger_name = logger_name
        self.level = level
        self.topic = topic

    def setup(self, worker):
        handler = self._handler = _Forwarder(worker, self.level, self.topic)
        logging.getLogger(self.logger_name).addHandler(handler)

    def teardown(self, worker):
        handler = getattr(self, "_handler", None)
        if handler is not None:
            logging.getLogger(self.logger_name).removeHandler(handler)
            handler.close()
