"""Data classes, the ones that may never leave the box whatever the configuration says, and
the record a collector hands the gate.

The denial lives here, in code, so that no configuration file, remote command or
bug in a collector can widen what is sent: listing a denied class in
``policy.send`` is a configuration error, and the gate refuses it regardless.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class DataClass(enum.StrEnum):
    """What kind of data a record holds; also the last element of its MQTT topic."""

    HEALTH = "health"
    CONFIG = "config"
    CALLSTATS = "callstats"


#: Classes that exist on a PBX but are never sent: the privacy policy's promise.
HARD_DENIED: frozenset[str] = frozenset({"recordings", "voicemail", "chats", "cdr_records"})


@dataclass(frozen=True, slots=True)
class Record:
    """One piece of data a collector proposes to send: its class and a JSON-able body.

    It is the gate's input (here, beside the classes the gate judges) and becomes
    an envelope only if the gate approves it.
    """

    data_class: DataClass
    body: Mapping[str, Any]
