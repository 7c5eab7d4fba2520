"""The ``policy`` section: which data classes the customer lets leave the box.

Listing a class the privacy policy forbids (recordings, voicemail, chats, per-call
records) is a configuration error, named with file, key and line: the denial is
in the code (:data:`agent.policy.classes.HARD_DENIED`), and a file that asks for
it is refused rather than quietly half-obeyed.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.confreader import Section
from agent.policy.classes import HARD_DENIED, DataClass


@dataclass(frozen=True, kw_only=True)
class PolicyConfig:
    """What the customer permits to leave the box."""

    send: frozenset[DataClass] = frozenset(DataClass)


def parse_policy(sec: Section) -> PolicyConfig:
    names = sec.str_list("send", [c.value for c in DataClass])
    allowed: set[DataClass] = set()
    for name in names:
        if name in HARD_DENIED:
            sec.problem(
                "send",
                f"{name!r} never leaves the box: the privacy policy forbids it, "
                "whatever the configuration says; remove it",
            )
        elif name not in DataClass.__members__.values():
            sec.problem(
                "send",
                f"unknown data class {name!r} (known: {', '.join(c.value for c in DataClass)})",
            )
        else:
            allowed.add(DataClass(name))
    sec.finish()
    return PolicyConfig(send=frozenset(allowed))
