"""A task's large result is kept unpickled on its worker and pickled only when a peer or a
client asks for it (zfabric/worker/spill.py: SpillStore.pickled): what the worker's own tasks
see, what travels, what spills, and what happens to a value that cannot be pickled."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from zfabric import serialize
from zfabric.errors import SerializationError
from zfabric.testing import gen_cluster
from zfabric.worker.spill import SpillStore, sizeof

N = 50_000  # 400 kB of float64: above the inline threshold (64 KiB)


def _frame(seed):
    import pandas as pd

    return pd.DataFrame({"a": np.arange(N) + seed, "b": np.ones(N) * seed})


def _pieces(seed):
    """A dict of many small arrays (a shuffle's pieces, in spirit): each under 64 KiB."""
    return {i: np.full(1_000, seed + i, dtype="f8") for i in range(40)}


def _locked(seed):
    """Large (by its arrays) and impossible to pickle (by its lock)."""
    return {"x": np.full(N, float(seed)), "lock": threading.Lock()}


def _total(d):
    return float(sum(v.sum() for v in d.values() if isinstance(v, np.ndarray)))


@gen_cluster()
async def test_a_large_result_is_pickled_only_when_it_travels(c, s, a, b):
    # Given a large DataFrame made on worker a
    f = c.submit(_frame, 1, workers=[a.address], key="frame-1")
    # When a task on the same worker uses it
    got = await c.submit(lambda df: int(df.a.sum()), f, workers=[a.address])
    # Then it was never pickled there (nor counted smaller than it is)
    assert got == int((np.arange(N) + 1).sum())
    assert "frame-1" in a.data and "frame-1" not in a._core.serialized
    assert a.data.weights["frame-1"] >= 16 * N
    # When a task on the other worker uses it, and the client asks for it
    assert await c.submit(lambda df: float(df.b.sum()), f, workers=[b.address],
                          allow_other_workers=False) == float(N)
    frame = await f
    # Then both got it whole, and worker a pickled it once and kept the pickle
    assert frame.equals(_frame(1))
    header, bufs, _ = a._core.serialized["frame-1"]
    assert len(bufs) >= 2 and len(header) < 16 * 1024  # its columns travel out of band


@gen_cluster()
async def test_many_small_buffers_of_a_large_value_travel_out_of_band(c, s, a, b):
    f = c.submit(_pieces, 3, workers=[a.address], key="pieces-1")
    total = await c.submit(_total, f, workers=[b.address], allow_other_workers=False)
    assert total == _total(_pieces(3))
    _, bufs, _ = a._core.serialized["pieces-1"]
    assert len(bufs) == 40 and all(memoryview(x).nbytes == 8_000 for x in bufs)


@gen_cluster()
async def test_a_large_unpicklable_result_fails_only_where_it_must_travel(c, s, a, b):
    # Given a large result that cannot be pickled, kept unpickled on worker a
    f = c.submit(_locked, 2, workers=[a.address], key="locked-1")
    # a task on the same worker uses it
    assert await c.submit(_total, f, workers=[a.address]) == 2.0 * N
    # where it must travel (another worker, the client), the error names the key and why
    with pytest.raises(SerializationError, match=r"'locked-1' cannot be pickled.*lock"):
        await c.submit(_total, f, workers=[b.address], allow_other_workers=False)
    with pytest.raises(SerializationError, match="locked-1"):
        await f
    # nothing is lost: the value is still there, its tasks on worker a still run
    assert isinstance(a.data["locked-1"]["lock"], type(threading.Lock()))
    assert await c.submit(_total, f, workers=[a.address], pure=False) == 2.0 * N
    # and the worker carries on
    assert await c.submit(sum, [1, 2], workers=[a.address]) == 3


def test_spilling_skips_a_value_that_cannot_be_pickled_and_keeps_it(tmp_path):
    # Given a store holding, unpickled, a value that cannot be pickled (oldest) and one that can
    store = SpillStore(str(tmp_path / "spill"))
    store.open()
    try:
        locked = _locked(1)
        store.put("locked", locked, sizeof(locked))
        store.put("array", np.arange(N, dtype="f8"), 8 * N)
        # When the store spills
        freed = store.evict()
        # Then the value that can be pickled went to disk, the other stayed as it was
        assert freed == 8 * N and store.is_spilled("array")
        assert store["locked"] is locked and "locked" in store.travel_errors
        assert store.evict() == 0  # nothing left that can be spilled
        np.testing.assert_array_equal(store["array"], np.arange(N, dtype="f8"))
        # and a peer asking for it gets the reason, as an Undecodable
        header, bufs, _ = store.pickled("locked")
        marker = serialize.loads_value(header, bufs)
        assert type(marker) is serialize.Undecodable and "'locked' cannot be pickled" in \
            marker.reason
        # a freed key is asked for in vain
        del store["locked"]
        assert store.pickled("locked") is None and not store.travel_errors
    finally:
        store.close()


def test_sizeof_weighs_arrays_frames_and_collections_without_pickling():
    import pandas as pd

    assert sizeof(np.ones(1000)) == 8000
    assert sizeof(pd.DataFrame({"a": np.ones(1000), "b": np.arange(1000)})) >= 16_000
    assert sizeof({i: np.ones(1000) for i in range(100)}) >= 800_000
    assert sizeof([b"x" * 1000] * 50) >= 50_000
    assert sizeof(None) < 100


class _Proxy:
    """Stands for something remote, as an actor's handle does: any attribute is a call."""

    def __getattr__(self, name):
        raise AssertionError(f"sizeof asked a proxy for {name!r}")


def test_sizeof_never_asks_an_instance_for_what_its_class_does_not_define():
    assert 0 < sizeof(_Proxy()) < 1_000
    assert sizeof([_Proxy()] * 3) < 1_000
