"""The NOC's own MQTT client: paho-mqtt 2.x over mutual TLS, MQTT 5.

Why paho directly: ingest acknowledges a message only after its database
transaction committed, which needs paho's ``manual_ack`` (aiomqtt has no
application-controlled acknowledgements). The NOC shares no code with the
agent: it builds its own TLS context (pinned vendor CA, host name checked, its
own client certificate) and translates paho's errors into :class:`BrokerError`.
"""

from __future__ import annotations

import json
import os
import ssl
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from noc.config import BrokerSettings
from noc.errors import BrokerError


def tls_context(ca_file: Path, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """TLS 1.2+ trusting only ``ca_file``, presenting the NOC's certificate.

    A key that group or others can read is refused, as ssh refuses one.
    """
    for p in (ca_file, cert_file, key_file):
        if not p.is_file():
            raise BrokerError(f"{p}: no such file")
    mode = key_file.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise BrokerError(f"{key_file}: readable by others (mode {mode & 0o777:04o}); chmod 600 it")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # checks the host name and the chain
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cafile=os.fspath(ca_file))
        ctx.load_cert_chain(os.fspath(cert_file), os.fspath(key_file))
    except (ssl.SSLError, OSError) as exc:
        raise BrokerError(f"{cert_file} / {key_file} / {ca_file}: unusable: {exc}") from exc
    return ctx


def client(
    settings: BrokerSettings,
    *,
    client_id: str,
    manual_ack: bool = False,
) -> paho.Client:
    """A configured (not yet connected) MQTT 5 client with the NOC's TLS context."""
    c = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv5,
        manual_ack=manual_ack,
    )
    c.tls_set_context(tls_context(settings.ca_file, settings.cert_file, settings.key_file))
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.suppress_exceptions = False
    c.disable_logger()
    c.reconnect_delay_set(min_delay=1, max_delay=30)
    return c


def connect_properties(*, session_expiry: float = 0, receive_maximum: int = 0) -> Properties:
    """CONNECT properties: how long the broker keeps our session; our receive window."""
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    if session_expiry:
        props.SessionExpiryInterval = int(session_expiry)
    if receive_maximum:
        props.ReceiveMaximum = receive_maximum
    return props


def connect_blocking(
    c: paho.Client,
    settings: BrokerSettings,
    *,
    clean_start: bool = True,
    properties: Properties | None = None,
    timeout: float = 10.0,
) -> None:
    """Connect and run paho's network thread; return once CONNACK says yes (BrokerError if not)."""
    done = threading.Event()
    outcome: dict[str, Any] = {}
    previous: Any = c.on_connect  # the caller's (version 2) callback, or None

    def on_connect(cl: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        outcome["rc"] = rc
        done.set()
        if previous is not None:
            previous(cl, userdata, flags, rc, props)

    # Kept for reconnects too: paho calls it from its thread, and it calls the caller's.
    c.on_connect = on_connect
    try:
        c.connect(
            settings.host,
            settings.port,
            keepalive=settings.keepalive,
            clean_start=clean_start,
            properties=properties,
        )
    except (OSError, ssl.SSLError) as exc:
        raise BrokerError(f"cannot reach the broker at {settings.url}: {exc}") from exc
    c.loop_start()
    if not done.wait(timeout):
        c.loop_stop()
        raise BrokerError(f"no CONNACK from {settings.url} within {timeout:g}s")
    rc = outcome["rc"]
    if getattr(rc, "is_failure", False):
        c.loop_stop()
        raise BrokerError(f"the broker at {settings.url} refused the NOC: {rc}")


class Answer:
    """The first JSON message on a listened topic that ``pick`` recognises as the answer."""

    def __init__(self, pick: Callable[[Any], dict[str, Any] | None]) -> None:
        self._pick = pick
        self._got = threading.Event()
        self.value: dict[str, Any] | None = None

    def offer(self, payload: bytes | bytearray) -> None:
        """A message arrived (paho's thread): keep it if it is the answer."""
        try:
            message = json.loads(payload)
        except ValueError:
            return  # not an answer to anything: not ours
        found = self._pick(message)
        if found is not None and not self._got.is_set():
            self.value = found
            self._got.set()

    def wait(self, timeout: float) -> dict[str, Any] | None:
        """The answer, or None when none came within ``timeout``."""
        return self.value if self._got.wait(timeout) else None


@contextmanager
def listening(
    settings: BrokerSettings,
    *,
    client_id: str,
    topic: str,
    pick: Callable[[Any], dict[str, Any] | None],
    confirm: float,
    unconfirmed: str,
) -> Iterator[tuple[paho.Client, Answer]]:
    """A connected client subscribed to ``topic`` (confirmed by SUBACK within ``confirm``
    seconds, else :class:`BrokerError` saying ``unconfirmed``), for a request whose answer
    comes back on that topic: subscribing first, a fast answer is never missed."""
    subscribed = threading.Event()
    answer = Answer(pick)

    def on_message(c: paho.Client, userdata: Any, m: paho.MQTTMessage) -> None:
        answer.offer(m.payload)

    def on_subscribe(c: paho.Client, userdata: Any, mid: int, rcs: Any, props: Any) -> None:
        subscribed.set()

    c = client(settings, client_id=client_id)
    c.on_message = on_message
    c.on_subscribe = on_subscribe
    connect_blocking(c, settings)
    try:
        c.subscribe(topic, qos=1)
        if not subscribed.wait(confirm):
            raise BrokerError(unconfirmed)
        yield c, answer
    finally:
        c.disconnect()
        c.loop_stop()
