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


def human_count(n: float) -> str:
    """A count for people: 1.24B, 18.9B, 350M, 50.2K (never an exponent)."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}" if n < 1000 * scale or unit == "B" else f"{n / scale:,.0f}{unit}"
    return f"{n:.0f}"


def human_duration(hours: float) -> str:
    """Hours for people: 42 minutes, 3.5 hours, 2.1 days."""
    return f"{hours * 60:.0f} minutes" if hours < 1 else f"{hours:.1f} hours" if hours < 48 else \
        f"{hours / 24:.1f} days"
