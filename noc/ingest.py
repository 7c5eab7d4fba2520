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

mosquitto 2.0 persists sessions and plain subscriptions across its restart but
not shared subscriptions: until the workers have subscribed again, what the
fleet sends reaches no subscriber and is dropped (the boxes, having their
PUBACK, have deleted it). A worker started with ``--standby`` also holds a
second session, ``noc-ingest-NAME-standby``, with plain subscriptions to the
same topics: the broker keeps (and restores) a copy of everything for it. For
``standby_window`` seconds after each of its connections it stores what it
gets (duplicates cost one conflicting INSERT); the rest of the time it
acknowledges copies at once without touching the database.
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
from noc.store import Outcome, Rejected, handle, handle_batch

log = structlog.get_logger(__name__)

FLEET_TOPICS = ("pbx/+/up/#", "pbx/+/status", "pbx/+/reply")
REJECT_KEEP = 64 * 1024  # bytes of a rejected payload kept for a person to look at


def shared_topics(group: str) -> list[str]:
    """The worker's subscriptions: the fleet's topics, shared by ``group``."""
    return [f"$share/{group}/{t}" for t in FLEET_TOPICS]


@dataclass(frozen=True, slots=True)
class Incoming:
    """One message as paho handed it over, with the session and connection it came on."""

    session: _Session
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
    standby_acked: int = 0  # copies acknowledged without storing (outside the window)
    retries: int = 0
    last_commit: float = 0.0
    by_outcome: dict[str, int] = field(default_factory=dict)


