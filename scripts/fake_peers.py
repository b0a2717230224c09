#!/usr/bin/env python
"""A thousand workers on two cores: a real ``zfabric scheduler`` process against N fake
workers that all live in ONE process.

Each fake worker is a DEALER socket that speaks the worker protocol and nothing more: it says
hello (security off, a made-up data address, one thread), heartbeats at the interval the
scheduler gives it (the welcome's ``heartbeat_s``, and later ``{"op": "heartbeat-interval",
"heartbeat_s": x}``), and answers every task of a ``compute`` with ``finished`` (the result
``None``, inline), at once or after ``delay`` seconds each, one task at a time (a worker of one
thread). All of them are served by one ``zmq.Poller`` loop in a process of their own (so the
client's process does not share their interpreter lock); the scheduler and the blocking client
(``zfabric.Client``, in this process) are real. The scheduler's cost is read from its process
(CPU time of its threads), so the harness sharing the cores does not blur it; tasks/s does
measure the harness too.

For each N (``--peers``), with a fresh scheduler:

* idle: the scheduler's CPU over ``--idle-s`` seconds (10) with N idle peers, in % of one core,
  and the heartbeats per second the peers sent (at the intervals they were told);
* no-op: ``gather(map(noop, range(T)))``, T = ``--tasks`` (10,000): scheduler CPU µs per task,
  tasks/s, and how the tasks spread over the peers;
* slow: 20 tasks per peer (``--slow-per-peer``), each finished 100 ms (``--delay``) after it
  started: efficiency = ideal (20 x 0.1 = 2 s) / seconds from the first submit to the last
  result;
* the scheduler's RSS at the end.

    python scripts/fake_peers.py --peers 2 100 500 1000
    python scripts/fake_peers.py --peers 2 100 --tasks 2000 --idle-s 3    # a quick look

Every wait has a timeout (``--phase-timeout``), and every process started here is stopped at the
end, also on Ctrl-C. The file descriptor limit is raised to the hard limit first (the scheduler
inherits it).
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import os
import pickle
import select
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgpack
import zmq

# procs.py beside us, and the zfabric of this checkout (its scheduler process runs that one too)
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import procs  # noqa: E402

from zfabric import Client, protocol, wait  # noqa: E402

NONE_PICKLE = pickle.dumps(None, protocol=5)


def noop(x: Any) -> None:
    return None


# ---------------------------------------------------------------------------- the fake workers


class Peer:
    """One fake worker: its socket and what it is doing."""

    __slots__ = ("beat_at", "current", "got", "hb", "i", "ident", "out", "queue", "sock",
                 "welcomed")

    def __init__(self, i: int, sock: zmq.Socket, ident: bytes):
        self.i = i
        self.sock = sock
        self.ident = ident
        self.welcomed = False
        self.hb = 0.5  # until the welcome says otherwise
        self.beat_at = float("inf")
        self.queue: deque[str] = deque()  # tasks given, not started (delay > 0)
        self.current: str | None = None  # the task "running" (delay > 0)
        self.got = 0  # tasks received
        self.out: list[list] = []  # finished items to send at the end of this loop round


class FakeWorkers:
    """N fake workers served by one poll loop; commands come over ``conn``
    (:class:`LineConn`)."""

    def __init__(self, address: str, n: int, conn: Any, *, delay: float = 0.0,
                 prefix: str = "fake"):
        self.address = address
        self.conn = conn
        self.delay = delay
        self.ctx = zmq.Context()
        self.ctx.set(zmq.MAX_SOCKETS, n + 64)
        self.poller = zmq.Poller()
        self.peers: list[Peer] = []
        self.by_sock: dict[zmq.Socket, Peer] = {}
        self.timers: list[tuple[float, int, int]] = []  # (due, kind, peer): 0 beat, 1 finish
        self.dirty: list[Peer] = []  # peers with finished items to send
        self.heartbeats = 0
        self.errors: list[str] = []
        self.other_ops: dict[str, int] = {}
        for i in range(n):
            ident = f"{prefix}-{i}".encode()
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTING_ID, ident)
            sock.connect(address)
            peer = Peer(i, sock, ident)
            self.peers.append(peer)
            self.by_sock[sock] = peer
            self.poller.register(sock, zmq.POLLIN)
        self.poller.register(conn.fileno(), zmq.POLLIN)
        for peer in self.peers:
            self.hello(peer)

    def hello(self, peer: Peer) -> None:
        name = peer.ident.decode()
        op = protocol.hello("worker", name, address=f"tcp://127.0.0.1:{20000 + peer.i}",
                            nthreads=1, memory_limit=0, pid=1, name=name)
        self.send(peer, [op])

    def send(self, peer: Peer, ops: list[dict]) -> None:
        try:
            peer.sock.send(msgpack.packb(ops, use_bin_type=True), zmq.NOBLOCK)
        except zmq.Again:
            self.errors.append(f"{peer.ident.decode()}: send queue full, message dropped")

    # -- the scheduler's ops

    def receive(self, peer: Peer, now: float) -> None:
        while True:
            try:
                frames = peer.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                ops = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
            except Exception as exc:
                self.errors.append(f"undecodable message: {exc}")
                continue
            for op in ops if type(ops) is list else ():
                self.handle(peer, op, now)

    def handle(self, peer: Peer, op: dict, now: float) -> None:
        name = op.get("op")
        if name == "compute":
            for item in op["tasks"]:
                peer.got += 1
                if self.delay <= 0:
                    self.finish(peer, item[0], 0.0)
                else:
                    peer.queue.append(item[0])
            if self.delay > 0 and peer.current is None:
                self.start_next(peer, now)
        elif name == "welcome":
            peer.welcomed = True
            self.set_interval(peer, op.get("heartbeat_s"), now)
        elif name == "heartbeat-interval":
            self.set_interval(peer, op.get("heartbeat_s"), now)
        elif name == "reregister":
            self.hello(peer)
        elif name == "error":
            self.errors.append(f"{peer.ident.decode()}: {str(op.get('message'))[:200]}")
            if not peer.welcomed and op.get("retry_s"):
                self.hello(peer)
        else:
            name = str(name)
            self.other_ops[name] = self.other_ops.get(name, 0) + 1

    def finish(self, peer: Peer, key: str, duration: float) -> None:
        if not peer.out:
            self.dirty.append(peer)
        peer.out.append([key, len(NONE_PICKLE), NONE_PICKLE, duration])

    def set_interval(self, peer: Peer, seconds: Any, now: float) -> None:
        if isinstance(seconds, int | float) and seconds > 0:
            peer.hb = float(seconds)
        peer.beat_at = now + peer.hb
        heapq.heappush(self.timers, (peer.beat_at, 0, peer.i))

    def start_next(self, peer: Peer, now: float) -> None:
        peer.current = peer.queue.popleft() if peer.queue else None
        if peer.current is not None:
            heapq.heappush(self.timers, (now + self.delay, 1, peer.i))

    def fire(self, kind: int, peer: Peer, due: float, now: float) -> None:
        if kind == 0:
            if due != peer.beat_at:
                return  # superseded by a new interval
            self.heartbeats += 1
            self.send(peer, [{"op": "heartbeat"}])
            peer.beat_at = now + peer.hb
            heapq.heappush(self.timers, (peer.beat_at, 0, peer.i))
        elif peer.current is not None:
            self.finish(peer, peer.current, self.delay)
            self.start_next(peer, now)

    # -- the harness's commands

    def command(self, msg: tuple) -> bool:
        """Carry out one command; False: stop."""
        what = msg[0]
        if what == "delay":
            self.delay = float(msg[1])
            self.conn.send(("ok",))
        elif what == "stats":
            got = [p.got for p in self.peers]
            self.conn.send({
                "peers": len(self.peers), "welcomed": sum(p.welcomed for p in self.peers),
                "got": got, "heartbeats": self.heartbeats,
                "heartbeat_s": sorted({p.hb for p in self.peers}),
                "errors": self.errors[:10], "n_errors": len(self.errors),
                "other_ops": dict(self.other_ops), "time": time.monotonic(),
            })
        elif what == "stop":
            for peer in self.peers:
                if peer.welcomed:
                    self.send(peer, [{"op": "goodbye"}])
            return False
        return True

    def serve(self, limit_s: float) -> None:
        """The loop: until "stop" or ``limit_s`` seconds (a harness that died)."""
        end = time.monotonic() + limit_s
        conn_fd = self.conn.fileno()
        timers, peers = self.timers, self.peers
        try:
            while True:
                now = time.monotonic()
                if now > end:
                    break
                wait = min(timers[0][0] - now if timers else 1.0, 1.0, end - now)
                events = self.poller.poll(max(0, int(wait * 1000) + 1) if wait > 0 else 0)
                now = time.monotonic()
                for sock, _ in events:
                    if sock == conn_fd:
                        while self.conn.poll():
                            if not self.command(self.conn.recv()):
                                return
                    else:
                        self.receive(self.by_sock[sock], now)
                while timers and timers[0][0] <= now:
                    due, kind, i = heapq.heappop(timers)
                    self.fire(kind, peers[i], due, now)
                for peer in self.dirty:  # one finished op per peer and round, as a worker
                    self.send(peer, [{"op": "finished", "tasks": peer.out}])
                    peer.out = []
                self.dirty.clear()
        finally:
            time.sleep(0.05)  # let the goodbyes leave
            for peer in peers:
                peer.sock.close(0)
            self.ctx.term()


class LineConn:
    """The fake workers' end of the command channel: JSON lines on stdin, answers on stdout."""

    def __init__(self) -> None:
        self.out = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)  # a stray print cannot garble the answers
        os.set_blocking(0, False)
        self.buf = b""
        self.lines: deque[bytes] = deque()
        self.eof = False

    def fileno(self) -> int:
        return 0

    def poll(self) -> bool:
        if not self.lines and not self.eof:
            try:
                data = os.read(0, 65536)
            except BlockingIOError:
                data = None
            if data == b"":
                self.eof = True  # the harness is gone: stop
            elif data:
                *lines, self.buf = (self.buf + data).split(b"\n")
                self.lines.extend(line for line in lines if line.strip())
        return bool(self.lines) or self.eof

    def recv(self) -> tuple:
        return tuple(json.loads(self.lines.popleft())) if self.lines else ("stop",)

    def send(self, obj: Any) -> None:
        self.out.write(json.dumps(obj) + "\n")
        self.out.flush()


