"""The package's log lines: ``logging`` under the ``zoomvit`` logger, one format, on stdout.

Library code only logs (``logging.getLogger(__name__)``); entry points (the command lines, the
Ray Train worker, the benchmarks) call :func:`configure` once. Lines read ``[stage] message``:
the stage prefix is part of the message.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(message)s"


def configure(level: int | str = logging.INFO) -> None:
    """Send the ``zoomvit`` loggers' records at ``level`` and above to stdout; idempotent."""
    logger = logging.getLogger("zoomvit")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(FORMAT))
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