class _Session:
    """One MQTT session of a worker: its client, and a count of its connections."""

    def __init__(self, worker: Worker, client_id: str, topics: list[str], *, standby: bool):
        self.worker = worker
        self.client_id = client_id
        self.topics = topics
        self.standby = standby
        self.generation = 0
        self.window_end = 0.0
        self.connected = threading.Event()
        self.client: paho.Client | None = None

    def on_connect(self, c: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if getattr(rc, "is_failure", False):
            log.error("ingest_refused", session=self.client_id, reason=str(rc))
            return
        self.generation += 1
        if self.standby:
            self.window_end = time.monotonic() + self.worker.config.ingest.standby_window
        opts = SubscribeOptions(qos=1)
        c.subscribe([(t, opts) for t in self.topics])
        self.connected.set()
        log.info(
            "ingest_connected",
            worker=self.worker.name,
            session=self.client_id,
            session_present=bool(getattr(flags, "session_present", False)),
        )

    def on_disconnect(self, c: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.connected.clear()
        self.generation += 1  # what is still queued belongs to a closed connection
        if not self.worker._stop.is_set():
            log.warning("ingest_disconnected", session=self.client_id, reason=str(rc))

    def on_message(self, c: paho.Client, userdata: Any, m: paho.MQTTMessage) -> None:
        if self.standby and time.monotonic() > self.window_end:
            # A copy of what the shared subscription delivers: nothing to store.
            if m.qos:
                c.ack(m.mid, m.qos)
            self.worker.counters.standby_acked += 1
            return
        self.worker._queue.put(
            Incoming(self, self.generation, m.mid, m.qos, m.topic, bytes(m.payload), bool(m.retain))
        )

    def start(self) -> None:
        cfg = self.worker.config
        c = mqtt.client(cfg.broker, client_id=self.client_id, manual_ack=True)
        c.on_message = self.on_message
        c.on_disconnect = self.on_disconnect
        c.on_connect = self.on_connect
        self.client = c
        mqtt.connect_blocking(
            c,
            cfg.broker,
            clean_start=False,
            properties=mqtt.connect_properties(
                session_expiry=cfg.broker.session_expiry,
                receive_maximum=cfg.ingest.receive_maximum,
            ),
        )

    def close(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()


class Worker:
    """Subscribe, store in batches, acknowledge after commit; ``stop()`` ends it cleanly."""

    def __init__(
        self,
        config: NocConfig,
        *,
        name: str = "1",
        pool: ConnectionPool | None = None,
        standby: bool | None = None,
    ):
        self.config = config
        self.name = name
        self.client_id = f"noc-ingest-{name}"
        self.counters = Counters()
        self._queue: queue.Queue[Incoming] = queue.Queue()
        self._stop = threading.Event()
        self._own_pool = pool is None
        self._pool = pool
        self.sessions = [
            _Session(self, self.client_id, shared_topics(config.broker.share_group), standby=False)
        ]
        if config.ingest.standby if standby is None else standby:
            self.sessions.append(
                _Session(self, f"{self.client_id}-standby", list(FLEET_TOPICS), standby=True)
            )

    def start(self) -> None:
        """Connect (BrokerError if the broker refuses) and begin receiving."""
        if self._pool is None:
            self._pool = db.pool(self.config.database, min_size=1, max_size=1, name=self.client_id)
        for s in self.sessions:
            s.start()

    def run(self) -> None:
        """Store and acknowledge until :meth:`stop`; then disconnect, keeping the session."""
        assert self._pool is not None
        try:
            while not self._stop.is_set():
                batch = self._take()
                if batch:
                    self._store(batch)
        finally:
            for s in self.sessions:
                s.close()
            if self._own_pool:
                self._pool.close()

    def stop(self) -> None:
        """Finish the batch in hand (commit and acknowledge), then end :meth:`run`."""
        self._stop.set()

    def wait_connected(self, timeout: float) -> bool:
        """Whether every session is connected (waiting up to ``timeout``)."""
        return all(s.connected.wait(timeout) for s in self.sessions)

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
        # Delivered on a connection that has closed: the broker sends them again.
        return [m for m in batch if m.generation == m.session.generation]

    def _store(self, batch: list[Incoming]) -> None:
        assert self._pool is not None
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
            except psycopg.errors.TransactionRollback as exc:
                # Deadlock or serialization failure against another worker: do it again.
                self.counters.retries += 1
                log.info("ingest_batch_retried", worker=self.name, reason=type(exc).__name__)
                continue
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
        for m in batch:  # arrival order
            client = m.session.client
            if m.qos and client is not None and m.generation == m.session.generation:
                client.ack(m.mid, m.qos)
                self.counters.acked += 1

    def _transaction(self, batch: list[Incoming], *, careful: bool) -> list[str]:
        assert self._pool is not None
        outcomes: list[str] = []
        with self._pool.connection() as conn, conn.transaction():
            if not careful:
                try:
                    results = handle_batch(conn, [(m.topic, m.payload, m.retained) for m in batch])
                except (Rejected, psycopg.DataError, psycopg.IntegrityError) as exc:
                    raise _Careful from exc
                for m, r in zip(batch, results, strict=True):
                    if isinstance(r, Rejected):
                        _reject(conn, m, str(r))
                        outcomes.append("rejected")
                    else:
                        outcomes.append(r)
                return outcomes
            for m in batch:
                try:
                    with conn.transaction():  # a savepoint per message
                        outcomes.append(handle(conn, m.topic, m.payload, retained=m.retained))
                except (Rejected, psycopg.DataError, psycopg.IntegrityError) as exc:
                    _reject(conn, m, str(exc))
                    outcomes.append("rejected")
        return outcomes


class _Careful(Exception):
    """A message in the batch failed: do it again one savepoint per message."""


def _reject(conn: psycopg.Connection[Any], m: Incoming, reason: str) -> None:
    log.warning("ingest_rejected", topic=m.topic[:200], reason=reason[:300])
    conn.execute(
        "INSERT INTO rejects (topic, reason, payload) VALUES (%s, %s, %s)",
        (m.topic[:1000], reason[:2000], m.payload[:REJECT_KEEP]),
    )


def serve(config: NocConfig, *, name: str, standby: bool | None = None) -> int:
    """Run one worker until SIGTERM/SIGINT (the ``noc ingest`` command)."""
    import signal

    worker = Worker(config, name=name, standby=standby)
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
