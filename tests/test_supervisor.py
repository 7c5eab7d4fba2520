"""The supervisor in process, with fake components, a fake clock and a fake sleep.

What it promises the daemon: a failing component is restarted with growing
backoff while the others run on; the backoff starts afresh after a component
ran well for a while; a component that returns has finished and is not
restarted; cancellation (shutdown, reload) goes straight through and is never
counted as a failure; an AgentError is logged as a failure, anything else as a
crash with its traceback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import pytest
import structlog

from agent.errors import CollectorError
from agent.supervisor import STABLE_FOR, Supervisor


class FakeTime:
    """A clock the test moves, and a sleep that records its delay and moves the clock."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def supervisor(t: FakeTime, attempts: list[int]) -> Supervisor:
    """A supervisor on fake time whose backoff records each attempt number (delay 1 s)."""

    def delay(attempt: int) -> float:
        attempts.append(attempt)
        return 1.0

    return Supervisor(clock=t.clock, sleep=t.sleep, delay=delay)


async def run_until(
    sup: Supervisor,
    components: dict[str, Callable[[], Awaitable[None]]],
    done: asyncio.Event,
) -> None:
    """Run the supervisor until ``done`` is set (or 5 s of real time), then cancel it."""
    task = asyncio.create_task(sup.run(components))
    try:
        async with asyncio.timeout(5):
            await done.wait()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_failing_component_restarts_with_growing_backoff_while_others_run() -> None:
    """Four failures: attempts 0..3, restarts counted, last error kept; a neighbour is not
    disturbed."""
    t, attempts = FakeTime(), list[int]()
    sup = supervisor(t, attempts)
    done = asyncio.Event()
    calls = {"bad": 0, "good": 0}

    async def bad() -> None:
        calls["bad"] += 1
        if calls["bad"] == 5:
            done.set()
            await asyncio.Event().wait()
        raise CollectorError(f"source gone ({calls['bad']})")

    async def good() -> None:
        calls["good"] += 1
        await asyncio.Event().wait()

    asyncio.run(run_until(sup, {"bad": bad, "good": good}, done))
    assert attempts == [0, 1, 2, 3]
    assert t.slept == [1.0, 1.0, 1.0, 1.0]
    assert sup.states["bad"].restarts == 4
    assert sup.states["bad"].last_error == "source gone (4)"
    assert calls["good"] == 1 and sup.states["good"].restarts == 0


def test_backoff_starts_afresh_after_a_stable_run() -> None:
    """A failure after running longer than STABLE_FOR is attempt 0 again."""
    t, attempts = FakeTime(), list[int]()
    sup = supervisor(t, attempts)
    done = asyncio.Event()
    calls = 0

    async def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            t.now += STABLE_FOR + 1  # this run lasted long enough
        if calls == 5:
            done.set()
            await asyncio.Event().wait()
        raise CollectorError("flaky")

    asyncio.run(run_until(sup, {"flaky": flaky}, done))
    assert attempts == [0, 1, 0, 1]


def test_a_component_that_returns_is_not_restarted() -> None:
    """Returning is finishing: no restart, no error, not running."""
    t, attempts = FakeTime(), list[int]()
    sup = supervisor(t, attempts)
    calls = 0

    async def once() -> None:
        nonlocal calls
        calls += 1

    asyncio.run(sup.run({"once": once}))
    assert calls == 1
    assert attempts == [] and sup.states["once"].restarts == 0
    assert sup.states["once"].running is False


def test_cancellation_goes_straight_through_and_is_no_failure() -> None:
    """Cancelling the supervisor cancels every component; nothing is counted or slept."""
    t, attempts = FakeTime(), list[int]()
    sup = supervisor(t, attempts)
    cancelled: list[str] = []
    started = asyncio.Event()

    def component(name: str) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            try:
                started.set()
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(name)
                raise

        return run

    async def main() -> None:
        task = asyncio.create_task(sup.run({"a": component("a"), "b": component("b")}))
        await started.wait()
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert sorted(cancelled) == ["a", "b"]
    assert attempts == [] and t.slept == []
    assert all(s.restarts == 0 and not s.running for s in sup.states.values())


