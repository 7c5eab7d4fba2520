"""The daemon: wires collectors → gate → outbox → uplink, serves the control socket.

Lifecycle: load the configuration (exit 78 if it is bad), lock the state
directory (exit 75 if another daemon holds it), open the state database and
compare it with the anchor (a lost database is recorded as a ``reset``), read
the switch, bind the control socket, start the components, tell systemd
READY=1. SIGHUP reloads the configuration: a reload that fails
validation keeps the running one and logs why. SIGTERM/SIGINT shut down in
order (uplink first, so ``offline`` is published) within a few seconds.
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from agent import __version__, anchor, control, fswatch, memory, statelock, switch
from agent.aio import cancel_and_wait
from agent.collectors.base import Collector
from agent.config import AgentConfig, load
from agent.errors import (
    EX_OK,
    AgentError,
    CollectorError,
    ConfigError,
    PolicyRefused,
    RequestRefused,
    StateError,
    StateLocked,
)
from agent.ledger import Ledger
from agent.outbox import Outbox
from agent.policy.classes import Record
from agent.policy.gate import Gate
from agent.salvage import salvage_outbox
from agent.sdnotify import Notifier
from agent.stacks import loaded_modules, task_stacks, thread_stacks
from agent.store import Opened, database_id, open_store, transaction
from agent.supervisor import Supervisor

if TYPE_CHECKING:
    from agent.collectors.registry import CollectorSpec
    from agent.uplink.support import SupportController

log = structlog.get_logger(__name__)

SHUTDOWN_BUDGET = 4.0
SWITCH_POLL = 1.0


class Uplink(Protocol):
    """What the daemon needs of the uplink (agent.uplink.session.UplinkSession)."""

    async def run(self) -> None:
        """Connect, deliver, reconnect; until cancelled."""
        ...

    async def sever(self) -> None:
        """Publish ``severed`` and close the connection now; return when it is closed."""
        ...

    def wake(self) -> None:
        """The switch turned on: connect without waiting for the backoff."""
        ...

    def status(self) -> dict[str, Any]:
        """Connection state and counters."""
        ...


class CollectorRun:
    """Makes one collector, schedules it, and remembers how its runs went.

    The collector is made inside :meth:`loop`, which the supervisor runs: one that
    cannot be made (a state file of a newer format, an unreadable source) fails
    that task alone, is logged and shown in status with its reason, and is tried
    again after the supervisor's backoff, while everything else runs on.
    """

    def __init__(self, spec: CollectorSpec, emit: Callable[[Record], bool]) -> None:
        self.spec = spec
        self.collector: Collector | None = None
        self.emit = emit
        self.trigger = asyncio.Event()
        self.last_run: float | None = None
        self.last_ok: float | None = None
        self.last_error: str | None = None
        self.start_error: str | None = None
        self.start_attempts = 0
        self.records = 0
        self.refused = 0

    @property
    def name(self) -> str:
        """The collector's name (known before it is made)."""
        return self.spec.name

    def _emit(self, record: Record) -> bool:
        ok = self.emit(record)
        if ok:
            self.records += 1
        else:
            self.refused += 1
        return ok

    async def start(self) -> Collector:
        """Make the collector (in a thread: opening its state may take a while)."""
        self.start_attempts += 1
        try:
            collector = await asyncio.to_thread(self.spec.make)
        except (AgentError, OSError) as exc:
            reason = str(exc) if isinstance(exc, AgentError) else f"{exc.filename}: {exc.strerror}"
            self.start_error = reason
            log.error(
                "collector_start_failed",
                collector=self.name,
                error=reason,
                attempt=self.start_attempts,
            )
            raise CollectorError(f"collector {self.name} cannot start: {reason}") from exc
        if self.start_error is not None:
            log.info("collector_started", collector=self.name, attempts=self.start_attempts)
        self.start_error = None
        self.collector = collector
        return collector

    async def once(self, collector: Collector, reason: str) -> None:
        """Run the collector once, bounded in time."""
        self.last_run = time.time()
        try:
            async with asyncio.timeout(max(collector.interval, 60.0)):
                await collector.collect(self._emit, reason=reason)
        except AgentError as exc:
            self.last_error = str(exc)
            log.warning("collector_failed", collector=self.name, error=str(exc))
            return
        except TimeoutError:
            self.last_error = "timed out"
            log.warning("collector_timed_out", collector=self.name)
            return
        self.last_ok = time.time()
        self.last_error = None
        memory.trim()  # what the run freed goes back to the system, not to an idle arena

    async def loop(self) -> None:
        """Make the collector if need be, then run it at each interval, or at once when
        triggered (NOC ``collect``)."""
        collector = self.collector or await self.start()
        reason = "command" if self.trigger.is_set() else "schedule"
        while True:
            # Cleared before the run, not after: a collect asked for during a run gets
            # a run of its own once this one ends, instead of being lost.
            self.trigger.clear()
            await self.once(collector, reason)
            reason = "schedule"
            try:
                async with asyncio.timeout(collector.interval):
                    await self.trigger.wait()
                    reason = "command"
            except TimeoutError:
                pass

    def status(self) -> dict[str, Any]:
        """What ``agentctl status`` shows for this collector."""
        out: dict[str, Any] = {
            "interval": self.spec.interval,
            "started": self.collector is not None,
            "start_error": self.start_error,
            "start_attempts": self.start_attempts,
            "last_run": self.last_run,
            "last_ok": self.last_ok,
            "last_error": self.last_error,
            "records": self.records,
            "refused": self.refused,
        }
        if self.collector is not None:
            out.update(self.collector.status())
        return out


