"""How the NOC's tools reach the broker: one set of options, one way to connect.

The NOC is a client like any box: it has its own certificate (CN ``noc``, which
the broker's ACL lets read ``pbx/#`` and write ``pbx/+/cmd``), pins the vendor
CA and checks the broker's host name, with the same context as the agent.
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
from paho.mqtt.client import MQTT_LOG_ERR

from agent.errors import UplinkError
from agent.uplink.tls import TLSFailure, check_material, classify_tls_error, client_context


@dataclass(frozen=True, kw_only=True)
class NocSettings:
    """Where the broker is and which certificate the NOC presents."""

    host: str
    port: int = 8883
    ca_file: Path
    cert_file: Path
    key_file: Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the connection options shared by the NOC tools."""
    p.add_argument("--broker", default="mqtts://localhost:8883", help="mqtts://HOST[:PORT]")
    p.add_argument("--ca", type=Path, required=True, help="the vendor CA file (pinned)")
    p.add_argument("--cert", type=Path, required=True, help="the NOC's client certificate")
    p.add_argument("--key", type=Path, required=True, help="the NOC's private key (mode 0600)")


def settings_from(args: argparse.Namespace) -> NocSettings:
    """Build settings from parsed arguments; SystemExit with a message when the URL is bad."""
    url = urlsplit(args.broker)
    if url.scheme != "mqtts" or not url.hostname:
        raise SystemExit(f"--broker {args.broker!r}: expected mqtts://HOST[:PORT]")
    return NocSettings(
        host=url.hostname,
        port=url.port or 8883,
        ca_file=args.ca,
        cert_file=args.cert,
        key_file=args.key,
    )


async def connect(settings: NocSettings, *, identifier: str) -> aiomqtt.Client:
    """A connected MQTT 5 client for the NOC; the caller must ``__aexit__`` it.

    Raises :class:`agent.errors.UplinkError` (or TLSMaterialError) with a
    message that says what is wrong, as the agent would.
    """
    check_material(settings.ca_file, settings.cert_file, settings.key_file)
    ctx = client_context(settings.ca_file, settings.cert_file, settings.key_file)
    client = aiomqtt.Client(
        settings.host,
        settings.port,
        tls_context=ctx,
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V5,
        max_queued_incoming_messages=100_000,
    )
    await connect_client(
        client, host=settings.host, ca_file=settings.ca_file, cert_file=settings.cert_file
    )
    return client


async def _cancel(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and wait for it, so that nothing is left pending or unretrieved."""
    task.cancel()
    # wait() does not raise, so a cancellation of our own caller still propagates.
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # mark it retrieved: the failure is reported by our caller


async def connect_client(
    client: aiomqtt.Client,
    *,
    host: str,
    ca_file: Path | None = None,
    cert_file: Path | None = None,
    connect_timeout: float = 10.0,
) -> None:
    """Enter ``client`` (connect and wait for CONNACK), failing fast and clearly.

    Under TLS 1.3 a broker that refuses our client certificate says so after the
    handshake has completed on our side: paho notices on its first read, logs
    the alert and drops the connection, but aiomqtt only fails its CONNACK wait
    when its own time-out (10 s by default) runs out, with "Operation timed out".
    Here a drop before CONNACK ends the wait at once, and the alert paho logged
    is classified (:func:`classify_tls_error`).

    Raises :class:`BrokerRefused` when the broker refused us, :class:`UplinkError`
    otherwise. After a failure the client must not be reused: make a new one
    for the next attempt (aiomqtt keeps its re-entrancy lock held).
    """
    paho = client._client  # aiomqtt exposes no public hook for these two paho callbacks
    loop = asyncio.get_running_loop()
    dropped: asyncio.Future[str] = loop.create_future()
    last_error: list[str] = []
    aiomqtt_on_disconnect = paho.on_disconnect

    def on_log(_c: object, _u: object, level: int, buf: str) -> None:
        if level == MQTT_LOG_ERR:
            last_error.append(buf)

    def resolve(reason: str) -> None:
        if not dropped.done():
            dropped.set_result(reason)

    def on_disconnect(*args: Any) -> None:
        # Usually on the loop's thread (aiomqtt drives paho from loop callbacks), but
        # paho may call it from the executor thread that runs connect(): hop safely.
        reason = last_error[-1] if last_error else "connection closed by broker"
        loop.call_soon_threadsafe(resolve, reason)
        if aiomqtt_on_disconnect is not None:
            aiomqtt_on_disconnect(*args)

    paho.on_log = on_log
    paho.on_disconnect = on_disconnect
    enter: asyncio.Future[Any] = asyncio.ensure_future(client.__aenter__())
    waiters: set[asyncio.Future[Any]] = {enter, dropped}
    try:
        async with asyncio.timeout(connect_timeout):
            done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    except TimeoutError:
        await _cancel(enter)
        raise UplinkError(
            f"no answer (CONNACK) from the broker {host!r} within {connect_timeout:g}s"
        ) from None
    finally:
        paho.on_disconnect = aiomqtt_on_disconnect
        paho.on_log = None
    if enter in done:
        try:
            enter.result()
        except aiomqtt.MqttError as exc:
            raise classify_tls_error(
                exc, host=host, ca_file=ca_file, cert_file=cert_file
            ).error() from exc
        return
    await _cancel(enter)
    reason = dropped.result()
    failure = classify_tls_error(reason, host=host, ca_file=ca_file, cert_file=cert_file)
    if failure.kind == "other":
        # Dropped after a completed handshake but before CONNACK, with no TLS alert
        # seen: mosquitto does that to clients it will not admit.
        failure = TLSFailure(
            "client_refused",
            f"the broker {host!r} closed the connection before accepting it: it most likely "
            f"refused this box's client certificate ({reason})",
        )
    raise failure.error()
