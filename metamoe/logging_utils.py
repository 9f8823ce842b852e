"""Log lines a person can follow: ``[metamoe] HH:MM:SS message`` on stdout."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    log = logging.getLogger("metamoe")
    if not any(getattr(h, "_metamoe", False) for h in log.handlers):
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(logging.Formatter("[metamoe] %(asctime)s %(message)s", "%H:%M:%S"))
        h._metamoe = True  # type: ignore[attr-defined]
        log.addHandler(h)
        log.propagate = False
    log.setLevel(level)
    return log