class Daemon:
    """The running agent."""

    def __init__(self, config: AgentConfig, notifier: Notifier | None = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier()
        self.started_at = time.time()
        self.supervisor = Supervisor()
        self.stop_event = asyncio.Event()
        self.reload_event = asyncio.Event()
        self.state_dir = config.paths.state_dir
        # Before anything else: a second daemon must not touch the socket or the database.
        self.lock = statelock.acquire(self.state_dir)
        self.switch = switch.read_switch(self.state_dir)
        self._switch_stat: tuple[int, int] | None = self._stat_switch()
        self._unledgered_flips: list[dict[str, Any]] = []  # flips the ledger could not take yet
        self._pending_off: switch.Flip | None = None  # an "off" in force, not yet in the file
        self._switch_lock = asyncio.Lock()
        self._housekeeping = asyncio.Event()  # the switch file changed, or a retry is due
        self.switch_watch = "starting"  # how a change of the switch file is noticed
        last = anchor.read_anchor(self.state_dir)
        opened = open_store(self.state_dir)
        self.db = opened.conn
        self.db_id = database_id(self.db)
        self.ledger = Ledger(self.db)
        self.outbox = Outbox(
            self.db,
            self.ledger,
            max_bytes=config.outbox.max_bytes,
            floor_seq=last.seq if last else 0,
        )
        loss = anchor.check(
            self.db, last, db_id=self.db_id, created=opened.created, moved=opened.moved
        )
        if loss is not None:
            self._record_reset(loss, opened, last)
        self.anchor = anchor.Anchor(self.state_dir, self._mark)
        self.outbox.anchor = self.anchor
        self._ledger_offline_flips()
        self.anchor.touch(force=True)
        self.gate = Gate(
            policy=config.policy,
            switch_on=lambda: self.switch.on,
            last_seq=self.outbox.last_seq,
            local_only=config.uplink is None,
        )
        self.runs: dict[str, CollectorRun] = {}
        self.uplink: Uplink | None = None
        self.renewer: Any = None
        self.reloads = 0
        self.last_reload_error: str | None = None
        self.control = control.ControlServer(
            config.paths.control_socket,
            read_group=config.control.read_group,
            admin_group=config.control.admin_group,
            max_request=config.control.max_request,
            log=log,
        )
        self.control.route("status", self._status, admin=False)
        self.control.route("ping", self._ping, admin=False)
        self.control.route("uplink", self._uplink, admin=True)
        self.control.route("uplink-status", self._uplink_status, admin=False)
        self.control.route("collect", self._collect_now, admin=True)
        self.control.route("reload", self._reload_request, admin=True)
        self.support = self.build_support(config)
        self.support.register(self.control)
        # Enrollment reloads the configuration when done: the uplink then starts (or
        # reconnects) with the new certificate.
        from agent.uplink.enroll import EnrollService

        self.enroll = EnrollService(
            device_id=config.device_id,
            state_dir=config.paths.state_dir,
            config=config.enroll,
            switch_on=lambda: self.switch.on,
            ledger=self.ledger,
            on_enrolled=lambda _installed: self.reload_event.set(),
        )
        self.enroll.register(self.control)

    def _record_reset(self, loss: anchor.Loss, opened: Opened, last: anchor.Mark | None) -> None:
        """Say in the new ledger what was lost; queue what a corrupt file still holds."""
        data = loss.ledger_data()
        rows = []
        if opened.aside is not None:
            found = salvage_outbox(opened.aside, max_seq_hint=last.seq if last else 0)
            rows = found.rows
            data.update(aside=str(opened.aside), salvaged=len(rows), unreadable=found.unreadable)
        with transaction(self.db, "recording the loss of the database"):
            self.outbox.restore(rows)
            self.ledger.append("reset", data)
            self.db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('last_seq', ?)", (self.outbox.last_seq,)
            )
        log.error("state_lost", **data, continues_at_seq=self.outbox.last_seq + 1)

    def _mark(self) -> anchor.Mark:
        n, digest = self.ledger.head
        return anchor.Mark(
            db_id=self.db_id,
            seq=self.outbox.last_seq,
            ledger_n=n,
            ledger_hash=digest,
            queued=self.outbox.count,
        )

    def _ledger_offline_flips(self) -> None:
        # Flips made with agentctl while the daemon was down are in the switch file only.
        from agent import ledger

        last = max((e.ts for e in ledger.read(self.db, kind="switch")), default=0.0)
        for flip in self.switch.history:
            if flip.at > last + 1e-3:
                self._ledger_flip(
                    {"state": flip.state, "uid": flip.uid, "via": flip.via, "at": flip.at}
                )

    def _ledger_flip(self, flip: dict[str, Any]) -> None:
        """Record a flip, or keep it to record once the database takes writes again."""
        self._unledgered_flips.append(flip)
        self._flush_flips()
        self._housekeeping.set()  # the switch file may wait to be written, or this flip

    def _flush_flips(self) -> None:
        while self._unledgered_flips:
            try:
                self.ledger.record("switch", self._unledgered_flips[0])
            except StateError as exc:
                log.warning(
                    "switch_flip_not_ledgered_yet",
                    error=str(exc),
                    pending=len(self._unledgered_flips),
                )
                return
            self._unledgered_flips.pop(0)

    # -- the data path -------------------------------------------------------------------

    def emit(self, record: Record) -> bool:
        """Offer a record to the gate; store it in the outbox if approved.

        A record that cannot be stored (a full disk) is refused, counted, and gives
        its seq back, so seq has no gaps; False either way.
        """
        try:
            envelope = self.gate.approve(record)
        except PolicyRefused as exc:
            log.debug("gate_refused", reason=str(exc))
            return False
        try:
            self.outbox.put(envelope)
        except StateError:
            self.gate.withdraw(envelope)  # the outbox counted it and logged the episode
            return False
        return True

    def agent_stats(self) -> dict[str, Any]:
        """The agent's own counters, reported in health."""
        return {
            "outbox": self.outbox.stats(),
            "gate": self.gate.stats(),
            "switch": self.switch.shown,
            "identity": self._identity_brief(),
            "collector_errors": {
                n: r.start_error or r.last_error
                for n, r in self.runs.items()
                if r.start_error or r.last_error
            },
        }

    def collector_specs(self, config: AgentConfig) -> list[CollectorSpec]:
        """The enabled collectors for ``config``, not made yet."""
        from agent.collectors import registry

        return registry.specs(
            config.collectors,
            config.paths.state_dir,
            self.agent_stats,
            local_only=config.uplink is None,
        )

    def build_uplink(self, config: AgentConfig) -> Uplink | None:
        """The uplink session, or None when the configuration has no uplink."""
        if config.uplink is None:
            return None
        from agent.uplink.session import UplinkSession

        return UplinkSession(
            uplink=config.uplink,
            device_id=config.device_id,
            outbox=self.outbox,
            ledger=self.ledger,
            switch_on=lambda: self.switch.on,
            commands=self,
        )

    def build_renewer(self, config: AgentConfig) -> Any:
        """Certificate rotation, when the uplink's certificate came from enrollment."""
        from agent.uplink.enroll import tls_root

        up, en = config.uplink, config.enroll
        if self.uplink is None or up is None or en is None:
            return None
        if tls_root(self.state_dir).resolve() not in up.cert_file.resolve().parents:
            return None  # a certificate installed by hand is renewed by hand
        from agent.uplink.renew import Renewer

        return Renewer(
            cfg=en,
            uplink=up,
            device_id=config.device_id,
            state_dir=self.state_dir,
            switch_on=lambda: self.switch.on,
            ledger=self.ledger,
            session=self.uplink,
        )

    def identity(self) -> dict[str, Any]:
        """The uplink certificate (subject, issuer, expiry, days left) and its renewal."""
        if self.renewer is not None:
            return dict(self.renewer.status())
        if self.config.uplink is None:
            return {"configured": False}
        from agent.errors import EnrollmentError
        from agent.uplink.renew import read_cert

        try:
            return {"certificate": read_cert(self.config.uplink.cert_file).status(time.time())}
        except EnrollmentError as exc:
            return {"certificate": {"error": str(exc)}}

    def _identity_brief(self) -> dict[str, Any]:
        """For health: when the certificate and the last command key seen expire."""
        if self.config.uplink is None:
            return {}
        cert = self.identity().get("certificate") or {}
        out = {k: cert[k] for k in ("not_after", "days_left") if k in cert}
        signing = (
            (self.uplink.status().get("commands") or {}).get("signing") if self.uplink else None
        )
        key = (signing or {}).get("command_key")
        if key:
            out["command_key_expires"] = key["expires"]
        return out

    def build_support(self, config: AgentConfig) -> SupportController:
        """Remote support: the window, the NOC's support.connect, the tunnel (paramiko lazily)."""
        from agent.uplink.support import SupportController

        return SupportController(
            config=config.support,
            device_id=config.device_id,
            state_dir=self.state_dir,
            ledger=self.ledger,
            switch_on=lambda: self.switch.on,
        )

    # -- NOC command hooks (called by the uplink) ------------------------------------------

    def collectors_known(self) -> list[str]:
        """Names a NOC ``collect`` may name."""
        return sorted(self.runs)

    def collect_now(self, name: str) -> None:
        """Run a collector at once (NOC ``collect``, agentctl collect)."""
        self.runs[name].trigger.set()

    def update_setting(self) -> str:
        """The customer's ``updates:`` (NOC ``update.check`` is refused when off)."""
        return self.config.updates

    def request_update_check(self) -> None:
        """Ask pbx-agent-update.path for a check: the daemon itself installs nothing."""
        from agent.update_state import REQUEST_FILE

        (self.config.paths.runtime_dir / REQUEST_FILE).touch(mode=0o644)

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the exit status."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop_event.set)
        loop.add_signal_handler(signal.SIGINT, self.stop_event.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload_event.set)
        # `kill -USR1 PID`: every thread's stack and every task's chain of awaits, logged
        # from the loop (faulthandler's own dump of running threads can crash the process).
        loop.add_signal_handler(signal.SIGUSR1, _log_stacks)
        await self.control.start()
        if self.switch.error:
            log.error("switch_file_untrusted", error=self.switch.error)
        log.info(
            "daemon_started",
            version=__version__,
            device_id=self.config.device_id,
            config=str(self.config.source),
            switch=self.switch.word,
            uplink=self.config.uplink.broker
            if self.config.uplink
            else "none: kept locally, nothing leaves this box",
            pid=os.getpid(),
        )
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._watchdog(), name="watchdog")
                tg.create_task(self._watch_switch(), name="switch-watch")
                tg.create_task(self.support.run(), name="support")
                workers = tg.create_task(self._run_workers(self.config), name="workers")
                self.notifier.ready(self._status_line())
                while True:
                    if await self._wait_stop_or_reload() == "stop":
                        await self.support.shutdown()  # the tunnel first: it is the vendor's way in
                        await self._stop_workers(workers)
                        raise _Stop
                    new = self._try_reload()
                    if new is not None:
                        # Collectors and the uplink are rebuilt from the new configuration;
                        # the database, the switch and the control socket stay as they are.
                        await self._stop_workers(workers)
                        self.config = new
                        self.gate.set_policy(new.policy)
                        self.gate.local_only = new.uplink is None
                        self.support.reconfigure(new.support)
                        self.enroll.config = new.enroll
                        workers = tg.create_task(self._run_workers(new), name="workers")
                    self.notifier.ready(self._status_line())
        except* _Stop:
            pass
        finally:
            self.notifier.stopping()
            await self.control.close()
            await self._close_collectors()
            self._flush_flips()
            self.anchor.touch(force=True)
            self.db.close()
            self.notifier.close()
            log.info("daemon_stopped")
            self.lock.release()
        return EX_OK

    async def _wait_stop_or_reload(self) -> str:
        stop = asyncio.ensure_future(self.stop_event.wait())
        reload = asyncio.ensure_future(self.reload_event.wait())
        try:
            await asyncio.wait({stop, reload}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            reload.cancel()
        if self.stop_event.is_set():
            self.notifier.stopping()
            return "stop"
        self.reload_event.clear()
        return "reload"

    def _try_reload(self) -> AgentConfig | None:
        self.notifier.reloading()
        try:
            new = load(self.config.source)
        except ConfigError as exc:
            self.last_reload_error = str(exc)
            log.error(
                "reload_rejected_keeping_running_config",
                config=str(self.config.source),
                problems=[str(p) for p in exc.problems],
            )
            return None
        if new.paths != self.config.paths or new.device_id != self.config.device_id:
            self.last_reload_error = (
                "paths and device_id take effect only at restart; restart the service"
            )
            log.warning("reload_needs_restart", reason=self.last_reload_error)
            new = _with(new, paths=self.config.paths, device_id=self.config.device_id)
        else:
            self.last_reload_error = None
        self.reloads += 1
        log.info("config_reloaded", config=str(new.source), reloads=self.reloads)
        return new

    async def _stop_workers(self, workers: asyncio.Task[None]) -> None:
        # The uplink publishes "offline" and disconnects when cancelled (bounded inside it).
        if not await cancel_and_wait(workers, SHUTDOWN_BUDGET):
            log.error("workers_did_not_stop_in_time", budget=SHUTDOWN_BUDGET)
        await self._close_collectors()

    async def _close_collectors(self) -> None:
        for run in self.runs.values():
            if run.collector is None:
                continue
            try:
                async with asyncio.timeout(1):
                    await run.collector.aclose()
            except (TimeoutError, AgentError, OSError) as exc:
                log.warning("collector_close_failed", collector=run.name, error=str(exc))
        self.runs.clear()

    async def _run_workers(self, config: AgentConfig) -> None:
        self.runs = {s.name: CollectorRun(s, self.emit) for s in self.collector_specs(config)}
        self.uplink = self.build_uplink(config)
        components: dict[str, Callable[[], Awaitable[None]]] = {
            f"collector:{name}": run.loop for name, run in self.runs.items()
        }
        if self.uplink is not None:
            components["uplink"] = self.uplink.run
        self.renewer = self.build_renewer(config)
        if self.renewer is not None:
            components["renew"] = self.renewer.run
        await self.supervisor.run(components)

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval()
        if interval is None:
            return
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    def _stat_switch(self) -> tuple[int, int] | None:
        try:
            st = switch.switch_path(self.state_dir).stat()
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns)

    async def _watch_switch(self) -> None:
        # agentctl writes the switch file itself when it cannot reach us: inotify tells us
        # when it is replaced (the file is polled every second where inotify is missing).
        # The same loop retries what a full disk refused (the switch file, flips, the
        # anchor): every second while one of them waits, and not at all otherwise, so an
        # idle daemon does not wake up to learn nothing (issue 17).
        loop = asyncio.get_running_loop()
        poke = self._housekeeping

        def deferred() -> None:
            loop.call_soon_threadsafe(poke.set)  # deliveries may run off the loop's thread

        self.anchor.on_deferred = deferred
        watch = fswatch.FolderWatch(
            [self.state_dir],
            lambda _name: poke.set(),
            names=[switch.SWITCH_FILE],
            # Replaced, created, removed, or written and closed; not every write of the
            # database beside it.
            mask=fswatch.REPLACED,
        )
        self.switch_watch = "inotify" if watch.active else f"poll ({watch.error})"
        try:
            while True:
                if not watch.active or self._housekeeping_due():
                    try:
                        async with asyncio.timeout(SWITCH_POLL):
                            await poke.wait()
                    except TimeoutError:
                        pass
                else:
                    await poke.wait()
                poke.clear()
                if not self._switch_lock.locked():  # an `off` in progress writes after its sever
                    self._persist_off()
                self._flush_flips()
                self.anchor.touch()
                stat = self._stat_switch()
                if stat == self._switch_stat:
                    continue
                self._switch_stat = stat
                state = switch.read_switch(self.state_dir)
                if self._pending_off is not None and state.on:
                    continue  # the stale "on" that the customer's unwritten "off" overrides
                async with self._switch_lock:
                    await self._apply_switch(state, source="file")
        finally:
            watch.close()
            self.anchor.on_deferred = None

    def _housekeeping_due(self) -> bool:
        """Something a full disk refused, or an anchor write put off, waits to be retried."""
        return bool(
            self._pending_off is not None
            or self._unledgered_flips
            or self.anchor.deferred
            or self.anchor.error
        )

    async def _apply_switch(self, state: switch.SwitchState, *, source: str) -> None:
        was_on = self.switch.on
        self.switch = state
        if was_on == state.on:
            return
        log.warning("uplink_switch", state=state.word, source=source)
        if not state.on:
            await self.support.sever()  # the window and any tunnel close with the switch
        if not state.on and self.uplink is not None:
            await self.uplink.sever()
        elif state.on and self.uplink is not None:
            self.uplink.wake()
        self.notifier.status(self._status_line())

    async def _switch_off(self, uid: int) -> bool:
        """Sever in memory and on the wire first; then write the file and the ledger.

        False when the switch was already off: nothing is severed or recorded twice
        (an ``off`` still waiting to be written is retried).
        """
        if not self.switch.on and self.switch.error is None:
            self._persist_off()
            return False
        flip = switch.Flip(state="off", at=time.time(), uid=uid, via="daemon")
        was_on = self.switch.on
        # From this line the gate refuses every record and the uplink will not reconnect.
        self.switch = self.switch._replace(on=False, error=None, unpersisted="being written")
        self._pending_off = flip
        async with self._switch_lock:
            if was_on:
                log.warning("uplink_switch", state="off", source=f"uid {uid}")
            await self.support.sever()  # the tunnel is cut at once; the window closes too
            if self.uplink is not None:
                await self.uplink.sever()
            self._persist_off()
            self._ledger_flip({"state": "off", "uid": uid, "via": "daemon", "at": flip.at})
        self.notifier.status(self._status_line())
        return True

    def _persist_off(self) -> None:
        """Write the pending ``off`` to the switch file; on failure say why and stay off."""
        flip = self._pending_off
        if flip is None:
            return
        try:
            new = switch.write_switch(self.state_dir, False, uid=flip.uid, via=flip.via, at=flip.at)
        except StateError as exc:
            if self.switch.unpersisted != str(exc):
                log.error(
                    "switch_off_not_persisted",
                    error=str(exc),
                    note="the uplink stays off in this process; writing it is retried every second",
                )
            self.switch = self.switch._replace(on=False, unpersisted=str(exc))
            return
        if self.switch.unpersisted not in (None, "being written"):
            log.warning("switch_off_persisted", path=str(switch.switch_path(self.state_dir)))
        self._pending_off = None
        self._switch_stat = self._stat_switch()
        self.switch = new

    def _switch_on(self, uid: int) -> bool:
        """Write ``on`` first; if it cannot be written the uplink stays off (StateError).

        False when it was already on (and written): no flip is recorded.
        """
        if self.switch.on and self.switch.unpersisted is None:
            return False
        at = time.time()
        try:
            new = switch.write_switch(self.state_dir, True, uid=uid, via="daemon", at=at)
        except StateError as exc:
            log.error("switch_on_refused", error=str(exc), uid=uid)
            raise StateError(
                f"the uplink stays off: {exc}. An on that is not written would turn back "
                f"into off at the next start; free space in {self.state_dir} and try again"
            ) from exc
        self._pending_off = None
        self._switch_stat = self._stat_switch()
        was_on = self.switch.on
        self.switch = new
        self._ledger_flip({"state": "on", "uid": uid, "via": "daemon", "at": at})
        if not was_on:
            log.warning("uplink_switch", state="on", source=f"uid {uid}")
            if self.uplink is not None:
                self.uplink.wake()
        self.notifier.status(self._status_line())
        return True

    # -- control handlers ----------------------------------------------------------------

    async def _ping(self, req: dict[str, Any], peer: control.Peer) -> str:
        return "pong"

    async def _status(self, req: dict[str, Any], peer: control.Peer) -> dict[str, Any]:
        from agent.version import versions

        return {
            "daemon": {
                "pid": os.getpid(),
                "started_at": self.started_at,
                "uptime": time.time() - self.started_at,
                "config": str(self.config.source),
                "reloads": self.reloads,
                "last_reload_error": self.last_reload_error,
                "loaded": loaded_modules(),
                "switch_watch": self.switch_watch,
            },
            "device_id": self.config.device_id,
            "versions": versions(),
            "switch": self.switch.to_json(),
            "uplink": self._uplink_state(),
            "support": self.support.status(),
            "identity": self.identity(),
            "policy": {
                "send": sorted(c.value for c in self.config.policy.send),
                "effective": self.gate.effective(),
            },
            "collectors": {name: run.status() for name, run in self.runs.items()},
            "outbox": self.outbox.stats(),
            "gate": self.gate.stats(),
            "components": {n: s.to_json() for n, s in self.supervisor.states.items()},
            "control": self.control.stats(),
            "update": self.update_status(),
        }

    def update_status(self) -> dict[str, Any]:
        """The setting, and what the update unit last found (agent/update_state.py)."""
        from agent.update_state import DEFAULT_UPDATE_DIR, read_state

        last = read_state(DEFAULT_UPDATE_DIR)
        return {"setting": self.config.updates, "last": last.to_json() if last else None}

    async def _uplink_status(self, req: dict[str, Any], peer: control.Peer) -> dict[str, Any]:
        return {
            "switch": self.switch.to_json(),
            "uplink": self._uplink_state(),
        }

    async def _uplink(self, req: dict[str, Any], peer: control.Peer) -> dict[str, Any]:
        state = req.get("state")
        if state not in ("on", "off"):
            raise RequestRefused('uplink: "state" must be "on" or "off"')
        if state == "off":
            changed = await self._switch_off(peer.uid)
        else:
            changed = self._switch_on(peer.uid)
        return {
            "changed": changed,
            "switch": self.switch.to_json(),
            "uplink": self._uplink_state(),
        }

    async def _collect_now(self, req: dict[str, Any], peer: control.Peer) -> dict[str, Any]:
        name = req.get("collector")
        if not isinstance(name, str) or name not in self.runs:
            raise RequestRefused(
                f"unknown collector {name!r} (known: {', '.join(sorted(self.runs))})"
            )
        self.collect_now(str(name))
        return {"triggered": name}

    async def _reload_request(self, req: dict[str, Any], peer: control.Peer) -> dict[str, Any]:
        self.reload_event.set()
        return {"reload": "requested"}

    def _uplink_state(self) -> dict[str, Any]:
        if self.uplink is not None:
            return self.uplink.status()
        return {
            "configured": False,
            "local_only": True,
            "note": "no uplink configured: nothing leaves this box; records are kept "
            "locally and none is queued for sending",
        }

    def _status_line(self) -> str:
        up = "no uplink configured" if self.config.uplink is None else f"uplink {self.switch.shown}"
        return f"{self.config.device_id}: {up}; outbox {self.outbox.count} queued"


