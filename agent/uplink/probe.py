"""The way to the broker, one step at a time, for ``agentctl diagnose``.

DNS, then TCP, then TLS (the pinned CA, this box's certificate), then MQTT
CONNECT and CONNACK, each bounded by the connect timeout; the first that fails
is named with the reason and the steps after it are not tried. The MQTT step
goes through :class:`agent.uplink.mqtt.MqttLink`, the one MQTT boundary, with
a client id of its own (``DEVICE.diagnose``) so that a running daemon's
session is not taken over, and it disconnects at once: nothing is published.

The caller decides whether to probe at all: with the customer's switch off
nothing may connect to the vendor, and ``diagnose`` does not call this.
"""

from __future__ import annotations

import asyncio
import enum
import socket
import ssl
import time
from dataclasses import dataclass

from agent.errors import AgentError
from agent.sections import UplinkConfig


class Verdict(enum.StrEnum):
    """How one check came out."""

    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True, slots=True)
class Step:
    """One check: its name, its verdict and a sentence."""

    name: str
    verdict: Verdict
    detail: str


def _ms(t0: float) -> str:
    return f"{(time.monotonic() - t0) * 1000:.0f} ms"


async def probe(uplink: UplinkConfig, device_id: str) -> list[Step]:
    """DNS → TCP → TLS → MQTT CONNECT; stops at the first failure (the rest ``skip``)."""
    steps: list[Step] = []
    names = ("dns", "tcp", "tls", "mqtt")

    def rest(after: str) -> None:
        for name in names[names.index(after) + 1 :]:
            steps.append(Step(name, Verdict.SKIP, f"not tried: the {after} step failed"))

    host, port, limit = uplink.host, uplink.port, uplink.connect_timeout
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(limit):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else "no answer"
        steps.append(Step("dns", Verdict.FAIL, f"cannot resolve {host!r}: {reason}"))
        rest("dns")
        return steps
    addresses = sorted({str(info[4][0]) for info in infos})
    steps.append(Step("dns", Verdict.OK, f"{host} is {', '.join(addresses)} ({_ms(t0)})"))

    t0 = time.monotonic()
    try:
        async with asyncio.timeout(limit):
            _, writer = await asyncio.open_connection(host, port)
        writer.close()
        await writer.wait_closed()
    except (OSError, TimeoutError) as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
        steps.append(Step("tcp", Verdict.FAIL, f"cannot connect to {host}:{port}: {why}"))
        rest("tcp")
        return steps
    steps.append(Step("tcp", Verdict.OK, f"{host}:{port} accepts connections ({_ms(t0)})"))

    from agent.uplink.tls import classify_tls_error, client_context

    try:
        ctx = client_context(uplink.ca_file, uplink.cert_file, uplink.key_file)
    except AgentError as exc:
        steps.append(Step("tls", Verdict.FAIL, str(exc)))
        rest("tls")
        return steps
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(limit):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=ctx, server_hostname=host
            )
        tls: ssl.SSLObject | None = writer.get_extra_info("ssl_object")
        version = tls.version() if tls is not None else "?"
        cert = tls.getpeercert() if tls is not None else None
        # TLS 1.3 reports a refused client certificate only on the first read.
        try:
            async with asyncio.timeout(0.3):
                await reader.read(1)
        except TimeoutError:
            pass
        writer.close()
        try:
            await writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass
    except (OSError, ssl.SSLError, TimeoutError) as exc:
        text = "no handshake within the connect timeout" if isinstance(exc, TimeoutError) else exc
        failure = classify_tls_error(text, host=host, ca_file=uplink.ca_file)
        steps.append(Step("tls", Verdict.FAIL, failure.message))
        rest("tls")
        return steps
    expiry = f"; the broker's certificate is valid until {cert['notAfter']}" if cert else ""
    steps.append(Step("tls", Verdict.OK, f"{version} with the pinned CA{expiry} ({_ms(t0)})"))

    from agent.uplink.mqtt import LinkSettings, MqttLink

    t0 = time.monotonic()
    settings = LinkSettings(
        host=host, port=port, client_id=f"{device_id}.diagnose", connect_timeout=limit
    )
    link = MqttLink(settings, client_context(uplink.ca_file, uplink.cert_file, uplink.key_file))
    try:
        await link.connect()
    except AgentError as exc:
        steps.append(Step("mqtt", Verdict.FAIL, f"CONNECT: {exc}"))
        return steps
    try:
        await link.disconnect()
    except AgentError:
        link.close_now("diagnose done")
    steps.append(Step("mqtt", Verdict.OK, f"CONNACK: accepted as {device_id} ({_ms(t0)})"))
    return steps
