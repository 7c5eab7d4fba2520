"""The policy gate: the only code that can turn a collector's record into an envelope.

An :class:`Envelope` can be made only with a key that this module keeps to
itself, and the outbox accepts nothing else, so a path that skips the gate is
a type error (mypy) and a ``TypeError`` at run time, not a review finding.

For each record the gate checks, in order: the class is not hard-denied; the
customer's switch is on; the local policy sends the class; no NOC ``narrow``
is in force for it; the serialised body holds no key material. It then stamps
a sortable id, the time, the next sequence number and the schema version.
Every refusal is counted by class and reason; none is silent. An envelope the
outbox then cannot store (a full disk) is withdrawn: its seq is issued again,
and it is counted as refused (``not-stored``), so seq has no gaps.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final

import structlog

from agent.errors import PolicyRefused
from agent.policy import wire
from agent.policy.classes import HARD_DENIED, DataClass, Record
from agent.policy.settings import PolicyConfig

SCHEMA_VERSION: Final = 1
_GATE_KEY: Final = object()
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

log = structlog.get_logger(__name__)


def new_id(now: float | None = None) -> str:
    """A 26-character id that sorts by creation time (48-bit ms time, 80 random bits)."""
    ms = int((time.time() if now is None else now) * 1000)
    value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def iso_now(now: float) -> str:
    """UTC ISO 8601 with milliseconds and a Z, truncated to the same millisecond as new_id."""
    ms = int(now * 1000)
    # From the integer millisecond, not the float: fromtimestamp rounds microseconds, which
    # could put ts one millisecond after the id's time part and break "ids sort like ts".
    return (
        datetime.fromtimestamp(ms // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
    )


class Envelope:
    """An approved record, ready to send. Only :class:`Gate` can make one."""

    __slots__ = ("_seal", "data_class", "id", "payload", "seq", "ts")
    id: str
    ts: str
    data_class: DataClass
    seq: int
    payload: bytes

    def __init__(
        self, key: object, *, id: str, ts: str, data_class: DataClass, seq: int, payload: bytes
    ) -> None:
        if key is not _GATE_KEY:
            raise TypeError("an Envelope can only be made by the policy gate")
        set_ = object.__setattr__
        set_(self, "id", id)
        set_(self, "ts", ts)
        set_(self, "data_class", data_class)
        set_(self, "seq", seq)
        set_(self, "payload", payload)
        set_(self, "_seal", _GATE_KEY)  # absent on an instance made by __new__ alone

    def __setattr__(self, name: str, value: object) -> None:
        # What the gate approved is what the outbox stores: no swapping the payload after.
        raise AttributeError(f"an approved Envelope cannot be changed ({name})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"an approved Envelope cannot be changed ({name})")

    def __repr__(self) -> str:
        return f"<Envelope {self.data_class} seq={self.seq} id={self.id} {len(self.payload)}B>"


def approved(envelope: object) -> bool:
    """Whether ``envelope`` is an Envelope that went through the gate's constructor."""
    return type(envelope) is Envelope and getattr(envelope, "_seal", None) is _GATE_KEY


class Gate:
    """Approves records against the policy, the switch and NOC narrowing."""

    def __init__(
        self,
        *,
        policy: PolicyConfig,
        switch_on: Callable[[], bool],
        last_seq: int,
        secret_check: Callable[[str], str | None] | None = None,  # None: redact's own check
        local_only: bool = False,
    ) -> None:
        self.policy = policy
        #: No uplink configured: nothing is approved (so nothing is queued or numbered);
        #: the refusal says "kept locally".
        self.local_only = local_only
        self._switch_on = switch_on
        self._seq = last_seq
        self.narrowed: set[DataClass] = set()
        self.refused: Counter[tuple[str, str]] = Counter()
        self.approved: Counter[str] = Counter()
        if secret_check is None:
            from agent.policy.redact import find_secret_material

            secret_check = find_secret_material
        self._secret_check = secret_check

    def set_policy(self, policy: PolicyConfig) -> None:
        """Adopt a reloaded local policy; a local change also lifts NOC narrowing."""
        self.policy = policy
        self.narrowed.clear()

    def narrow(self, data_class: DataClass) -> None:
        """Stop approving a class until the next local change (a NOC ``narrow``)."""
        self.narrowed.add(data_class)

    def effective(self) -> list[str]:
        """The classes that would be approved now (switch aside)."""
        return sorted(c.value for c in self.policy.send - self.narrowed)

    def approve(self, record: Record) -> Envelope:
        """Return an envelope for ``record`` or raise :class:`PolicyRefused` saying why not."""
        reason = self._refusal(record)
        if reason is not None:
            self.refused[(str(record.data_class), reason)] += 1
            if reason == "no-uplink":
                raise PolicyRefused(f"{record.data_class}: kept locally (no uplink configured)")
            raise PolicyRefused(f"{record.data_class}: {reason}")
        now = time.time()
        envelope_id = new_id(now)
        ts = iso_now(now)
        body_text = json.dumps(
            record.body, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
        found = self._secret_check(body_text)
        if found is not None:
            self.refused[(str(record.data_class), "secret-material")] += 1
            log.error(
                "gate_refused_secret_material", data_class=str(record.data_class), reason=found
            )
            raise PolicyRefused(f"{record.data_class}: body holds secret material ({found})")
        seq = self._seq + 1
        payload = (
            f'{{"v":{SCHEMA_VERSION},"id":"{envelope_id}","ts":"{ts}",'
            f'"class":"{record.data_class.value}","seq":{seq},'
            f"{wire.body_field(record.data_class, body_text)}}}"
        ).encode()
        self._seq = seq
        self.approved[str(record.data_class)] += 1
        return Envelope(
            _GATE_KEY, id=envelope_id, ts=ts, data_class=record.data_class, seq=seq, payload=payload
        )

    def withdraw(self, envelope: Envelope) -> None:
        """The outbox could not store ``envelope``: its seq goes to the next record.

        Only the envelope approved last can be withdrawn; the daemon stores each one
        before it approves the next (both on the event loop's thread), so a record
        that is not stored leaves no gap in seq. It is counted as refused, reason
        ``not-stored``.
        """
        if envelope.seq != self._seq:
            raise RuntimeError(
                f"only the last approved envelope (seq {self._seq}) can be withdrawn, "
                f"not seq {envelope.seq}"
            )
        self._seq -= 1
        self.approved[str(envelope.data_class)] -= 1
        if not self.approved[str(envelope.data_class)]:
            del self.approved[str(envelope.data_class)]
        self.refused[(str(envelope.data_class), "not-stored")] += 1

    def _refusal(self, record: Record) -> str | None:
        data_class: Any = record.data_class
        if not isinstance(data_class, DataClass):
            if str(data_class) in HARD_DENIED:
                return "hard-denied"
            return "unknown-class"
        if self.local_only:
            return "no-uplink"
        if not self._switch_on():
            return "switch-off"
        if data_class not in self.policy.send:
            return "not-in-policy"
        if data_class in self.narrowed:
            return "narrowed-by-noc"
        return None

    def stats(self) -> dict[str, Any]:
        """Counters for status and health."""
        return {
            "approved": dict(self.approved),
            "refused": {f"{c}:{r}": n for (c, r), n in sorted(self.refused.items())},
            "narrowed": sorted(c.value for c in self.narrowed),
            "last_seq": self._seq,
            "local_only": self.local_only,
        }
