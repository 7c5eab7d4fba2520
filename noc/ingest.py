"""``noc ingest``: one worker of the shared subscription that takes the fleet into PostgreSQL.

Each worker holds an MQTT 5 session of its own (client id ``noc-ingest-NAME``,
``clean_start`` false, a session expiry of days) subscribed to
``$share/GROUP/pbx/+/up/#``, ``$share/GROUP/pbx/+/status`` and
``$share/GROUP/pbx/+/reply``: the broker hands each message to one worker of
the group, so N workers split the traffic, and while a worker is away the
broker keeps its share queued for it.

A message is acknowledged (PUBACK) only after the transaction that stored it
committed (paho's ``manual_ack``). Messages are taken in batches (one
transaction each) and acknowledged in the order they arrived, as MQTT asks. A
worker killed between commit and PUBACK gets the message again: the database
de-duplicates it. PUBACKs are sent only on the connection that delivered the
message: after a reconnect, paho's packet ids belong to the new connection,
and the broker sends again what was not acknowledged.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
import psycopg
import structlog
from paho.mqtt.subscribeoptions import SubscribeOptions
from psycopg_pool import ConnectionPool

from noc import db, mqtt
from noc.config import NocConfig
from noc.store import Outcome, Rejected, handle

log = structlog.get_logger(__name__)

FLEET_TOPICS = ("pbx/+/up/#", "pbx/+/status", "pbx/+/reply")
REJECT_KEEP = 64 * 1024  # bytes of a rejected payload kept for a person to look at


def shared_topics(group: str) -> list[str]:
    """The worker's subscriptions: the fleet's topics, shared by ``group``."""
    return [f"$share/{group}/{t}" for t in FLEET_TOPICS]


@dataclass(frozen=True, slots=True)
class Incoming:
    """One message as paho handed it over, with the connection it came on."""

    generation: int
    mid: int
    qos: int
    topic: str
    payload: bytes
    retained: bool


@dataclass
class Counters:
    """What a worker has done since it started."""

    stored: int = 0
    duplicates: int = 0
    statuses: int = 0
    replies: int = 0
    rejected: int = 0
    batches: int = 0
    acked: int = 0
    retries: int = 0
    last_commit: float = 0.0
    by_outcome: dict[str, int] = field(default_factory=dict)


class Worker:
    """Subscribe, store in batches, acknowledge after commit; ``stop()`` ends it cleanly."""

    def __init__(self, config: NocConfig, *, name: str = "1", pool: ConnectionPool | None = None):
        self.config = config
        self.name = name
        self.client_id = f"noc-ingest-{name}"
        self.counters = Counters()
        self._queue: queue.Queue[Incoming] = queue.Queue()
        self._generation = 0
        self._gen_lock = threading.Lock()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._own_pool = pool is None
        self._pool = pool
        self._client: paho.Client | None = None

    # -- paho's thread ---------------------------------------------------------------------

    def _on_connect(self, c: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if getattr(rc, "is_failure", False):
            log.error("ingest_refused", worker=self.name, reason=str(rc))
            return
        with self._gen_lock:
            self._generation += 1
        opts = SubscribeOptions(qos=1)
        c.subscribe([(t, opts) for t in shared_topics(self.config.broker.share_group)])
        self._connected.set()
        log.info(
            "ingest_connected",
            worker=self.name,
            session_present=bool(getattr(flags, "session_present", False)),
        )

    def _on_disconnect(self, c: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self._connected.clear()
        with self._gen_lock:
            self._generation += 1  # what is still queued belongs to a closed connection
        if not self._stop.is_set():
            log.warning("ingest_disconnected", worker=self.name, reason=str(rc))

    def _on_message(self, c: paho.Client, userdata: Any, m: paho.MQTTMessage) -> None:
        self._queue.put(
            Incoming(self._generation, m.mid, m.qos, m.topic, bytes(m.payload), bool(m.retain))
        )

    # -- the worker's thread ---------------------------------------------------------------

    def start(self) -> None:
        """Connect (BrokerError if the broker refuses) and begin receiving."""
        if self._pool is None:
            self._pool = db.pool(self.config.database, min_size=1, max_size=1, name=self.client_id)
        b = self.config.broker
        c = mqtt.client(b, client_id=self.client_id, manual_ack=True)
        c.on_message = self._on_message
        c.on_disconnect = self._on_disconnect
        c.on_connect = self._on_connect
        self._client = c
        mqtt.connect_blocking(
            c,
            b,
            clean_start=False,
            properties=mqtt.connect_properties(
                session_expiry=b.session_expiry,
                receive_maximum=self.config.ingest.receive_maximum,
            ),
        )

    def run(self) -> None:
        """Store and acknowledge until :meth:`stop`; then disconnect, keeping the session."""
        assert self._client is not None and self._pool is not None
        try:
            while not self._stop.is_set():
                batch = self._take()
                if batch:
                    self._store(batch)
        finally:
            self._client.disconnect()
            self._client.loop_stop()
            if self._own_pool:
                self._pool.close()

    def stop(self) -> None:
        """Finish the batch in hand (commit and acknowledge), then end :meth:`run`."""
        self._stop.set()

    def wait_connected(self, timeout: float) -> bool:
        """Whether the worker is connected (waiting up to ``timeout``)."""
        return self._connected.wait(timeout)

    def _take(self) -> list[Incoming]:
        try:
            first = self._queue.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        limit = self.config.ingest.batch
        while len(batch) < limit:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        current = self._generation
        # Delivered on a connection that has closed: the broker sends them again.
        return [m for m in batch if m.generation == current]

    def _store(self, batch: list[Incoming]) -> None:
        assert self._pool is not None and self._client is not None
        # Rows are locked in device order in every worker: two batches never deadlock.
        ordered = sorted(batch, key=lambda m: m.topic.split("/", 2)[1])
        delay = 0.2
        while True:
            try:
                outcomes = self._transaction(ordered, careful=False)
                break
            except _Careful:
                outcomes = self._transaction(ordered, careful=True)
                break
            except psycopg.OperationalError as exc:
                # The database is away: nothing is acknowledged, the batch waits for it.
                self.counters.retries += 1
                log.error("ingest_store_unavailable", worker=self.name, error=str(exc))
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, 5.0)
        self.counters.batches += 1
        self.counters.last_commit = time.time()
        for o in outcomes:
            self.counters.by_outcome[o] = self.counters.by_outcome.get(o, 0) + 1
        self.counters.stored += outcomes.count(Outcome.STORED)
        self.counters.duplicates += outcomes.count(Outcome.DUPLICATE)
        self.counters.statuses += outcomes.count(Outcome.STATUS)
        self.counters.replies += outcomes.count(Outcome.REPLY)
        self.counters.rejected += outcomes.count("rejected")
        current = self._generation
        for m in batch:  # arrival order
            if m.qos and m.generation == current:
                self._client.ack(m.mid, m.qos)
                self.counters.acked += 1

    def _transaction(self, batch: list[Incoming], *, careful: bool) -> list[str]:
        assert self._pool is not None
        outcomes: list[str] = []
        with self._pool.connection() as conn:
            try:
                with conn.transaction():
                    for m in batch:
                        if not careful:
                            try:
                                outcomes.append(handle(conn, m.topic, m.payload, retained=m.retained))
                            except (Rejected, psycopg.DataError, psycopg.IntegrityError) as exc:
                                raise _Careful from exc
                            continue
                        try:
                            with conn.transaction():  # a savepoint per message
                                outcomes.append(handle(conn, m.topic, m.payload, retained=m.retained))
                        except (Rejected, psycopg.DataError, psycopg.IntegrityError) as exc:
                            _reject(conn, m, str(exc))
                            outcomes.append("rejected")
            except psycopg.OperationalError:
                raise
        return outcomes


class _Careful(Exception):
    """A message in the batch failed: do it again one savepoint per message."""


def _reject(conn: psycopg.Connection[Any], m: Incoming, reason: str) -> None:
    log.warning("ingest_rejected", topic=m.topic[:200], reason=reason[:300])
    conn.execute(
        "INSERT INTO rejects (topic, reason, payload) VALUES (%s, %s, %s)",
        (m.topic[:1000], reason[:2000], m.payload[:REJECT_KEEP]),
    )


def serve(config: NocConfig, *, name: str) -> int:
    """Run one worker until SIGTERM/SIGINT (the ``noc ingest`` command)."""
    import signal

    worker = Worker(config, name=name)
    worker.start()

    def stop(signum: int, frame: Any) -> None:
        worker.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("ingest_started", worker=name, broker=config.broker.url)
    worker.run()
    c = worker.counters
    log.info("ingest_stopped", worker=name, stored=c.stored, duplicates=c.duplicates)
    return 0
