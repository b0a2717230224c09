"""The dashboard's HTTP server: a thread in the scheduler's process, off its hot loop.

The scheduler's loop hands a snapshot (plain data, see :mod:`zfabric.scheduler.observe`) to
:meth:`Dashboard.publish` a few times a second; that only swaps a reference and wakes the
readers. Everything else happens on the server's threads: encoding the snapshot as JSON (once
per snapshot, shared by every reader), the page and its assets, the live stream (server-sent
events at ``/events``), ``/api/snapshot`` and ``/metrics``.

Routes: ``/`` (redirects to ``/status``), ``/status`` (the page), ``/static/NAME``,
``/events``, ``/api/snapshot``, ``/metrics``, ``/health``.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import threading
import time
from collections import deque
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs

import psutil

from .metrics import CONTENT_TYPE, INSTALL_HINT, render
from .view import View

logger = logging.getLogger(__name__)

#: The files the page needs, shipped in the package (no CDN: LAN clusters may be offline).
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
#: A live-stream reader with nothing new hears a comment this often (keeps proxies open).
KEEPALIVE_S = 15.0
#: Live-stream readers served at once (each holds a thread); more are told to come back.
MAX_READERS = 64
#: Deltas kept for readers that fell behind (one further behind gets the whole picture).
DELTAS_KEPT = 64
#: The pages (all served by one HTML file; the script draws the one its path names).
PAGES = ("/status", "/graph", "/worker", "/profile", "/system", "/history")


def parse_address(value, default_host: str) -> tuple[str, int]:
    """``":8787"``, ``"host:8787"``, ``8787`` or ``"http://host:8787"`` -> ``(host, port)``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return default_host, value
    if not isinstance(value, str):
        raise TypeError(f"dashboard_address must be a string like ':8787' or None, got"
                        f" {value!r}")
    text = value.strip()
    for scheme in ("http://", "https://", "tcp://"):
        if text.startswith(scheme):
            text = text[len(scheme):]
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"dashboard_address {value!r} has no port; write it like ':8787' or"
                         " '0.0.0.0:8787'") from None
    if not 0 <= number < 65536:
        raise ValueError(f"dashboard_address {value!r}: port out of range")
    return host.strip("[]") or default_host, number


class Hub:
    """The dashboard's picture (:class:`~zfabric.dashboard.view.View`) and the recent deltas;
    readers wait here for the next one."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._seq = 0
        self.view = View()
        self._deltas: deque[tuple[int, dict]] = deque(maxlen=DELTAS_KEPT)
        self._encoded: dict[int, bytes] = {}
        self._full: tuple[int, bytes] = (-1, b"")
        self._encode_lock = threading.Lock()
        self.closed = False
        self.readers = 0
        self.max_readers = MAX_READERS
        self.publish_s = 0.0  # time spent in publish, in total (the scheduler's thread)

    def publish(self, delta: dict) -> None:
        """Called by the scheduler's loop with what changed: merge it, wake the readers."""
        with self._cond:
            view = self.view
            view.merge(delta)
            wire = {k: v for k, v in delta.items() if k != "profiles"}
            wire["profiles_version"] = view.profiles_version
            wire["erred_groups"] = sorted(view.erred)
            self._seq += 1
            self._deltas.append((self._seq, wire))
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def latest(self) -> tuple[int, dict | None]:
        """The whole picture now, and its number."""
        with self._cond:
            if self.view.empty:
                return self._seq, None
            return self._seq, self.view.full()

    def call(self, method: str, *args):
        """A method of the view, under the lock."""
        with self._cond:
            return getattr(self.view, method)(*args)

    def encoded(self, seq: int, snapshot: dict) -> bytes:
        """The whole picture's JSON, encoded once per number whoever asks first."""
        with self._encode_lock:
            if self._full[0] != seq:
                self._full = (seq, _json(snapshot))
            return self._full[1]

    def delta_encoded(self, seq: int) -> bytes | None:
        """Delta number ``seq`` as JSON (encoded once), or None when no longer kept."""
        with self._cond:
            first = self._deltas[0][0] if self._deltas else self._seq + 1
            if not first <= seq <= self._seq:
                return None
            delta = self._deltas[seq - first][1]
        with self._encode_lock:
            body = self._encoded.get(seq)
            if body is None:
                body = self._encoded[seq] = _json(delta)
                while len(self._encoded) > DELTAS_KEPT:
                    del self._encoded[next(iter(self._encoded))]
            return body

    def wait_newer(self, seq: int, timeout: float) -> int:
        """The newest number after ``seq``, or ``seq`` after ``timeout`` or on close."""
        with self._cond:
            self._cond.wait_for(lambda: self._seq != seq or self.closed, timeout)
            return seq if self.closed else self._seq


