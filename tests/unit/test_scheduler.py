"""Schedules and the scheduler on a fake clock: tick times, daylight saving, missed ticks."""

from __future__ import annotations

import datetime as dt
import sys
import threading
from pathlib import Path
from typing import Any
from uuid import uuid4
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner
from conftest import wait_for

from conveyor import Conveyor, Worker
from conveyor.cli import main
from conveyor.errors import ArgumentError, ConfigurationError, UnknownTaskError
from conveyor.message import decode
from conveyor.scheduler import HEADER_TICK, Schedule, Scheduler, tick_id, tick_task_id
from conveyor.scheduler.claims import SQLiteClaims
from conveyor.task import current_request

UTC = dt.UTC
T0 = dt.datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


class Clock:
    """A clock the test moves."""

    def __init__(self, at: dt.datetime) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at.timestamp()

    def advance(self, **delta: float) -> None:
        self.at += dt.timedelta(**delta)


def local(zone: str, *args: int, fold: int = 0) -> dt.datetime:
    return dt.datetime(*args, tzinfo=ZoneInfo(zone), fold=fold).astimezone(UTC)  # type: ignore[misc]


def ticks(schedule: Schedule, after: dt.datetime, until: dt.datetime) -> list[dt.datetime]:
    due, dropped = schedule.due(after, until, 10_000)
    assert dropped == 0
    return due


def test_every_ticks_from_the_schedule_not_from_the_last_run() -> None:
    every = Schedule("s", "t", every=dt.timedelta(seconds=10))
    # Whenever the scheduler looks, the ticks are the same instants: no drift.
    assert ticks(every, T0 + dt.timedelta(seconds=3), T0 + dt.timedelta(seconds=31)) == [
        T0 + dt.timedelta(seconds=s) for s in (10, 20, 30)
    ]
    assert next(every.ticks(T0 + dt.timedelta(seconds=10))) == T0 + dt.timedelta(seconds=20)


def test_a_long_downtime_is_counted_not_walked() -> None:
    every = Schedule("s", "t", every=dt.timedelta(milliseconds=10))
    due, dropped = every.due(T0, T0 + dt.timedelta(days=365), 3)
    assert len(due) == 3 and due[-1] == T0 + dt.timedelta(days=365)
    assert dropped == 365 * 86_400 * 100 - 3


@pytest.mark.parametrize("zone", ["Europe/Berlin", "America/New_York"])
def test_a_0230_job_runs_once_on_both_daylight_saving_days(zone: str) -> None:
    daily = Schedule("s", "t", cron="30 2 * * *", tz=zone)
    spring = (2026, 3, 29) if zone == "Europe/Berlin" else (2026, 3, 8)
    autumn = (2026, 10, 25) if zone == "Europe/Berlin" else (2026, 11, 1)
    # Spring forward: 02:30 does not exist that day; the job runs once, at 03:00.
    got = ticks(daily, local(zone, *spring, 0, 0), local(zone, *spring, 23, 0))
    assert got == [local(zone, *spring, 3, 0)]
    # Fall back: 02:30 happens twice; the job runs once, the first time.
    got = ticks(daily, local(zone, *autumn, 0, 0), local(zone, *autumn, 23, 0))
    assert got == [local(zone, *autumn, 2, 30, fold=0)]
    # And every other day at 02:30 local time.
    day = ticks(daily, local(zone, 2026, 7, 1, 0, 0), local(zone, 2026, 7, 3, 0, 0))
    assert [t.astimezone(ZoneInfo(zone)).strftime("%d %H:%M") for t in day] == [
        "01 02:30",
        "02 02:30",
    ]


