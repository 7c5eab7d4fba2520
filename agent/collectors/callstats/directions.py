"""Which way a call went, and over which trunk: decided from configuration, then forgotten.

The direction rules and trunk rules look at the destination context and the
channel names of a CDR. Channel names carry a unique suffix
(``PJSIP/provider-0000001a``); the suffix is cut off first, so that what the
rules see, and what the cache remembers, is configuration (``PJSIP/provider``),
and a busy box needs one regex evaluation per distinct (context, channel,
channel) triple rather than per call.

A trunk is counted by name only when its name passes the trunk rules: the
explicit ``trunks`` list when one is configured, else ``trunk_pattern`` (by
default: a name with at least one letter, because ``PJSIP/1001`` is a person's
extension and ``SIP/+15551234567`` a number, not a provider). Everything else on the trunk side of a
call is counted as ``other``.
"""

from __future__ import annotations

import re
from typing import Final

from agent.collectors.callstats.settings import CallstatsSettings

OTHER: Final = "other"
#: Channel technologies that are never trunks: dialplan-internal or not a line at all.
_NOT_TRUNK_TECH: Final = frozenset(
    {"local", "message", "bridge", "announcer", "recorder", "cbanchan", "cbrec", "multicast", ""}
)
_CACHE_MAX: Final = 50_000


def channel_prefix(channel: str) -> str:
    """``PJSIP/provider-0000001a`` → ``PJSIP/provider``: all before the last ``-``, if any."""
    return channel.rpartition("-")[0] or channel


def trunk_name(prefix: str) -> tuple[str, str]:
    """``PJSIP/provider`` → (``pjsip``, ``provider``); the technology is lower-cased."""
    slash = prefix.find("/")
    if slash < 0:
        return "", prefix
    return prefix[:slash].lower(), prefix[slash + 1 :]


class Classifier:
    """Decides (direction, trunk) for a call from its context and channels."""

    def __init__(self, settings: CallstatsSettings) -> None:
        self._rules = [
            (
                r.direction,
                re.compile(r.context) if r.context is not None else None,
                re.compile(r.channel) if r.channel is not None else None,
                re.compile(r.dstchannel) if r.dstchannel is not None else None,
            )
            for r in settings.directions
        ]
        self._default = settings.default_direction
        self._trunks = frozenset(settings.trunks)
        self._trunk_re = re.compile(settings.trunk_pattern)
        #: (dcontext, channel prefix, dstchannel prefix) → (direction, trunk key).
        self.cache: dict[tuple[str, str, str], tuple[str, str | None]] = {}

    def classify(self, dcontext: str, channel: str, dstchannel: str) -> tuple[str, str | None]:
        """Direction and trunk key (a trunk name, ``other``, or None for internal calls)."""
        key = (
            dcontext,
            channel.rpartition("-")[0] or channel,
            dstchannel.rpartition("-")[0] or dstchannel,
        )
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        result = self._decide(*key)
        if len(self.cache) >= _CACHE_MAX:
            self.cache.clear()
        self.cache[key] = result
        return result

    def _decide(self, dcontext: str, chan: str, dst: str) -> tuple[str, str | None]:
        direction = self._default
        for name, ctx_re, chan_re, dst_re in self._rules:
            if ctx_re is not None and ctx_re.match(dcontext) is None:
                continue
            if chan_re is not None and chan_re.match(chan) is None:
                continue
            if dst_re is not None and dst_re.match(dst) is None:
                continue
            direction = name
            break
        if direction == "inbound":
            return direction, self.trunk_key(chan)
        if direction == "outbound":
            return direction, self.trunk_key(dst)
        return direction, None

    def trunk_key(self, prefix: str) -> str:
        """The name a trunk is counted under, or ``other`` when it is not a known trunk."""
        tech, name = trunk_name(prefix)
        if tech in _NOT_TRUNK_TECH or self._trunk_re.fullmatch(name) is None:
            return OTHER
        if self._trunks and name not in self._trunks:
            return OTHER
        if name == OTHER:
            return OTHER
        return name
