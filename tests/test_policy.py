"""zfabric.scheduler.policy: pure worker choice by restrictions, locality and load."""

from __future__ import annotations

from zfabric.scheduler import policy
from zfabric.scheduler.records import TaskState, WorkerState


def worker(n: int, nthreads: int = 1, resources=None, name=None) -> WorkerState:
    return WorkerState(ident=f"w{n}".encode(), id=f"w{n}", address=f"tcp://10.0.0.{n}:1",
                       name=name or f"w{n}", nthreads=nthreads, memory_limit=0,
                       resources=resources or {}, nanny=None, pid=0, host=f"host{n}", now=0.0)


def task(key="t", **options) -> TaskState:
    ts = TaskState(key, b"p")
    if options:
        ts.set_options(options)
    return ts


def in_memory(key, nbytes, *holders, value=None) -> TaskState:
    ts = task(key)
    ts.state, ts.nbytes, ts.value = "memory", nbytes, value
    for ws in holders:
        ts.add_holder(ws)
    return ts


def test_least_loaded_worker_per_thread():
    a, b = worker(1, nthreads=1), worker(2, nthreads=4)
    a.assign(task("x"))
    b.assign(task("y"))
    assert policy.choose_worker(task(), [a, b]) is b  # 1/4 busy beats 1/1


def test_no_worker_with_a_free_slot_means_queue():
    a = worker(1)
    for i in range(a.limit):
        a.assign(task(f"x{i}"))
    assert not a.has_slot()
    assert policy.choose_worker(task(), [a]) is None
    assert policy.choose_worker(task(), []) is None


def test_locality_of_large_dependencies_wins_over_load():
    a, b = worker(1), worker(2)
    a.assign(task("busy"))
    t = task()
    t.deps = (in_memory("big", 10**8, a), in_memory("small", 10, b, value=b"inline"))
    assert policy.choose_worker(t, [a, b]) is a


def test_most_bytes_local_wins():
    a, b = worker(1), worker(2)
    t = task()
    t.deps = (in_memory("d1", 100, a), in_memory("d2", 1000, b))
    assert policy.choose_worker(t, [a, b]) is b


def test_worker_restriction_by_address_name_or_host():
    a, b = worker(1), worker(2, name="gpu-box")
    assert policy.choose_worker(task(workers=[b.address]), [a, b]) is b
    assert policy.choose_worker(task(workers=["gpu-box"]), [a, b]) is b
    assert policy.choose_worker(task(workers=["host2"]), [a, b]) is b
    assert policy.choose_worker(task(workers=["elsewhere"]), [a, b]) is None


def test_allow_other_workers_loosens_names_only():
    a = worker(1)
    assert policy.choose_worker(task(workers=["elsewhere"], allow_other_workers=True), [a]) is a
    t = task(workers=["elsewhere"], allow_other_workers=True, resources={"GPU": 1})
    assert policy.choose_worker(t, [a]) is None


def test_resources_are_counted():
    a, b = worker(1, resources={"GPU": 2}), worker(2)
    t1, t2, t3 = (task(f"g{i}", resources={"GPU": 1}) for i in range(3))
    assert policy.allowed(t1, a) and not policy.allowed(t1, b)
    a.assign(t1)
    assert policy.choose_worker(t2, [a, b]) is a
    a.assign(t2)
    assert a.available == {"GPU": 0}
    assert policy.choose_worker(t3, [a, b]) is None
    a.done(t1, 0.1)
    assert a.available == {"GPU": 1}
    assert policy.choose_worker(t3, [a, b]) is a


def test_options_drop_empty_values_and_scheduling_only_fields():
    # a user priority stays: the worker orders its queue by it too
    t = task(workers=None, resources={}, priority=5, retries=2, task_timeout=1.0)
    assert t.options == {"task_timeout": 1.0, "priority": 5} and not t.restricted
    assert policy.allowed(t, worker(1))
