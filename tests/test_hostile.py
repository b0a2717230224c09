"""Hostile and buggy peers (issue 15 §2): raw ZeroMQ peers on loopback against real
components. Each test names the defect it guards against; each failed before its fix."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import zmq
import zmq.asyncio

from zfabric import Client, protocol, shm
from zfabric.config import from_env
from zfabric.testing import FakePeer, cluster, until

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20


def inc(x):
    return x + 1


def raw_dealer(address: str, *, read: bool = True,
               identity: bytes | None = None) -> zmq.asyncio.Socket:
    """A DEALER that, with ``read=False``, takes in as little as ZeroMQ lets it."""
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if identity:
        sock.setsockopt(zmq.ROUTING_ID, identity)
    if not read:
        sock.setsockopt(zmq.RCVHWM, 1)
        sock.setsockopt(zmq.RCVBUF, 4096)
    sock.connect(address)
    return sock


async def ask(sock, *ops, buffers=()):
    await sock.send_multipart(protocol.encode(list(ops), buffers))
    assert await sock.poll(5000), f"no answer to {[o['op'] for o in ops]}"
    return protocol.decode(await sock.recv_multipart())


async def canary(c: Client) -> None:
    assert await asyncio.wait_for(c.submit(inc, 1, pure=False), 10) == 2


# ---------------------------------------------------------------------------- data port


async def test_worker_data_port_never_blocks_on_a_peer_that_does_not_read():
    # Given a worker whose data port queues few messages per peer, 1 MB of backlog at most
    cfg = from_env(HWM_MESSAGES=10, PEER_BACKLOG_BYTES=1_000_000)
    async with cluster(1, config=cfg) as (s, [w]), \
            Client(s.address, asynchronous=True, set_as_default=False) as c:
        blob = c.submit(bytes, 4000, key="blob")
        await blob
        sock = raw_dealer(w.address, read=False)
        try:
            # When a peer asks it for the value thousands of times and never reads
            for i in range(40):
                await sock.send_multipart(protocol.encode(
                    [{"op": "get-data", "id": i * 1000 + j, "keys": ["blob"]}
                     for j in range(200)]))
            await asyncio.sleep(0.5)
            # Then the worker keeps computing for everyone else and keeps its heartbeats
            for _ in range(3):
                await canary(c)
            ws = next(iter(s.state.workers.values()))
            await until(lambda: ws.last_seen > s.state.now - 1.0, 5, "worker heartbeats")
            # and keeps at most its byte budget for that peer
            assert sum(w._core.data_backlog_bytes.values()) <= cfg.PEER_BACKLOG_BYTES
        finally:
            sock.close(0)
        await canary(c)


# ---------------------------------------------------------------------------- shared memory

VICTIM = textwrap.dedent("""
    import json, os, sys
    from zfabric import shm
    path = sys.argv[1]
    f = open(path, "r+b")
    st = os.fstat(f.fileno())
    seg = shm.pool().lease(2 << 20)
    print(json.dumps({"file": [1, os.getpid(), f.fileno(), st.st_dev, st.st_ino, st.st_size],
                      "segment": seg}), flush=True)
    sys.stdin.readline()
    f.seek(0)
    seg_bytes = os.pread(seg[2], 16, 0)
    print(json.dumps({"file": f.read(16).hex(), "segment": seg_bytes.hex()}), flush=True)
