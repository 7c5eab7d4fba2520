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

from agent.collectors.callstats.cdr import DISPOSITIONS
from agent.collectors.callstats.settings import CallstatsSettings

OTHER: Final = "other"
#: What a call is counted under in a bucket: (direction, trunk key, disposition, hour).
Combo = tuple[str, "str | None", str, str]
_KNOWN: Final = frozenset(DISPOSITIONS)
_HOURS: Final = frozenset(f"{h:02d}" for h in range(24))
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


class Route:
    """Where a call went (direction, and trunk key or None), with the counter keys it makes.

    Routes are shared by every call that went the same way, so the hot loop finds a
    row's bucket key as ``route.keys[disposition][hour]`` instead of building a tuple
    per row (that was a tenth of the loop's time).
    """

    __slots__ = ("direction", "keys", "trunk")

    def __init__(self, direction: str, trunk: str | None) -> None:
        self.direction = direction
        self.trunk = trunk
        #: disposition → hour → key; only known dispositions and real hours are kept.
        self.keys: dict[str, dict[str, Combo]] = {}

    def key(self, disposition: str, hour: str) -> Combo:
        """The bucket key of a call; a disposition Asterisk does not write counts as OTHER."""
        if disposition not in _KNOWN:
            return (self.direction, self.trunk, OTHER, hour)
        by_hour = self.keys.get(disposition)
        if by_hour is None:
            by_hour = self.keys[disposition] = {}
        k = by_hour.get(hour)
        if k is None:
            k = (self.direction, self.trunk, disposition, hour)
            if hour in _HOURS:
                by_hour[hour] = k
        return k


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
        #: (dcontext, channel prefix, dstchannel prefix) → its route.
        self.cache: dict[tuple[str, str, str], Route] = {}
        self._routes: dict[tuple[str, str | None], Route] = {}

    def classify(self, dcontext: str, channel: str, dstchannel: str) -> tuple[str, str | None]:
        """Direction and trunk key (a trunk name, ``other``, or None for internal calls)."""
        r = self.route(dcontext, channel, dstchannel)
        return r.direction, r.trunk

    def route(self, dcontext: str, channel: str, dstchannel: str) -> Route:
        """The :class:`Route` of a call (cached by context and channel prefixes)."""
        key = (
            dcontext,
            channel.rpartition("-")[0] or channel,
            dstchannel.rpartition("-")[0] or dstchannel,
        )
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        decided = self._decide(*key)
        if len(self.cache) >= _CACHE_MAX:
            self.cache.clear()
            self._routes.clear()
        r = self._routes.get(decided)
        if r is None:
            r = self._routes[decided] = Route(*decided)
        self.cache[key] = r
        return r

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
