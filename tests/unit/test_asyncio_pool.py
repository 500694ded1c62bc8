"""The asyncio pool: many async tasks at once on the worker's event loop."""

from __future__ import annotations

import asyncio
import threading

from conftest import run_bounded

from conveyor import Conveyor
from conveyor.results import State

RUNNING_TOGETHER = 20


def test_async_tasks_run_concurrently(app: Conveyor) -> None:
    started = 0
    everyone: asyncio.Event | None = None

    @app.task
    async def gather(n: int) -> int:
        nonlocal started, everyone
        if everyone is None:
            everyone = asyncio.Event()
        started += 1
        if started == RUNNING_TOGETHER:
            everyone.set()
        # Finishes only if all the others started meanwhile: they run at once, not in turn.
        await asyncio.wait_for(everyone.wait(), timeout=3)
        return n

    results = gather.map([(n,) for n in range(RUNNING_TOGETHER)])
    stats = run_bounded(app, pool="asyncio", concurrency=RUNNING_TOGETHER)
    assert [r.get(timeout=1) for r in results] == list(range(RUNNING_TOGETHER))
    assert stats.succeeded == RUNNING_TOGETHER


def test_a_plain_task_runs_in_a_thread_and_does_not_stall_the_loop(app: Conveyor) -> None:
    released = threading.Event()

    @app.task
    def blocking() -> str:
        assert released.wait(3), "the async task never ran while this one blocked"
        return "done"

    @app.task
    async def releaser() -> str:
        released.set()
        return "released"

    first, second = blocking.delay(), releaser.delay()
    run_bounded(app, pool="asyncio", concurrency=2)
    assert (first.get(timeout=1), second.get(timeout=1)) == ("done", "released")


def test_failures_and_limits_settle_and_the_next_tasks_run(app: Conveyor) -> None:
    @app.task(time_limit=0.2)
    async def stuck() -> None:
        await asyncio.sleep(30)

    @app.task
    async def broken() -> None:
        raise ValueError("nope")

    @app.task
    async def fine() -> int:
        return 1

    results = [stuck.delay(), broken.delay(), fine.delay()]
    stats = run_bounded(app, pool="asyncio", concurrency=3)
    assert [r.state for r in results] == [State.FAILURE, State.FAILURE, State.SUCCESS]
    assert app.results is not None
    record = app.results.get(results[0].id)
    assert record is not None and record.error_type == "TimeLimitExceeded"
    assert (stats.failed, stats.succeeded) == (2, 1)
