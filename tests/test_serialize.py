"""zfabric.serialize: task payloads, dependency markers, out-of-band values, exceptions."""

from __future__ import annotations

import pickle
import threading
import traceback

import numpy as np
import pytest

from zfabric import serialize
from zfabric.errors import SerializationError
from zfabric.serialize import Dep


def add(x, y=0):
    return x + y


# ---------------------------------------------------------------------------- tasks


def test_task_roundtrip():
    payload, deps, buffers = serialize.dumps_task(add, (1,), {"y": 2})
    assert deps == [] and buffers == []
    fbytes, _ = serialize.split_payload(payload)
    assert fbytes == serialize.dumps_function(add)[1]
    func, args, kwargs = serialize.loads_task(payload, {})
    assert func(*args, **kwargs) == 3
    assert (args, kwargs) == ((1,), {"y": 2})


def test_task_without_kwargs_gives_empty_dict():
    payload, _, _ = serialize.dumps_task(add, (1, 2), {})
    assert serialize.loads_task(payload, {})[2] == {}


def test_lambda_and_closure_pickle_with_cloudpickle():
    offset = 5
    payload, _, _ = serialize.dumps_task(lambda x: x + offset, (1,), {})
    func, args, _ = serialize.loads_task(payload, {})
    assert func(*args) == 6


def test_function_pickle_is_cached_per_function_object():
    f = lambda x: x  # noqa: E731
    assert serialize.dumps_function(f) is serialize.dumps_function(f)


def test_deps_nested_in_list_tuple_dict_are_found_and_resolved():
    args = ([Dep("a"), (Dep("b"), 1)], {"k": {"deep": Dep("c")}})
    payload, deps, _ = serialize.dumps_task(add, args, {"y": Dep("d")})
    assert sorted(deps) == ["a", "b", "c", "d"]
    _, args2, kwargs = serialize.loads_task(payload, {"a": 10, "b": 20, "c": 30, "d": 40})
    assert args2 == ([10, (20, 1)], {"k": {"deep": 30}})
    assert kwargs == {"y": 40}


def test_deps_found_when_arguments_need_cloudpickle():
    payload, deps, _ = serialize.dumps_task(add, ([Dep("a"), lambda: 1],), {})
    assert deps == ["a"]
    _, (resolved,), _ = serialize.loads_task(payload, {"a": "A"})
    assert resolved[0] == "A" and resolved[1]() == 1


def test_missing_dependency_on_worker_is_a_serialization_error():
    payload, _, _ = serialize.dumps_task(add, (Dep("gone"),), {})
    with pytest.raises(SerializationError, match="dependency 'gone' is missing"):
        serialize.loads_task(payload, {})


def test_unpicklable_argument_names_the_function():
    with pytest.raises(SerializationError, match=r"cannot pickle the arguments of 'add'.*lock"):
        serialize.dumps_task(add, (threading.Lock(),), {})


def test_task_hash_is_deterministic_and_discriminating():
    p1, _, _ = serialize.dumps_task(add, (1,), {})
    p2, _, _ = serialize.dumps_task(add, (1,), {})
    p3, _, _ = serialize.dumps_task(add, (2,), {})
    assert serialize.task_hash(p1) == serialize.task_hash(p2) != serialize.task_hash(p3)
    assert serialize.task_hash(p1, [b"a"]) != serialize.task_hash(p1, [b"b"])


def test_large_task_argument_travels_out_of_band_without_a_copy():
    arr = np.arange(100_000, dtype="f8")
    payload, deps, buffers = serialize.dumps_task(add, (arr,), {"y": Dep("d")},
                                                  inline_bytes=64 * 1024)
    assert deps == ["d"] and len(buffers) == 1
    assert len(payload) < 2000 and np.shares_memory(np.frombuffer(buffers[0]), arr)
    # without inline_bytes everything stays in the payload
    whole, _, none = serialize.dumps_task(add, (arr,), {})
    assert none == [] and len(whole) > arr.nbytes


# ---------------------------------------------------------------------------- values


def test_large_array_travels_out_of_band_without_a_copy():
    arr = np.arange(100_000, dtype="f8")  # 800 kB
    header, buffers = serialize.dumps_value(arr, inline_bytes=64 * 1024)
    assert len(buffers) == 1
    assert len(header) < 1000  # the data is not in the pickle
    assert np.shares_memory(np.frombuffer(buffers[0], dtype="f8"), arr)
    rebuilt = serialize.loads_value(header, buffers)
    assert np.shares_memory(rebuilt, arr)  # rebuilt on the very same memory
    np.testing.assert_array_equal(rebuilt, arr)
    assert serialize.nbytes(header, buffers) == len(header) + arr.nbytes


def test_large_array_rebuilt_from_a_received_frame_shares_its_memory():
    arr = np.arange(50_000, dtype="i8")
    header, buffers = serialize.dumps_value(arr)
    frame = bytearray(buffers[0])  # what a received frame looks like: some other buffer
    rebuilt = serialize.loads_value(header, [frame])
    assert np.shares_memory(rebuilt, np.frombuffer(frame, dtype="i8"))
    np.testing.assert_array_equal(rebuilt, arr)


