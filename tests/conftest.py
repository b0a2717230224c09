"""Shared fixtures: an in-process cluster with a client, built on :mod:`zfabric.testing`."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from zfabric import Client
from zfabric.testing import cluster


@pytest.fixture
async def fab():
    """A scheduler, two single-threaded workers and an asynchronous client, in this loop.

    ``fab.s``, ``fab.a``, ``fab.b``, ``fab.workers`` and ``fab.c``; everything is closed and
    leak-checked afterwards.
    """
    async with cluster(nworkers=2, nthreads=1) as (s, workers), \
            Client(s.address, asynchronous=True, set_as_default=False) as c:
        yield SimpleNamespace(s=s, workers=workers, a=workers[0], b=workers[1], c=c)
