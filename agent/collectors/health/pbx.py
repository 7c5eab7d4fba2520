"""Asterisk's own state, asked over AMI and reduced to counts and configuration names.

Every AMI reply this module reads is full of people: channels carry caller IDs
and connected-line names, contacts carry the phone's address and user agent,
registrations carry the account (often a phone number) in their URIs, and
``PJSIPShowRegistrationsOutbound`` even sends each registration's auth with its
password. None of it is kept: each reducer below picks the few fields it counts
by (a state, a number) and the names that are configuration (a trunk, a queue),
and the raw replies are dropped when it returns. What leaves is:

- ``asterisk``: running, version, uptime, seconds since the last reload
  (``CoreStatus``, ``CoreSettings``);
- ``calls``: calls and channels up now, counted from ``CoreShowChannels``, and
  calls processed since start;
- ``trunks``: per trunk name (decided as the call-statistics collector decides
  them: :class:`agent.collectors.callstats.directions.Classifier`), outbound
  registration states, contact reachability and qualify round trip, channels
  up; names the rules do not accept are summed under ``other``;
- ``endpoints``: how many are registered, unregistered, unavailable; never which;
- ``queues``: per queue, members logged in and available, callers waiting, the
  longest wait (``QueueSummary``).

A reply Asterisk refuses (``Permission denied``: the manager account lacks a
write class) or does not know (the module is not loaded: chan_sip on a modern
box) leaves its part out and says so under ``sections``; only a connection that
fails makes the whole section ``unreachable``.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Final

from agent.collectors.callstats.directions import OTHER, Classifier, channel_prefix, trunk_name
from agent.collectors.callstats.settings import CallstatsSettings
from agent.collectors.health.ami import AmiClient, AmiError, Reply
from agent.collectors.health.settings import AmiSettings

#: Queue names are configuration, but only plain ones are sent; others count as ``other``.
QUEUE_NAME: Final = re.compile(r"[A-Za-z0-9_.+-]{1,64}")
MAX_NAMED: Final = 200  # trunks or queues named in one record; the rest go to ``other``
_UNKNOWN_COMMAND: Final = "Invalid/unknown command"
#: An empty list is an error reply for these (res_pjsip: "No Contacts found", ...).
_EMPTY_LIST: Final = ("No endpoints found", "No Contacts found")


class PbxState(StrEnum):
    """The ``pbx.state`` of a health record."""

    OK = "ok"  # every question answered
    PARTIAL = "partial"  # connected, but some questions refused or failed (see ``sections``)
    UNREACHABLE = "unreachable"  # no connection: ``reason`` says why
    NOT_CONFIGURED = "not_configured"  # no collectors.health.pbx.ami: processes only


class Section(StrEnum):
    """Why one question's figures are missing."""

    DENIED = "denied"  # the manager account lacks the write class for it
    NOT_LOADED = "not_loaded"  # Asterisk does not know the action (its module is not loaded)
    ERROR = "error"  # Asterisk answered with an error


@dataclass(slots=True)
class _Trunk:
    registrations: Counter[str]
    contacts: Counter[str]
    rtt_us: int | None = None
    channels: int = 0

    def body(self) -> dict[str, Any]:
        down = any(k != "registered" for k in self.registrations) or (
            bool(self.contacts) and not self.contacts.get("reachable")
        )
        known = bool(self.registrations) or bool(self.contacts)
        return {
            "state": "down" if down else "up" if known else "unknown",
            "registrations": dict(sorted(self.registrations.items())),
            "contacts": dict(sorted(self.contacts.items())),
            "rtt_ms": round(self.rtt_us / 1000, 1) if self.rtt_us is not None else None,
            "channels": self.channels,
        }


def slug(value: str) -> str:
    """``Auth. Sent`` → ``auth_sent``: a state word as a stable key."""
    return re.sub(r"[^a-z0-9]+", "_", value.lower()).strip("_")[:32] or "unknown"


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _local_epoch(date: str | None, clock: str | None) -> float | None:
    """``CoreStartupDate``/``Time`` (the box's local time, as Asterisk prints it) → epoch."""
    if not date or not clock:
        return None
    try:
        return datetime.strptime(f"{date} {clock}", "%Y-%m-%d %H:%M:%S").timestamp()
    except ValueError:
        return None


