"""Misbehaving peers over real sockets (FakePeer): the scheduler and workers answer with an
error or a reregister, never crash, and keep serving well-behaved clients afterwards."""

from __future__ import annotations

import msgpack
import pytest

from zfabric import Client, Scheduler, protocol, serialize
from zfabric.config import PROTOCOL_VERSION, Config
from zfabric.errors import CommTimeoutError, KilledWorker, RemoteProtocolError
from zfabric.serialize import dumps_task
from zfabric.testing import FakePeer, cluster


def inc(x):
    return x + 1


async def still_serving(s) -> None:
    async with Client(s.address, asynchronous=True, set_as_default=False) as c:
        assert await c.submit(inc, 1, pure=False) == 2
    assert s.status == "running"


async def test_garbage_frames_get_error_replies():
    async with cluster(1) as (s, _), FakePeer(s.address) as peer:
        for frames in ([b"\xc1 not msgpack"], [msgpack.packb({"op": "hello"})],
                       [msgpack.packb([{"op": "frobnicate"}])],
                       [msgpack.packb([{"op": "submit", "tasks": "many"}])],
                       [msgpack.packb([1, 2, 3])]):
            await peer.send_frames(frames)
            [op] = await peer.recv()
            assert op["op"] == "error" and op["message"].startswith("malformed message: ")
        await still_serving(s)


async def test_too_many_frames_is_refused():
    config = Config(MAX_FRAMES=4)
    async with cluster(1, config=config) as (s, _), FakePeer(s.address) as peer:
        await peer.send(*[{"op": "heartbeat"}], buffers=[b"x"] * 10)
        [op] = await peer.recv()
        assert op["op"] == "error" and "11 frames; the limit is 4" in op["message"]
        await still_serving(s)


async def test_ops_before_hello_get_reregister():
    async with cluster(1) as (s, _), FakePeer(s.address) as peer:
        await peer.send({"op": "submit", "tasks": []})
        assert await peer.recv() == [{"op": "reregister",
                                      "reason": "unknown peer sent 'submit'"}]
        # after a hello the same peer is served
        welcome = await peer.hello()
        assert welcome["op"] == "welcome" and welcome["epoch"] == s.id
        await still_serving(s)


async def test_registered_client_sending_nonsense_gets_errors():
    async with cluster(1) as (s, _), FakePeer(s.address) as peer:
        await peer.hello()
        await peer.send({"op": "finished", "tasks": []},
                        {"op": "submit", "tasks": [["k", "not-bytes", [], None]]},
                        {"op": "release", "keys": [[1, 2]]},
                        {"op": "request", "id": 1, "kind": "who-has", "args": {"keys": 3}})
        ops = await peer.recv()
        assert [o["op"] for o in ops] == ["error"] * 4
        assert "a client may not send 'finished'" in ops[0]["message"]
        assert "malformed task" in ops[1]["message"]
        await still_serving(s)


async def test_protocol_version_mismatch_is_a_clear_error():
    async with cluster(1) as (s, _), FakePeer(s.address) as peer:
        answer = await peer.hello(protocol_version=PROTOCOL_VERSION + 1)
        assert answer["op"] == "error" and answer["fatal"] is True
        assert f"protocol version {PROTOCOL_VERSION + 1} is not supported" in answer["message"]
        assert f"speaks version {PROTOCOL_VERSION}" in answer["message"]
        await still_serving(s)


async def test_client_of_another_protocol_version_is_refused(monkeypatch):
    async with cluster(0) as (s, _):
        monkeypatch.setattr(protocol, "PROTOCOL_VERSION", PROTOCOL_VERSION + 1)
        with pytest.raises(RemoteProtocolError, match="install the same zfabric version"):
            await Client(s.address, asynchronous=True, set_as_default=False, timeout=5)
        monkeypatch.undo()
        await still_serving_without_workers(s)


async def still_serving_without_workers(s) -> None:
    async with Client(s.address, asynchronous=True, set_as_default=False) as c:
        assert (await c.scheduler_info())["address"] == s.address


async def test_bogus_payload_fails_the_task_not_the_worker():
    async with cluster(1) as (s, [w]), FakePeer(s.address) as peer:
        await peer.hello()
        # When a client submits bytes that are no pickled task
        await peer.send({"op": "submit", "tasks": [["bogus", b"\x00\x00\x00\x02xx", [], None]]},
                        {"op": "want", "keys": ["bogus"]})
        erred = await peer.expect("erred", timeout=5, skip="*")
        [item] = erred["items"]
        assert item[0] == "bogus" and item[3]  # the worker reports the unpickling error
        assert w.status == "running"
        await still_serving(s)


