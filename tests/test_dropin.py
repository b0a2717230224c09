"""dask.distributed's names that scripts reach for, each used as a dask user would, in a
``python script.py`` subprocess on a LocalCluster of worker processes."""

from __future__ import annotations

import pytest
from userscript import run_script

from zfabric.errors import SerializationError
from zfabric.testing import gen_cluster

pytestmark = [pytest.mark.timeout(150), pytest.mark.usefixtures("no_leftover_processes")]


def test_missing_names_now_work(tmp_path):
    (tmp_path / "pkgdir" / "mypkg").mkdir(parents=True)
    (tmp_path / "pkgdir" / "mypkg" / "__init__.py").write_text("ANSWER = 42\n")
    out = run_script(tmp_path, """
        import logging
        import os
        import threading
        import time
        import warnings

        import msgpack
        import gzip

        import zfabric
        from zfabric import Client, LocalCluster, as_completed
        from zfabric.errors import SerializationError, ZFabricError


        def inc(x):
            return x + 1


        def talk(x):
            zfabric.print("hello from a task", x)
            zfabric.warn("careful, task")
            logging.getLogger("userlog").warning("logged on a worker %s", x)
            return x


        def fails():
            raise ValueError("no")


        def log_topic(x):
            zfabric.get_client().log_event("mytopic", {"x": x})
            return x


        def expect(exc_type, fn, *args, match="", **kwargs):
            try:
                fn(*args, **kwargs)
            except exc_type as exc:
                assert match in str(exc), (match, str(exc))
                return exc
            raise AssertionError(f"{fn} did not raise {exc_type.__name__}")


        class Listener(zfabric.TransitionListener):
            def __init__(self):
                self.seen = []

            def transition(self, key, start, finish, **kwargs):
                self.seen.append((key, start, finish))


        def until(check, what, timeout=20):
            deadline = time.monotonic() + timeout
            while not check():
                assert time.monotonic() < deadline, what
                time.sleep(0.05)


        if __name__ == "__main__":
            for name in zfabric.__all__:
                assert getattr(zfabric, name) is not None, name
            for name in ("print", "warn", "CancelledError", "TimeoutError", "Reschedule"):
                assert getattr(zfabric, name) is not None, name
            assert issubclass(zfabric.TaskCancelled, zfabric.CancelledError)
            assert issubclass(SerializationError, TypeError)

            with LocalCluster(n_workers=2, threads_per_worker=1, protocol="tcp://",
                              worker_dashboard_address=None) as cluster, \\
                    Client(cluster) as client:
                assert cluster.status == zfabric.Status.running
                info = client.scheduler_info()  # every worker by default, each with services
                assert len(info["workers"]) == 2
                assert all(w["services"] == {} for w in info["workers"].values())

                # Futures: identity, executor, type, bind_client
                a, b = client.submit(inc, 1), client.submit(inc, 1)
                assert a.key == b.key and a != b and len({a, b}) == 2
                assert a.executor is client and a.result() == 2 and a.type is int
                assert "<code>int" in a._repr_html_().replace("builtins.", "")
                with Client(cluster, set_as_default=False) as other:
                    b.bind_client(other)
                    assert b.client is other and b.result() == 2

                # SerializationError is a TypeError, as dask raises
                expect(TypeError, client.submit, inc, threading.Lock())

                # as_completed(raise_errors=False): dask's (type, exc, tb) triple
                bad = client.submit(lambda: 1 / 0)
                pairs = dict((f.key, r) for f, r in as_completed(
                    [bad, client.submit(inc, 5)], with_results=True, raise_errors=False))
                typ, exc, tb = pairs[bad.key]
                assert typ is ZeroDivisionError and isinstance(exc, ZeroDivisionError)
                assert tb is not None
                # the remote traceback names this script (not <dynamic-code>)
                import traceback
                text = "".join(traceback.format_tb(tb))
                assert "script.py" in text and "dynamic-code" not in text, text
                text = "".join(traceback.format_tb(client.submit(fails).exception().__traceback__))
                assert 'script.py", line' in text and "in fails" in text, text
                slow = client.submit(time.sleep, 5, pure=False)
                slow.cancel()
                try:
                    slow.result()
                except zfabric.CancelledError:
                    pass
                else:
                    raise AssertionError("no CancelledError")

                # a task's print and warn reach the client; so do forwarded log records
                got = []
                handler = logging.Handler()
                handler.emit = lambda record: got.append(record.getMessage())
                logging.getLogger("userlog").addHandler(handler)
                client.forward_logging("userlog", level=logging.INFO)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    client.submit(talk, 7).result()
                    until(lambda: any("careful, task" in str(w.message) for w in caught),
                          "the task's warning did not reach the client")
                until(lambda: any("logged on a worker 7" in m for m in got),
                      "the forwarded record did not arrive")
                client.unforward_logging("userlog")

                # subscribe_topic
                events = []
                client.subscribe_topic("mytopic", events.append)
                client.submit(log_topic, 3).result()
                until(lambda: events, "no event for mytopic")
                assert events[0][1] == {"x": 3}
                client.unsubscribe_topic("mytopic")

                # metadata
                client.set_metadata(["a", "b"], 1)
                client.set_metadata("c", [1, 2])
                assert client.get_metadata("a") == {"b": 1}
                assert client.get_metadata(["a", "b"]) == 1
                assert client.get_metadata("missing", default=None) is None
                expect(KeyError, client.get_metadata, "missing")

                # rebalance: values placed on one worker spread over both
                first, second = sorted(info["workers"])
                data = client.scatter([bytes(200_000) for _ in range(6)], workers=[first],
                                      hash=False)
                assert set(client.has_what()[first]) >= {d.key for d in data}
                client.rebalance(data)
                held = client.has_what()
                assert {d.key for d in data} & set(held[second]), held
                assert client.gather(data)[0] == bytes(200_000)

                # dump_cluster_state, benchmark_hardware
                path = client.dump_cluster_state(str(os.path.join(os.getcwd(), "dump")))
                with gzip.open(path) as f:
                    state = msgpack.unpackb(f.read(), strict_map_key=False)
                assert set(state) == {"scheduler", "workers", "versions"}
                assert len(state["scheduler"]["info"]["workers"]) == 2
                bench = client.benchmark_hardware()
                assert set(bench) == {"memory", "disk", "network"}
                assert all(v > 0 for v in bench["memory"].values())

                # plugins: callbacks, Environ, UploadDirectory, InstallPlugin, CondaInstall
                client.register_worker_callbacks(
                    lambda dask_worker: os.environ.__setitem__("CB", dask_worker.address))
                ran = client.run(lambda dask_worker: os.environ["CB"] == dask_worker.address)
                assert all(ran.values()), ran
                client.register_plugin(zfabric.Environ({"MY_ENV": "set"}))
                client.wait_for_workers(2)
                until(lambda: all(v == "set" for v in client.run(
                    os.environ.get, "MY_ENV", on_error="return").values()),
                    "Environ did not reach the restarted workers")
                client.register_plugin(zfabric.UploadDirectory("pkgdir", update_path=True))
                assert client.submit(lambda: __import__("mypkg").ANSWER).result() == 42
                marker = os.path.join(os.getcwd(), "installed")
                client.register_plugin(zfabric.InstallPlugin(
                    lambda: open(marker, "a").write("x")))
                assert open(marker).read() == "x"  # once per host
                client.register_plugin(zfabric.PipInstall(["msgpack"],
                                                          pip_options=["--no-index"]))
                expect(RuntimeError, client.register_plugin,
                       zfabric.PipInstall(["no-such-package-zz"], pip_options=["--no-index"]),
                       match="pip install failed")
                if not os.environ.get("CONDA_EXE"):
                    expect(RuntimeError, client.register_plugin,
                           zfabric.CondaInstall(["numpy"]), match="PipInstall")

                # scheduler plugins: an error naming what to use instead
                expect(ZFabricError, client.unregister_scheduler_plugin, "x",
                       match="TransitionListener")
                expect(TypeError, client.register_plugin, zfabric.SchedulerPlugin(),
                       match="subscribe_topic")

                # TransitionListener, get_task_metadata, the task stream's records
                with Listener() as listener, zfabric.get_task_metadata() as tasks:
                    f = client.submit(inc, 100)
                    assert f.result() == 101
                    until(lambda: (f.key, "processing", "memory") in listener.seen
                          or any(k == f.key and e == "memory" for k, _, e in listener.seen),
                          f"no transition of {f.key}: {listener.seen}")
                assert tasks.state == {f.key: "memory"}, tasks.state
                assert tasks.metadata[f.key]["worker"] in client.scheduler_info()["workers"]
                [record] = client.get_task_stream(count=1)
                assert {"type", "typename", "metadata", "stimulus_id"} <= set(record)
                expect(ImportError, client.get_task_stream, plot=True, match="bokeh")

                # MultiLock, local_client, span
                m1 = zfabric.MultiLock(["x", "y"])
                assert m1.acquire(timeout=5)
                assert not zfabric.MultiLock(["y", "z"]).acquire(blocking=False)
                m1.release()
                with zfabric.MultiLock(["y", "z"]):
                    pass

                def nested(x):
                    with zfabric.local_client() as c:
                        return c.submit(inc, x).result()

                assert client.submit(nested, 1).result() == 2
                with zfabric.span("load") as span_id:
                    assert isinstance(span_id, str)

                # HTML reprs
                assert "zfabric Client" in client._repr_html_()
                assert "LocalCluster" in cluster._repr_html_()
                assert "Workers" in cluster._repr_html_()

            expect(ValueError, LocalCluster, protocol="inproc://", match="TCP")
            expect(ValueError, LocalCluster, worker_dashboard_address=":0",
                   match="scheduler's dashboard")
            with zfabric.SubprocessCluster(n_workers=1, threads_per_worker=1) as sc, \\
                    Client(sc) as client:
                assert client.submit(inc, 1).result() == 2
                assert "SubprocessCluster" in sc._repr_html_()
            print("ALL OK")
    """, timeout=140)
    assert "ALL OK" in out
    assert "hello from a task 7" in out  # the task's zfabric.print, printed by the client


