"""agent.aio: a cancellation that is swallowed must still end a task, and a stop stays bounded."""

from __future__ import annotations

import asyncio
import sys

import pytest

from agent.aio import backoff, cancel_and_wait


async def _swallow_race() -> tuple[asyncio.Task[int], int]:
    """A loop awaiting acknowledgements through wait_for, as the uplink's heartbeat does,
    cancelled in the same turn as its acknowledgement arrives (Python 3.11's race)."""
    loop = asyncio.get_running_loop()
    acks: list[asyncio.Future[None]] = []
    turns = 0

    async def heartbeat() -> int:
        nonlocal turns
        while True:
            fut: asyncio.Future[None] = loop.create_future()
            acks.append(fut)
            await asyncio.wait_for(fut, 10)
            turns += 1
            if turns > 3:
                return turns

    task = asyncio.create_task(heartbeat())
    await asyncio.sleep(0)  # the task now waits inside wait_for
    acks[-1].set_result(None)
    task.cancel()  # lands just as the acknowledgement completes
    for _ in range(10):
        await asyncio.sleep(0)
        if acks and not acks[-1].done():
            acks[-1].set_result(None)
    return task, turns


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="wait_for no longer swallows (3.12)")
def test_wait_for_swallows_a_cancel_on_this_python() -> None:
    """Why cancel_and_wait cancels again: one cancel() can be swallowed by wait_for here."""

    async def main() -> None:
        task, _ = await _swallow_race()
        assert await task > 1  # it went on and finished its turns as if never cancelled

    asyncio.run(main())


def test_cancel_and_wait_repeats_until_the_task_ends_and_stays_bounded() -> None:
    """A task that swallows one cancel still ends; one that never ends costs only the budget."""

    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def swallows_once() -> None:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
            await asyncio.sleep(10)

        t1 = asyncio.create_task(swallows_once())
        await asyncio.sleep(0)
        assert await cancel_and_wait(t1, 2.0)
        assert t1.cancelled()

        release = asyncio.Event()

        async def never_ends() -> None:
            while not release.is_set():
                try:
                    await asyncio.sleep(10)
                except asyncio.CancelledError:
                    continue

        t2 = asyncio.create_task(never_ends())
        await asyncio.sleep(0)
        t0 = loop.time()
        assert not await cancel_and_wait(t2, 0.3)
        assert 0.3 <= loop.time() - t0 < 1.0
        release.set()
        t2.cancel()
        await asyncio.wait({t2}, timeout=1)
        assert t2.done()

    asyncio.run(main())


def test_backoff_is_full_jitter_and_capped() -> None:
    """Each delay lies in [0, min(cap, base * 2**attempt)], and a huge attempt stays capped."""
    for attempt in range(40):
        bound = min(60.0, 2.0**attempt)
        delays = [backoff(attempt) for _ in range(50)]
        assert all(0 <= d <= bound for d in delays)
    assert max(backoff(10_000, base=1.0, cap=5.0) for _ in range(200)) <= 5.0
    assert len({round(backoff(6), 6) for _ in range(20)}) > 1  # jittered, not a fixed step
