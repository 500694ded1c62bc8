"""Logging set-up for the worker and the command line: every line carries pid and thread."""

from __future__ import annotations

import logging
import sys

from conveyor.redact import RedactingFilter

FORMAT = "%(asctime)s %(levelname)-7s [%(process)d/%(threadName)s] %(name)s: %(message)s"


def setup(level: str = "INFO") -> None:
    """Send conveyor's logs to stderr, with pid and thread, and passwords masked."""
    logger = logging.getLogger("conveyor")
    if any(getattr(h, "_conveyor", False) for h in logger.handlers):
        logger.setLevel(level.upper())
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(RedactingFilter())
    handler._conveyor = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