def test_dask_config_keys_are_read_from_files_and_variables(tmp_path, monkeypatch):
    pytest.importorskip("dask")
    pytest.importorskip("yaml")
    from zfabric import dask_config
    from zfabric.config import from_env

    # Given DASK_* variables, as dask reads them (__ nests, "_" and "-" alike, literals)
    env = {"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0",
           "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "7s",
           "DASK_DISTRIBUTED__WORKER__MEMORY__SPILL": "False"}
    config = from_env(env)
    assert config.ALLOWED_FAILURES == 0 and config.CONNECT_TIMEOUT_S == 7.0
    assert config.MEMORY_SPILL_FRACTION == 0.0
    # ZFABRIC_* variables win over dask's keys
    assert from_env({**env, "ZFABRIC_ALLOWED_FAILURES": "2"}).ALLOWED_FAILURES == 2
    # a set key zfabric does not honour: one warning naming it, once
    monkeypatch.setattr(dask_config, "_warned", set())
    odd = {"DASK_DISTRIBUTED__SCHEDULER__WORK_STEALING": "False"}
    with pytest.warns(RuntimeWarning, match="distributed.scheduler.work-stealing"):
        from_env(odd)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_env(odd)  # not again
        from_env({"DASK_DISTRIBUTED__SCHEDULER__WORK_STEALING": "True"})  # the default: unset


