"""How the NOC's tools reach the broker: one set of options, one way to connect.

The NOC is a client like any box: it has its own certificate (CN ``noc``, which
the broker's ACL lets read ``pbx/#`` and write ``pbx/+/cmd``), pins the vendor
CA and checks the broker's host name, with the same context as the agent.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiomqtt

from agent.uplink.tls import check_material, client_context, connect_client


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
