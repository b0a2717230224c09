"""The last log records of this process, kept in memory for ``LocalCluster.get_logs``.

:func:`install` attaches one bounded handler to the ``zfabric`` logger (once per process);
worker processes install it at start, a LocalCluster in its own process. :func:`recent` reads
it back as ``[(level name, formatted message)]``, oldest first, which is what dask's
``get_worker_logs`` returns per worker. Records below the logger's level never reach it.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

#: Records kept per process (the oldest go first).
MAX_RECORDS = 1000

_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
_lock = threading.Lock()
_handler: LogBuffer | None = None


class LogBuffer(logging.Handler):
    """A handler that keeps the last ``n`` formatted records."""

    def __init__(self, n: int = MAX_RECORDS):
        super().__init__()
        self.records: deque[tuple[str, str]] = deque(maxlen=n)
        self.setFormatter(logging.Formatter(_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.records.append((record.levelname, self.format(record)))
        except Exception:  # pragma: no cover - a bad record must not break logging
            self.handleError(record)
        # Being a handler, this one hides logging's last resort (warnings to stderr when the
        # program configured no logging): stand in for it.
        last = logging.lastResort
        if (last is not None and record.levelno >= last.level
                and not logging.getLogger().handlers):
            last.handle(record)


def install() -> LogBuffer:
    """Keep the ``zfabric`` logger's records in memory from now on (idempotent)."""
    global _handler
    with _lock:
        if _handler is None:
            _handler = LogBuffer()
            logging.getLogger("zfabric").addHandler(_handler)
        return _handler


def recent(n: int | None = None, prefix: str = "zfabric") -> list[tuple[str, str]]:
    """The last ``n`` kept records (all by default) of loggers under ``prefix``."""
    if _handler is None:
        return []
    out = [r for r in list(_handler.records) if r[1].split(" ", 3)[2].startswith(prefix)]
    return out[-n:] if n else out