def test_a_job_without_an_hour_runs_in_both_copies_of_the_repeated_hour() -> None:
    zone = "Europe/Berlin"
    half = Schedule("s", "t", cron="*/30 * * * *", tz=zone)
    got = ticks(half, local(zone, 2026, 10, 25, 1, 59), local(zone, 2026, 10, 25, 3, 1))
    assert got == [
        local(zone, 2026, 10, 25, 2, 0, fold=0),
        local(zone, 2026, 10, 25, 2, 30, fold=0),
        local(zone, 2026, 10, 25, 2, 0, fold=1),
        local(zone, 2026, 10, 25, 2, 30, fold=1),
        local(zone, 2026, 10, 25, 3, 0),
    ]
    assert len(set(got)) == 5  # five different instants, an hour apart where the clock repeats


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"cron": "61 * * * *"}, "cannot read cron expression '61 * * * *': Bad minute"),
        ({"cron": "* * *"}, "cannot read cron expression '* * *'"),
        ({"cron": "0 3 * * *", "tz": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
        ({}, "exactly one of cron= and every="),
        ({"cron": "* * * * *", "every": dt.timedelta(1)}, "exactly one of cron= and every="),
        ({"every": dt.timedelta(0)}, "every= must be a timedelta of 10 ms or more"),
        ({"every": dt.timedelta(1), "missed": "twice"}, "missed='twice'; use one of once, skip"),
        ({"every": dt.timedelta(1), "grace": dt.timedelta(0)}, "grace must be a positive"),
    ],
)
def test_a_bad_schedule_is_refused_when_the_app_is_loaded(
    app: Conveyor, kwargs: dict[str, Any], says: str
) -> None:
    @app.task
    def nightly() -> None:
        """Nothing."""

    with pytest.raises(ConfigurationError, match="schedule") as caught:
        app.schedule(nightly, **kwargs)
    assert says in str(caught.value)
    assert app.schedules == {}


def test_two_schedules_of_one_name_and_a_schedule_under_the_wrong_decorator(
    app: Conveyor,
) -> None:
    @app.periodic(every=dt.timedelta(minutes=5))
    @app.task
    def poll_feeds() -> None:
        """Nothing."""

    with pytest.raises(ConfigurationError, match="two schedules are named"):
        app.schedule(poll_feeds, cron="0 * * * *")
    app.schedule(poll_feeds, cron="0 * * * *", name="hourly")
    assert set(app.schedules) == {poll_feeds.name, "hourly"}
    with pytest.raises(ConfigurationError, match=r"above @app\.task"):
        app.periodic(every=dt.timedelta(minutes=1))(lambda: None)  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match="too many positional arguments"):  # as a send would
        app.schedule(poll_feeds, every=dt.timedelta(1), args=(1,), name="with-args")


def test_a_schedule_of_an_unknown_task_is_refused_by_name(app: Conveyor, tmp_path: Path) -> None:
    app.schedule("reports.nightly", cron="0 3 * * *")
    with pytest.raises(UnknownTaskError, match=r"reports\.nightly"):
        Scheduler(app, SQLiteClaims(f"sqlite:///{tmp_path}/claims.db"))


class Fleet:
    """Schedulers of one app on one claim store, on one fake clock."""

    def __init__(self, app: Conveyor, store: str, count: int, clock: Clock) -> None:
        self.app, self.clock = app, clock
        self.schedulers = [
            Scheduler(app, SQLiteClaims(store), clock=clock, owner=f"s{n}", lease=5.0)
            for n in range(count)
        ]

    def step(self) -> None:
        for scheduler in self.schedulers:
            scheduler.step()

    def sent(self) -> list[str]:
        """The tick ids of the messages in the app's queue."""
        deliveries = self.app.broker.fetch(["default"], 100_000)
        return sorted(decode(d.body).headers[HEADER_TICK] for d in deliveries)


@pytest.fixture
def memory_app() -> Conveyor:
    app = Conveyor("sched", broker="memory://", results=None)

    @app.task(name="sched.tick")
    def tick() -> None:
        """Nothing."""

    return app


def test_three_schedulers_send_each_tick_once(memory_app: Conveyor, tmp_path: Path) -> None:
    memory_app.schedule("sched.tick", every=dt.timedelta(seconds=1), name="fast")
    clock = Clock(T0)
    fleet = Fleet(memory_app, f"sqlite:///{tmp_path}/claims.db", 3, clock)
    fleet.step()  # they start from now: nothing is due yet
    for _ in range(50):
        clock.advance(seconds=1)
        fleet.step()
    expected = [tick_id("fast", T0 + dt.timedelta(seconds=s)) for s in range(1, 51)]
    assert fleet.sent() == sorted(expected)
    assert sum(s.sent for s in fleet.schedulers) == 50


