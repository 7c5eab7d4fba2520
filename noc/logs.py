"""The NOC's logging: structlog key-value events, JSON when asked (``NOC_LOG_FORMAT=json``)."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def setup(level: str = "info") -> None:
    """Configure structlog once for a NOC process (events go to stderr)."""
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if os.environ.get("NOC_LOG_FORMAT") == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