def _json(data) -> bytes:
    return json.dumps(data, separators=(",", ":"), default=str).encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = True  # close() joins the request threads (they end on hub.closed)
    allow_reuse_address = True

    def __init__(self, addr, handler, dashboard: Dashboard, family):
        self.address_family = family
        self.dashboard = dashboard
        self.sampler = ProcessSampler()
        self.next_sample = 0.0
        super().__init__(addr, handler)

    def process_request_thread(self, request, client_address):
        threading.current_thread().name = "zfabric-dashboard-request"  # seen by leak checks
        name_os_thread("zf-dashboard")
        super().process_request_thread(request, client_address)

    def serve_forever(self, poll_interval=0.5):
        name_os_thread("zf-dashboard")
        super().serve_forever(poll_interval)

    def service_actions(self):
        """Between requests (every poll interval): a sample of this process a second."""
        now = time.time()
        if now >= self.next_sample:
            self.next_sample = now + 1.0
            self.dashboard.hub.call("own_process", now, self.sampler.sample())


class ProcessSampler:
    """CPU %, memory, disk and network counters of this process (the scheduler's)."""

    def __init__(self) -> None:
        self.process = psutil.Process()

    def sample(self) -> list:
        p = self.process
        out: list = [0.0, 0, 0, 0, 0, 0]
        try:
            out[0] = p.cpu_percent()
            out[1] = p.memory_info().rss
            io = p.io_counters()
            out[2], out[3] = io.read_bytes, io.write_bytes
            net = psutil.net_io_counters()
            out[4], out[5] = net.bytes_recv, net.bytes_sent
        except (AttributeError, OSError, psutil.Error):
            pass
        return out


