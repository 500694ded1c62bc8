"""The worker rides out broker failures, late settlements and risky time limits."""

from __future__ import annotations

import time
from typing import Any

import pytest

from conveyor import Conveyor
from conveyor.brokers.memory import MemoryBroker
from conveyor.testing import memory_app, run_until_empty
from conveyor.worker import consumer


def test_the_worker_backs_off_and_recovers_when_the_broker_fails(
    app: Conveyor, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(consumer, "RETRY_BASE_S", 0.001)
    delays: list[float] = []
    real_uniform = consumer.random.uniform

    def uniform(low: float, high: float) -> float:
        delays.append(high)
        return real_uniform(low, high)

    monkeypatch.setattr(consumer.random, "uniform", uniform)

    @app.task
    def double(x: int) -> int:
        return 2 * x

    results = double.map([(n,) for n in range(5)])
    broker = app.broker
    real_fetch = broker.fetch
    failures = iter(range(3))

    def flaky_fetch(queues: Any, limit: int) -> Any:
        if next(failures, None) is not None:
            raise OSError("connection reset by peer")
        return real_fetch(queues, limit)

    monkeypatch.setattr(broker, "fetch", flaky_fetch)
    run_until_empty(app)
    assert [r.get(timeout=1) for r in results] == [0, 2, 4, 6, 8]
    assert delays == [0.002, 0.004, 0.008], "the ceiling doubles with each failure in a row"
    assert caplog.text.count("retrying the broker") == 3
    assert "answers again after 3 failed rounds" in caplog.text


def test_a_task_that_outlives_its_lease_is_counted_and_runs_again(
    app: Conveyor, caplog: pytest.LogCaptureFixture
) -> None:
    broker = app.broker
    assert isinstance(broker, MemoryBroker)
    runs: list[int] = []

    @app.task(bind=True)
    def slow(self: Any) -> int:
        runs.append(self.request.delivery_count)
        if len(runs) == 1:
            # Time jumps past the lease while the task runs, as if it had taken far too long.
            later = time.time() + 10 * broker.visibility_timeout
            broker.clock = lambda: later
            broker.stats()  # another worker's look at the queue reclaims the expired lease
        return len(runs)

    result = slow.delay()
    stats = run_until_empty(app)
    assert runs == [1, 2]
    assert stats.stale == 1 and stats.succeeded == 2
    assert result.get(timeout=1) == 2
    assert "finished after their delivery had ended" in caplog.text


@pytest.mark.parametrize(("time_limit", "warned"), [(3600, True), (60, False), (None, False)])
def test_a_time_limit_beyond_the_brokers_ack_timeout_is_warned_about(
    caplog: pytest.LogCaptureFixture, time_limit: float | None, warned: bool
) -> None:
    app = memory_app()
    app.broker.ack_timeout = 1800.0

    @app.task(name="report", time_limit=time_limit)
    def report() -> None:
        pass

    run_until_empty(app)
    assert ("report may run" in caplog.text) is warned
    app.close()


def test_the_sqlite_broker_needs_no_ack_timeout_warning(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = Conveyor("t", broker=f"sqlite:///{tmp_path}/q.db")

    @app.task(time_limit=86_400)
    def nightly() -> None:
        pass

    run_until_empty(app)
    assert "may run" not in caplog.text
    app.close()
