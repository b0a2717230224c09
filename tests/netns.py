"""A throw-away LAN of Linux network namespaces, for tests of zfabric across hosts.

:class:`Lan` makes ``n`` *host* namespaces and one more that holds a bridge. Each host gets
``eth0``, one end of a veth pair whose other end is a port of the bridge, an address
``10.213.<net>.<i + 1>/24`` and ``lo`` up. Everything is made inside namespaces this module
created (the veths are born in them), so the root namespace's interfaces, addresses and routes
are never touched, and the hosts can only reach each other.

Processes started with :meth:`Lan.popen` run in a session of their own inside a host (``ip netns
exec``, which also mounts that namespace's ``/sys``). :meth:`Lan.close` kills them by process
group, then every process still inside the namespaces (a Nanny's workers run in sessions of
their own), then deletes the namespaces; the veths and the bridge go with them. Namespace names
carry the creating pid (``zf-<pid>-<random>-...``), so :func:`sweep_stale` can remove what a
killed test run left behind without touching anyone else's.

Needs root and iproute2; :func:`unavailable_reason` says why a test should be skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence

#: Every namespace this module makes starts with this, then the creating pid.
PREFIX = "zf-"
#: The private range the LANs use; it exists only inside their namespaces.
NET_PREFIX = "10.213"
#: How long one ``ip`` command may take.
IP_TIMEOUT_S = 10.0
_STALE = re.compile(rf"^{PREFIX}(\d+)-[0-9a-f]+-")


class NetnsError(RuntimeError):
    """Raised when an ``ip`` command fails; carries its stderr."""


def ip(*args: str, check: bool = True) -> str:
    """Run ``ip ARGS`` and return its stdout."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    if check and proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None when they (probably) can."""
    if os.name != "posix" or not os.path.isdir("/proc/self/ns"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    try:
        ip("netns", "list")
    except (NetnsError, OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns` is unavailable: {exc}"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_names() -> list[str]:
    # "name (id: 3)" or just "name", one per line.
    return [line.split()[0] for line in ip("netns", "list", check=False).splitlines() if line]


def _kill_inside(name: str) -> None:
    """SIGKILL every process in namespace ``name`` (all of them started by a test)."""
    for _ in range(3):
        pids = [int(p) for p in ip("netns", "pids", name, check=False).split() if p.isdigit()]
        pids = [p for p in pids if p != os.getpid()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def _delete(name: str) -> None:
    _kill_inside(name)
    ip("netns", "delete", name, check=False)


def sweep_stale() -> list[str]:
    """Delete namespaces left by test runs whose process is gone; returns their names."""
    removed = []
    for name in _netns_names():
        m = _STALE.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _delete(name)
            removed.append(name)
    return removed


class Lan:
    """``n`` hosts on one bridged /24, each in its own network namespace.

    ``hosts[i]`` is the namespace name of host ``i`` and ``ips[i]`` its address on ``eth0``.
    """

    IFACE = "eth0"

    def __init__(self, n: int, *, net: int | None = None):
        tag = f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.net = random.randrange(256) if net is None else net
        self.bridge_ns = f"{tag}-br"
        self.hosts = [f"{tag}-{chr(ord('a') + i)}" for i in range(n)]
        self.ips = [f"{NET_PREFIX}.{self.net}.{i + 1}" for i in range(n)]
        self.procs: list[subprocess.Popen] = []
        self._made: list[str] = []

    # ------------------------------------------------------------------ life cycle

    def create(self) -> Lan:
        """Make the namespaces, the bridge and the links; undo everything if a step fails."""
        try:
            self._add_ns(self.bridge_ns)
            ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
            ip("-n", self.bridge_ns, "link", "set", "br0", "up")
            for i, (host, addr) in enumerate(zip(self.hosts, self.ips, strict=True)):
                self._add_ns(host)
                port = f"p{i}"
                ip("-n", host, "link", "add", self.IFACE, "type", "veth",
                   "peer", "name", port, "netns", self.bridge_ns)
                ip("-n", self.bridge_ns, "link", "set", port, "master", "br0")
                ip("-n", self.bridge_ns, "link", "set", port, "up")
                ip("-n", host, "addr", "add", f"{addr}/24", "dev", self.IFACE)
                ip("-n", host, "link", "set", self.IFACE, "up")
                ip("-n", host, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def _add_ns(self, name: str) -> None:
        ip("netns", "add", name)
        self._made.append(name)

    def close(self) -> None:
        """Kill every process started in the LAN and delete its namespaces. Idempotent."""
        try:
            for p in self.procs:
                if p.poll() is None:  # a reaped pid may belong to someone else by now
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(p.pid, signal.SIGKILL)
            for p in self.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=5)
        finally:
            # Whatever is still inside (a Nanny's workers, or everything if the waits above
            # were interrupted) is killed by _delete before its namespace goes.
            for name in reversed(self._made):
                _delete(name)
            self._made.clear()

    def __enter__(self) -> Lan:
        return self.create()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ use

    def argv(self, host: int, argv: Sequence[str]) -> list[str]:
        """``argv`` to be run inside host ``host``."""
        return ["ip", "netns", "exec", self.hosts[host], *argv]

    def popen(self, host: int, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start ``argv`` inside host ``host``, in a new session; :meth:`close` kills it."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        # `ip netns exec` execs the command in place, so p.pid is the command's own pid.
        p = subprocess.Popen(self.argv(host, argv), start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def counters(self, host: int) -> tuple[int, int]:
        """``(rx_bytes, tx_bytes)`` of host ``host``'s ``eth0``."""
        (link,) = json.loads(ip("-n", self.hosts[host], "-s", "-j", "link", "show", self.IFACE))
        stats = link.get("stats64") or link["stats"]
        return stats["rx"]["bytes"], stats["tx"]["bytes"]

    def names(self) -> list[str]:
        """Every namespace of this LAN that still exists."""
        existing = set(_netns_names())
        return [n for n in [self.bridge_ns, *self.hosts] if n in existing]


@contextlib.contextmanager
def lan_for_test(hosts: int):
    """A LAN of ``hosts`` namespace hosts for one test, torn down afterwards; the test is
    skipped (saying why) where none can be built."""
    import pytest

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    sweep_stale()
    lan = Lan(hosts)
    try:
        lan.create()
    except NetnsError as exc:
        pytest.skip(f"cannot build a LAN of network namespaces here: {exc}")
    try:
        yield lan
    finally:
        lan.close()


# ---------------------------------------------------------------------- sshd on the hosts

#: The test key's and host key's type.
SSH_KEY_TYPE = "ed25519"


def ssh_unavailable_reason() -> str | None:
    """Why sshd cannot serve the LAN's hosts here, or None."""
    for program in ("sshd", "ssh", "ssh-keygen"):
        if shutil.which(program) is None and not os.path.exists(f"/usr/sbin/{program}"):
            return f"`{program}` (Debian's openssh-server / openssh-client) is not installed"
    return None


def make_ssh_keys(directory: str) -> str:
    """A client key pair and a host key in ``directory``; returns the client key's path
    (its public half is the only authorized key)."""
    key = os.path.join(directory, "id_test")
    for path in (key, os.path.join(directory, "host_key")):
        subprocess.run(["ssh-keygen", "-q", "-t", SSH_KEY_TYPE, "-N", "", "-f", path],
                       check=True, capture_output=True, timeout=30)
    shutil.copy(key + ".pub", os.path.join(directory, "authorized_keys"))
    return key


def start_sshd(lan: Lan, host: int, directory: str) -> subprocess.Popen:
    """sshd on host ``host``'s address, port 22, taking only the key of :func:`make_ssh_keys`
    (root may log in with it); its log goes to ``directory/sshd-<host>.log``."""
    os.makedirs("/run/sshd", exist_ok=True)  # its privilege separation directory
    config = os.path.join(directory, f"sshd-{host}.conf")
    with open(config, "w") as f:
        f.write(f"""Port 22
ListenAddress {lan.ips[host]}
HostKey {directory}/host_key
PidFile none
AuthorizedKeysFile {directory}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
LogLevel ERROR
""")
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    log = open(os.path.join(directory, f"sshd-{host}.log"), "wb")  # noqa: SIM115
    try:
        return lan.popen(host, [sshd, "-D", "-e", "-f", config], stdout=log, stderr=log)
    finally:
        log.close()


def wait_for_port(lan: Lan, host: int, port: int, timeout: float = 10.0) -> None:
    """Return once something listens on host ``host``'s ``port``."""
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(lan.argv(host, ["ss", "-ltnH", f"sport = :{port}"]),
                             capture_output=True, text=True, timeout=10).stdout
        if out.strip():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {lan.ips[host]}:{port}")
        time.sleep(0.05)


def zfabric_pids(lan: Lan) -> dict[str, list[str]]:
    """``{host namespace: [command lines]}`` of zfabric processes still in the LAN's hosts."""
    out: dict[str, list[str]] = {}
    for name in lan.hosts:
        for p in ip("netns", "pids", name, check=False).split():
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            if "zfabric" in cmd:
                out.setdefault(name, []).append(cmd)
    return out
