"""Task failures seen by the caller: type, message, remote traceback, propagation."""

from __future__ import annotations

import threading
import traceback

import pytest

from zfabric.errors import SerializationError
from zfabric.serialize import RemoteError
from zfabric.testing import gen_cluster


class CustomError(Exception):
    """A user exception type defined in the test module."""


def raise_custom(x):
    raise CustomError(f"custom failure for {x}")


def inner(x):
    return {}[x]


def outer(x):
    return inner(x)


class Unpicklable(Exception):
    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()


def raise_unpicklable():
    raise Unpicklable("cannot travel")


def return_lock():
    return threading.Lock()


def inc(x):
    return x + 1


def line_of(func, text: str) -> int:
    """Line number of the first source line of ``func`` containing ``text``."""
    import inspect

    lines, start = inspect.getsourcelines(func)
    return start + next(i for i, line in enumerate(lines) if text in line)


@gen_cluster()
async def test_exception_keeps_type_and_message(c, s, a, b):
    f = c.submit(raise_custom, 7)
    with pytest.raises(CustomError, match="custom failure for 7"):
        await f
    exc = await f.exception()
    assert type(exc) is CustomError and exc.args == ("custom failure for 7",)


@gen_cluster()
async def test_remote_traceback_points_at_the_failing_lines(c, s, a, b):
    f = c.submit(outer, "missing")
    with pytest.raises(KeyError) as info:
        await f
    frames = traceback.extract_tb(info.value.__traceback__)
    remote = [(fr.filename, fr.lineno, fr.name) for fr in frames if fr.filename == __file__]
    assert remote[-2:] == [
        (__file__, line_of(outer, "return inner"), "outer"),
        (__file__, line_of(inner, "return {}"), "inner"),
    ]
    tb = await f.traceback()
    text = "".join(traceback.format_tb(tb))
    assert "in inner" in text and "in outer" in text
    # no frames of zfabric's own worker machinery between the caller and the task
    assert "zfabric/worker" not in text


@gen_cluster()
async def test_dependents_fail_with_the_same_error(c, s, a, b):
    x = c.submit(raise_custom, 1)
    y = c.submit(inc, x)
    z = c.submit(inc, y)
    for f in (x, y, z):
        with pytest.raises(CustomError, match="custom failure for 1"):
            await f
    # and a task submitted later on top of the failed one fails the same way at once
    with pytest.raises(CustomError, match="custom failure for 1"):
        await c.submit(inc, z)


@gen_cluster()
async def test_unpicklable_exception_arrives_as_remote_error(c, s, a, b):
    f = c.submit(raise_unpicklable)
    with pytest.raises(RemoteError, match="Unpicklable: cannot travel") as info:
        await f
    names = [fr.name for fr in traceback.extract_tb(info.value.__traceback__)]
    assert "raise_unpicklable" in names


@gen_cluster()
async def test_unpicklable_argument_fails_at_submit(c, s, a, b):
    with pytest.raises(SerializationError, match=r"cannot pickle the arguments of 'inc'.*lock"):
        c.submit(inc, threading.Lock())
    with pytest.raises(SerializationError, match="cannot pickle"):
        c.map(inc, [1, threading.Lock()])
    assert not s.tasks
    assert await c.submit(inc, 1) == 2


@gen_cluster(nworkers=1)
async def test_unpicklable_result_fails_the_future_and_the_worker_goes_on(c, s, a):
    f = c.submit(return_lock)
    with pytest.raises(SerializationError, match="cannot pickle a value of type lock") as info:
        await f
    assert "Return or pass something picklable" in str(info.value)
    # the same worker keeps working
    assert await c.gather(c.map(inc, range(10))) == list(range(1, 11))
    assert a.status == "running"


@gen_cluster()
async def test_keyboard_interrupt_and_system_exit_in_a_task_are_task_errors(c, s, a, b):
    def leave():
        raise SystemExit(3)

    with pytest.raises(SystemExit):
        await c.submit(leave)
    assert await c.submit(inc, 1) == 2
    assert a.status == b.status == "running"
