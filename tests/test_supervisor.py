"""Cancellation that is swallowed must still end a task, and a stop must stay bounded."""

from __future__ import annotations

import asyncio
import sys

import pytest

from agent.supervisor import cancel_and_wait, check_cancelled


async def _swallow_race(loop_body_checks: bool) -> tuple[asyncio.Task[int], int]:
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
            if loop_body_checks:
                check_cancelled()
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
    """The race is real here: without the check the loop runs on after cancel()."""

    async def main() -> None:
        task, _ = await _swallow_race(loop_body_checks=False)
        assert await task > 1  # it went on and finished its turns as if never cancelled

    asyncio.run(main())


def test_check_cancelled_ends_the_loop_after_a_swallowed_cancel() -> None:
    """With check_cancelled after the await, the same race ends the task as asked."""

    async def main() -> None:
        task, _ = await _swallow_race(loop_body_checks=True)
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()

    asyncio.run(main())


def test_check_cancelled_is_quiet_without_a_pending_cancel() -> None:
    """A timeout that fired and was handled leaves nothing pending."""

    async def main() -> None:
        try:
            async with asyncio.timeout(0.01):
                await asyncio.sleep(1)
        except TimeoutError:
            pass
        check_cancelled()  # does not raise

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
