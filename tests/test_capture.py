"""What crosses the wire (issue 15): a capture of a bridged LAN of network namespaces holds a
known plaintext with security off and none of it with CurveZMQ on.

Needs root, iproute2 and tcpdump. Where tcpdump is missing the test skips with the line that
installs it; in CI (``ZFABRIC_CI=1``, set by ``.ci/run``, which installs it) it fails instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import netns
import pytest

from zfabric.security import keygen

pytestmark = pytest.mark.timeout(120)

ZFABRIC = [sys.executable, "-m", "zfabric"]
PORT = 8786

CLIENT = r'''
import sys
from zfabric import Client
from zfabric.security import Security

address, keys, secret = sys.argv[1:4]
security = Security(keys) if keys != "-" else None
with Client(address, security=security, timeout=20) as client:
    # the argument goes client -> scheduler -> worker, the result worker -> scheduler -> client
    future = client.submit(str.upper, secret, pure=False)
    assert future.result(timeout=30) == secret.upper()
    print("OK", flush=True)
'''


@pytest.fixture
def lan():
    if shutil.which("tcpdump") is None:
        if os.environ.get("ZFABRIC_CI"):
            pytest.fail("tcpdump is missing; .ci/run installs it (apt-get install tcpdump)")
        pytest.skip("needs tcpdump: apt-get install -y tcpdump")
    with netns.lan_for_test(2) as lan:
        yield lan


@pytest.mark.parametrize("secure", [True, False], ids=["curve", "plain"])
def test_capture_shows_no_plaintext_with_security_on(lan, tmp_path, secure):
    # Given a scheduler on host a and a worker on host b, with or without keys
    keys = str(keygen(tmp_path / "keys")) if secure else None
    flags = ["--security", keys] if secure else []
    address = f"tcp://{lan.ips[0]}:{PORT}"
    logs = {}

    def start(host: int, name: str, *args: str) -> subprocess.Popen:
        logs[name] = tmp_path / f"{name}.log"
        with open(logs[name], "w") as out:
            return lan.popen(host, [*ZFABRIC, *args], stdout=out, stderr=subprocess.STDOUT)

    start(0, "scheduler", "scheduler", "--host", lan.ips[0], "--port", str(PORT), *flags)
    start(1, "worker", "worker", address, "--nthreads", "1", "--memory-limit", "0",
          "--death-timeout", "30", *flags)
    # and tcpdump on the bridge port of host a (all its traffic with host b)
    pcap = tmp_path / "lan.pcap"
    dump = subprocess.Popen(["ip", "netns", "exec", lan.bridge_ns, "tcpdump", "-i", "p0",
                             "-U", "--immediate-mode", "-s", "0", "-w", str(pcap)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not pcap.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pcap.exists(), "tcpdump did not start"
        # When a client on host b sends a known plaintext through the cluster
        secret = f"zfabric-capture-canary-{uuid.uuid4().hex}"
        script = tmp_path / "client.py"
        script.write_text(CLIENT)
        client = lan.popen(1, [sys.executable, str(script), address, keys or "-", secret],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = client.communicate(timeout=60)
        assert client.returncode == 0 and "OK" in out, (
            err + "".join(f"\n--- {n}\n{p.read_text()[-2000:]}" for n, p in logs.items()))
        time.sleep(0.3)  # the last packets reach the capture file (-U: written per packet)
    finally:
        os.killpg(dump.pid, signal.SIGINT)
        try:
            dump.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(dump.pid, signal.SIGKILL)
            dump.wait()
    captured = pcap.read_bytes()
    assert len(captured) > 1000, "the capture holds no traffic"
    # Then the plaintext crossed the wire only without security
    seen = secret.encode() in captured or secret.upper().encode() in captured
    assert seen is not secure
