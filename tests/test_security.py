"""CurveZMQ security (issue 15 §1): keys by role, strangers refused, revocation.

Real sockets on loopback; raw CURVE peers play the strangers."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import numpy as np
import pytest
import zmq
import zmq.asyncio

from zfabric import Client, LocalCluster, Scheduler, Worker, protocol
from zfabric.config import from_env
from zfabric.errors import SchedulerLost
from zfabric.security import KeyRevoked, Security, SecurityError, keygen
from zfabric.testing import FakePeer, until

pytestmark = pytest.mark.timeout(60)


def inc(x):
    return x + 1


def total(a):
    return float(a.sum())


def fan_out(n):
    """A task that submits tasks (its worker's client connects with the client key)."""
    from zfabric import worker_client

    with worker_client() as client:  # gives its slot back while it waits
        return sum(client.gather(client.map(inc, range(n), pure=False)))


async def secure_cluster(sec, n=2, **kw):
    s = await Scheduler(security=sec, **kw)
    workers = [await Worker(s.address, security=sec, nthreads=1, memory_limit=0)
               for _ in range(n)]
    return s, workers


async def close_all(s, workers):
    import threading

    for w in workers:
        await w.close()
    await s.close()
    # the ZAP handler goes with the last server that used it
    await until(lambda: not any(t.name == "zfabric-zap" for t in threading.enumerate()), 5,
                "ZAP handler stopped")


def real_clients(s) -> list[bytes]:
    """The connected clients (not the scheduler's pseudo clients, named <...>)."""
    return [c for c in s.state.clients if not c.startswith(b"<")]


def curve_dealer(address: str, sec: Security, role: str) -> zmq.asyncio.Socket:
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sec.client_socket(sock, role)
    sock.connect(address)
    return sock


async def test_client_and_workers_compute_with_security_on():
    sec = Security.temporary()
    s, workers = await secure_cluster(sec)
    try:
        async with Client(s.address, asynchronous=True, set_as_default=False,
                          security=sec) as c:
            assert await c.submit(inc, 1) == 2
            # a large value fetched worker to worker, and by the client, over CURVE
            big = c.submit(np.ones, 1 << 18, workers=[workers[0].address])
            t = c.submit(total, big, workers=[workers[1].address])
            assert await t == float(1 << 18)
            assert (await big).shape == (1 << 18,)
            [scattered] = await c.scatter([np.arange(300_000)])
            assert await c.submit(total, scattered) == float(np.arange(300_000).sum())
    finally:
        await close_all(s, workers)


async def test_strangers_are_refused_with_a_clear_error_and_never_served():
    sec = Security.temporary()
    s, workers = await secure_cluster(sec, n=1)
    try:
        # no keys
        with pytest.raises(SecurityError, match="requires security"):
            await Client(s.address, asynchronous=True, set_as_default=False, timeout=5)
        # another cluster's keys
        with pytest.raises(SecurityError, match="another cluster"):
            await Client(s.address, asynchronous=True, set_as_default=False, timeout=5,
                         security=Security.temporary())
        # keys the scheduler knows but not authorized: a client of another cluster that
        # somehow has this scheduler's public key
        other = Security.temporary()
        other.publics = dict(sec.publics)
        with pytest.raises(SecurityError, match="refused this client's key"):
            await Client(s.address, asynchronous=True, set_as_default=False, timeout=5,
                         security=other)
        # plain TCP, speaking the protocol: no answer, nothing registered, nothing parsed
        async with FakePeer(s.address) as peer:
            await peer.send(protocol.hello("client", "stranger"),
                            {"op": "submit", "tasks": [["k", b"p", [], None]]})
            with pytest.raises(Exception, match="nothing arrived"):
                await peer.recv(timeout=1)
        # and a worker's data port refuses them too
        async with FakePeer(workers[0].address) as peer:
            await peer.send({"op": "get-data", "id": 1, "keys": ["x"]})
            with pytest.raises(Exception, match="nothing arrived"):
                await peer.recv(timeout=1)
        assert real_clients(s) == [] and "k" not in s.state.tasks
        async with Client(s.address, asynchronous=True, set_as_default=False,
                          security=sec) as c:
            assert await c.submit(inc, 1) == 2
    finally:
        await close_all(s, workers)


async def test_a_key_acts_only_in_its_role():
    sec = Security.temporary()
    s, workers = await secure_cluster(sec, n=1)
    try:
        # Given a peer holding the client key
        sock = curve_dealer(s.address, sec, "client")
        try:
            # When it says hello as a worker
            await sock.send_multipart(protocol.encode([protocol.hello(
                "worker", "sneaky", address="tcp://127.0.0.1:9", nthreads=1)]))
            assert await sock.poll(5000)
            [op], _ = protocol.decode(await sock.recv_multipart())
            # Then it is refused, and never becomes a worker
            assert op["op"] == "error" and "a client key cannot register as a worker" in \
                op["message"]
            assert len(s.state.workers) == 1
        finally:
            sock.close(0)
        # A worker key cannot say hello as a client
        sock = curve_dealer(s.address, sec, "worker")
        try:
            await sock.send_multipart(protocol.encode([protocol.hello("client", "sneaky")]))
            assert await sock.poll(5000)
            [op], _ = protocol.decode(await sock.recv_multipart())
            assert op["op"] == "error" and "a worker key cannot register as a client" in \
                op["message"]
        finally:
            sock.close(0)
    finally:
        await close_all(s, workers)


async def test_admin_only_requests_need_an_admin_key():
    sec = Security.temporary()
    cfg = from_env(ADMIN_ONLY="run,shutdown")
    s, workers = await secure_cluster(sec, n=1, config=cfg)
    try:
        async with Client(s.address, asynchronous=True, set_as_default=False,
                          security=sec) as c:
            with pytest.raises(Exception, match="need an admin key"):
                await c.run(inc, 1)
        admin = Security.temporary()
        admin.pairs = {"admin": sec.pairs["admin"]}
        admin.publics = dict(sec.publics)
        async with Client(s.address, asynchronous=True, set_as_default=False,
                          security=admin) as c:
            assert list((await c.run(inc, 1)).values()) == [2]
    finally:
        await close_all(s, workers)


async def test_revoking_a_key_refuses_new_connections_and_ends_live_sessions(tmp_path):
    keys = keygen(tmp_path / "keys")
    keygen(keys, ("client",), name="alice")
    sec = Security(keys)
    alice = Security(keys)
    alice.pairs = {"client": Security(keys).pairs["client"]}
    import zmq.auth
    alice.pairs["client"] = zmq.auth.load_certificate(str(keys / "alice.key_secret"))
    s, workers = await secure_cluster(sec, n=1)
    try:
        c = await Client(s.address, asynchronous=True, set_as_default=False, security=alice)
        try:
            assert await c.submit(inc, 1) == 2
            assert len(real_clients(s)) == 1
            slow = c.submit(time.sleep, 3, pure=False)
            # When alice's key leaves the authorized directory
            (keys / "authorized" / "alice.key").unlink()
            # Then her live session ends within a heartbeat or two, and what she waits for
            # fails saying why
            await until(lambda: real_clients(s) == [], 5, "alice's session ended")
            with pytest.raises(SchedulerLost, match="revoked"):
                await asyncio.wait_for(slow, 5)
            # and the session is over: every later call fails at once, saying what to do
            # (not after SCHEDULER_LOST_TIMEOUT_S of waiting for an answer that never comes)
            with pytest.raises(KeyRevoked, match="authorize a key"):
                c.submit(inc, 2)
            with pytest.raises(KeyRevoked, match="new Client"):
                c.map(inc, [1, 2])
            with pytest.raises(KeyRevoked):
                await c.scatter([1])
            with pytest.raises(KeyRevoked):
                await c.scheduler_info()
            with pytest.raises(KeyRevoked):
                await c.gather([slow])
        finally:
            await c.close()
        # and she cannot connect again
        with pytest.raises(SecurityError, match="refused this client's key"):
            await Client(s.address, asynchronous=True, set_as_default=False, timeout=5,
                         security=alice)
        # while the cluster's own client key still works
        async with Client(s.address, asynchronous=True, set_as_default=False,
                          security=sec) as c2:
            assert await c2.submit(inc, 3) == 4
    finally:
        await close_all(s, workers)


async def test_a_worker_restarted_at_its_address_with_the_same_key_takes_it_at_once(tmp_path):
    import os
    import signal
    import socket

    keys = keygen(tmp_path / "keys")
    sec = Security(keys)
    ports = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    address = f"tcp://127.0.0.1:{ports[0]}"
    # A stranger may take a live worker's address only after two of the scheduler's heartbeat
    # intervals of silence (2 x 15 s here), and a silent worker is dropped after WORKER_TTL_S:
    # both far longer than this test waits.
    cfg = from_env(HEARTBEAT_INTERVAL_S=15, WORKER_TTL_S=60)

    def start_worker(scheduler, port):
        return subprocess.Popen(
            [sys.executable, "-m", "zfabric", "worker", scheduler, "--nthreads", "1",
             "--memory-limit", "0", "--listen-address", f"tcp://127.0.0.1:{port}",
             "--contact-address", address, "--security", str(keys)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def worker_pids(s):
        return {ws.pid for ws in list(s.state.workers.values())}

    async with Scheduler(security=sec, config=cfg, dashboard=False) as s:
        first = start_worker(s.address, ports[0])
        second = None
        try:
            await until(lambda: worker_pids(s) == {first.pid}, 30, "the first worker joined")
            # Given a worker whose connection stays open but that no longer answers (a frozen
            # machine: a kill -9 closes the connection, and the scheduler's probe of the old
            # worker finds it gone at once, with or without keys)
            os.kill(first.pid, signal.SIGSTOP)
            # When a new worker with the same key says hello with its address (its
            # replacement; two processes of one host cannot listen at one port, so this one
            # listens elsewhere and gives the old address to contact it)
            second = start_worker(s.address, ports[1])
            # Then it takes the address at once, not after two heartbeat intervals
            await until(lambda: worker_pids(s) == {second.pid}, 10, "the new worker took over")
            async with Client(s.address, asynchronous=True, set_as_default=False,
                              security=sec) as c:
                f = c.submit(abs, -2, workers=[address], pure=False)
                assert await asyncio.wait_for(f, 20) == 2
                # and the old one, should it wake up, is told to close (it does not flap
                # with the new one)
                os.kill(first.pid, signal.SIGCONT)
                assert await asyncio.to_thread(first.wait, 20) == 0
                assert worker_pids(s) == {second.pid}
                assert await asyncio.wait_for(c.submit(abs, -3, pure=False), 20) == 3
        finally:
            for p in (first, second):
                if p is not None and p.poll() is None:
                    p.kill()
                    p.wait(10)


def test_local_cluster_with_security_true_runs_nanny_workers():
    with LocalCluster(n_workers=2, threads_per_worker=1, security=True,
                      memory_limit=0) as cluster:
        assert cluster.security is not None
        with Client(cluster, set_as_default=False) as c:
            assert c.security is cluster.security
            assert c.submit(inc, 41).result(timeout=20) == 42
            assert c.submit(total, c.submit(np.ones, 1 << 18)).result(timeout=20) == 1 << 18
            # a task that submits tasks: its worker's client connects with the client key
            assert c.submit(fan_out, 10, pure=False).result(timeout=30) == sum(range(1, 11))
        with pytest.raises(SecurityError):
            Client(cluster.scheduler_address, set_as_default=False, timeout=5)


def what_a_task_sees():
    """Everything of its environment a task, and the processes it starts, can read."""
    import os

    with open("/proc/self/environ", "rb") as f:
        proc_environ = f.read().decode(errors="replace")
    child = subprocess.run(["env"], capture_output=True, text=True, timeout=30).stdout
    grandchild = subprocess.run(
        [sys.executable, "-c", "import os, subprocess; print(dict(os.environ));"
         " print(subprocess.run(['env'], capture_output=True, text=True).stdout)"],
        capture_output=True, text=True, timeout=60).stdout
    return os.getpid(), "\n".join([repr(dict(os.environ)), proc_environ, child, grandchild])


def test_nanny_workers_get_keys_in_memory_through_a_pipe_never_the_environment():
    import os
    import signal

    sec = Security.temporary()
    secrets = [secret.decode() for _, secret in sec.pairs.values()]
    with LocalCluster(n_workers=1, threads_per_worker=1, security=sec,
                      memory_limit=0) as cluster, Client(cluster, set_as_default=False) as c:
        # A task and what it starts see no key in any environment
        pid, seen = c.submit(what_a_task_sees, pure=False).result(timeout=60)
        assert seen.count("PATH=") >= 3  # it did read the environments
        assert "ZFABRIC_SECURITY_KEYS" not in seen
        assert not [s for s in secrets if s in seen]
        # and a worker process the Nanny starts again (this one killed) gets its keys too
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            new_pid, seen = c.submit(what_a_task_sees, pure=False).result(timeout=60)
            if new_pid != pid or time.monotonic() > deadline:
                break
        assert new_pid != pid
        assert not [s for s in secrets if s in seen]
        assert c.submit(inc, 1, pure=False).result(timeout=30) == 2


def test_keys_in_a_pipe_are_read_once_and_the_pipe_closed(monkeypatch, tmp_path):
    import os

    from zfabric.spawn import _keys_pipe, read_keys, worker_env

    sec = Security.temporary()
    fd = _keys_pipe(sec)
    got = read_keys(fd)
    # a worker gets its own key and the client key of its tasks, not the admin's or the
    # scheduler's, and knows every key that may connect to its data port
    assert got.pairs == {r: sec.pairs[r] for r in ("worker", "client")}
    assert got.publics == sec.publics and got.authorized() == sec.authorized()
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(SecurityError, match="keys-fd"):
        read_keys(fd)
    # a worker's environment names the keys' directory at most, never keys
    monkeypatch.setenv("ZFABRIC_SECURITY_KEYS", "left over")
    monkeypatch.setenv("ZFABRIC_SECURITY", "/not/ours")
    assert not {"ZFABRIC_SECURITY_KEYS", "ZFABRIC_SECURITY"} & set(worker_env({}, sec))
    on_disk = Security(keygen(tmp_path / "keys"))
    assert worker_env({}, on_disk)["ZFABRIC_SECURITY"] == str(tmp_path / "keys")


def test_dask_tls_arguments_name_keygen():
    with pytest.raises(SecurityError, match=r"zfabric keygen.*Security.temporary"):
        Security(tls_ca_file="ca.pem", tls_client_cert="c.pem")


def test_keygen_writes_private_files_and_require_encryption_refuses_to_start(tmp_path):
    out = subprocess.run([sys.executable, "-m", "zfabric", "keygen", str(tmp_path / "k")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for path in (tmp_path / "k").glob("*.key_secret"):
        assert path.stat().st_mode & 0o077 == 0, path
    assert sorted(p.stem for p in (tmp_path / "k" / "authorized").glob("*.key")) == [
        "admin", "client", "nanny", "worker"]
    out = subprocess.run([sys.executable, "-m", "zfabric", "scheduler", "--port", "0",
                          "--require-encryption"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "zfabric keygen" in out.stderr


async def test_listening_beyond_loopback_without_keys_warns(caplog, monkeypatch):
    from zfabric import _zmq

    monkeypatch.setattr(_zmq, "_warned_insecure", set())  # once per process and host
    async with Scheduler(host="0.0.0.0", dashboard=False):
        pass
    warned = [r.getMessage() for r in caplog.records if "without security" in r.getMessage()]
    assert len(warned) == 1 and "--require-encryption" in warned[0]
    assert len(warned[0]) < 120  # short
    caplog.clear()
    async with Scheduler(host="0.0.0.0", dashboard=False):  # said already
        pass
    assert not any("without security" in r.getMessage() for r in caplog.records)
    async with Scheduler(dashboard=False):  # loopback: no warning
        pass
    assert not any("without security" in r.getMessage() for r in caplog.records)
    with pytest.raises(SecurityError, match="zfabric keygen"):
        Scheduler(config=from_env(REQUIRE_ENCRYPTION=True))


class Counter:
    def __init__(self):
        self.n = 0

    def add(self, k=1):
        self.n += k
        return self.n


def test_actors_work_with_security_on():
    with LocalCluster(n_workers=1, threads_per_worker=1, security=True, memory_limit=0,
                      processes=False) as cluster, Client(cluster, set_as_default=False) as c:
        counter = c.submit(Counter, actor=True).result(timeout=20)
        assert counter.add(2).result(timeout=20) == 2
        assert counter.add().result(timeout=20) == 3


class Box:
    def __init__(self, v):
        self.v = v

    def get(self):
        return self.v


def _host_keys(keys, tmp_path, name: str):
    """What one worker host holds: its own worker key, the public keys it checks servers
    against, a client key for its tasks, and the authorized set (shared here, so that a
    revocation reaches every host at once, as an administrator's would)."""
    import shutil

    host = tmp_path / name
    host.mkdir()
    for f in (f"{name}.key_secret", f"{name}.key", "scheduler.key", "worker.key",
              "client.key_secret", "client.key"):
        shutil.copy(keys / f, host / f)
    (host / "authorized").symlink_to(keys / "authorized")
    return Security(host)


async def test_workers_with_keys_of_their_own_serve_and_one_can_be_revoked(tmp_path):
    # Given two worker hosts, each with a worker key of its own (keygen --role worker --name)
    keys = keygen(tmp_path / "keys")
    for name in ("host1", "host2"):
        keygen(keys, ("worker",), name=name)
    sec = Security(keys)
    s = await Scheduler(security=sec)
    h1, h2 = _host_keys(keys, tmp_path, "host1"), _host_keys(keys, tmp_path, "host2")
    assert h1.pair("worker") != h2.pair("worker") != sec.pair("worker")
    w1 = await Worker(s.address, security=h1, nthreads=1, memory_limit=0, name="w1")
    w2 = await Worker(s.address, security=h2, nthreads=1, memory_limit=0, name="w2")
    try:
        async with Client(s.address, asynchronous=True, set_as_default=False,
                          security=Security(keys)) as c:
            # When values move between them and to the client (each data port serves with
            # its own key, which the scheduler vouches for)
            x = c.submit(np.arange, 300_000, workers=[w1.address])
            total = c.submit(np.sum, x, workers=[w2.address])  # w2 fetches x from w1
            assert await total == np.arange(300_000).sum()
            assert (await x)[-1] == 299_999  # the client fetches from w1's port
            [y] = await c.scatter([np.ones(200_000)], workers=[w2.address])
            assert await c.submit(np.sum, y, workers=[w1.address]) == 200_000
            box = await c.submit(Box, "held by w1", actor=True, workers=[w1.address])
            assert await box.get() == "held by w1"
            # Then revoking host1's key ends that worker alone
            (keys / "authorized" / "host1.key").unlink()
            await until(lambda: [ws.name for ws in s.state.workers.values()] == ["w2"], 10,
                        "host1's worker removed")
            assert await c.submit(np.sum, y) == 200_000
            assert await c.submit(inc, 41, pure=False) == 42
    finally:
        for w in (w1, w2):
            await w.close()
        await s.close()


def _alice_unknown_to_the_worker_host(tmp_path):
    """Keys with a client key "alice" authorized on the scheduler's host; a copy for a worker
    host without it; and alice's Security."""
    import shutil

    import zmq.auth

    keys = keygen(tmp_path / "keys")
    keygen(keys, ("client",), name="alice")
    host = tmp_path / "worker-host"
    shutil.copytree(keys, host)
    (host / "authorized" / "alice.key").unlink()
    alice = Security(keys)
    alice.pairs = {"client": zmq.auth.load_certificate(str(keys / "alice.key_secret"))}
    return keys, host, alice


@pytest.mark.parametrize("where", ["worker-process", "same-process"])
async def test_a_data_port_that_refuses_the_clients_key_says_so_at_once(tmp_path, where):
    # Given alice's key authorized on the scheduler's host but not on the worker's. A worker
    # process of its own refuses her handshake; in one process the handshake is checked with
    # the scheduler's set (one ZAP handler per process), and the worker's own set refuses
    # her requests after it
    keys, host, alice = _alice_unknown_to_the_worker_host(tmp_path)
    s = await Scheduler(security=Security(keys))
    if where == "worker-process":
        worker = subprocess.Popen([sys.executable, "-m", "zfabric", "worker", s.address,
                                   "--nthreads", "1", "--memory-limit", "0", "--security",
                                   str(host)], stdout=subprocess.DEVNULL)
    else:
        worker = await Worker(s.address, security=Security(host), nthreads=1, memory_limit=0)
    try:
        await until(lambda: len(s.state.workers) == 1, 30, "the worker joined")
        async with Client(s.address, asynchronous=True, set_as_default=False,
                          security=alice) as c:
            # When she asks for a value held on the worker (fetched from its data port)
            f = c.submit(np.ones, 300_000)
            await until(lambda: f.status == "finished", 30)
            t0 = time.monotonic()
            # Then the refusal is an error that says what to do, not a wait for a timeout
            with pytest.raises(SecurityError, match="refused this process's key"):
                await f
            assert time.monotonic() - t0 < 10
    finally:
        if where == "worker-process":
            worker.terminate()
            worker.wait(20)
        else:
            await worker.close()
        await s.close()