""")


@pytest.mark.skipif(not shm.available(), reason="memfd segments are not available")
async def test_get_data_into_never_writes_another_process_memory_or_files(tmp_path):
    # Given a process that is not part of the cluster, with a file and a segment open
    target = tmp_path / "precious"
    target.write_bytes(b"\0" * (4 * MiB))
    victim = subprocess.Popen([sys.executable, "-c", VICTIM, str(target)], text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        descs = json.loads(await asyncio.to_thread(victim.stdout.readline))
        async with cluster(1) as (s, [w]), \
                Client(s.address, asynchronous=True, set_as_default=False) as c:
            big = c.submit(np.ones, MiB // 2, key="big")  # 4 MiB of buffers
            await big
            sock = raw_dealer(w.address)
            try:
                # When a peer asks for the value "into" the other process's descriptors
                for name in ("file", "segment"):
                    [op], frames = await ask(sock, {"op": "get-data", "id": 1, "keys": ["big"],
                                                    "into": {"big": descs[name]}})
                    # Then the value comes over the socket instead
                    assert op["op"] == "data" and op["items"][0][4] is None, op
                    assert sum(len(f) for f in frames) == 4 * MiB
            finally:
                sock.close(0)
            await canary(c)
        victim.stdin.write("\n")
        victim.stdin.flush()
        after = json.loads(await asyncio.to_thread(victim.stdout.readline))
        # and nothing of it was written there
        assert after == {"file": "00" * 16, "segment": "00" * 16}
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.skipif(not shm.available(), reason="memfd segments are not available")
async def test_a_lease_is_adopted_only_by_the_connection_it_was_leased_to():
    async with cluster(1) as (_, [w]):
        a, b = raw_dealer(w.address), raw_dealer(w.address)
        try:
            # Given a lease the worker granted to peer A
            [op], _ = await ask(a, {"op": "lease", "id": 1, "sizes": [2 * MiB]})
            [desc] = op["items"]
            assert desc is not None
            header = b"\x80\x05K\x01."  # pickle of 1
            item = ["stolen", header, 0, False, ["seg", desc[0], [16]]]
            # When peer B claims it in a put-data
            [op], _ = await ask(b, {"op": "put-data", "id": 2, "items": [item]})
            # Then B is refused and nothing is stored
            assert op["op"] == "error" and "lease" in op["message"], op
            assert "stolen" not in w.data
            # while A may still use it
            item[0] = "mine"
            [op], _ = await ask(a, {"op": "put-data", "id": 3, "items": [item]})
            assert op["op"] == "reply", op
            await until(lambda: "mine" in w.data, 5)
        finally:
            a.close(0)
            b.close(0)


# ---------------------------------------------------------------------------- roles, ownership


def worker_hello(address: str = "tcp://127.0.0.1:9", **extra) -> dict:
    return {"address": address, "nthreads": 1, "pid": 1, "name": "fake", **extra}


async def test_a_nanny_may_report_only_its_own_workers_dead():
    async with cluster(1) as (s, [w]), FakePeer(s.address, role="nanny") as nanny, \
            Client(s.address, asynchronous=True, set_as_default=False) as c:
        assert (await nanny.hello())["op"] == "welcome"
        # When a nanny reports a worker that is not its own
        await nanny.send({"op": "worker-died", "worker": w.id, "reason": "made up"})
        answer = await nanny.expect("error")
        # Then it is refused and the worker stays
        assert "not its own" in answer["message"]
        assert w.id.encode() in s.state.workers and w.status == "running"
        await canary(c)


async def test_finished_and_missing_are_accepted_only_from_the_worker_concerned():
    async with cluster(1) as (s, [w]), FakePeer(s.address, role="worker") as fake, \
            Client(s.address, asynchronous=True, set_as_default=False) as c:
        big = c.submit(np.zeros, 1 << 17, key="big")  # 1 MiB: held by the worker only
        await big
        fake_addr = "tcp://127.0.0.1:9"
        assert (await fake.hello(**worker_hello(fake_addr)))["op"] == "welcome"
        ts = s.state.tasks["big"]
        # When a worker that never ran "big" says it finished it
        await fake.send({"op": "finished", "tasks": [["big", 10, None, 0.1]]})
        # and says it could not fetch it from the worker that holds it
        await fake.send({"op": "missing", "key": "big", "dep": "big", "address": w.address})
        await fake.expect("free")
        # Then it does not become a holder, and the real holder stays one
        assert [ws.address for ws in ts.who_has] == [w.address]
        s.state.validate()
        assert (await big).nbytes == 1 << 20
        await canary(c)


async def test_bad_transfer_reports_are_dropped_and_the_finish_beside_them_applies():
    import math

    good = ["tcp://127.0.0.1:7", 1.0, 2.0, 100, 1]
    bad = [
        ["tcp://x:1", float("nan"), 1.0, 10, 1], ["tcp://x:1", 0.0, float("inf"), 10, 1],
        ["tcp://x:1", 0.0, 1.0, float("inf"), 1], ["tcp://x:1", 0.0, 1.0, -5, 1],
        ["tcp://x:1", 0.0, 1.0, 2**63, 1], ["tcp://x:1", 0.0, 1.0, 10, "many"],
        ["x" * 4 * MiB, 0.0, 1.0, 10, 1], ["tcp://x:1\nforged", 0.0, 1.0, 10, 1],
        [1, 2, 3], "junk", None, {"a": 1},
    ]
    async with cluster(1) as (s, _), FakePeer(s.address, role="worker") as fake, \
            Client(s.address, asynchronous=True, set_as_default=False) as c:
        fake_addr = "tcp://127.0.0.1:9"
        assert (await fake.hello(**worker_hello(fake_addr)))["op"] == "welcome"
        f = c.submit(inc, 1, workers=[fake_addr], pure=False)
        [key, *_] = (await fake.expect("compute", timeout=5))["tasks"][0]
        # When a worker's report of its transfers is full of bad values, and long
        await fake.send({"op": "heartbeat", "transfers": "not a list"},
                        {"op": "heartbeat", "transfers": [good] * 100_000})
        await fake.send({"op": "finished", "tasks": [[key, 1, None, 0.1]],
                         "transfers": [*bad, good]})
        # Then the task it finished beside them is applied, nothing failed in the loop
        await until(lambda: f.done(), 5, "the fake worker's task finished")
        assert f.status == "finished" and s.state.tasks[key].state == "memory"
        assert not any(o["op"] == "error" for o in fake.received), fake.received
        # and only well-formed entries were kept, at most a report's worth
        obs = s.state.observe
        kept = list(obs.transfers)
        assert kept and all(t[1:] == (good[0], 1.0, 2.0, 100, 1) for t in kept)
        assert obs.transfer_bytes == 100 * 1001
        assert all(math.isfinite(t[2]) and math.isfinite(t[3]) for t in kept)
        s.state.validate()
        await fake.send({"op": "goodbye"})
        await until(lambda: fake.identity not in s.state.workers, 5)
        await canary(c)


async def test_a_live_workers_data_address_is_not_taken_over():
    async with cluster(1) as (s, [w]), FakePeer(s.address, role="worker") as fake, \
            Client(s.address, asynchronous=True, set_as_default=False) as c:
        # When a newcomer says hello with the data address of a live worker
        answer = await fake.hello(**worker_hello(w.address))
        # Then it is refused, with the address named, and the live worker keeps its place
        assert answer["op"] == "error" and w.address in answer["message"]
        assert answer["retry_s"] > 0
        assert [ws.ident for ws in s.state.workers.values()] == [w.id.encode()]
        await canary(c)


# ---------------------------------------------------------------------------- bad values


@pytest.mark.parametrize("extra", [
    {"resources": {"GPU": "x"}}, {"nthreads": float("inf")}, {"memory_limit": float("inf")},
    {"pid": float("inf")}, {"resources": {"GPU": float("nan")}}, {"nthreads": -5},
])
async def test_bad_worker_hello_values_are_refused_and_wedge_nothing(extra):
    async with cluster(1, resources={"GPU": 1}) as (s, _), \
            FakePeer(s.address, role="worker") as fake, \
            Client(s.address, asynchronous=True, set_as_default=False) as c:
        answer = await fake.hello(**{**worker_hello(), **extra})
        assert answer["op"] == "error", answer
        assert next(iter(extra)) in answer["message"]  # it names the field
        assert fake.identity not in s.state.workers
        # resource-restricted tasks still run
        f = c.submit(inc, 1, resources={"GPU": 1}, pure=False)
        assert await asyncio.wait_for(f, 10) == 2
        s.state.validate()


async def test_names_cannot_forge_log_lines_and_op_names_are_not_logged_whole(caplog):
    async with cluster(0) as (s, _), FakePeer(s.address, role="worker") as fake, \
            FakePeer(s.address) as peer:
        forged = "fake\n2026-01-01 CRITICAL scheduler: all data deleted"
        assert (await fake.hello(**worker_hello(name=forged)))["op"] == "welcome"
        [ws] = s.state.workers.values()
        assert "\n" not in ws.name
        await peer.send({"op": "x" * 10_000_000})
        answer = await peer.expect("error", timeout=10)
        assert len(answer["message"]) < 1000
        assert all(len(r.getMessage()) < 2000 for r in caplog.records)
        assert all("\n2026-01-01" not in r.getMessage() for r in caplog.records)


async def test_ops_after_goodbye_and_unused_functions_are_not_kept():
    async with cluster(0) as (s, _), FakePeer(s.address) as peer:
        await peer.hello()
        # a submit with no task but a large function, one refused for a bad option
        await peer.send({"op": "submit", "tasks": [], "functions": {"f1": b"x" * 100_000}})
        await peer.send({"op": "submit", "functions": {"f2": b"y" * 100_000},
                         "tasks": [["k", b"p", [], {"priority": "high"}, "f2"]]})
        await peer.expect("error")
        # a goodbye, then more in the same message
        await peer.send({"op": "goodbye"},
                        {"op": "scatter", "items": [["pinned", b"v" * 1000, 1000, []]]})
        await until(lambda: peer.identity not in s.state.clients, 5)
        await asyncio.sleep(0.1)
        assert s.state.functions == {}
        assert "pinned" not in s.state.tasks and "k" not in s.state.tasks
        s.state.validate()


async def test_non_numeric_metrics_are_not_kept_and_info_prints(tmp_path):
    from zfabric.cli import format_info

    async with cluster(0) as (s, _), FakePeer(s.address, role="worker") as fake, \
            Client(s.address, asynchronous=True, set_as_default=False) as c:
        await fake.hello(**worker_hello(memory_limit=1000))
        await fake.send({"op": "heartbeat", "metrics": {
            "memory": "lots", "executing": float("nan"), "cpu": float("inf"), "ready": [1],
            "ok": 5}})
        [ws] = s.state.workers.values()
        await until(lambda: ws.metrics == {"ok": 5}, 5)
        assert "fake" in format_info(await c.scheduler_info())
        # the dashboard's snapshot of it is made (a NaN count once failed every snapshot)
        assert s.state.observe.snapshot(s.state, time.monotonic())["workers"]
        # and a report from elsewhere with odd values still prints
        text = format_info({"workers": {"tcp://x:1": {"name": "x", "metrics": {"memory": "?"},
                                                      "memory_limit": "big", "nthreads": "n"}}})
        assert "tcp://x:1" in text


async def test_a_bad_run_request_is_refused_and_drops_no_other_work():
    async with cluster(1) as (s, _), FakePeer(s.address) as peer, \
            Client(s.address, asynchronous=True, set_as_default=False) as c:
        await peer.hello()
        futures = c.map(inc, range(50), pure=False)
        await peer.send({"op": "request", "id": 1, "kind": "run",
                         "args": {"payload": "not bytes"}})
        answer = await peer.expect("error")
        assert "payload" in answer["message"]
        assert await asyncio.wait_for(c.gather(futures), 10) == list(range(1, 51))
        await canary(c)


# ---------------------------------------------------------------------------- pure state


def state_with_workers(*workers):
    from zfabric.config import Config
    from zfabric.scheduler.state import SchedulerState

    state = SchedulerState(address="tcp://sched:8786", config=Config())
    for ident, address in workers:
        state.handle(ident, [protocol.hello("worker", ident.decode(), address=address,
                                            nthreads=1)], 0.0)
    state.handle(b"c", [protocol.hello("client", "c")], 0.0)
    state.flush()
    return state


def test_a_lost_result_makes_its_dependents_wait_for_it_again():
    state = state_with_workers((b"w1", "tcp://10.0.0.1:1"), (b"w2", "tcp://10.0.0.2:1"))
    # Given x (large, held by w1 only) in memory, z still running, y waiting on both
    state.handle(b"c", [{"op": "submit", "tasks": [["x", b"p", [], None],
                                                   ["z", b"p", [], None]]}], 1.0)
    ws_x = state.tasks["x"].processing_on
    state.handle(ws_x.ident, [{"op": "finished", "tasks": [["x", 1 << 20, None, 0.1]]}], 2.0)
    state.handle(b"c", [{"op": "submit", "tasks": [["y", b"p", ["x", "z"], None]]}], 2.0)
    assert state.tasks["y"].state == "waiting" and state.tasks["y"].waiting_on == 1
    # When the holder of x dies
    state.remove_worker(ws_x, "killed", died=True)
    # Then y waits for x again too, and the books balance
    assert state.tasks["y"].waiting_on == 2
    state.validate()


def test_with_keys_only_the_same_key_takes_a_live_workers_address_early():
    keys = {b"w1": b"K1", b"w2": b"K1", b"w3": b"K2"}
    state = state_with_workers()
    state.key_of = keys.get  # as the shell does with security on
    address = "tcp://10.0.0.1:1"
    state.handle(b"w1", [protocol.hello("worker", "w1", address=address, nthreads=1)], 0.0)
    state.flush()
    # When a worker with another key says hello with w1's address while w1 is live
    state.handle(b"w3", [protocol.hello("worker", "w3", address=address, nthreads=1)], 0.1)
    out = state.flush()
    # Then it is refused
    assert [o["op"] for o in out[b"w3"]] == ["error"] and b"w3" not in state.workers
    # When one with w1's own key does
    state.handle(b"w2", [protocol.hello("worker", "w2", address=address, nthreads=1)], 0.2)
    out = state.flush()
    # Then it takes the address at once, and w1 is told to close (not to say hello again)
    assert [o["op"] for o in out[b"w2"]] == ["welcome"]
    assert list(state.workers) == [b"w2"] and state.workers_by_address[address].ident == b"w2"
    assert [o["op"] for o in out[b"w1"]] == ["close"]
    state.validate()


def test_restricted_tasks_nobody_can_run_cost_one_check_per_fill():
    from zfabric.scheduler.queue import RestrictedQueue
    from zfabric.scheduler.records import TaskState

    q = RestrictedQueue()
    tasks = []
    for i in range(20_000):
        ts = TaskState(f"t{i}", b"p")
        ts.set_options({"resources": {"GPU": 1}})
        ts.state = "queued"
        ts.priority = i
        q.add(ts)
        tasks.append(ts)
    other = TaskState("u", b"p")
    other.set_options({"resources": {"CPU": 1}})
    other.state, other.priority = "queued", -1
    q.add(other)
    asked, sent = [], []
    q.fill(lambda ts: asked.append(ts.key) or ("w" if ts.key == "u" else None),
           lambda ts, ws: sent.append(ts.key))
    assert sorted(asked) == ["t0", "u"] and sent == ["u"] and len(q) == 20_000
    for ts in tasks[:15_000]:
        q.discard(ts)
    tasks[15_000].state = "memory"
    asked.clear()
    q.fill(lambda ts: asked.append(ts.key) or "w", lambda ts, ws: sent.append(ts.key))
    assert asked == [f"t{i}" for i in range(15_001, 20_000)] and len(q) == 0


# ---------------------------------------------------------------------------- sizes


async def test_a_task_over_the_frame_limit_fails_at_once_naming_size_and_scatter():
    from zfabric.errors import TaskTooLarge

    cfg = from_env(SCHEDULER_FRAME_BYTES=4 * MiB)
    async with cluster(1, config=cfg) as (s, _), \
            Client(s.address, asynchronous=True, set_as_default=False, config=cfg) as c:
        big = b"x" * (5 * MiB)
        f = c.submit(len, big)
        with pytest.raises(TaskTooLarge, match=r"5,24\d,\d+ bytes.*scatter"):
            await asyncio.wait_for(f, 5)
        # so does a run whose function is too large
        with pytest.raises(TaskTooLarge, match="scatter"):
            await c.run(len, big)
        # many tasks of 1 MiB each travel in several messages, each inside the limit
        futures = c.map(len, [b"y" * MiB] * 12, pure=False)
        assert await asyncio.wait_for(c.gather(futures), 20) == [MiB] * 12
        await canary(c)


async def test_an_oversized_frame_closes_only_its_own_connection():
    cfg = from_env(SCHEDULER_FRAME_BYTES=MiB)
    async with cluster(1, config=cfg) as (s, _), \
            Client(s.address, asynchronous=True, set_as_default=False, config=cfg) as c:
        sock = raw_dealer(s.address)
        try:
            await sock.send_multipart([b"\x91" + b"\xc6" + (64 * MiB).to_bytes(4, "big")
                                       + b"\0" * (2 * MiB)])
            await asyncio.sleep(0.2)
            await canary(c)
        finally:
            sock.close(0)


async def test_values_placed_under_keys_the_scheduler_never_hears_of_are_dropped():
    cfg = from_env(PUT_DATA_CONFIRM_S=1.0)
    async with cluster(1, config=cfg) as (s, [w]), \
            Client(s.address, asynchronous=True, set_as_default=False, config=cfg) as c:
        [kept] = await c.scatter([np.arange(200_000)])  # placed and registered
        sock = raw_dealer(w.address)
        try:
            header = b"\x80\x05K\x01."  # pickle of 1
            [op], _ = await ask(sock, {"op": "put-data", "id": 1,
                                       "items": [["orphan", header, 0, False, None]]})
            assert op["op"] == "reply" and "orphan" in w.data
        finally:
            sock.close(0)
        await until(lambda: "orphan" not in w.data, 10, "orphan value dropped")
        assert kept.key in w.data
        assert (await kept).sum() == np.arange(200_000).sum()


async def test_queued_bytes_not_messages_bound_a_peer_that_does_not_read():
    # Given a scheduler with its default high-water mark (100,000 messages) and 8 MB of
    # backlog allowed per peer
    cfg = from_env(PEER_BACKLOG_BYTES=8_000_000)
    async with cluster(0, config=cfg) as (s, _):
        sock = raw_dealer(s.address, read=False, identity=b"greedy")
        try:
            await sock.send_multipart(protocol.encode([protocol.hello("client", "greedy")]))
            await until(lambda: b"greedy" in s.state.clients, 5)
            # When it places values inline (each comes back to it in a memory op, ~60 KB)
            # and never reads: 3,000 of them, 180 MB
            value = b"v" * 60_000
            for batch in range(60):
                await sock.send_multipart(protocol.encode([{"op": "scatter", "items": [
                    [f"k-{batch}-{i}", value, len(value), []] for i in range(50)]}]))
                # (each batch taken in before the next: on a loaded machine the intake guard
                # would otherwise cut it first, for sending faster than the loop reads)
                await until(lambda b=batch: len(s.state.tasks) >= 50 * (b + 1)
                            or b"greedy" not in s.state.clients, 10, "batch taken in")
                if b"greedy" not in s.state.clients:
                    break
            # Then it is dropped once its bytes, not its messages, pass the bound
            await until(lambda: b"greedy" not in s.state.clients, 20, "greedy peer dropped")
            assert any("did not read its messages" in text for _, text in s.state.events)
            # (what it still sends after that gets a reregister, which may wait too: bytes)
            assert s.backlog_bytes < 100_000
            await until(lambda: not s.state.tasks, 5, "its values released")
        finally:
            sock.close(0)


async def test_workers_and_nannies_may_not_make_client_requests():
    async with cluster(1) as (s, _), FakePeer(s.address, role="worker") as fake, \
            FakePeer(s.address, role="nanny") as nanny:
        await fake.hello(**worker_hello())
        await nanny.hello()
        for peer in (fake, nanny):
            for kind in ("shutdown", "restart", "run"):
                await peer.send({"op": "request", "id": 1, "kind": kind,
                                 "args": {"payload": b"x"}})
                answer = await peer.expect("error")
                assert "only clients do" in answer["message"]
            await peer.send({"op": "request", "id": 2, "kind": "who-has", "args": {}})
            assert (await peer.expect("reply"))["id"] == 2
        assert s.status == "running" and not s.state.closing
