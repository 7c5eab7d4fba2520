"""MQTT client helpers for tests: QoS 1 publishes that report their PUBACK reason code.

Why it exists: aiomqtt 2.5's ``publish()`` returns normally whatever the PUBACK
says (its ``on_publish`` callback drops the reason code), yet under MQTT 5 an
ACL denial is only visible there (135, not authorized). :class:`AckTracker`
publishes through the paho client inside aiomqtt and resolves one future per
publish with the reason code, which also lets many publishes be in flight at
once without one task each.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any, cast

import aiomqtt
import paho.mqtt.client as paho_mqtt
from paho.mqtt.reasoncodes import ReasonCode

from tests.support.pki import PKI, Creds


class AckTracker:
    """Publish QoS 1 messages on an entered aiomqtt client; each returns a future of its PUBACK.

    Everything runs on the event loop's thread (aiomqtt drives paho from loop
    callbacks), so a PUBACK cannot be handled between ``publish()`` and the
    registration of its future.
    """

    def __init__(self, client: aiomqtt.Client) -> None:
        self._paho = client._client  # aiomqtt has no public way to see PUBACK reason codes
        self._loop = asyncio.get_running_loop()
        self._waiting: dict[int, asyncio.Future[ReasonCode]] = {}
        # aiomqtt registers a version-2 callback; paho types it as either version.
        self._aiomqtt_on_publish = cast(
            "paho_mqtt.CallbackOnPublish_v2 | None", self._paho.on_publish
        )
        self._paho.on_publish = self._on_publish

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: ReasonCode, props: Any) -> None:
        fut = self._waiting.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(rc)
        if self._aiomqtt_on_publish is not None:
            self._aiomqtt_on_publish(client, userdata, mid, rc, props)

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False
    ) -> asyncio.Future[ReasonCode]:
        """Queue one QoS 1 publish; the future resolves with the PUBACK's reason code."""
        info = self._paho.publish(topic, payload, qos=1, retain=retain)
        if info.rc != paho_mqtt.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
        fut: asyncio.Future[ReasonCode] = self._loop.create_future()
        self._waiting[info.mid] = fut
        return fut

    def fail_all(self, exc: BaseException) -> None:
        """Fail every publish still waiting (call when the connection is lost)."""
        waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(exc)


def context_for(
    pki: PKI, creds: Creds, *, max_version: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    """The device-style SSL context (pinned CA, host name checked) for ``creds``."""
    from agent.uplink.tls import client_context

    return client_context(pki.ca_file, creds.cert, creds.key, max_version=max_version)


def v5_client(
    host: str, port: int, ctx: ssl.SSLContext, *, identifier: str, **kwargs: Any
) -> aiomqtt.Client:
    """An aiomqtt client speaking MQTT 5 with ``ctx``; large in-flight window."""
    kwargs.setdefault("max_inflight_messages", 100)
    client = aiomqtt.Client(
        host,
        port,
        tls_context=ctx,
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V5,
        **kwargs,
    )
    client.pending_calls_threshold = 1_000_000  # many pending publishes are the point, not a leak
    return client
