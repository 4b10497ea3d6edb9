"""One rank-aware logger for the whole package: `logging.getLogger("lrc")` and its children.

`configure` (called by the entry points, never at import) sends INFO records of rank 0 to standard output as
plain lines (progress, start-up summary, the data pipeline's progress from `lrc.data`), and only warnings
from the other ranks, so a run under torchrun prints each line once.
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("lrc")


class _Stdout(logging.Handler):
    """Writes to whatever `sys.stdout` is at the time (test runners swap it), flushing each line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stdout, flush=True)
        except Exception:
            self.handleError(record)


def configure(rank: int = 0) -> None:
    """Route the package's records: INFO and up from rank 0, WARNING and up from the others (idempotent)."""
    logger.handlers = [h for h in logger.handlers if not isinstance(h, _Stdout)]
    handler = _Stdout()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False


def info(message: str) -> None:
    logger.info(message)


def warning(message: str) -> None:
    logger.warning(f"warning: {message}")