class _Stop(Exception):
    """Internal: leaves the daemon's TaskGroup on an orderly shutdown."""


def _with(config: AgentConfig, **changes: Any) -> AgentConfig:
    import dataclasses

    return dataclasses.replace(config, **changes)


def _log_stacks() -> None:
    threads, tasks = thread_stacks(), task_stacks()
    for th in threads:
        log.warning("thread_stack", **th)
    for t in tasks:
        log.warning("task_stack", **t)
    log.warning("stacks_dumped", threads=len(threads), tasks=len(tasks))


def run(config_path: Path, log_level: str | None = None) -> int:
    """``agentctl run``: load, set up logging, run the daemon; returns the exit status."""
    from agent import logs

    try:
        config = load(config_path)
    except ConfigError as exc:
        logs.configure(log_level or "info")
        structlog.get_logger(__name__).error(
            "configuration_invalid",
            config=str(config_path),
            problems=[str(p) for p in exc.problems],
        )
        raise
    logs.configure(log_level or config.log_level)
    # A stuck event loop stops the watchdog pings, and systemd then sends SIGABRT:
    # every thread's stack goes to stderr (the journal) as the process dies.
    faulthandler.enable(all_threads=True)
    memory.limit_arenas()  # before any thread starts (agent/memory.py)
    _preflight(config)
    try:
        daemon = Daemon(config)
    except StateLocked as exc:
        structlog.get_logger(__name__).error("state_directory_locked", error=str(exc))
        raise
    return asyncio.run(daemon.run())


def _preflight(config: AgentConfig) -> None:
    """What config check checks, for this process: a runtime folder it cannot make stops it
    (StateError, exit 73); a TLS problem is an error event, and the daemon runs on."""
    from agent import preflight

    try:
        preflight.ensure_runtime_dir(config.paths.runtime_dir)
    except AgentError as exc:
        log.error("runtime_dir_unusable", path=str(config.paths.runtime_dir), error=str(exc))
        raise
    for problem in preflight.check(config, user=preflight.ServiceUser.current()):
        log.error(
            "preflight_problem", setting=problem.key, line=problem.line, problem=problem.reason
        )