async def test_fake_worker_gets_tasks_and_its_results_reach_the_client():
    async with cluster(0) as (s, _), FakePeer(s.address, role="worker") as fake, \
                Client(s.address, asynchronous=True, set_as_default=False) as c:
        welcome = await fake.hello(address="tcp://127.0.0.1:9", nthreads=1, name="fake")
        assert welcome["op"] == "welcome"
        f = c.submit(inc, 41)
        op = await fake.expect("compute", timeout=5)
        [[key, payload, inline, who_has, _options, fid]] = op["tasks"]
        assert key == f.key and inline is None and who_has is None
        # the function came once, before the task, in a functions op
        [functions] = [o for o in fake.received if o["op"] == "functions"]
        [[sent_fid, fbytes]] = functions["items"]
        assert sent_fid == fid
        # the fake worker runs the task itself, the way a worker would
        func = serialize.loads_function(fbytes)
        args, kwargs = serialize.loads_args(payload, {})
        header, _ = serialize.dumps_value(func(*args, **kwargs))
        await fake.send({"op": "finished", "tasks": [[key, len(header), header, 0.001]]})
        assert await f == 42
        info = await c.scheduler_info()
        assert [w["name"] for w in info["workers"].values()] == ["fake"]


async def test_task_on_workers_that_keep_dying_fails_with_killed_worker():
    config = Config(WORKER_TTL_S=0.2, ALLOWED_FAILURES=1)
    async with Scheduler(config=config) as s, \
            Client(s.address, asynchronous=True, set_as_default=False, config=config) as c:
        f = c.submit(inc, 1)
        for i in range(2):
            # Given a worker that takes the task, starts it, then goes silent
            async with FakePeer(s.address, role="worker") as fake:
                await fake.hello(address=f"tcp://127.0.0.1:{10 + i}")
                op = await fake.expect("compute", timeout=5)
                assert op["tasks"][0][0] == f.key
                await fake.send({"op": "started", "keys": [f.key]})
                with pytest.raises(CommTimeoutError):
                    await fake.expect("nothing", timeout=0.5)  # silence: it is declared dead
        with pytest.raises(KilledWorker, match="was running on 2 workers that died") as info:
            await f.result(timeout=5)
        assert info.value.task == f.key and info.value.count == 2
        assert info.value.last_worker == "tcp://127.0.0.1:11"


async def test_worker_data_port_answers_garbage_with_errors():
    async with cluster(1) as (s, [w]), \
            Client(s.address, asynchronous=True, set_as_default=False) as c:
        f = c.submit(inc, 1)
        assert await f == 2
        async with FakePeer(w.address) as peer:
            await peer.send_frames([b"garbage"])
            [op] = await peer.recv()
            assert op["op"] == "error" and "not msgpack" in op["message"]
            await peer.send({"op": "compute", "tasks": []})
            [op] = await peer.recv()
            assert op["op"] == "error" and "unexpected 'compute'" in op["message"]
            await peer.send({"op": "get-data", "id": 7, "keys": [f.key, "absent"]})
            [op] = await peer.recv()
            assert op["op"] == "data" and op["id"] == 7
            [[k1, header, n, *_], [k2, none, zero, *_]] = op["items"]
            assert (k1, n, k2, none, zero) == (f.key, 0, "absent", None, 0)
            assert serialize.loads_value(header) == 2
        assert await c.submit(inc, 2) == 3


async def test_dumps_task_payloads_from_fake_client_run_on_real_workers():
    async with cluster(2) as (s, _), FakePeer(s.address) as peer:
        await peer.hello()
        payload, _, _ = dumps_task(inc, (1,), {})
        await peer.send({"op": "submit", "tasks": [["k1", payload, [], None]]})
        memory = await peer.expect("memory", timeout=5)
        [[key, value, _, nbytes]] = memory["items"]
        assert key == "k1" and serialize.loads_value(value) == 2 and nbytes > 0
        # And a goodbye makes the scheduler forget the client and its keys
        await peer.send({"op": "goodbye"})
        await still_serving(s)
        assert "k1" not in s.tasks