def test_small_values_stay_in_band():
    for value in (np.arange(10), b"x" * 1000, {"a": [1, 2.5, "s"]}, None):
        header, buffers = serialize.dumps_value(value)
        assert buffers == []
        rebuilt = serialize.loads_value(header)
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(rebuilt, value)
        else:
            assert rebuilt == value


def test_non_contiguous_array_is_pickled_in_band():
    arr = np.arange(200_000, dtype="f8")[::2]
    header, buffers = serialize.dumps_value(arr)
    assert buffers == []
    np.testing.assert_array_equal(serialize.loads_value(header), arr)


def test_unpicklable_value_names_its_type():
    with pytest.raises(SerializationError, match="cannot pickle a value of type lock"):
        serialize.dumps_value(threading.Lock())


def test_unpicklable_bytes_give_a_clear_error():
    with pytest.raises(SerializationError, match=r"cannot unpickle the value.*same code installed"):
        serialize.loads_value(b"not a pickle")
    with pytest.raises(SerializationError, match=r"value of 'k'"):
        serialize.loads_value(b"not a pickle", key="k")


def test_undecodable_values_fail_the_tasks_that_use_them():
    mark = serialize.loads_or_mark("dep", b"not a pickle")
    assert isinstance(mark, serialize.Undecodable) and "'dep'" in mark.reason
    payload, deps, _ = serialize.dumps_task(len, (Dep("dep"),), {})
    assert deps == ["dep"]
    with pytest.raises(SerializationError, match=r"cannot run task 't'.*dependency 'dep'"):
        serialize.loads_task(payload, {"dep": mark}, "t")


def test_plain_data_keeps_plain_pickle_and_main_objects_go_by_value():
    header, _ = serialize.dumps_value({"a": [1, 2.0, "x"]})
    assert header == pickle.dumps({"a": [1, 2.0, "x"]}, protocol=5)
    Local = type("Local", (), {"__module__": "__main__"})  # as a script's class would be
    header, _ = serialize.dumps_value(Local())
    assert b"cloudpickle" in header


# ---------------------------------------------------------------------------- exceptions


def fail_here():
    raise ValueError("bad value 42")


def _raise_and_capture(fn):
    try:
        fn()
    except BaseException as exc:
        return exc
    raise AssertionError("did not raise")


def test_exception_keeps_type_message_and_remote_frames():
    exc = _raise_and_capture(fail_here)
    line = fail_here.__code__.co_firstlineno + 1
    data, tb, text = serialize.exception_payload(exc)
    assert data is not None and text == "ValueError: bad value 42"

    rebuilt = serialize.rebuild_exception(data, tb, text)
    assert type(rebuilt) is ValueError and str(rebuilt) == "bad value 42"
    frames = traceback.extract_tb(rebuilt.__traceback__)
    assert (frames[-1].filename, frames[-1].lineno, frames[-1].name) == (__file__, line,
                                                                         "fail_here")
    assert frames[-2].name == "_raise_and_capture"
    assert "fail_here" in "".join(traceback.format_exception(rebuilt))


class Unpicklable(Exception):
    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()


class NeedsTwoArgs(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a}-{b}")


@pytest.mark.parametrize("make", [lambda: Unpicklable("boom"), lambda: NeedsTwoArgs("x", "y")])
def test_unpicklable_exception_becomes_remote_error_with_same_text(make):
    def boom():
        raise make()

    exc = _raise_and_capture(boom)
    data, tb, text = serialize.exception_payload(exc)
    rebuilt = serialize.rebuild_exception(data, tb, text)
    if data is None:
        assert type(rebuilt) is serialize.RemoteError
        assert str(rebuilt) == text
    else:
        # tblib's pickling support (installed process-wide by dask.multiprocessing, which
        # dask.bag imports) makes NeedsTwoArgs picklable: then it comes back as itself
        assert type(rebuilt) is type(exc) and str(rebuilt) == str(exc)
    assert type(exc).__name__ in text and str(exc) in text
    assert traceback.extract_tb(rebuilt.__traceback__)[-1].name == "boom"


def test_rebuild_tolerates_garbage():
    rebuilt = serialize.rebuild_exception(b"garbage", b"garbage", "KeyError: 'x'")
    assert isinstance(rebuilt, serialize.RemoteError) and str(rebuilt) == "KeyError: 'x'"
    rebuilt = serialize.rebuild_exception(pickle.dumps("not an exception"), None, "text")
    assert isinstance(rebuilt, serialize.RemoteError)


def test_build_traceback_points_at_given_file_and_line():
    tb = serialize.build_traceback([("/remote/host/job.py", 17, "compute"),
                                    ("/remote/host/lib.py", 3, "helper")])
    frames = traceback.extract_tb(tb)
    assert [(f.filename, f.lineno, f.name) for f in frames] == [
        ("/remote/host/job.py", 17, "compute"), ("/remote/host/lib.py", 3, "helper")]


def test_a_dependency_marker_read_again_on_the_client_stays_a_marker():
    # A task's large arguments carried in band (no worker yet) are unpickled and pickled
    # again on the client: a dependency must arrive at the worker as its value, never as a
    # Future of whatever client the client's process has.
    header = pickle.dumps(((serialize.Dep("k"), [serialize.Dep("k")]), None), protocol=5)
    again = serialize.inband(header, [])
    args, kwargs = serialize.loads_args(again, {"k": 5})
    assert args == (5, [5]) and kwargs == {}