def test_dask_config_set_reaches_the_cluster_a_client_starts(tmp_path):
    pytest.importorskip("dask")
    out = run_script(tmp_path, """
        import os
        import time
        import warnings

        import dask

        from zfabric import Client
        from zfabric.errors import KilledWorker


        def die(path):
            with open(path, "a") as f:
                f.write("ran ")
            os._exit(1)


        if __name__ == "__main__":
            dask.config.set({"distributed.scheduler.allowed-failures": 0,
                             "distributed.comm.timeouts.connect": "7s",
                             "distributed.scheduler.work-stealing": False})
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with Client(n_workers=1, threads_per_worker=1) as client:
                    seen = client.run(lambda dask_worker: dask_worker.config.CONNECT_TIMEOUT_S)
                    assert list(seen.values()) == [7.0], seen
                    path = os.path.abspath("runs")
                    try:
                        client.submit(die, path).result()
                    except KilledWorker:
                        pass
                    else:
                        raise AssertionError("no KilledWorker")
                    assert open(path).read() == "ran ", open(path).read()  # once, as dask
                    # the cluster a bare Client() started scales from the user's thread
                    client.cluster.scale(2)  # blocks until the new worker started
                    assert len(client.cluster.workers) == 2
                    client.wait_for_workers(2, timeout=20)
                    client.cluster.adapt(minimum=1, maximum=1, interval="100ms", wait_count=1)
                    deadline = time.monotonic() + 30
                    while len(client.scheduler_info()["workers"]) != 1:
                        assert time.monotonic() < deadline, "adapt() did not retire a worker"
                        time.sleep(0.05)
            stealing = [w for w in caught if "work-stealing" in str(w.message)]
            assert len(stealing) == 1, [str(w.message) for w in caught]
            print("CONFIG OK")
    """, timeout=90)
    assert "CONFIG OK" in out


