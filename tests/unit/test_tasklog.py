"""The worker's INFO lines about finished tasks: a line each while few, summaries while many.

`TaskLog` on a clock the tests move by hand, so the thresholds are exact; through a real worker
on the memory broker at the end. In worker processes: tests/integration/test_logging.py.
"""

from __future__ import annotations

import logging

import pytest
from conftest import run_bounded

from conveyor import Conveyor
from conveyor.testing import memory_app
from conveyor.worker.tasklog import LINES_PER_S, SUMMARY_EVERY_S, TaskLog, TaskLogMode

LOGGER = "conveyor.worker.tasklog"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def lines(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger=LOGGER)
    return caplog


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    out = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    caplog.clear()
    return out


def finish(log: TaskLog, n: int, name: str = "shop.charge", outcome: str = "succeeded") -> None:
    for k in range(n):
        log.finished(name, f"id{k}", outcome, 0.00125)


def test_a_line_for_each_success_while_few(clock: Clock, lines: pytest.LogCaptureFixture) -> None:
    log = TaskLog(clock=clock)
    for _ in range(3):
        clock.now += 1.0
        finish(log, LINES_PER_S - 1)  # 9 a second, three seconds running
        finish(log, 1, outcome="failed")  # counts toward the rate, but the consumer logs it
    got = messages(lines)
    assert len(got) == 3 * (LINES_PER_S - 1)
    assert got[0] == "task shop.charge[id0] succeeded in 1.25ms"
    log.tick()
    log.flush()
    assert messages(lines) == []


def test_the_line_carries_the_task_for_structured_formatters(
    clock: Clock, lines: pytest.LogCaptureFixture
) -> None:
    TaskLog(clock=clock).finished("shop.charge", "abc", "succeeded", 2.5)
    (record,) = lines.records
    assert record.getMessage() == "task shop.charge[abc] succeeded in 2.50s"
    fields = {k: getattr(record, k) for k in ("task_name", "task_id", "task_outcome")}
    assert fields == {"task_name": "shop.charge", "task_id": "abc", "task_outcome": "succeeded"}
    assert record.task_runtime == 2.5  # type: ignore[attr-defined]


def test_more_than_the_limit_in_a_second_switches_to_summaries(
    clock: Clock, lines: pytest.LogCaptureFixture
) -> None:
    log = TaskLog(clock=clock)
    finish(log, LINES_PER_S)
    assert len(messages(lines)) == LINES_PER_S
    finish(log, 190)  # the 11th within the second: no more lines
    finish(log, 3, outcome="failed")
    finish(log, 7, name="shop.ship", outcome="retried")
    assert messages(lines) == []
    clock.now += SUMMARY_EVERY_S - 0.01
    log.tick()
    assert messages(lines) == []  # the interval is not over yet
    clock.now += 0.01
    log.tick()
    assert messages(lines) == [
        "200 tasks finished in the last 5.0s (40/s); shop.charge: 190 succeeded (38/s), "
        "3 failed (0.6/s); shop.ship: 7 retried (1.4/s)"
    ]


def test_a_finishing_task_puts_out_a_due_summary(
    clock: Clock, lines: pytest.LogCaptureFixture
) -> None:
    log = TaskLog(clock=clock)
    finish(log, LINES_PER_S + 100)
    messages(lines)
    clock.now += SUMMARY_EVERY_S
    finish(log, 1)  # opens the next interval, and is counted in it
    assert messages(lines) == [
        "100 tasks finished in the last 5.0s (20/s); shop.charge: 100 succeeded (20/s)"
    ]
    clock.now += 1.0
    log.flush()  # at shutdown: what the interval holds so far
    assert messages(lines) == [
        "1 tasks finished in the last 1.0s (1.0/s); shop.charge: 1 succeeded (1.0/s)"
    ]


