"""Future, wait, as_completed and fire_and_forget against a real in-process cluster."""

from __future__ import annotations

import gc
import operator
import time

import pytest

from zfabric import Future, as_completed, fire_and_forget, wait
from zfabric.errors import TaskCancelled
from zfabric.testing import gen_cluster, until


def inc(x):
    return x + 1


def slow_inc(x, delay=0.2):
    time.sleep(delay)
    return x + 1


# ---------------------------------------------------------------------------- Future API


@gen_cluster()
async def test_status_transitions_and_result(c, s, a, b):
    f = c.submit(slow_inc, 1, 0.2)
    assert f.status == "pending" and not f.done() and not f.cancelled()
    assert repr(f) == f"<Future: pending, key: {f.key}>"
    assert await f.result() == 2  # result() is awaitable in an asynchronous client
    assert f.status == "finished" and f.done()
    assert await f.exception() is None and await f.traceback() is None
    # as dask.distributed's: two handles of one key are two objects (identity, not key)
    g = Future(f.key, c)
    assert g.key == f.key and f != g and len({f, g}) == 2 and await g.result() == 2


@gen_cluster()
async def test_result_timeout(c, s, a, b):
    f = c.submit(slow_inc, 1, 0.5)
    with pytest.raises(TimeoutError):
        await f.result(timeout=0.05)
    assert await f.result(timeout=5) == 2


@gen_cluster()
async def test_exception_and_traceback(c, s, a, b):
    f = c.submit(operator.truediv, 1, 0)
    exc = await f.exception()
    assert isinstance(exc, ZeroDivisionError) and f.status == "error"
    tb = await f.traceback()
    assert tb is not None
    with pytest.raises(ZeroDivisionError):
        await f.result()


@gen_cluster()
async def test_add_done_callback(c, s, a, b):
    seen = []
    f = c.submit(slow_inc, 1, 0.1)
    f.add_done_callback(lambda fut: seen.append(("first", fut.status)))
    await f
    await until(lambda: seen)
    f.add_done_callback(lambda fut: seen.append(("late", fut.status)))  # already done: at once
    await until(lambda: len(seen) == 2)
    assert seen == [("first", "finished"), ("late", "finished")]
    bad = c.submit(operator.truediv, 1, 0)
    bad.add_done_callback(lambda fut: 1 / 0)  # a failing callback is logged, not raised
    bad.add_done_callback(lambda fut: seen.append(("bad", fut.status)))
    await bad.exception()
    await until(lambda: len(seen) == 3)
    assert seen[-1] == ("bad", "error")


@gen_cluster()
async def test_cancel_future(c, s, a, b):
    f = c.submit(slow_inc, 1, 0.5)
    await f.cancel()
    assert f.cancelled() and f.done()
    with pytest.raises(TaskCancelled):
        await f.result()
    assert isinstance(await f.exception(), TaskCancelled)
    await until(lambda: f.key not in s.tasks)


@gen_cluster()
async def test_new_work_does_not_queue_behind_a_cancelled_task_still_running(c, s, a, b):
    # Given a task running on one of two one-thread workers
    slow = c.submit(time.sleep, 1.5, pure=False)
    await until(lambda: any(ws.started for ws in s.state.workers.values()))
    [busy] = [ws.address for ws in s.state.workers.values() if ws.started]
    # When it is cancelled (its thread runs on: Python cannot stop it)
    await slow.cancel()
    # Then the next task goes to the idle worker, not behind the busy thread
    f = c.submit(inc, 1, pure=False)
    assert await f == 2
    assert (await c.who_has([f]))[f.key] != [busy]
    # and once the cancelled task ends, the busy worker takes work again
    await until(lambda: not s.state.workers_by_address[busy].cancelled_running, 10)


@gen_cluster()
async def test_release_and_garbage_collection(c, s, a, b):
    f = c.submit(inc, 1)
    await f
    key = f.key
    assert c.refcount(key) == 1
    g = Future(key, c)
    assert c.refcount(key) == 2
    f.release()
    assert c.refcount(key) == 1
    del g
    gc.collect()
    assert c.refcount(key) == 0
    await until(lambda: key not in s.tasks)


