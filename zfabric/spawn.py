"""Starting a Nanny's worker process: its command line and environment, the pipe it reports
on, and the pipe that hands it its keys.

The command line is :func:`zfabric.process.worker_command`; the environment is this
process's, with the fixed settings of :func:`zfabric.process.worker_environ`, the Nanny's
``env=``, and the Nanny's own security settings in place of any it inherited.

Keys held in memory (``Security.temporary()``) never travel in the environment, which every
process a task starts inherits and which ``/proc/PID/environ`` shows, nor on the command line,
which ``ps`` shows to every user. The Nanny writes them into a pipe of their own and closes its
end before the worker starts; the worker reads them once at startup (``--keys-fd``, see
:func:`read_keys`) and closes the pipe, so nothing it starts can find them there. It gets the
key pairs of the roles it acts as only (worker, and client for its tasks' clients), since its
tasks run any code in its process. Keys on disk
travel as the directory's name (``ZFABRIC_SECURITY``), which is no secret: the worker reads the
files, and sees keys added to or revoked from the directory later.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid

from .process import worker_command, worker_environ
from .security import ENV_DIRECTORY, Security, SecurityError
from .supervision import WorkerProcess

__all__ = ["read_keys", "start_worker"]

#: Variables a worker process must not inherit from its Nanny's environment: the Nanny passes
#: its own keys (``ZFABRIC_SECURITY_KEYS`` carried keys in memory in earlier versions).
SECURITY_VARIABLES = (ENV_DIRECTORY, "ZFABRIC_SECURITY_KEYS")
#: Most bytes of keys written into a pipe; far below a pipe's buffer, so writing never blocks.
MAX_KEYS_BYTES = 16384
#: The key pairs a worker process gets: its own, and the client key its tasks' clients use
#: (not the scheduler's, the nanny's or an admin's: tasks run code in that process).
WORKER_ROLES = ("worker", "client")


def start_worker(scheduler_address: str, *, now: float, security: Security | None,
                 env: dict, **command) -> WorkerProcess:
    """Start one worker process for the Nanny (``command``: :func:`worker_command`'s other
    arguments). Returns its record, whose ``fd`` is the non-blocking read end of the pipe on
    which it reports (``ready ADDRESS``, ``closing REASON``, ``restarting REASON``)."""
    identity = f"worker-{uuid.uuid4().hex[:16]}"
    keys_fd = _keys_pipe(security) if security is not None and security.in_memory else None
    read_fd, write_fd = os.pipe()
    passed = (write_fd,) if keys_fd is None else (write_fd, keys_fd)
    try:
        cmd = worker_command(scheduler_address, identity=identity, parent_pid=os.getpid(),
                             ready_fd=write_fd, keys_fd=keys_fd, **command)
        proc = subprocess.Popen(cmd, env=worker_env(env, security), pass_fds=passed,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        for fd in passed:  # the child has its copies; the keys are in the pipe, not here
            os.close(fd)
    os.set_blocking(read_fd, False)
    return WorkerProcess(proc, identity, read_fd, now)


def worker_env(extra: dict, security: Security | None) -> dict[str, str]:
    """A worker process's environment: :func:`worker_environ` with ``extra``, and no
    security settings but the Nanny's own keys' directory (none for keys in memory)."""
    env = worker_environ(extra)
    for name in SECURITY_VARIABLES:
        env.pop(name, None)
    if security is not None:
        env.update(security.environ())
    return env


def _keys_pipe(security: Security) -> int:
    """The read end of a pipe that holds ``security``'s keys and then ends (its write end is
    closed already)."""
    data = security.dumps_keys(WORKER_ROLES)
    if len(data) > MAX_KEYS_BYTES:
        raise SecurityError(f"{len(data)} bytes of keys are more than a worker reads"
                            f" ({MAX_KEYS_BYTES})")
    read_fd, write_fd = os.pipe()
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(write_fd, view):]
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    return read_fd


def read_keys(fd: int) -> Security:
    """In the worker process: the keys its Nanny wrote into pipe ``fd``, read to the end;
    the pipe is closed whatever happens."""
    chunks = []
    size = 0
    try:
        while chunk := os.read(fd, 65536):
            size += len(chunk)
            if size > MAX_KEYS_BYTES:
                raise SecurityError(f"more than {MAX_KEYS_BYTES} bytes of keys on descriptor"
                                    f" {fd}; is --keys-fd the pipe a Nanny passed?")
            chunks.append(chunk)
    except OSError as exc:
        raise SecurityError(f"cannot read the keys on descriptor {fd} (--keys-fd): {exc}"
                            ) from None
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    return Security.loads_keys(b"".join(chunks))
