"""What an unfinished multipart message costs a real ``zfabric scheduler`` process.

Starts the scheduler (as a process), connects a raw ZMTP peer (tests/zmtp.py) and sends one
message of empty frames that all say "more", as fast as the socket takes them, up to
``--mb`` MiB. Prints how far it got before the scheduler shut the connection, and the
scheduler's RSS before, at its highest (sampled every 10 ms), and after. ``--off`` runs the
same with the guard turned off (``INCOMPLETE_MESSAGE_BYTES=0``) for comparison; keep ``--mb``
modest then: libzmq holds about 32 bytes of memory per byte sent.

    python scripts/probe_unfinished.py --mb 64
    python scripts/probe_unfinished.py --mb 64 --off
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from zmtp import RawPeer, frame


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=64, help="MiB of empty frames to send")
    parser.add_argument("--off", action="store_true", help="with the guard turned off")
    args = parser.parse_args()
    port = free_port()
    env = dict(os.environ)
    if args.off:
        env["ZFABRIC_INCOMPLETE_MESSAGE_BYTES"] = "0"
    proc = subprocess.Popen([sys.executable, "-m", "zfabric", "scheduler", "--port", str(port),
                             "--no-dashboard"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                peer = RawPeer(f"tcp://127.0.0.1:{port}")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        me = psutil.Process(proc.pid)
        time.sleep(0.5)
        before = me.memory_info().rss
        peak = [before]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                try:
                    peak[0] = max(peak[0], me.memory_info().rss)
                except psutil.Error:
                    return
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        chunk = frame(b"", more=True) * (1 << 19)  # 1 MiB of empty frames
        t0 = time.monotonic()
        cut = False
        for _ in range(args.mb):
            try:
                peer.send(chunk)
            except OSError:
                cut = True
                break
            if peer.closed_by_server():
                cut = True
                break
        elapsed = time.monotonic() - t0
        time.sleep(1.0)  # libzmq frees what it held once the connection is closed
        stop.set()
        sampler.join()
        after = me.memory_info().rss
        peer.close()
        mib = 1 << 20
        print(f"guard {'off' if args.off else 'on'}: sent {peer.sent / mib:.1f} MiB of empty"
              f" frames in {elapsed:.2f} s; connection {'cut' if cut else 'still open'}")
        print(f"scheduler RSS: before {before / mib:.0f} MiB, peak {peak[0] / mib:.0f} MiB,"
              f" 1 s later {after / mib:.0f} MiB")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
