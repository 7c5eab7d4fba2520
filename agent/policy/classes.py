"""Data classes, and the ones that may never leave the box whatever the configuration says.

The denial lives here, in code, so that no configuration file, remote command or
bug in a collector can widen what is sent: listing a denied class in
``policy.send`` is a configuration error, and the gate refuses it regardless.
"""

from __future__ import annotations

import enum


class DataClass(enum.StrEnum):
    """What kind of data a record holds; also the last element of its MQTT topic."""

    HEALTH = "health"
    CONFIG = "config"
    CALLSTATS = "callstats"


#: Classes that exist on a PBX but are never sent: the privacy policy's promise.
HARD_DENIED: frozenset[str] = frozenset({"recordings", "voicemail", "chats", "cdr_records"})