def test_a_claim_whose_scheduler_died_unsent_is_taken_over_after_its_lease(
    memory_app: Conveyor, tmp_path: Path
) -> None:
    memory_app.schedule("sched.tick", every=dt.timedelta(seconds=10), name="ten")
    store = f"sqlite:///{tmp_path}/claims.db"
    clock = Clock(T0)
    survivor = Scheduler(memory_app, SQLiteClaims(store), clock=clock, owner="b", lease=5.0)
    survivor.step()
    # Another scheduler claimed the next tick and died before sending it.
    tick = T0 + dt.timedelta(seconds=10)
    assert SQLiteClaims(store).claim("ten", tick, "a", 5.0, tick)
    clock.advance(seconds=10)
    survivor.step()
    assert survivor.sent == 0  # the claim holds: its owner may still send it
    clock.advance(seconds=6)
    survivor.step()
    assert survivor.sent == 1
    (delivery,) = memory_app.broker.fetch(["default"], 10)
    envelope = decode(delivery.body)
    assert envelope.headers[HEADER_TICK] == tick_id("ten", tick)
    assert envelope.id == tick_task_id("ten", tick)
    last = SQLiteClaims(store).last("ten")
    assert last is not None and (last.tick, last.owner, last.sent) == (tick, "b", True)


@pytest.mark.parametrize(
    ("missed", "grace", "expected"),
    [
        ("once", None, [60]),  # the latest missed tick only
        ("skip", None, []),  # none of them
        ("all", None, [40, 50, 60]),  # each, up to max_missed=3 (the latest)
        ("all", dt.timedelta(seconds=20), [50, 60]),  # not those older than the grace
    ],
)
def test_missed_ticks_after_downtime_follow_the_schedule_policy(
    memory_app: Conveyor,
    tmp_path: Path,
    missed: Any,
    grace: dt.timedelta | None,
    expected: list[int],
) -> None:
    memory_app.schedule(
        "sched.tick",
        every=dt.timedelta(seconds=10),
        name="ten",
        missed=missed,
        max_missed=3,
        grace=grace,
    )
    store = f"sqlite:///{tmp_path}/claims.db"
    clock = Clock(T0)
    first = Scheduler(memory_app, SQLiteClaims(store), clock=clock)
    first.step()
    clock.advance(seconds=10)
    first.step()  # sends the tick at T0+10
    memory_app.broker.fetch(["default"], 10)
    # Down for 57 s: ticks at +20 ... +60 are missed; a new scheduler starts from the store.
    clock.advance(seconds=57)
    Scheduler(memory_app, SQLiteClaims(store), clock=clock).step()
    got = memory_app.broker.fetch(["default"], 10)
    ticks_sent = sorted(decode(d.body).headers[HEADER_TICK] for d in got)
    assert ticks_sent == [tick_id("ten", T0 + dt.timedelta(seconds=s)) for s in expected]


def test_an_unreachable_store_sends_nothing(memory_app: Conveyor, tmp_path: Path) -> None:
    """No claim, no send: the ticks are late, never doubled."""

    class Down(SQLiteClaims):
        def claim(self, *args: Any) -> bool:
            raise OSError("connection refused")

    memory_app.schedule("sched.tick", every=dt.timedelta(seconds=1), name="fast")
    clock = Clock(T0)
    scheduler = Scheduler(memory_app, Down(f"sqlite:///{tmp_path}/c.db"), clock=clock)
    scheduler.step()
    clock.advance(seconds=3)
    with pytest.raises(OSError, match="refused"):  # `run` logs it and retries with backoff
        scheduler.step()
    assert memory_app.broker.fetch(["default"], 10) == []