def test_agent_errors_are_failures_and_bugs_are_crashes_in_the_log() -> None:
    """An AgentError logs component_failed with its message; a bug logs component_crashed
    with the exception (its traceback goes with it), both with the retry delay."""
    t, attempts = FakeTime(), list[int]()
    sup = supervisor(t, attempts)
    done = asyncio.Event()
    calls = 0

    async def mixed() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise CollectorError("cannot read the CDR file")
        if calls == 2:
            raise KeyError("a bug")
        done.set()
        await asyncio.Event().wait()

    with structlog.testing.capture_logs() as logs:
        asyncio.run(run_until(sup, {"mixed": mixed}, done))
    events: list[MutableMapping[str, Any]] = [
        e for e in logs if e["event"].startswith("component_")
    ]
    assert [e["event"] for e in events] == ["component_failed", "component_crashed"]
    assert events[0]["error"] == "cannot read the CDR file" and events[0]["retry_in"] == 1.0
    assert events[1]["exc_info"] is True
    assert sup.states["mixed"].last_error == "KeyError('a bug')"


def test_state_while_running_and_after_a_failure_and_its_json(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Status sees running=True while a component runs, False while it waits to restart, with
    the error, its wall-clock time and the task named after the component."""

    monkeypatch.setattr("agent.supervisor.time.time", lambda: 4242.0)
    t = FakeTime()
    seen: list[tuple[bool, int, str | None]] = []
    names: list[str | None] = []
    done = asyncio.Event()

    async def sleep(seconds: float) -> None:
        state = sup.states["svc"]
        seen.append((state.running, state.restarts, state.last_error))
        await t.sleep(seconds)

    sup = Supervisor(clock=t.clock, sleep=sleep, delay=lambda attempt: 0.123456)
    calls = 0

    async def svc() -> None:
        nonlocal calls
        calls += 1
        task = asyncio.current_task()
        names.append(task.get_name() if task else None)
        state = sup.states["svc"]
        assert state.running is True and state.name == "svc"
        if calls == 1:
            raise CollectorError("gone")
        done.set()
        await asyncio.Event().wait()

    with structlog.testing.capture_logs() as logs:
        asyncio.run(run_until(sup, {"svc": svc}, done))
    assert seen == [(False, 1, "gone")]
    assert names[0] == "svc"
    assert sup.states["svc"].to_json() == {
        "running": False,  # cancelled at the end of the run
        "restarts": 1,
        "last_error": "gone",
        "last_error_at": 4242.0,
    }
    (failed,) = [e for e in logs if e["event"] == "component_failed"]
    assert failed["component"] == "svc" and failed["retry_in"] == 0.12


def test_a_crash_names_its_component_and_rounds_its_delay() -> None:
    t = FakeTime()
    done = asyncio.Event()
    sup = Supervisor(clock=t.clock, sleep=t.sleep, delay=lambda attempt: 2.71828)
    calls = 0

    async def buggy() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("bug")
        done.set()
        await asyncio.Event().wait()

    with structlog.testing.capture_logs() as logs:
        asyncio.run(run_until(sup, {"buggy": buggy}, done))
    (crashed,) = [e for e in logs if e["event"] == "component_crashed"]
    assert crashed["component"] == "buggy" and crashed["retry_in"] == 2.72
    assert crashed["log_level"] == "error"


def test_a_run_exactly_stable_for_long_is_not_yet_stable() -> None:
    """The backoff resets only after a run longer than STABLE_FOR, not equal to it."""
    t, attempts = FakeTime(), list[int]()
    sup = supervisor(t, attempts)
    done = asyncio.Event()
    calls = 0

    async def edge() -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            t.now += STABLE_FOR  # exactly the threshold
        if calls == 3:
            done.set()
            await asyncio.Event().wait()
        raise CollectorError("edge")

    asyncio.run(run_until(sup, {"edge": edge}, done))
    assert attempts == [0, 1]


def test_a_finished_component_is_not_running() -> None:
    t = FakeTime()
    sup = Supervisor(clock=t.clock, sleep=t.sleep)
    seen: list[bool] = []

    async def job() -> None:
        seen.append(sup.states["job"].running)

    asyncio.run(sup.run({"job": job}))
    assert seen == [True] and sup.states["job"].running is False
    assert sup.states["job"].to_json() == {
        "running": False,
        "restarts": 0,
        "last_error": None,
        "last_error_at": None,
    }
