"""Shared fixtures: an in-process cluster with a client, built on :mod:`zfabric.testing`."""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace

# A bug of the scheduler's own code met while it applies an op fails the test (it is only
# logged and answered in production): see zfabric.scheduler.state.RAISE_BUGS_ENV.
os.environ.setdefault("ZFABRIC_RAISE_BUGS", "1")

import psutil
import pytest

from zfabric import Client
from zfabric.testing import cluster, wait_gone


@pytest.fixture
async def fab():
    """A scheduler, two single-threaded workers and an asynchronous client, in this loop.

    ``fab.s``, ``fab.a``, ``fab.b``, ``fab.workers`` and ``fab.c``; everything is closed and
    leak-checked afterwards.
    """
    async with cluster(nworkers=2, nthreads=1) as (s, workers), \
            Client(s.address, asynchronous=True, set_as_default=False) as c:
        yield SimpleNamespace(s=s, workers=workers, a=workers[0], b=workers[1], c=c)


@pytest.fixture
def no_leftover_processes():
    """Fail a test that leaves a child process of this one running (and kill what it left)."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    new = [p.pid for p in psutil.Process().children(recursive=True) if p.pid not in before]
    left = wait_gone(new)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind: {left}"
