"""Logging to the systemd journal natively: a priority per event, the event's fields as fields.

Under systemd, stderr lines reach the journal as plain text at one priority, so
``journalctl -p warning`` could not filter the agent's JSON lines. Here every
event is one entry with ``PRIORITY`` from its level, ``MESSAGE`` a readable
line, ``PBX_EVENT`` the event's name and each key as ``PBX_<KEY>``
(``journalctl -u pbx-agent PBX_EVENT=uplink_failed``).

How it is sent, in order of preference:

- ``systemd.journal.send`` (systemd-python, the ``systemd`` extra), imported
  on the first event, never at start-up;
- else the native protocol written here: one ``AF_UNIX``/``SOCK_DGRAM``
  datagram of ``KEY=value`` lines (a value holding a newline is sent as
  ``KEY``, a little-endian 64-bit length and the bytes) to
  ``/run/systemd/journal/socket``; ``PBX_AGENT_JOURNAL_SOCKET`` names another
  socket (tests bind their own and read what arrives), and then systemd-python
  is not used, since it always writes to the system's;
- when the socket refuses (journald stopped, an event too large for one
  datagram): the line on stderr with the ``<N>`` priority prefix that
  systemd's stream reader understands, so the priority survives.

Values are the already masked ones: this runs after :func:`agent.logs.mask_secrets`.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import socket
import struct
import sys
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, TextIO

SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "pbx-agent"

#: syslog priorities (journalctl -p) for structlog's level names.
PRIORITY = {
    "debug": 7,
    "info": 6,
    "notice": 5,
    "warning": 4,
    "warn": 4,
    "error": 3,
    "exception": 3,
    "critical": 2,
}

_NOT_FIELD = re.compile(r"[^A-Z0-9_]")
#: Keys rendered elsewhere or added by the journal itself.
_SKIP = frozenset({"event", "level", "timestamp"})


def field_name(key: str) -> str:
    """``PBX_`` and the key in upper case, reduced to what journal field names allow."""
    return ("PBX_" + _NOT_FIELD.sub("_", key.upper()))[:64]


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), default=str, ensure_ascii=False)


def fields(event: Mapping[str, Any]) -> dict[str, str]:
    """The journal entry for one structlog event (after the level and masking processors)."""
    name = str(event.get("event", ""))
    level = str(event.get("level", "info"))
    extra = {k: v for k, v in event.items() if k not in _SKIP}
    words = " ".join(f"{k}={_text(v)}" for k, v in extra.items() if k != "exception")
    message = f"{name} {words}".rstrip()
    if "exception" in extra:
        message += "\n" + _text(extra["exception"])
    out = {
        "MESSAGE": message,
        "PRIORITY": str(PRIORITY.get(level, 6)),
        "SYSLOG_IDENTIFIER": IDENTIFIER,
        "PBX_EVENT": name,
    }
    for key, value in extra.items():
        out.setdefault(field_name(key), _text(value))
    return out


def encode(entry: Mapping[str, str]) -> bytes:
    """The native protocol's datagram for one entry."""
    parts: list[bytes] = []
    for key, value in entry.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            parts.append(key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(key.encode() + b"=" + data + b"\n")
    return b"".join(parts)


class JournalLogger:
    """A structlog logger whose every method sends one journal entry (a dict of fields)."""

    def __init__(self, fallback: TextIO | None = None, path: str | None = None) -> None:
        self.fallback = fallback or sys.stderr
        self.path = path or os.environ.get("PBX_AGENT_JOURNAL_SOCKET") or SOCKET
        self._sock: socket.socket | None = None
        self._send: Callable[..., Any] | None = None
        if path is None and "PBX_AGENT_JOURNAL_SOCKET" not in os.environ:
            try:  # systemd-python, when installed (by name: it has no type information)
                self._send = importlib.import_module("systemd.journal").send
            except ImportError:
                pass

    def _emit(self, entry: dict[str, str]) -> None:
        if self._send is not None:
            try:
                self._send(**entry)
                return
            except OSError:
                pass
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(encode(entry), self.path)
        except OSError:
            # journald away or the entry too large for a datagram: keep the priority.
            first, *rest = entry["MESSAGE"].splitlines() or [""]
            line = f"<{entry['PRIORITY']}>{first}"
            for more in rest:
                line += f"\n<{entry['PRIORITY']}>  {more}"
            self.fallback.write(line + "\n")
            self.fallback.flush()

    def msg(self, entry: dict[str, str]) -> None:
        """Send one entry."""
        self._emit(entry)

    debug = info = warning = warn = error = critical = exception = failure = err = msg

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket (a new one is opened if it is used again)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def render(
    _logger: object, _name: str, event: MutableMapping[str, Any]
) -> tuple[tuple[dict[str, str]], dict[str, Any]]:
    """structlog's last processor: the event as journal fields, for :class:`JournalLogger`."""
    return (fields(event),), {}


def under_journal(stream: TextIO) -> bool:
    """Whether ``stream`` is the journal stream systemd gave us (``$JOURNAL_STREAM``)."""
    value = os.environ.get("JOURNAL_STREAM")
    if not value:
        return False
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)
