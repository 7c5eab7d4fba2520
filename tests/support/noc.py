"""A NOC-side subscriber for tests: a real MQTT client, with the NOC's own certificate.

It runs its own event loop in a thread so that tests stay plain synchronous
functions that drive the daemon through agentctl while messages arrive.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from agent.errors import UplinkError
from agent.uplink.mqtt import LinkSettings, MqttLink
from agent.uplink.tls import client_context
from noc.wire import decode_body
from tests.support.mosquitto import Mosquitto
from tests.support.signing import signed_bytes


@dataclass
class Received:
    """One message as the NOC saw it."""

    topic: str
    payload: bytes
    retain: bool
    at: float = field(default_factory=time.time)

    def json(self) -> Any:
        """The payload parsed as JSON."""
        return json.loads(self.payload)


class NocListener:
    """Subscribes to ``pbx/#`` as the NOC and records what arrives; can send commands."""

    def __init__(self, broker: Mosquitto, topic: str = "pbx/#", *, persistent: bool = False):
        self.broker = broker
        self.topic = topic
        self.persistent = persistent
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._client: MqttLink | None = None
        self._subscribed = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> NocListener:
        self._thread.start()
        if not self._subscribed.wait(10):
            raise AssertionError("the NOC listener could not subscribe within 10 s")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        noc = self.broker.pki.device("noc")
        stopper = asyncio.ensure_future(self._stop.wait())
        while not self._stop.is_set():
            link = MqttLink(
                LinkSettings(
                    host=self.broker.host,
                    port=self.broker.port,
                    client_id="noc-test",
                    # A persistent session: the broker keeps what arrives while we are away.
                    clean_start=not self.persistent,
                    session_expiry=3600 if self.persistent else 0,
                ),
                client_context(self.broker.pki.ca_file, noc.cert, noc.key),
            )
            try:
                await link.connect()
                self._client = link
                await link.subscribe(self.topic, qos=1)
                self._subscribed.set()
                reader = asyncio.ensure_future(self._read(link))
                await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
                reader.cancel()
                await asyncio.wait({reader})
                if not reader.cancelled():
                    reader.exception()  # the link was lost: connect again below
            except UplinkError:
                pass
            finally:
                self._client = None
                await link.disconnect()
            if not self._stop.is_set():
                await asyncio.sleep(0.1)  # broker down in an outage test: try again
        stopper.cancel()

    async def _read(self, link: MqttLink) -> None:
        while True:
            m = await link.next_message()
            with self._lock:
                self.messages.append(Received(m.topic, m.payload, m.retain))

    def snapshot(self) -> list[Received]:
        """A copy of what arrived so far."""
        with self._lock:
            return list(self.messages)

    def envelopes(self, data_class: str | None = None) -> list[dict[str, Any]]:
        """Envelopes received on ``pbx/+/up/#``, parsed."""
        out = []
        for m in self.snapshot():
            if "/up/" in m.topic and (data_class is None or m.topic.endswith("/" + data_class)):
                env = m.json()
                # As the NOC reads it: a compressed body decoded (README, wire protocol).
                env["body"] = decode_body(env)
                out.append(env)
        return out

    def statuses(self, device: str) -> list[str]:
        """The status payloads received for ``device``, in order."""
        return [m.payload.decode() for m in self.snapshot() if m.topic == f"pbx/{device}/status"]

    def send(self, device: str, payload: bytes | dict[str, Any]) -> None:
        """Publish a command to ``pbx/<device>/cmd``: a dict signed as the NOC signs, bytes as
        they are."""
        data = payload if isinstance(payload, bytes) else signed_bytes(payload, device)

        async def pub() -> None:
            assert self._client is not None
            await self._client.publish_wait(f"pbx/{device}/cmd", data)

        asyncio.run_coroutine_threadsafe(pub(), self._loop).result(10)

    def replies(self, device: str) -> list[dict[str, Any]]:
        """Replies received from ``device``."""
        return [m.json() for m in self.snapshot() if m.topic == f"pbx/{device}/reply"]
