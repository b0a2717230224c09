"""CurveZMQ security: key pairs by role, the ZAP authenticator, and socket setup.

A :class:`Security` holds the public keys of the servers (the scheduler's port and the
workers' data ports) and a key pair for each role this process may act as. With it, every
ROUTER is a CURVE server and every DEALER a CURVE client: traffic is encrypted and each peer
proves which key it holds before a single message of it is read.

Keys carry roles. ``zfabric keygen DIR`` writes one certificate per role (ZeroMQ's own format,
``zmq.auth``; secret files 0600) with the role in the certificate's metadata, and copies the
public halves that may connect into ``DIR/authorized``. The ZAP handler of this module (one
thread per process, shared by the servers in it) accepts a connection only when its key is
in the authorized set, and returns ``"ROLE PUBLICKEY"`` as the ZAP user id, which ZeroMQ then
attaches to every message of that connection. The scheduler and the workers read it to bind
what a peer may do to the key it holds (see :func:`role_of`). The set is read again when the
directory changes, so adding or deleting a certificate there takes effect without a restart.

Server sockets set ``ZAP_ENFORCE_DOMAIN``: should the handler be missing, connections are
refused rather than accepted.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import zmq
import zmq.auth

from . import current
from .errors import KeyRevoked, SecurityError

logger = logging.getLogger(__name__)

__all__ = ["ROLES", "KeyRevoked", "Security", "SecurityError", "keygen"]

#: The roles a key can carry. The scheduler's key only serves; ``admin`` is a client that may
#: also make the requests listed in the ``ADMIN_ONLY`` setting.
ROLES = ("scheduler", "worker", "client", "nanny", "admin")
#: Roles that connect, and so are listed in the authorized directory.
PEER_ROLES = ("worker", "client", "nanny", "admin")
#: Most data ports whose keys a process remembers (the oldest is forgotten first).
MAX_WORKER_KEYS = 100_000
#: The ZAP endpoint libzmq asks (RFC 27), one per context.
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
#: Environment variable with the directory of a process's keys (read by the CLI and by
#: workers that a Nanny starts). Keys in memory never travel in the environment: a Nanny
#: hands them to its worker processes through a pipe (:meth:`Security.dumps_keys`).
ENV_DIRECTORY = "ZFABRIC_SECURITY"

_TLS_ARGUMENTS = {
    "tls_ca_file", "tls_ciphers", "tls_client_key", "tls_client_cert", "tls_scheduler_key",
    "tls_scheduler_cert", "tls_worker_key", "tls_worker_cert", "tls_min_version",
    "tls_max_version", "extra_conn_args",
}


def keygen(directory: str | os.PathLike, roles=PEER_ROLES, *, name: str | None = None) -> Path:
    """Write a certificate per role into ``directory`` (scheduler's too, unless adding one key
    with ``name``) and authorize the peer roles' public keys. Returns the directory."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    authorized = root / "authorized"
    authorized.mkdir(exist_ok=True)
    todo = [(name or role, role) for role in roles]
    if name is None and not (root / "scheduler.key_secret").exists():
        todo.insert(0, ("scheduler", "scheduler"))
    for stem, role in todo:
        if role not in ROLES:
            raise SecurityError(f"unknown role {role!r}; choose from {', '.join(ROLES)}")
        public, secret = zmq.auth.create_certificates(str(root), stem, metadata={"role": role})
        # pyzmq writes the metadata into the secret file only: the public one (what others
        # authorize) carries the role too
        text = Path(public).read_text()
        if _cert_role(Path(public)) is None:
            Path(public).write_text(text.replace("metadata\n", f"metadata\n    role = {role}\n", 1))
        for path in (public, secret):
            os.chmod(path, 0o600)
        if role in PEER_ROLES:
            target = authorized / f"{stem}.key"
            target.write_bytes(Path(public).read_bytes())
            os.chmod(target, 0o600)
    return root


def _cert_role(path: Path) -> str | None:
    for line in path.read_text().splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key.strip() == "role":
            return value.strip().strip('"')
    return None


