"""The scheduler's web dashboard: an HTTP server thread, a live page, ``/metrics``."""

from .server import Dashboard, parse_address

__all__ = ["Dashboard", "parse_address"]