def _numbers(n):
    return (i for i in range(n))  # a generator: it cannot be pickled


@gen_cluster()
async def test_an_unpicklable_result_stays_usable_on_its_worker(c, s, a, b):
    # Given a task whose result is a generator, on worker a
    gen = c.submit(_numbers, 4, workers=[a.address], key="gen-1")
    # a task on the same worker uses it
    assert await c.submit(sum, gen, workers=[a.address]) == 6
    # where it must travel (another worker, the client), the error names the key and why
    with pytest.raises(SerializationError, match=r"'gen-1' cannot be pickled.*generator"):
        await c.submit(sum, gen, workers=[b.address], allow_other_workers=False)
    with pytest.raises(SerializationError, match="gen-1"):
        await gen
    # the worker carries on
    assert await c.submit(sum, [1, 2], workers=[a.address]) == 3


def test_worker_processes_cannot_be_shadowed_by_the_current_directory(tmp_path, monkeypatch):
    from zfabric.process import worker_command, worker_environ

    # Given the parent of a clone (a folder named zfabric that is not the package) and a
    # folder of the user's own modules, both on the client's sys.path
    clone_parent, mine = tmp_path / "parent", tmp_path / "mine"
    (clone_parent / "zfabric").mkdir(parents=True)
    mine.mkdir()
    (mine / "mymod.py").write_text("X = 1\n")
    monkeypatch.setattr("sys.path", [str(clone_parent), str(mine), *__import__("sys").path])
    paths = worker_environ({}).get("PYTHONPATH", "").split(":")
    assert str(mine) in paths and str(clone_parent) not in paths
    cmd = worker_command("tcp://127.0.0.1:1", identity="w", nthreads=1, memory_limit=0,
                         nanny="n", parent_pid=1, ready_fd=3)
    assert cmd[1:4] == ["-P", "-m", "zfabric"]  # the cwd is not on the worker's sys.path


def spin(seconds):
    import time

    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += 1
    return n


@gen_cluster()
async def test_profile_and_call_stack(c, s, a, b):
    import asyncio
    import time

    f = c.submit(spin, 1.5, key="spin-1")
    deadline = time.monotonic() + 10
    stacks = {}
    while not stacks and time.monotonic() < deadline:
        stacks = await c.call_stack(keys=["spin-1"])
        await asyncio.sleep(0.05)
    [(_worker, by_key)] = stacks.items()
    assert "spin" in "".join(by_key["spin-1"])  # the task's own frame, now
    await f
    while time.monotonic() < deadline:
        prof = await c.profile(key="spin")
        if prof["count"]:
            break
        await asyncio.sleep(0.1)
    assert prof["count"] > 0 and set(prof["children"]) == {"spin"}
    names = []
    stack = [prof]
    while stack:
        node = stack.pop()
        names.append(node["description"]["name"])
        stack.extend(node["children"].values())
    assert "spin" in names
    with pytest.raises(ValueError, match="profile per task group"):
        await c.profile(start=0)


async def test_a_fresh_worker_logs_what_an_operator_needs(caplog):
    import logging

    from zfabric import Scheduler, Worker

    caplog.set_level(logging.INFO, logger="zfabric.worker")
    async with Scheduler(dashboard=False) as s, Worker(s.address, nthreads=1, name="w1") as w:
        lines = [r.getMessage() for r in caplog.records if r.name == "zfabric.worker"]
        assert any(w.address in m and s.address in m for m in lines), lines
        assert any("1 thread," in m and "memory" in m and "directory" in m for m in lines)