def name_os_thread(name: str) -> None:
    """Name the calling OS thread (Linux; shown by ``top -H`` and in /proc/PID/task/TID/comm)
    so that the dashboard's CPU can be told apart from the scheduler's (scripts/bench.py)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


class _Handler(BaseHTTPRequestHandler):
    server_version = "zfabric-dashboard"
    timeout = 10  # a reader that stops reading is dropped (and close() is not held up long)

    def log_message(self, format, *args):
        logger.debug("dashboard %s: " + format, self.address_string(), *args)

    def do_GET(self):
        d: Dashboard = self.server.dashboard
        path, _, query = self.path.partition("?")
        args = {k: v[-1] for k, v in parse_qs(query).items()}
        try:
            if path == "/":
                self.send_response(HTTPStatus.FOUND)
                self.send_header("Location", "/status")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif path in PAGES:
                self._asset("index.html")
            elif path.startswith("/static/"):
                self._asset(path[len("/static/"):])
            elif path == "/events":
                self._events(d.hub)
            elif path == "/api/snapshot":
                seq, snap = d.hub.latest()
                if snap is None:
                    self._reply(HTTPStatus.SERVICE_UNAVAILABLE, b"no snapshot yet\n")
                else:
                    self._reply(HTTPStatus.OK, d.hub.encoded(seq, snap), "application/json")
            elif path == "/api/profile":
                self._json(d.hub.call("profile", args.get("group")))
            elif path == "/api/logs":
                self._json(d.hub.call("worker_logs", args.get("address")))
            elif path == "/api/system":
                self._json(d.hub.call("system_series"))
            elif path == "/metrics":
                self._metrics(d.hub)
            elif path == "/health":
                self._reply(HTTPStatus.OK, b"ok\n")
            else:
                self._reply(HTTPStatus.NOT_FOUND, f"no page at {path}\n".encode())
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the reader went away

    def do_POST(self):
        path, _, query = self.path.partition("?")
        args = {k: v[-1] for k, v in parse_qs(query).items()}
        try:
            if path == "/api/dismiss" and "group" in args:
                self._json({"dismissed": self.server.dashboard.hub.call("dismiss",
                                                                        args["group"])})
            else:
                self._reply(HTTPStatus.NOT_FOUND, f"nothing to post at {path}\n".encode())
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass

    def _json(self, data) -> None:
        self._reply(HTTPStatus.OK, _json(data), "application/json")

    def _reply(self, status, body: bytes, ctype: str = "text/plain; charset=utf-8"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _asset(self, name: str) -> None:
        ctype = ASSETS.get(name)
        if ctype is None:
            self._reply(HTTPStatus.NOT_FOUND, f"no asset {name}\n".encode())
            return
        self._reply(HTTPStatus.OK, read_asset(name), ctype)

    def _metrics(self, hub: Hub) -> None:
        _seq, snap = hub.latest()
        try:
            body = render(snap or {})
        except ImportError:
            self._reply(HTTPStatus.NOT_IMPLEMENTED, INSTALL_HINT.encode())
            return
        self._reply(HTTPStatus.OK, body, CONTENT_TYPE)

    def _events(self, hub: Hub) -> None:
        with hub._cond:
            full = hub.readers >= hub.max_readers
            if not full:
                hub.readers += 1
        if full:
            self._reply(HTTPStatus.SERVICE_UNAVAILABLE,
                        f"{hub.max_readers} live readers already; try again later\n".encode())
            return
        try:
            self._stream(hub)
        finally:
            with hub._cond:
                hub.readers -= 1

    def _stream(self, hub: Hub) -> None:
        """The whole picture first, then each delta; a reader that fell more than
        DELTAS_KEPT behind gets the whole picture again."""
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "keep-alive")
        self.end_headers()
        self.close_connection = True
        seq = -1
        while not hub.closed:
            if seq < 0:
                now, snap = hub.latest()
                if snap is None:  # nothing published yet
                    if hub.wait_newer(now, KEEPALIVE_S) == now and not hub.closed:
                        self.wfile.write(b": keep-alive\n\n")
                        self.wfile.flush()
                    continue
                seq = now
                self._send_event(hub.encoded(seq, snap))
            new = hub.wait_newer(seq, KEEPALIVE_S)
            if new == seq:
                if hub.closed:
                    break
                self.wfile.write(b": keep-alive\n\n")
                self.wfile.flush()
                continue
            for number in range(seq + 1, new + 1):
                body = hub.delta_encoded(number)
                if body is None:
                    seq = -1  # fell behind: the whole picture again
                    break
                self._send_event(body)
                seq = number

    def _send_event(self, body: bytes) -> None:
        self.wfile.write(b"data: " + body + b"\n\n")
        self.wfile.flush()


def read_asset(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


class Dashboard:
    """``Dashboard(host, port, contact_host=...)``; :meth:`start` binds (a port in use falls
    back to a free one, with a warning) and serves from a thread; :meth:`close` stops it and
    joins every thread it started."""

    def __init__(self, host: str, port: int, *, contact_host: str | None = None):
        self.host = host
        self.port = port
        self.contact_host = contact_host
        self.hub = Hub()
        self.publish = self.hub.publish
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def link(self) -> str:
        host = self.host
        if host in ("", "0.0.0.0", "::") and self.contact_host:
            host = self.contact_host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/status"

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            self._server = _Server((self.host, self.port), _Handler, self, family)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or self.port == 0:
                raise
            wanted = self.port
            self._server = _Server((self.host, 0), _Handler, self, family)
            self.port = self._server.server_address[1]
            logger.warning("port %d is already in use (another cluster on this host?); the"
                           " dashboard is at %s instead", wanted, self.link)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05},  # how soon close() returns
                                        name="zfabric-dashboard", daemon=True)
        self._thread.start()
        logger.info("dashboard at %s", self.link)

    def close(self) -> None:
        self.hub.close()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()  # joins the request threads
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
