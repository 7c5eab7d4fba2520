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

import aiomqtt

from tests.support.mosquitto import Mosquitto
from tests.support.mqtt import context_for


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
        self._client: aiomqtt.Client | None = None
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
        ctx = context_for(self.broker.pki, self.broker.pki.device("noc"))
        kwargs: dict[str, Any] = {}
        if self.persistent:
            kwargs = {"clean_session": False, "protocol": aiomqtt.ProtocolVersion.V311}
        while not self._stop.is_set():
            try:
                async with aiomqtt.Client(
                    self.broker.host,
                    self.broker.port,
                    tls_context=ctx,
                    identifier="noc-test",
                    **kwargs,
                ) as client:
                    self._client = client
                    await client.subscribe(self.topic, qos=1)
                    self._subscribed.set()
                    reader = asyncio.ensure_future(self._read(client))
                    stopper = asyncio.ensure_future(self._stop.wait())
                    await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
                    reader.cancel()
                    stopper.cancel()
                    await asyncio.wait({reader, stopper})
                    if not reader.cancelled() and reader.exception() is not None:
                        raise reader.exception()  # type: ignore[misc]
            except aiomqtt.MqttError:
                self._client = None
                await asyncio.sleep(0.1)  # broker down in an outage test: try again

    async def _read(self, client: aiomqtt.Client) -> None:
        async for m in client.messages:
            payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
            with self._lock:
                self.messages.append(Received(str(m.topic), payload, bool(m.retain)))

    def snapshot(self) -> list[Received]:
        """A copy of what arrived so far."""
        with self._lock:
            return list(self.messages)

    def envelopes(self, data_class: str | None = None) -> list[dict[str, Any]]:
        """Envelopes received on ``pbx/+/up/#``, parsed."""
        out = []
        for m in self.snapshot():
            if "/up/" in m.topic and (data_class is None or m.topic.endswith("/" + data_class)):
                out.append(m.json())
        return out

    def statuses(self, device: str) -> list[str]:
        """The status payloads received for ``device``, in order."""
        return [m.payload.decode() for m in self.snapshot() if m.topic == f"pbx/{device}/status"]

    def send(self, device: str, payload: bytes | dict[str, Any]) -> None:
        """Publish a command to ``pbx/<device>/cmd``."""
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()

        async def pub() -> None:
            assert self._client is not None
            await self._client.publish(f"pbx/{device}/cmd", data, qos=1)

        asyncio.run_coroutine_threadsafe(pub(), self._loop).result(10)

    def replies(self, device: str) -> list[dict[str, Any]]:
        """Replies received from ``device``."""
        return [m.json() for m in self.snapshot() if m.topic == f"pbx/{device}/reply"]
