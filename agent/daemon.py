"""The daemon: wires collectors → gate → outbox → uplink, serves the control socket.

Lifecycle: load the configuration (exit 78 if it is bad), open the state
database, read the switch, bind the control socket, start the components,
tell systemd READY=1. SIGHUP reloads the configuration: a reload that fails
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

from agent import __version__, control, switch
from agent.collectors.base import Collector, Record
from agent.config import AgentConfig, load
from agent.errors import EX_OK, AgentError, CollectorError, ConfigError, PolicyError
from agent.ledger import Ledger
from agent.outbox import Outbox
from agent.policy.gate import Gate
from agent.sdnotify import Notifier
from agent.stacks import task_stacks, thread_stacks
from agent.store import open_db
from agent.supervisor import Supervisor, cancel_and_wait

if TYPE_CHECKING:
    from agent.collectors.factory import CollectorSpec

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
        self.switch = switch.read_switch(self.state_dir)
        self._switch_stat: tuple[int, int] | None = self._stat_switch()
        conn, moved = open_db(self.state_dir)
        self.db = conn
        self.ledger = Ledger(conn)
        if moved:
            self.ledger.record("reset", {"reason": moved})
        self._ledger_offline_flips()
        self.outbox = Outbox(conn, self.ledger, max_bytes=config.outbox.max_bytes)
        self.gate = Gate(
            policy=config.policy,
            switch_on=lambda: self.switch.on,
            last_seq=self.outbox.last_seq,
        )
        self.runs: dict[str, CollectorRun] = {}
        self.uplink: Uplink | None = None
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

    def _ledger_offline_flips(self) -> None:
        # Flips made with agentctl while the daemon was down are in the switch file only.
        from agent import ledger

        last = max((e.ts for e in ledger.read(self.db, kind="switch")), default=0.0)
        for flip in self.switch.history:
            if flip.at > last + 1e-3:
                self.ledger.record(
                    "switch", {"state": flip.state, "uid": flip.uid, "via": flip.via, "at": flip.at}
                )

    # -- the data path -------------------------------------------------------------------

    def emit(self, record: Record) -> bool:
        """Offer a record to the gate; store it in the outbox if approved."""
        try:
            envelope = self.gate.approve(record)
        except PolicyError as exc:
            log.debug("gate_refused", reason=str(exc))
            return False
        self.outbox.put(envelope)
        return True

    def agent_stats(self) -> dict[str, Any]:
        """The agent's own counters, reported in health."""
        return {
            "outbox": self.outbox.stats(),
            "gate": self.gate.stats(),
            "switch": self.switch.word,
            "collector_errors": {
                n: r.start_error or r.last_error
                for n, r in self.runs.items()
                if r.start_error or r.last_error
            },
        }

    def collector_specs(self, config: AgentConfig) -> list[CollectorSpec]:
        """The enabled collectors for ``config``, not made yet."""
        from agent.collectors import factory

        return factory.specs(config, self.agent_stats)

    def build_uplink(self, config: AgentConfig) -> Uplink | None:
        """The uplink session, or None when the configuration has no uplink."""
        if config.uplink is None:
            return None
        from agent.uplink.session import UplinkSession

        return UplinkSession(
            config=config,
            outbox=self.outbox,
            ledger=self.ledger,
            switch_on=lambda: self.switch.on,
            commands=self,
        )

    # -- NOC command hooks (called by the uplink) ------------------------------------------

    def collectors_known(self) -> list[str]:
        """Names a NOC ``collect`` may name."""
        return sorted(self.runs)

    def collect_now(self, name: str) -> None:
        """Run a collector at once (NOC ``collect``, agentctl collect)."""
        self.runs[name].trigger.set()

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
            uplink=self.config.uplink.broker if self.config.uplink else None,
            pid=os.getpid(),
        )
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._watchdog(), name="watchdog")
                tg.create_task(self._watch_switch(), name="switch-watch")
                workers = tg.create_task(self._run_workers(self.config), name="workers")
                self.notifier.ready(self._status_line())
                while True:
                    if await self._wait_stop_or_reload() == "stop":
                        await self._stop_workers(workers)
                        raise _Stop
                    new = self._try_reload()
                    if new is not None:
                        # Collectors and the uplink are rebuilt from the new configuration;
                        # the database, the switch and the control socket stay as they are.
                        await self._stop_workers(workers)
                        self.config = new
                        self.gate.set_policy(new.policy)
                        workers = tg.create_task(self._run_workers(new), name="workers")
                    self.notifier.ready(self._status_line())
        except* _Stop:
            pass
        finally:
            self.notifier.stopping()
            await self.control.close()
            await self._close_collectors()
            self.db.close()
            self.notifier.close()
            log.info("daemon_stopped")
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
            self.notifier.notify("STOPPING=1")
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
        # agentctl writes the file itself when it cannot reach us; notice it promptly.
        while True:
            await asyncio.sleep(SWITCH_POLL)
            stat = self._stat_switch()
            if stat != self._switch_stat:
                self._switch_stat = stat
                await self._apply_switch(switch.read_switch(self.state_dir), source="file")

    async def _apply_switch(self, state: switch.SwitchState, *, source: str) -> None:
        was_on = self.switch.on
        self.switch = state
        if was_on == state.on:
            return
        log.warning("uplink_switch", state=state.word, source=source)
        if not state.on and self.uplink is not None:
            await self.uplink.sever()
        elif state.on and self.uplink is not None:
            self.uplink.wake()
        self.notifier.status(self._status_line())

    # -- control handlers ----------------------------------------------------------------

    async def _ping(self, req: dict[str, Any], peer: control.Peer) -> str:
        return "pong"

    async def _status(self, req: dict[str, Any], peer: control.Peer) -> dict[str, Any]:
        from agent.cli.cmd_version import versions

        return {
            "daemon": {
                "pid": os.getpid(),
                "started_at": self.started_at,
                "uptime": time.time() - self.started_at,
                "config": str(self.config.source),
                "reloads": self.reloads,
                "last_reload_error": self.last_reload_error,
            },
            "device_id": self.config.device_id,
            "versions": versions(),
            "switch": self.switch.to_json(),
            "uplink": self.uplink.status() if self.uplink else {"configured": False},
            "policy": {
                "send": sorted(c.value for c in self.config.policy.send),
                "effective": self.gate.effective(),
            },
            "collectors": {name: run.status() for name, run in self.runs.items()},
            "outbox": self.outbox.stats(),
            "gate": self.gate.stats(),
            "components": {n: s.to_json() for n, s in self.supervisor.states.items()},
            "control": self.control.stats(),
        }

    async def _uplink_status(self, req: dict[str, Any], peer: control.Peer) -> dict[str, Any]:
        return {
            "switch": self.switch.to_json(),
            "uplink": self.uplink.status() if self.uplink else {"configured": False},
        }

    async def _uplink(self, req: dict[str, Any], peer: control.Peer) -> dict[str, Any]:
        state = req.get("state")
        if state not in ("on", "off"):
            raise control.RequestError('uplink: "state" must be "on" or "off"')
        new = switch.write_switch(self.state_dir, state == "on", uid=peer.uid, via="daemon")
        self._switch_stat = self._stat_switch()
        self.ledger.record("switch", {"state": new.word, "uid": peer.uid, "via": "daemon"})
        await self._apply_switch(new, source=f"uid {peer.uid}")
        return {
            "switch": self.switch.to_json(),
            "uplink": self.uplink.status() if self.uplink else {"configured": False},
        }

    async def _collect_now(self, req: dict[str, Any], peer: control.Peer) -> dict[str, Any]:
        name = req.get("collector")
        if not isinstance(name, str) or name not in self.runs:
            raise control.RequestError(
                f"unknown collector {name!r} (known: {', '.join(sorted(self.runs))})"
            )
        self.collect_now(str(name))
        return {"triggered": name}

    async def _reload_request(self, req: dict[str, Any], peer: control.Peer) -> dict[str, Any]:
        self.reload_event.set()
        return {"reload": "requested"}

    def _status_line(self) -> str:
        up = "no uplink configured" if self.config.uplink is None else f"uplink {self.switch.word}"
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
    _preflight(config)
    daemon = Daemon(config)
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
