"""zfabric.current: what code is running in, asked without importing the client or worker."""

from __future__ import annotations

import subprocess
import sys

import pytest

from zfabric import current


class Handle:
    """Anything with a client's ``status`` can stand in the default-client stack."""

    def __init__(self):
        self.status = "running"


def test_the_newest_open_default_wins_and_closing_it_hands_back():
    old, new = Handle(), Handle()
    current.add_default(old)
    current.add_default(new)
    try:
        assert current.default_client() is new
        new.status = "closed"
        assert current.default_client() is old
        with current.using_client(new):  # a closed client in as_current() does not count
            assert current.default_client() is old
        other = Handle()
        with current.using_client(other):
            assert current.default_client() is other
            assert current.as_current_client() is other
        assert current.as_current_client() is None
    finally:
        current.drop_default(old)
        current.drop_default(new)


def test_outside_a_task_client_is_the_default_one_or_says_what_to_do():
    c = Handle()
    with current.using_client(c):
        assert current.client() is c
    code = ("import zfabric.current as c\n"
            "try:\n    c.client()\nexcept ValueError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30).stdout
    assert "No client found" in out


def test_the_last_keys_set_for_the_process_win():
    before = current.process_keys()
    try:
        a, b = object(), object()
        current.set_process_keys(a)
        current.set_process_keys(b)
        current.set_process_keys(None)  # security off for one client changes nothing
        assert current.process_keys() is b
    finally:
        current._process_keys = before


def test_a_thread_outside_a_task_runs_none():
    assert current.current_task() == (None, None)
    assert current.task_worker() is None


def test_the_package_installs_the_local_cluster_and_task_client_factories():
    code = ("import zfabric, zfabric.current as c, sys\n"
            "assert c._local_cluster is not None and c._task_client is not None\n"
            "assert 'zfabric.cluster' not in sys.modules and 'zfabric.context' not in"
            " sys.modules\nprint('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.parametrize("name", ["zfabric.current", "zfabric._version"])
def test_ground_floor_modules_import_nothing_of_zfabric(name):
    code = (f"import sys, importlib; importlib.import_module({name!r}); "
            "print(sorted(m for m in sys.modules if m.startswith('zfabric.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30).stdout
    # the package's own __init__ runs first: it may load only the ground floor
    assert set(eval(out)) <= {"zfabric.current", "zfabric._version", "zfabric.errors"}, out
