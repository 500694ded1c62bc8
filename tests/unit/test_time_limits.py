"""Soft and hard time limits in every pool: prefork (in its children), threads, asyncio and solo."""

from __future__ import annotations

import asyncio
import time

import pytest

from conveyor import Conveyor, SoftTimeLimitExceeded
from conveyor.results import State
from conveyor.testing import memory_app, run_until_empty

POOLS = ["prefork", "threads", "asyncio", "solo"]


def spin(seconds: float) -> None:
    """Busy Python work: a time-limit exception can land between its instructions."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass


@pytest.fixture
def app() -> Conveyor:
    return memory_app()


@pytest.mark.parametrize("pool", POOLS)
def test_soft_limit_raises_inside_the_task(app: Conveyor, pool: str) -> None:
    @app.task(soft_time_limit=0.2)
    def slow() -> str:
        spin(10)
        return "finished"

    started = time.monotonic()
    result = slow.delay()
    stats = run_until_empty(app, pool=pool)
    assert time.monotonic() - started < 5
    assert result.state == State.FAILURE
    record = app.results.get(result.id) if app.results else None
    assert record is not None and record.error_type == "SoftTimeLimitExceeded"
    assert stats.failed == 1


@pytest.mark.parametrize("pool", POOLS)
def test_task_can_clean_up_after_its_soft_limit(app: Conveyor, pool: str) -> None:
    @app.task(soft_time_limit=0.2, time_limit=5)
    def careful() -> str:
        try:
            spin(10)
        except SoftTimeLimitExceeded:
            return "cleaned up"
        return "finished"

    result = careful.delay()
    run_until_empty(app, pool=pool)
    assert result.get(timeout=1) == "cleaned up"


@pytest.mark.parametrize("pool", POOLS)
def test_hard_limit_stops_a_task_that_ignores_the_soft_one(app: Conveyor, pool: str) -> None:
    @app.task(soft_time_limit=0.1, time_limit=0.4)
    def stubborn() -> str:
        try:
            spin(10)
        except SoftTimeLimitExceeded:
            spin(10)
        return "finished"

    result = stubborn.delay()
    run_until_empty(app, pool=pool)
    record = app.results.get(result.id) if app.results else None
    assert record is not None and record.error_type == "TimeLimitExceeded"


@pytest.mark.parametrize("pool", POOLS)
def test_async_task_over_its_limit_fails(app: Conveyor, pool: str) -> None:
    @app.task(time_limit=0.2)
    async def sleepy() -> str:
        await asyncio.sleep(10)
        return "finished"

    started = time.monotonic()
    result = sleepy.delay()
    run_until_empty(app, pool=pool)
    assert time.monotonic() - started < 5
    record = app.results.get(result.id) if app.results else None
    assert record is not None and record.error_type == "TimeLimitExceeded"


@pytest.mark.parametrize("pool", POOLS)
def test_soft_limit_can_trigger_a_retry(app: Conveyor, pool: str) -> None:
    @app.task(bind=True, soft_time_limit=0.1, autoretry_for=(SoftTimeLimitExceeded,))
    def sometimes_slow(self: object) -> int:
        retries: int = self.request.retries  # type: ignore[attr-defined]
        if retries == 0:
            spin(10)
        return retries

    result = sometimes_slow.delay()
    stats = run_until_empty(app, pool=pool)
    assert result.get(timeout=1) == 1
    assert stats.retried == 1


@pytest.mark.parametrize("pool", POOLS)
def test_tasks_within_their_limits_are_untouched(app: Conveyor, pool: str) -> None:
    @app.task(soft_time_limit=0.05, time_limit=0.1)
    def quick(n: int) -> int:
        return n

    results = quick.map([(n,) for n in range(300)])
    stats = run_until_empty(app, pool=pool)
    assert [r.get(timeout=1) for r in results] == list(range(300))
    assert stats.failed == 0