def asterisk_figures(status: Reply, settings: Reply | None, now: float) -> dict[str, Any]:
    """Running, version, uptime, seconds since reload, from ``CoreStatus``/``CoreSettings``."""
    r = status.response
    started = _local_epoch(r.get("CoreStartupDate"), r.get("CoreStartupTime"))
    reloaded = _local_epoch(r.get("CoreReloadDate"), r.get("CoreReloadTime"))
    version = settings.response.get("AsteriskVersion") if settings and settings.ok else None
    return {
        "running": True,
        "version": version[:64] if version else None,
        "uptime": max(int(now - started), 0) if started else None,
        "since_reload": max(int(now - reloaded), 0) if reloaded else None,
        "started_at": int(started) if started else None,
    }


def call_figures(status: Reply, channels: Reply | None) -> dict[str, Any]:
    """Calls and channels up now (counted, never listed) and calls processed since start."""
    out: dict[str, Any] = {"processed": _int(status.response.get("CoreProcessedCalls"))}
    if channels is None:
        return out
    up = 0
    calls: set[str] = set()
    calls_up: set[str] = set()
    for ev in channels.events:
        linked = ev.get("Linkedid") or ev.get("Uniqueid") or ""
        calls.add(linked)
        if ev.get("ChannelStateDesc") == "Up":
            up += 1
            calls_up.add(linked)
    out.update(
        calls=len(calls), calls_up=len(calls_up), channels=len(channels.events), channels_up=up
    )
    return out


class TrunkRules:
    """Which names are trunks: configuration, decided as for call statistics.

    A PJSIP endpoint is a trunk candidate when it has an outbound registration,
    outbound auth, or no inbound auth (a provider matched by address); a phone
    authenticates inbound and sends no auth of its own. A candidate is named
    only when :meth:`Classifier.trunk_key` names it (the explicit ``trunks`` list,
    else ``trunk_pattern``: ``1001`` is a person's extension and never named);
    all other candidates are summed under ``other``.
    """

    def __init__(self, settings: CallstatsSettings) -> None:
        self._classifier = Classifier(settings)
        self._explicit = frozenset(settings.trunks)

    def key(self, tech: str, name: str) -> str:
        """The name ``tech/name`` is reported under: itself or ``other``."""
        return self._classifier.trunk_key(f"{tech}/{name}")

    def candidates(self, registrations: Reply | None, endpoints: Reply | None) -> set[str]:
        """PJSIP endpoint names that are trunks by their configuration."""
        names = set(self._explicit)
        if registrations is not None:
            for ev in registrations.events:
                if ev.get("Event") == "OutboundRegistrationDetail":
                    names.add(ev.get("Endpoint") or ev.get("ObjectName", ""))
        if endpoints is not None:
            for ev in endpoints.events:
                if ev.get("Event") != "EndpointList":
                    continue
                if ev.get("OutboundAuths", "").strip() or not ev.get("Auths", "").strip():
                    names.add(ev.get("ObjectName", ""))
        names.discard("")
        return names