def peers_main(config: dict) -> None:
    """The fake workers' process (``--_serve CONFIG``)."""
    procs.raise_nofile()
    conn = LineConn()
    try:
        fake = FakeWorkers(config["address"], config["n"], conn, delay=config["delay"],
                           prefix=config["prefix"])
    except Exception as exc:
        conn.send({"failed": f"{type(exc).__name__}: {exc}"})
        return
    conn.send({"ready": config["n"]})
    fake.serve(config["limit_s"])


class PeerProcess:
    """The fake workers in a process of their own (this script, ``--_serve``), driven over
    its stdin and stdout."""

    def __init__(self, address: str, n: int, *, delay: float = 0.0, limit_s: float = 3600,
                 prefix: str = "fake", timeout: float = 60):
        config = {"address": address, "n": n, "delay": delay, "limit_s": limit_s,
                  "prefix": prefix}
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--_serve", json.dumps(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=procs.env_for_zfabric(),
            start_new_session=True)
        try:
            answer = self.ask(None, timeout)
        except BaseException:
            self.close()
            raise
        if "failed" in answer:
            self.close()
            raise RuntimeError(f"the fake workers did not start: {answer['failed']}")

    def ask(self, msg: tuple | None, timeout: float = 30) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if msg is not None:
            self.proc.stdin.write((json.dumps(msg) + "\n").encode())
            self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"the fake workers' process did not answer {msg} in {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fake workers' process exited ({self.proc.wait(5)})")
        return json.loads(line)

    def stats(self) -> dict:
        return self.ask(("stats",))

    def set_delay(self, seconds: float) -> None:
        self.ask(("delay", seconds))

    def wait_welcomed(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            st = self.stats()
            if st["welcomed"] >= st["peers"] or time.monotonic() > deadline:
                return st
            time.sleep(0.1)

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with contextlib.suppress(OSError, ValueError):
            if self.proc.poll() is None:
                self.proc.stdin.write(b'["stop"]\n')
                self.proc.stdin.flush()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            procs.stop([self.proc], grace=1)
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                f.close()


# ---------------------------------------------------------------------------- the measurements


def wait_workers(client: Any, n: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        info = client.scheduler_info()
        have = info.get("n_workers", len(info["workers"]))  # "workers" lists 5 at most
        if have >= n or time.monotonic() > deadline:
            return have
        time.sleep(0.1)


def run_n(n: int, args: argparse.Namespace) -> dict:
    """Every phase at N fake workers, a fresh scheduler; returns the figures."""
    out: dict[str, Any] = {"peers": n}
    env = procs.env_for_zfabric()
    extra = [] if args.dashboard else ["--no-dashboard"]
    with procs.workdir("fake-peers-") as tmp:
        sched = procs.Scheduler(env, Path(tmp), extra)
        peers = None
        try:
            peers = PeerProcess(sched.address, n, limit_s=args.phase_timeout * 4 + 120,
                                timeout=args.phase_timeout)
            st = peers.wait_welcomed(args.phase_timeout)
            out["welcomed"] = st["welcomed"]
            if st["welcomed"] < n:
                out["error"] = f"only {st['welcomed']}/{n} fake workers welcomed: {st['errors']}"
                return out
            with Client(sched.address, set_as_default=False) as client:
                have = wait_workers(client, n, args.phase_timeout)
                if have < n:
                    out["error"] = f"the scheduler lists {have}/{n} workers"
                    return out
                client.gather(client.map(noop, range(min(1000, args.tasks)), pure=False))

                # idle
                time.sleep(1.0)
                st0, c0, t0 = peers.stats(), sched.cpu_s(), time.monotonic()
                time.sleep(args.idle_s)
                c1, t1, st1 = sched.cpu_s(), time.monotonic(), peers.stats()
                out["idle_cpu_pct"] = (c1 - c0) / (t1 - t0) * 100
                out["heartbeats_per_s"] = (st1["heartbeats"] - st0["heartbeats"]) / (
                    st1["time"] - st0["time"])
                out["heartbeat_s"] = st1["heartbeat_s"]

                # no-op
                before = st1["got"]
                c0, t0 = sched.cpu_s(), time.perf_counter()
                futures = client.map(noop, range(args.tasks), pure=False)
                done = gather_within(client, futures, args.phase_timeout)
                wall = time.perf_counter() - t0
                c1 = sched.cpu_s()
                del futures
                if not done:
                    out["error"] = f"no-op: not done in {args.phase_timeout:g} s"
                    return out
                out["noop_sched_us_per_task"] = (c1 - c0) / args.tasks * 1e6
                out["noop_tasks_per_s"] = args.tasks / wall
                got = [b - a for a, b in zip(before, peers.stats()["got"], strict=True)]
                out["noop_peers_used"] = sum(1 for g in got if g)
                out["noop_tasks_per_peer_max"] = max(got)

                # slow: delay each finish
                peers.set_delay(args.delay)
                total = args.slow_per_peer * n
                before = peers.stats()["got"]
                t0 = time.perf_counter()
                futures = client.map(noop, range(total), pure=False)
                done = gather_within(client, futures, args.phase_timeout)
                wall = time.perf_counter() - t0
                del futures
                peers.set_delay(0.0)
                ideal = args.slow_per_peer * args.delay
                if done:
                    out["slow_s"] = wall
                    out["slow_efficiency"] = ideal / wall
                else:
                    out["slow_s"] = None
                    out["slow_efficiency_below"] = ideal / wall
                got = [b - a for a, b in zip(before, peers.stats()["got"], strict=True)]
                out["slow_peers_used"] = sum(1 for g in got if g)
                out["sched_rss_mb"] = sched.rss_mb()
                st = peers.stats()
                out["peer_errors"] = st["n_errors"]
                if st["errors"]:
                    out["first_errors"] = st["errors"][:3]
        finally:
            if peers is not None:
                peers.close()
            procs.stop([sched.proc])
    return out


def gather_within(client: Any, futures: list, timeout: float) -> bool:
    """Wait for every future, at most ``timeout`` s; True when all finished."""
    try:
        wait(futures, timeout=timeout)
    except TimeoutError:
        return False
    return all(f.done() for f in futures)


def fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and abs(value) >= 1000:
        return f"{value:,.0f}"
    return format(value, spec) if isinstance(value, float) else str(value)


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    cols = [
        ("peers", "peers", "d"),
        ("sched µs/no-op", "noop_sched_us_per_task", ".3g"),
        ("no-op tasks/s", "noop_tasks_per_s", ".3g"),
        ("peers used", "noop_peers_used", "d"),
        ("idle sched CPU %", "idle_cpu_pct", ".3g"),
        ("heartbeats/s", "heartbeats_per_s", ".3g"),
        (f"{args.slow_per_peer}x{args.delay * 1e3:g}ms eff.", "slow_efficiency", ".3g"),
        ("slow s", "slow_s", ".3g"),
        ("sched RSS MB", "sched_rss_mb", ".3g"),
    ]
    widths = [max(len(h), 9) for h, _, _ in cols]
    print("  ".join(h.rjust(w) for (h, _, _), w in zip(cols, widths, strict=True)))
    for r in rows:
        cells = []
        for (_, key, spec), w in zip(cols, widths, strict=True):
            v = r.get(key)
            if key == "slow_efficiency" and v is None and "slow_efficiency_below" in r:
                cells.append(f"<{r['slow_efficiency_below']:.2g}".rjust(w))
            else:
                cells.append(fmt(v, spec).rjust(w))
        print("  ".join(cells))
        if "error" in r:
            print(f"  N={r['peers']}: {r['error']}")
        if r.get("first_errors"):
            print(f"  N={r['peers']}: {r['peer_errors']} peer errors, first: {r['first_errors']}")
    base = next((r for r in rows if r.get("noop_sched_us_per_task")), None)
    if base:
        for r in rows:
            if r is not base and r.get("noop_sched_us_per_task"):
                print(f"sched µs/no-op at {r['peers']} peers: "
                      f"{r['noop_sched_us_per_task'] / base['noop_sched_us_per_task']:.2f} x"
                      f" the figure at {base['peers']}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, nargs="+", default=[2, 100, 500, 1000])
    ap.add_argument("--tasks", type=int, default=10_000, help="no-op tasks (10,000)")
    ap.add_argument("--idle-s", type=float, default=10.0, help="idle window (10 s)")
    ap.add_argument("--slow-per-peer", type=int, default=20, help="slow tasks per peer (20)")
    ap.add_argument("--delay", type=float, default=0.1, help="a slow task's seconds (0.1)")
    ap.add_argument("--phase-timeout", type=float, default=120.0,
                    help="seconds allowed for start-up and for each phase (120)")
    ap.add_argument("--dashboard", action="store_true", help="keep the scheduler's dashboard on")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--_serve", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._serve:
        peers_main(json.loads(args._serve))
        return 0
    procs.raise_on_sigterm()
    soft, hard = procs.raise_nofile()
    print(f"open files limit: {soft} (hard {hard})", file=sys.stderr)
    if soft != -1 and soft < 2 * max(args.peers) + 200:
        print(f"warning: {soft} open files may be too few for {max(args.peers)} peers (two"
              " descriptors each here, one each in the scheduler)", file=sys.stderr)
    rows: list[dict] = []
    interrupted = False
    try:
        for n in args.peers:
            print(f"N = {n} ...", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            row = run_n(n, args)
            rows.append(row)
            print(f"N = {n}: {json.dumps(row)} ({time.monotonic() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, SIGTERM: what was measured, then out
        print("interrupted", file=sys.stderr)
        interrupted = True
    print_table(rows, args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    if interrupted:
        return 130
    return 0 if rows and all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
