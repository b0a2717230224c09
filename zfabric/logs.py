"""Recent log records of this process, kept in memory for ``get_worker_logs`` and
``get_scheduler_logs``.

One :class:`LogRing` per process hangs on the ``zfabric`` logger; it keeps what that logger
emits (its level decides what is recorded) as ``(level name, formatted message)``, the newest
``LOG_RING_LENGTH``. Workers in the scheduler's process (``processes=False``) share its ring.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

#: Records kept per process.
LOG_RING_LENGTH = 10_000

_lock = threading.Lock()
_ring: LogRing | None = None


class LogRing(logging.Handler):
    """A handler that keeps the newest records, formatted, in a bounded deque."""

    def __init__(self, length: int = LOG_RING_LENGTH):
        super().__init__(logging.NOTSET)
        self.records: deque[tuple[str, str]] = deque(maxlen=length)
        self.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.records.append((record.levelname, self.format(record)))
        except Exception:  # a record that cannot be formatted must not break the caller
            self.handleError(record)
        # Being a handler, this one hides logging's last resort (warnings to stderr when the
        # program configured no logging): stand in for it.
        last = logging.lastResort
        if (last is not None and record.levelno >= last.level
                and not logging.getLogger().handlers):
            last.handle(record)


def install() -> LogRing:
    """Hang this process's ring on the ``zfabric`` logger (once) and return it."""
    global _ring
    with _lock:
        if _ring is None:
            _ring = LogRing()
            logging.getLogger("zfabric").addHandler(_ring)
        return _ring


def recent(n: int | None = None) -> list[tuple[str, str]]:
    """The newest ``n`` records of this process (all kept when ``n`` is None), oldest first."""
    records = list(install().records)
    return records[-n:] if n else records