def trunk_figures(
    rules: TrunkRules,
    candidates: set[str],
    registrations: Reply | None,
    sip_registry: Reply | None,
    contacts: Reply | None,
    channels: Reply | None,
) -> dict[str, Any]:
    """Per trunk name: registration states, contact reachability and RTT, channels up."""
    trunks: dict[str, _Trunk] = {}

    def entry(tech: str, name: str) -> _Trunk:
        key = rules.key(tech, name)
        if key != OTHER and key not in trunks and len(trunks) >= MAX_NAMED:
            key = OTHER
        t = trunks.get(key)
        if t is None:
            t = trunks[key] = _Trunk(Counter(), Counter())
        return t

    if registrations is not None:
        for ev in registrations.events:
            if ev.get("Event") != "OutboundRegistrationDetail":
                continue  # AuthDetail events (with passwords) are not even looked at
            name = ev.get("Endpoint") or ev.get("ObjectName", "")
            entry("pjsip", name).registrations[slug(ev.get("Status", "unknown"))] += 1
    if sip_registry is not None:
        for ev in sip_registry.events:
            if ev.get("Event") != "RegistryEntry":
                continue
            # chan_sip names no peer here: the provider's host is the only configuration name.
            host = ev.get("Host", "")
            entry("sip", host).registrations[slug(ev.get("State", "unknown"))] += 1
    if contacts is not None:
        for ev in contacts.events:
            if ev.get("Event") != "ContactList":
                continue
            name = ev.get("Endpoint") or ev.get("ObjectName", "").split(";@", 1)[0]
            if name not in candidates:
                continue  # a phone's contact: endpoint counts cover it
            t = entry("pjsip", name)
            t.contacts[slug(ev.get("Status", "unknown"))] += 1
            rtt = _int(ev.get("RoundtripUsec"))
            if rtt is not None and (t.rtt_us is None or rtt > t.rtt_us):
                t.rtt_us = rtt  # the slowest reachable contact is the trunk's
    if channels is not None:
        for ev in channels.events:
            tech, name = trunk_name(channel_prefix(ev.get("Channel", "")))
            if tech == "pjsip":
                if name in candidates:  # else a phone's channel: in the totals only
                    entry(tech, name).channels += 1
            elif (key := rules.key(tech, name)) != OTHER and key in trunks:
                trunks[key].channels += 1
    return {name: t.body() for name, t in sorted(trunks.items())}


def endpoint_figures(endpoints: Reply, trunks: set[str]) -> dict[str, int]:
    """How many phones are registered, unregistered, unavailable: counts, never names."""
    counts = Counter({"registered": 0, "unregistered": 0, "unavailable": 0})
    for ev in endpoints.events:
        if ev.get("Event") != "EndpointList" or ev.get("ObjectName") in trunks:
            continue
        has_contact = any(c.strip(" ,") for c in ev.get("Contacts", "").split("\n"))
        state = ev.get("DeviceState", "")
        if not has_contact:
            counts["unregistered"] += 1
        elif state in ("Unavailable", "Invalid"):
            counts["unavailable"] += 1
        else:
            counts["registered"] += 1
    return {"total": sum(counts.values()), **counts}


def queue_figures(summary: Reply) -> dict[str, dict[str, int]]:
    """Per queue: members logged in and available, callers waiting, the longest wait (s)."""
    queues: dict[str, dict[str, int]] = {}
    for ev in summary.events:
        if ev.get("Event") != "QueueSummary":
            continue
        name = ev.get("Queue", "")
        if QUEUE_NAME.fullmatch(name) is None or (name not in queues and len(queues) >= MAX_NAMED):
            name = OTHER
        q = queues.setdefault(
            name, {"logged_in": 0, "available": 0, "callers": 0, "longest_wait": 0}
        )
        q["logged_in"] += _int(ev.get("LoggedIn")) or 0
        q["available"] += _int(ev.get("Available")) or 0
        q["callers"] += _int(ev.get("Callers")) or 0
        q["longest_wait"] = max(q["longest_wait"], _int(ev.get("LongestHoldTime")) or 0)
    return dict(sorted(queues.items()))