# ---------------------------------------------------------------------------- wait


@gen_cluster()
async def test_wait_all_and_timeout(c, s, a, b):
    fast = c.map(inc, range(3))
    done, not_done = await wait(fast)
    assert done == set(fast) and not_done == set()
    slow = c.submit(slow_inc, 1, 0.4)
    with pytest.raises(TimeoutError, match="1 of 4 futures were not done"):
        await wait([*fast, slow], timeout=0.1)
    done, not_done = await wait([*fast, slow], timeout=5)
    assert not not_done


@gen_cluster()
async def test_wait_first_completed(c, s, a, b):
    slow = c.submit(slow_inc, 1, 0.4)
    fast = c.submit(slow_inc, 2, 0.01)
    done, not_done = await wait([slow, fast], return_when="FIRST_COMPLETED")
    assert fast in done and slow in not_done
    with pytest.raises(ValueError, match="return_when"):
        wait([slow], return_when="SOMETIMES")
    await c.cancel([slow])


@gen_cluster()
async def test_wait_on_single_future_and_errors(c, s, a, b):
    bad = c.submit(operator.truediv, 1, 0)
    done, not_done = await wait(bad)
    assert done == {bad} and not not_done  # an error counts as done


# ---------------------------------------------------------------------------- as_completed


@gen_cluster()
async def test_as_completed_yields_in_completion_order(c, s, a, b):
    slow = c.submit(slow_inc, 1, 0.4)
    fast = c.submit(slow_inc, 2, 0.01)
    seen = [f async for f in as_completed([slow, fast])]
    assert seen == [fast, slow]


@gen_cluster()
async def test_as_completed_with_results_and_add(c, s, a, b):
    ac = as_completed(c.map(inc, range(5)), with_results=True)
    extra = c.submit(inc, 100)
    ac.add(extra)
    results = sorted([r async for _, r in ac])
    assert results == [1, 2, 3, 4, 5, 101]
    assert ac.is_empty()


@gen_cluster()
async def test_as_completed_errors(c, s, a, b):
    bad = c.submit(operator.truediv, 1, 0)
    with pytest.raises(ZeroDivisionError):
        async for _ in as_completed([bad], with_results=True):
            pass
    pairs = [p async for p in as_completed([bad, c.submit(inc, 1)], with_results=True,
                                            raise_errors=False)]
    # as dask.distributed's: an erred future's result is its (type, exception, traceback)
    results = {f.key: r for f, r in pairs}
    typ, exc, tb = results[bad.key]
    assert typ is ZeroDivisionError and isinstance(exc, ZeroDivisionError) and tb is not None
    assert sorted(type(r).__name__ for r in results.values()) == ["int", "tuple"]


# ---------------------------------------------------------------------------- fire_and_forget


@gen_cluster()
async def test_fire_and_forget_runs_after_the_future_is_dropped(c, s, a, b, tmp_path):
    target = tmp_path / "written"

    def write(path, delay):
        import pathlib

        time.sleep(delay)
        pathlib.Path(path).write_text("done")

    f = c.submit(write, str(target), 0.2)
    fire_and_forget(f)
    del f
    gc.collect()
    # (exists() alone may see the file between its creation and its write)
    await until(lambda: target.exists() and target.read_text() == "done")
    await until(lambda: not s.tasks)  # and then the scheduler forgets it


@gen_cluster()
async def test_fire_and_forget_with_dependencies(c, s, a, b, tmp_path):
    target = tmp_path / "chain"

    def write(path, value):
        import pathlib

        pathlib.Path(path).write_text(str(value))

    x = c.submit(slow_inc, 1, 0.1)
    fire_and_forget([c.submit(write, str(target), x)])
    del x
    gc.collect()
    # (the file exists a moment before its text is in it)
    await until(lambda: target.exists() and target.read_text() != "")
    assert target.read_text() == "2"
    await until(lambda: not s.tasks)
