"""The task functions the rows send. Workers do not import this module: the benchmark's
child process registers it with cloudpickle, so the functions travel by value (as from
``__main__``) for both implementations; ``scripts/`` is on the workers' PYTHONPATH as well."""

from __future__ import annotations

import time
from typing import Any


def inc(x: int) -> int:
    return x + 1


class Counter:
    """An actor for actor_call_p50_ms."""

    def __init__(self) -> None:
        self.n = 0

    def incr(self) -> int:
        self.n += 1
        return self.n

    def value(self) -> int:
        return self.n


def noop(x: Any) -> None:
    return None


def identity(x: Any) -> Any:
    return x


def add(a: Any, b: Any) -> Any:
    return a + b


def first(x: Any, gate: Any = None) -> Any:
    return x


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def make_array(i: int, nbytes: int) -> Any:
    import numpy as np

    return np.full(nbytes // 8, float(i))


def array_sum(a: Any) -> float:
    return float(a.sum())


def plus_one(block: Any) -> Any:
    return block + 1