def test_summaries_stay_while_an_interval_averages_half_the_limit(
    clock: Clock, lines: pytest.LogCaptureFixture
) -> None:
    log = TaskLog(clock=clock)
    finish(log, LINES_PER_S + 1)
    messages(lines)
    per_interval = int(SUMMARY_EVERY_S * LINES_PER_S / 2)  # exactly 5 a second: still many
    finish(log, per_interval - 1)  # with the one above
    clock.now += SUMMARY_EVERY_S
    log.tick()
    assert len(messages(lines)) == 1
    finish(log, per_interval - 1)  # 4.8 a second: few again
    clock.now += SUMMARY_EVERY_S
    log.tick()
    assert messages(lines) == [
        "24 tasks finished in the last 5.0s (4.8/s); shop.charge: 24 succeeded (4.8/s)"
    ]
    finish(log, 2)
    assert messages(lines) == [
        "task shop.charge[id0] succeeded in 1.25ms",
        "task shop.charge[id1] succeeded in 1.25ms",
    ]


def test_an_empty_interval_brings_the_lines_back(
    clock: Clock, lines: pytest.LogCaptureFixture
) -> None:
    log = TaskLog(clock=clock)
    finish(log, LINES_PER_S + 1)
    clock.now += SUMMARY_EVERY_S
    log.tick()
    messages(lines)
    clock.now += SUMMARY_EVERY_S
    log.tick()  # nothing finished: no summary line
    assert messages(lines) == []
    finish(log, 1)
    assert messages(lines) == ["task shop.charge[id0] succeeded in 1.25ms"]


def test_a_summary_names_the_ten_busiest_tasks(
    clock: Clock, lines: pytest.LogCaptureFixture
) -> None:
    log = TaskLog(clock=clock)
    finish(log, LINES_PER_S + 1, name="warm.up")
    messages(lines)
    for n in range(12):
        finish(log, 100 - n, name=f"t{n:02d}")
    clock.now += SUMMARY_EVERY_S
    log.tick()
    (summary,) = messages(lines)
    # The task that switched to summaries is the first counted: warm.up, 1, among the rest.
    assert summary.startswith("1,135 tasks finished in the last 5.0s (227/s); t00: 100 succeeded")
    assert summary.endswith("t09: 91 succeeded (18/s); 3 more tasks: 180 finished (36/s)")
    assert "t10" not in summary


@pytest.mark.parametrize("mode", ["each", "quiet"])
def test_each_and_quiet_choose_one_way_for_good(
    mode: TaskLogMode, clock: Clock, lines: pytest.LogCaptureFixture
) -> None:
    log = TaskLog(mode, clock=clock)
    finish(log, 1000)
    finish(log, 5, outcome="failed")
    clock.now += 60
    log.tick()
    log.flush()
    assert len(messages(lines)) == (1000 if mode == "each" else 0)


def test_nothing_is_counted_while_info_is_off(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    log = TaskLog(clock=clock)
    finish(log, 1000)
    caplog.set_level(logging.INFO, logger=LOGGER)
    clock.now += 60
    log.flush()
    assert messages(caplog) == []


# through a worker


@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_the_worker_logs_each_success_and_not_failures_twice(
    app: Conveyor, pool: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="conveyor")

    @app.task(name="shop.add")
    def add(x: int) -> int:
        return x + 1

    @app.task(name="shop.boom", max_retries=0)
    def boom() -> None:
        raise ValueError("no good")

    sent = [add.delay(n).id for n in range(3)]
    boom.delay()
    run_bounded(app, pool=pool)
    failures = [r for r in caplog.records if "failed: ValueError: no good" in r.getMessage()]
    assert len(failures) == 1
    got = messages(caplog)
    assert sorted(m.rpartition(" in ")[0] for m in got) == sorted(
        f"task shop.add[{task_id}] succeeded" for task_id in sent
    )


@pytest.mark.parametrize("where", ["setting", "environment", "argument"])
def test_the_worker_takes_its_mode_from_settings_or_argument(
    where: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="conveyor")
    if where == "environment":
        monkeypatch.setenv("CONVEYOR_TASK_LOG", "quiet")
    app = memory_app(**({"task_log": "quiet"} if where == "setting" else {}))
    try:

        @app.task(name="shop.add")
        def add(x: int) -> int:
            return x + 1

        add.delay(1)
        run_bounded(app, **({"task_log": "quiet"} if where == "argument" else {}))
    finally:
        app.close()
    assert messages(caplog) == []