class PbxProbe:
    """Asks Asterisk the questions of one health record over one long-lived AMI connection."""

    def __init__(
        self,
        settings: AmiSettings,
        trunk_rules: CallstatsSettings,
        *,
        client: AmiClient | None = None,
    ) -> None:
        self.client = client or AmiClient(settings)
        self.rules = TrunkRules(trunk_rules)
        #: Actions this connection does not know (module not loaded); asked again after a
        #: reconnect, since Asterisk may have come back with other modules.
        self._unknown: set[str] = set()
        self._connects = -1
        self.last: dict[str, Any] | None = None

    async def gather(self, now: float | None = None) -> dict[str, Any]:
        """The AMI part of ``pbx``: figures, or ``unreachable`` and why. Never raises AmiError."""
        sections: dict[str, str] = {}
        try:
            status = await self.client.action("CoreStatus")
            if self.client.connects != self._connects:
                self._connects = self.client.connects
                self._unknown.clear()
            if not status.ok:
                sections["CoreStatus"] = self._why(status)
            settings = await self._ask("CoreSettings", sections, is_list=False)
            channels = await self._ask("CoreShowChannels", sections)
            registrations = await self._ask("PJSIPShowRegistrationsOutbound", sections)
            endpoints = await self._ask("PJSIPShowEndpoints", sections)
            contacts = await self._ask("PJSIPShowContacts", sections)
            sip_registry = await self._ask("SIPshowregistry", sections)
            queues = await self._ask("QueueSummary", sections)
        except AmiError as exc:
            out: dict[str, Any] = {
                "state": PbxState.UNREACHABLE.value,
                "reason": exc.fault.value,
                "detail": exc.detail,
                "retry_in": exc.retry_in,
            }
            self.last = out
            return out
        now = time.time() if now is None else now
        candidates = self.rules.candidates(registrations, endpoints)
        out = {
            "state": (PbxState.PARTIAL if _problems(sections) else PbxState.OK).value,
            "reason": None,
            "asterisk": asterisk_figures(status, settings, now) if status.ok else None,
            "calls": call_figures(status, channels) if status.ok else None,
            "trunks": trunk_figures(
                self.rules, candidates, registrations, sip_registry, contacts, channels
            ),
            "endpoints": endpoint_figures(endpoints, candidates) if endpoints is not None else None,
            "queues": queue_figures(queues) if queues is not None else None,
            "sections": dict(sorted(sections.items())),
        }
        self.last = out
        return out

    async def _ask(
        self, name: str, sections: dict[str, str], *, is_list: bool = True
    ) -> Reply | None:
        """One question; None (and why, in ``sections``) when Asterisk would not answer it."""
        if name in self._unknown:
            sections[name] = Section.NOT_LOADED.value
            return None
        reply = await (self.client.list(name) if is_list else self.client.action(name))
        if reply.ok and (not is_list or reply.complete is not None):
            return reply
        if any(reply.message.startswith(m) for m in _EMPTY_LIST):
            return Reply(reply.response, [], reply.response)
        why = self._why(reply)
        if why == Section.NOT_LOADED.value:
            self._unknown.add(name)
        sections[name] = why
        return None

    @staticmethod
    def _why(reply: Reply) -> str:
        message = reply.message
        if message.startswith("Permission denied"):
            return Section.DENIED.value
        if message.startswith(_UNKNOWN_COMMAND):
            return Section.NOT_LOADED.value
        return Section.ERROR.value

    def status(self) -> dict[str, Any]:
        """The connection's state and the last figures' headline, for ``agentctl status``."""
        return {"ami": self.client.status(), **summary(self.last)}

    async def aclose(self) -> None:
        """Log off and close the connection."""
        await self.client.aclose()


def _problems(sections: dict[str, str]) -> bool:
    """A module that is not loaded is how the box is, not a problem."""
    return any(v != Section.NOT_LOADED.value for v in sections.values())


def summary(pbx: dict[str, Any] | None) -> dict[str, Any]:
    """The headline of a ``pbx`` section: what ``agentctl status`` prints."""
    if pbx is None:
        return {}
    out: dict[str, Any] = {"state": pbx.get("state"), "reason": pbx.get("reason")}
    if pbx.get("detail"):
        out["detail"] = pbx["detail"]
    ast = pbx.get("asterisk") or {}
    calls = pbx.get("calls") or {}
    trunks = pbx.get("trunks") or {}
    out.update(
        version=ast.get("version"),
        uptime=ast.get("uptime"),
        since_reload=ast.get("since_reload"),
        calls_up=calls.get("calls_up"),
        channels=calls.get("channels"),
        trunks_down=sorted(n for n, t in trunks.items() if t.get("state") == "down"),
        trunks_up=sum(1 for t in trunks.values() if t.get("state") == "up"),
        endpoints=pbx.get("endpoints"),
        queues=len(pbx.get("queues") or {}),
        sections=pbx.get("sections") or {},
    )
    return out