def test_a_tick_runs_with_its_id_in_the_request(tmp_path: Path) -> None:
    """On the embedded broker, with the claims in the broker's own file: claim, send and
    record are one transaction."""
    app = Conveyor("sched", broker=f"sqlite:///{tmp_path}/app.db")
    seen: list[tuple[str, str]] = []

    @app.periodic(every=dt.timedelta(seconds=30), name="half-minute")
    @app.task(name="sched.report")
    def report() -> None:
        request = current_request.get()
        assert request is not None
        seen.append((request.id, request.headers[HEADER_TICK]))

    clock = Clock(T0)
    scheduler = Scheduler(app, clock=clock)
    assert scheduler.claims.display_url == f"sqlite:///{tmp_path}/app.db"
    scheduler.step()
    clock.advance(seconds=30)
    scheduler.step()
    Worker(app, pool="threads", concurrency=1, until_empty=True).run()
    tick = T0 + dt.timedelta(seconds=30)
    assert seen == [(tick_task_id("half-minute", tick), tick_id("half-minute", tick))]
    app.close()


def test_the_docs_example_declares_its_three_schedules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # its app uses the embedded broker's default file
    page = (Path(__file__).resolve().parents[2] / "docs" / "periodic-tasks.md").read_text()
    example = page.split("```python\n")[1].split("```")[0]
    namespace: dict[str, Any] = {"__name__": "shop"}
    exec(example, namespace)
    app = namespace["app"]
    try:
        schedules = app.schedules
        assert set(schedules) == {"shop.nightly_report", "shop.refresh", "weekday-cleanup"}
        assert schedules["weekday-cleanup"].kwargs == {"days": 30}
        nightly = schedules["shop.nightly_report"]
        after = dt.datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
        assert next(nightly.ticks(after)) == dt.datetime(2026, 12, 4, 2, 0, tzinfo=UTC)
    finally:
        app.close()


def _cli_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> str:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(tmp_path)
    monkeypatch.setenv("COLUMNS", "250")
    name = f"sched_app_{uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "import datetime as dt\nfrom conveyor import Conveyor\n\n"
        f"app = Conveyor('cli', broker='sqlite:///{tmp_path}/app.db')\n\n{body}"
    )
    return f"{name}:app"


def test_conveyor_schedule_lists_next_and_last_ticks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _cli_app(
        tmp_path,
        monkeypatch,
        "@app.periodic(cron='0 3 * * *', tz='Europe/Berlin', name='nightly')\n"
        "@app.task(name='cli.report')\ndef report() -> None:\n    pass\n",
    )
    shown = CliRunner().invoke(main, ["schedule", path])
    assert shown.exit_code == 0, shown.output
    assert "nightly" in shown.output and "cron 0 3 * * * (Europe/Berlin)" in shown.output
    assert "03:00:00+01:00" in shown.output and "never" in shown.output
    app = sys.modules[path.split(":")[0]].app
    scheduler = Scheduler(app, clock=Clock(dt.datetime(2026, 12, 4, 1, 59, 59, tzinfo=UTC)))
    scheduler.step()
    scheduler.clock = Clock(dt.datetime(2026, 12, 4, 2, 0, 1, tzinfo=UTC))
    scheduler.step()
    scheduler.close()
    shown = CliRunner().invoke(main, ["schedule", path])
    assert "2026-12-04 03:00:00+01:00" in shown.output and scheduler.owner in shown.output


def test_conveyor_scheduler_without_schedules_says_what_to_add(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _cli_app(tmp_path, monkeypatch, "")
    result = CliRunner().invoke(main, ["scheduler", path])
    assert result.exit_code == 1
    assert "declares no schedules: add @app.periodic(...) or app.schedule(...)" in result.output


def test_a_scheduler_whose_store_is_down_retries_and_sends_nothing(
    memory_app: Conveyor, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Down(SQLiteClaims):
        def last(self, schedule: str) -> Any:
            raise OSError("connection refused")

    memory_app.schedule("sched.tick", every=dt.timedelta(milliseconds=10), name="fast")
    scheduler = Scheduler(memory_app, Down(f"sqlite:///{tmp_path}/c.db"))
    thread = threading.Thread(target=scheduler.run)
    with caplog.at_level("ERROR", logger="conveyor.scheduler"):
        thread.start()
        wait_for(lambda: len(caplog.records) >= 2, what="two failed steps")
        scheduler.stop()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert "connection refused; nothing is sent that is not claimed, retrying in" in caplog.text
    assert memory_app.broker.fetch(["default"], 10) == []
