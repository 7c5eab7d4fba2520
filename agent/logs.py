"""Logging: structlog key-value events, to the journal under systemd, readable in a terminal.

``PBX_AGENT_LOG_FORMAT`` chooses the output: ``journal`` (native journal entries
with a priority per event and the event's fields, :mod:`agent.journal`),
``json`` (one JSON object per line), ``console`` (for people), or ``auto``
(the default): the journal when stderr is the journal stream systemd gave us
(``$JOURNAL_STREAM``), JSON lines when it is not a terminal, console otherwise.

Secrets never reach a log line: a processor masks the values of keys that name
a secret and the password part of any ``scheme://user:password@`` URL, whatever
the event is. It runs last before rendering so that no code path can skip it.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import Any, TextIO

import structlog

_SECRET_KEY = re.compile(
    r"pass|secret|token|pwd|passwd|credential|private|^key$|_key$|pin$", re.IGNORECASE
)
_URL_PASSWORD = re.compile(
    r"(?P<head>[a-z][a-z0-9+.-]*://[^/\s:@]*:)[^@\s/]*(?P<tail>@)", re.IGNORECASE
)
MASK = "***"


def _mask_value(value: object) -> object:
    if isinstance(value, str):
        return _URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}{m['tail']}", value)
    return value


def mask_secrets(
    _logger: object, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: hide secret-named keys and passwords inside URLs."""
    for key, value in list(event.items()):
        if key != "event" and _SECRET_KEY.search(key) and value is not None:
            event[key] = MASK
        else:
            event[key] = _mask_value(value)
    return event


FORMATS = ("auto", "journal", "json", "console")


def log_format(stream: TextIO) -> str:
    """``journal``, ``json`` or ``console``: ``$PBX_AGENT_LOG_FORMAT``, or chosen for ``stream``."""
    chosen = os.environ.get("PBX_AGENT_LOG_FORMAT", "auto")
    if chosen in ("journal", "json", "console"):
        return chosen
    from agent.journal import under_journal

    if under_journal(stream):
        return "journal"
    if "INVOCATION_ID" in os.environ or not stream.isatty():
        return "json"
    return "console"


def wants_json(stream: TextIO) -> bool:
    """Whether events are written as JSON lines on ``stream``."""
    return log_format(stream) == "json"


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    """Set up structlog once for the daemon or a CLI command."""
    out = stream or sys.stderr
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    renderer: Any
    factory: Any = structlog.PrintLoggerFactory(out)
    fmt = log_format(out)
    if fmt == "journal":
        from agent import journal

        renderer = journal.render
        logger = journal.JournalLogger(fallback=out)

        def factory(*_args: Any) -> journal.JournalLogger:
            return logger

    elif fmt == "json":
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            mask_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )


class Throttle:
    """At most one log line per key and interval; the lines held back are counted.

    For events a peer can cause at will (a refused control connection, a hostile
    NOC command): each is counted where it is reported (status, the ledger), and
    the log says so once per interval with how many it did not repeat, so that
    nobody can fill the journal by knocking.
    """

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def admit(self, key: str) -> int | None:
        """None to stay quiet; else how many events of ``key`` were held back since the last."""
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)