class Security:
    """Keys for CurveZMQ, dask.distributed's name for a cluster's security settings.

    ``Security(DIR)`` reads the certificates ``zfabric keygen DIR`` wrote (a host needs the
    secret files of the roles it runs, the public ``scheduler.key`` and ``worker.key``, and,
    on the scheduler's and workers' hosts, ``DIR/authorized``). ``Security.temporary()``
    makes a fresh set in memory for one machine. ``Security()`` with neither is off.
    ``require_encryption=True`` makes a component refuse to start without keys.
    """

    def __init__(self, directory: str | os.PathLike | None = None, *,
                 require_encryption: bool | None = None, **kwargs):
        tls = sorted(set(kwargs) & _TLS_ARGUMENTS)
        if tls:
            raise SecurityError(
                f"zfabric secures its sockets with CurveZMQ keys, not TLS ({', '.join(tls)}):"
                " write keys with `zfabric keygen DIR` and pass Security(DIR), or use"
                " Security.temporary() for a cluster on one machine")
        if kwargs:
            raise TypeError(f"Security() got unexpected arguments {sorted(kwargs)}")
        self.directory = Path(directory) if directory is not None else None
        self.require_encryption = bool(require_encryption)
        self.pairs: dict[str, tuple[bytes, bytes]] = {}  # role -> (public, secret)
        self.publics: dict[str, bytes] = {}  # server role -> public key
        self._authorized: dict[bytes, str] | None = None  # in-memory keys (temporary)
        #: data address -> its port's public key, as the scheduler tells (learn_worker_keys)
        self.worker_keys: dict[str, bytes] = {}
        if self.directory is not None:
            self._load(self.directory)
        if self.require_encryption and not self.encrypted:
            raise SecurityError("require_encryption is set but no keys were given; write"
                                " them with `zfabric keygen DIR` and pass Security(DIR)")

    # -- construction ------------------------------------------------------------------

    @classmethod
    def temporary(cls) -> Security:
        """A fresh set of keys for every role, in memory (for a cluster on one machine)."""
        self = cls()
        self._authorized = {}
        for role in ROLES:
            public, secret = zmq.curve_keypair()
            self.pairs[role] = (public, secret)
            if role in PEER_ROLES:
                self._authorized[public] = role
        self.publics = {r: self.pairs[r][0] for r in ("scheduler", "worker")}
        return self

    def _load(self, root: Path) -> None:
        if not root.is_dir():
            raise SecurityError(f"security directory {str(root)!r} does not exist; write keys"
                                " with `zfabric keygen DIR`")
        # a role's own file (client.key_secret) first, then others of that role (added keys)
        paths = sorted(root.glob("*.key_secret"), key=lambda p: (p.stem not in ROLES, p))
        for path in paths:
            role = _cert_role(path)
            public, secret = zmq.auth.load_certificate(str(path))
            if role in ROLES and secret and role not in self.pairs:
                self.pairs[role] = (public, secret)
        for role in ("scheduler", "worker"):
            path = root / f"{role}.key"
            if role in self.pairs:
                self.publics[role] = self.pairs[role][0]
            elif path.exists():
                self.publics[role] = zmq.auth.load_certificate(str(path))[0]
        if not self.pairs:
            raise SecurityError(f"no secret keys (*.key_secret) in {str(root)!r}; write them"
                                " with `zfabric keygen DIR`")

    def environ(self) -> dict[str, str]:
        """Environment variables that carry these keys to a process this one starts: the
        directory's name for keys on disk (not a secret), none for keys in memory, which go
        by :meth:`dumps_keys` through a pipe (an environment is inherited by every process
        that one starts, and readable in ``/proc/PID/environ``)."""
        if self.encrypted and self.directory is not None:
            return {ENV_DIRECTORY: str(self.directory)}
        return {}

    @property
    def in_memory(self) -> bool:
        """Whether these are keys in memory (:meth:`temporary`), not read from a directory."""
        return self.encrypted and self.directory is None

    def dumps_keys(self, roles=ROLES) -> bytes:
        """These keys (in memory) as bytes for :meth:`loads_keys` in a process this one
        starts: the key pairs of ``roles`` only, the servers' public keys and the authorized
        set. Secret: hand them over a pipe, never on a command line or in the environment."""
        data = {"pairs": {r: [p.decode(), s.decode()] for r, (p, s) in self.pairs.items()
                          if r in roles},
                "publics": {r: p.decode() for r, p in self.publics.items()},
                "authorized": {p.decode(): r for p, r in self.authorized().items()}}
        return json.dumps(data).encode()

    @classmethod
    def loads_keys(cls, data: bytes) -> Security:
        """The Security of :meth:`dumps_keys`."""
        try:
            obj = json.loads(data)
            self = cls()
            self.pairs = {r: (p.encode(), s.encode()) for r, (p, s) in obj["pairs"].items()}
            self.publics = {r: p.encode() for r, p in obj["publics"].items()}
            self._authorized = {p.encode(): r for p, r in obj["authorized"].items()
                                if r in PEER_ROLES}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SecurityError(f"malformed keys from the parent process: {exc}") from None
        return self

    @classmethod
    def from_environ(cls, environ=None) -> Security | None:
        """The Security of the directory :meth:`environ` names, or None."""
        env = os.environ if environ is None else environ
        if env.get(ENV_DIRECTORY):
            return cls(env[ENV_DIRECTORY])
        return None

    # -- queries -----------------------------------------------------------------------

    @property
    def encrypted(self) -> bool:
        """Whether this Security has keys (CURVE on)."""
        return bool(self.pairs)

    def __bool__(self) -> bool:
        return self.encrypted

    def __repr__(self) -> str:
        where = str(self.directory) if self.directory else "temporary" if self.pairs else "off"
        return f"<Security {where} roles={sorted(self.pairs)}>"

    @property
    def domain(self) -> bytes:
        """The ZAP domain of this cluster (from the scheduler's public key): the handler
        checks each server's peers against that server's own authorized set."""
        return b"zfabric-" + self.publics.get("scheduler", b"")[:20]

    def pair(self, role: str) -> tuple[bytes, bytes]:
        if role == "client" and "client" not in self.pairs and "admin" in self.pairs:
            role = "admin"
        try:
            return self.pairs[role]
        except KeyError:
            raise SecurityError(
                f"no {role} key in {self!r}: copy {role}.key_secret from the directory"
                " `zfabric keygen` wrote") from None

    def authorized(self) -> dict[bytes, str]:
        """Public key -> role of every key that may connect (read from disk each call)."""
        if self._authorized is not None:
            return self._authorized
        out: dict[bytes, str] = {}
        folder = self.directory / "authorized" if self.directory else None
        if folder is None or not folder.is_dir():
            return out
        for path in folder.glob("*.key"):
            try:
                role = _cert_role(path)
                public, _ = zmq.auth.load_certificate(str(path))
            except (OSError, ValueError) as exc:
                logger.warning("skipping certificate %s: %s", path, exc)
                continue
            if role in PEER_ROLES:
                out[public] = role
        return out

    def authorized_version(self):
        """Something that changes when the authorized set may have changed."""
        if self._authorized is not None:
            return len(self._authorized)
        folder = self.directory / "authorized" if self.directory else None
        try:
            st = os.stat(folder)
            return (st.st_mtime_ns, st.st_ino, len(os.listdir(folder)))
        except (OSError, TypeError):
            return None

    # -- sockets -----------------------------------------------------------------------

    def server_socket(self, sock: zmq.Socket, role: str) -> None:
        """Make ``sock`` (before it binds) a CURVE server with ``role``'s key pair, whose
        peers the ZAP handler checks."""
        public, secret = self.pair(role)
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        sock.setsockopt(zmq.ZAP_DOMAIN, self.domain)
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)

    def learn_worker_keys(self, keys) -> None:
        """Data address -> public key (Z85) of workers' data ports, as the scheduler tells
        them (``welcome`` and ``worker-keys``): a worker with a key of its own serves with it."""
        if type(keys) is not dict:
            return
        book = self.worker_keys
        for address, key in keys.items():
            if type(address) is str and len(address) <= 300 and type(key) is str \
                    and len(key) == 40:
                if len(book) >= MAX_WORKER_KEYS:
                    book.pop(next(iter(book)))
                book[address] = key.encode()

    def client_socket(self, sock: zmq.Socket, role: str, server: str = "scheduler",
                      address: str | None = None) -> None:
        """Make ``sock`` (before it connects) a CURVE client with ``role``'s key pair that
        expects ``server``'s public key (a worker's data port at ``address``: the key the
        scheduler said it has, else the cluster's ``worker.key``)."""
        public, secret = self.pair(role)
        try:
            server_key = (self.worker_keys.get(address) if server == "worker" and address
                          else None) or self.publics[server]
        except KeyError:
            raise SecurityError(f"no public key of the {server} in {self!r}: copy"
                                f" {server}.key from the directory `zfabric keygen` wrote"
                                ) from None
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)


def use_for_process(security: Security | None) -> None:
    """Remember the keys a Client or Worker of this process uses, for connections made
    without one at hand (an actor handle calling its worker): :mod:`zfabric.current` keeps
    them (the last keys set win)."""
    current.set_process_keys(security)


def process_security() -> Security | None:
    """The keys of :func:`use_for_process`, or None (security off)."""
    return current.process_keys()


def as_security(value) -> Security | None:
    """What components accept as ``security=``: a Security, a directory, True (temporary),
    or None/False (off)."""
    if value is None or value is False:
        return None
    if value is True:
        return Security.temporary()
    if isinstance(value, Security):
        return value if value.encrypted else None
    if isinstance(value, str | os.PathLike):
        return Security(value)
    raise TypeError(f"security= takes a Security, a key directory or True, not {value!r}")


def role_of(frame: zmq.Frame) -> tuple[str, bytes]:
    """The role and public key (Z85) the ZAP handler gave the connection ``frame`` came on."""
    user = str(frame.get("User-Id"))
    role, _, key = user.partition(" ")
    return role, key.encode()
