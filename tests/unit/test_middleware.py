"""Middleware on the memory broker, in the prefork, threads, asyncio and solo pools: every hook
where it belongs, the task options a middleware declares, and isolation of a raising one."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from middleware_cases import (
    Exploding,
    Recorder,
    Scenario,
    by_hook,
    check_scenario,
    note,
    read,
)

from conveyor import ConfigurationError, Conveyor, Request, Task, Worker
from conveyor.errors import TaskFailed, TaskSkipped
from conveyor.message import Envelope, decode
from conveyor.middleware import Middleware, RunOutcome
from conveyor.testing import memory_app, run_until_empty

POOLS = ["prefork", "threads", "asyncio", "solo"]


@pytest.fixture
def app() -> Iterator[Conveyor]:
    application = memory_app()
    yield application
    application.close()


def broker_is_empty(app: Conveyor) -> bool:
    return all(s.ready + s.delayed + s.in_flight + s.dead == 0 for s in app.broker.stats())


# every hook, in the process it belongs to


@pytest.mark.parametrize("pool", POOLS)
def test_every_hook_runs_once_per_event_where_it_belongs(
    app: Conveyor, pool: str, tmp_path: Path
) -> None:
    ledger = tmp_path / "hooks.jsonl"
    app.add_middleware(Recorder(ledger))
    scenario = Scenario(app)
    ids = scenario.send()
    stats = run_until_empty(app, pool=pool)
    check_scenario(read(ledger), ids, prefork=pool == "prefork")
    assert (stats.succeeded, stats.failed, stats.retried) == (3, 1, 1)
    assert broker_is_empty(app)


def test_middleware_passed_to_the_app_runs_in_order(tmp_path: Path) -> None:
    ledger = tmp_path / "hooks.jsonl"
    app = memory_app(middleware=[Recorder(ledger, "first"), Recorder(ledger, "second")])
    try:

        @app.task
        def noop() -> None: ...

        noop.delay()
        run_until_empty(app)
    finally:
        app.close()
    order = [(n["hook"], n["by"]) for n in read(ledger) if n["hook"] == "before_run"]
    assert order == [("before_run", "first"), ("before_run", "second")]


def test_before_send_headers_travel_with_the_message(app: Conveyor, tmp_path: Path) -> None:
    app.add_middleware(Recorder(tmp_path / "hooks.jsonl"))

    @app.task
    def noop() -> None: ...

    result = noop.apply_async(headers={"tenant": "a"})
    (delivery,) = app.broker.fetch(["default"], 1)
    assert decode(delivery.body).headers == {"tenant": "a", "traceparent": f"00-{result.id}-01"}


def test_after_settle_sees_messages_that_never_ran(app: Conveyor, tmp_path: Path) -> None:
    ledger = tmp_path / "hooks.jsonl"
    app.add_middleware(Recorder(ledger))
    envelope = Envelope(id="a" * 32, task="nobody.registered", queue="default")
    from conveyor.brokers import Outgoing
    from conveyor.message import encode

    app.broker.publish([Outgoing("default", encode(envelope)), Outgoing("default", b"{junk")])
    stats = run_until_empty(app)
    settled = by_hook(read(ledger))["after_settle"]
    seen = [(n["id"], n["task"], n["outcome"], n["ran"]) for n in settled]
    assert sorted(seen, key=str) == [
        ("a" * 32, None, "rejected", False),
        (None, None, "rejected", False),
    ]
    assert all(n["dead_letter"] for n in settled)
    assert "before_run" not in by_hook(read(ledger))
    assert stats.rejected == 2


# isolation


@pytest.mark.parametrize("pool", POOLS)
def test_a_raising_middleware_loses_nothing_and_the_others_still_run(
    app: Conveyor, pool: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = tmp_path / "hooks.jsonl"
    app.add_middleware(Exploding(ledger))
    app.add_middleware(Recorder(ledger))
    scenario = Scenario(app)
    ids = scenario.send()
    with caplog.at_level(logging.ERROR, logger="conveyor.middleware"):
        stats = run_until_empty(app, pool=pool)
    notes = read(ledger)
    check_scenario(notes, ids, prefork=pool == "prefork")
    assert (stats.succeeded, stats.failed, stats.retried, stats.rejected) == (3, 1, 1, 0)
    assert scenario.tasks["double"].app.result(ids["double"]).get(timeout=1) == 42
    assert broker_is_empty(app)
    exploded = by_hook(notes, "exploding")
    assert {hook: len(n) for hook, n in exploded.items()} == {
        "process_start": len(exploded["process_start"]),
        "worker_start": 1,
        "before_admit": 5,
        "before_run": 5,
        "after_run": 5,
        "after_settle": 5,
        "worker_stop": 1,
    }
    # One line per failure, naming the middleware and the hook (the worker's process logs
    # here; a prefork child logs its own the same way, to its stderr).
    logged = [r.getMessage() for r in caplog.records if r.name == "conveyor.middleware"]
    in_worker = ["worker_start", "before_admit", "after_settle", "worker_stop"]
    in_runner = [] if pool == "prefork" else ["process_start", "before_run", "after_run"]
    for hook in in_worker + in_runner:
        expected = len(exploded[hook])
        lines = [m for m in logged if m == f"middleware Exploding raised in {hook}; ignored"]
        assert len(lines) == expected, (hook, logged)
    assert all(r.exc_info is not None for r in caplog.records if r.name == "conveyor.middleware")


def test_before_send_that_raises_reaches_the_caller_and_sends_nothing(app: Conveyor) -> None:
    class Refusing(Middleware):
        def before_send(self, envelope: Envelope, headers: dict[str, str]) -> None:
            raise PermissionError("not this tenant")

    app.add_middleware(Refusing())

    @app.task
    def noop() -> None: ...

    with pytest.raises(PermissionError, match="not this tenant"):
        noop.delay()
    with pytest.raises(PermissionError):
        noop.map([(), ()])
    assert broker_is_empty(app)


def test_headers_that_are_not_strings_fail_the_send(app: Conveyor) -> None:
    class Sloppy(Middleware):
        def before_send(self, envelope: Envelope, headers: dict[str, str]) -> None:
            headers["attempt"] = 1  # type: ignore[assignment]

    app.add_middleware(Sloppy())

    @app.task
    def noop() -> None: ...

    with pytest.raises(ConfigurationError, match="strings"):
        noop.delay()
    assert broker_is_empty(app)


# what counts as a middleware


class NoHooks:
    pass


class Misspelled(Middleware):
    def before_runn(self, task: Task[Any, Any], request: Request) -> None: ...


class DuckTyped:
    """Not a subclass: any object with a hook is a middleware."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def before_run(self, task: Task[Any, Any], request: Request) -> None:
        self.seen.append(request.id)


def test_an_object_without_hooks_is_refused(app: Conveyor) -> None:
    with pytest.raises(ConfigurationError, match=r"is not a middleware.*before_send"):
        app.add_middleware(NoHooks())
    with pytest.raises(ConfigurationError, match="is not a middleware"):
        app.add_middleware(Middleware())
    with pytest.raises(ConfigurationError, match="is not a middleware"):
        memory_app(middleware=[object()])


def test_a_misspelled_hook_is_refused(app: Conveyor) -> None:
    with pytest.raises(ConfigurationError, match=r"unknown hook 'before_runn'.*'before_run'"):
        app.add_middleware(Misspelled())


def test_a_duck_typed_middleware_works(app: Conveyor) -> None:
    duck = DuckTyped()
    app.add_middleware(duck)

    @app.task
    def noop() -> None: ...

    result = noop.delay()
    run_until_empty(app)
    assert duck.seen == [result.id]


def test_no_middleware_means_no_hooks(app: Conveyor) -> None:
    hooks = app.hooks
    assert not any(getattr(hooks, name) for name in hooks.__slots__)


def test_only_overridden_hooks_are_kept(app: Conveyor) -> None:
    class OnlyAfterRun(Middleware):
        def after_run(self, task: Task[Any, Any], request: Request, outcome: RunOutcome) -> None:
            pass

    app.add_middleware(OnlyAfterRun())
    kept = [name for name in app.hooks.__slots__ if getattr(app.hooks, name)]
    assert kept == ["after_run"]


# task options a middleware declares


class SentryOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    sentry: bool = True
    sentry_sample_rate: float = msgspec.field(default=1.0)


class Bounded(msgspec.Struct, frozen=True, kw_only=True):
    sentry_sample_rate: float = 1.0


class WithOptions(Middleware):
    options = SentryOptions

    def __init__(self) -> None:
        self.seen: dict[str, SentryOptions] = {}

    def after_run(self, task: Task[Any, Any], request: Request, outcome: RunOutcome) -> None:
        self.seen[task.name] = task.options_for(SentryOptions)


def test_middleware_options_are_accepted_and_read_by_the_middleware(app: Conveyor) -> None:
    middleware = WithOptions()
    app.add_middleware(middleware)

    @app.task(sentry=False, queue="default")
    def quiet() -> None: ...

    @app.task
    def loud() -> None: ...

    quiet.delay()
    loud.delay()
    run_until_empty(app)
    assert middleware.seen == {
        quiet.name: SentryOptions(sentry=False),
        loud.name: SentryOptions(),
    }


def test_a_bad_middleware_option_value_fails_at_decoration(app: Conveyor) -> None:
    app.add_middleware(WithOptions())
    with pytest.raises(ConfigurationError, match="invalid task option: Expected `bool`"):

        @app.task(sentry="yes")
        def noop() -> None: ...


def test_unknown_options_are_still_refused_with_the_middleware_names(app: Conveyor) -> None:
    with pytest.raises(ConfigurationError, match="unknown task option 'sentry'"):

        @app.task(sentry=False)
        def early() -> None: ...

    app.add_middleware(WithOptions())
    with pytest.raises(
        ConfigurationError, match=r"unknown task option 'sentri'.*did you mean 'sentry'"
    ):

        @app.task(sentri=False)
        def typo() -> None: ...


def test_options_may_not_clash(app: Conveyor) -> None:
    class Shadowing(Middleware):
        options = msgspec.defstruct("Shadow", [("queue", str, "x")])

    with pytest.raises(ConfigurationError, match="'queue', which conveyor declares"):
        app.add_middleware(Shadowing())
    app.add_middleware(WithOptions())

    class Twice(Middleware):
        options = Bounded

    with pytest.raises(ConfigurationError, match="middleware WithOptions declares already"):
        app.add_middleware(Twice())
    with pytest.raises(ConfigurationError, match=r"must be a msgspec\.Struct"):

        class NotAStruct(Middleware):
            options = dict  # type: ignore[assignment]

        app.add_middleware(NotAStruct())


def test_options_of_a_task_decorated_before_the_middleware_are_its_defaults(
    app: Conveyor,
) -> None:
    @app.task
    def noop() -> None: ...

    app.add_middleware(WithOptions())
    assert noop.options_for(SentryOptions) == SentryOptions()


# request fields Celery users rely on


@pytest.mark.parametrize("pool", POOLS)
def test_request_has_time_limits_root_id_and_delivery_info(app: Conveyor, pool: str) -> None:
    @app.task(bind=True, time_limit=30, soft_time_limit=20, priority=4)
    def report(self: Task[Any, Any], send: bool) -> dict[str, Any]:
        r = self.request
        # A prefork child cannot send to memory://: the integration tests do it on SQLite.
        child = inner.delay().id if send else None
        return {
            "id": r.id,
            "root_id": r.root_id,
            "limits": [r.time_limit, r.soft_time_limit],
            "delivery_info": r.delivery_info,
            "child": child,
        }

    @app.task(bind=True)
    def inner(self: Task[Any, Any]) -> list[Any]:
        r = self.request
        return [r.root_id, r.parent_id, r.time_limit, r.soft_time_limit]

    result = report.apply_async((pool != "prefork",), priority=7)
    run_until_empty(app, pool=pool)
    answer = result.get(timeout=1)
    assert answer["root_id"] == answer["id"] == result.id
    assert answer["limits"] == [30, 20]
    assert answer["delivery_info"] == {
        "queue": "default",
        "routing_key": "default",
        "priority": 7,
        "redelivered": False,
    }
    if answer["child"] is not None:
        assert app.result(answer["child"]).get(timeout=1) == [result.id, result.id, None, None]


def test_an_inline_call_is_its_own_root() -> None:
    app = memory_app()

    @app.task(bind=True)
    def whoami(self: Task[Any, Any]) -> tuple[str, str | None]:
        return self.request.id, self.request.root_id

    task_id, root = whoami()
    assert root == task_id
    app.close()


# a middleware that decides at admission (the seam revocation is built on)


class SkipOdd(Middleware):
    """Skips every delivery whose first argument is odd."""

    def before_admit(self, task: Task[Any, Any], request: Request) -> None:
        if request.args and request.args[0] % 2:
            raise TaskSkipped(f"{request.args[0]} is odd")


@pytest.mark.parametrize("pool", POOLS)
def test_before_admit_can_skip_a_delivery(app: Conveyor, pool: str, tmp_path: Path) -> None:
    ledger = tmp_path / "hooks.jsonl"
    app.add_middleware(SkipOdd())
    app.add_middleware(Recorder(ledger))

    @app.task(acks_late=pool == "threads")  # either way the message goes
    def half(x: int) -> int:
        return x // 2

    even, odd = half.delay(4), half.delay(3)
    stats = run_until_empty(app, pool=pool)
    assert (stats.succeeded, stats.skipped, stats.failed, stats.finished) == (1, 1, 0, 2)
    assert even.get(timeout=1) == 2
    with pytest.raises(TaskFailed) as failed:
        odd.get(timeout=1)
    assert (failed.value.type_name, failed.value.message) == ("TaskSkipped", "3 is odd")
    hooks = by_hook(read(ledger))
    assert [n["id"] for n in hooks["before_run"]] == [even.id]
    assert [n["id"] for n in hooks["before_admit"]] == [even.id], "later middleware not called"
    skipped = [n for n in hooks["after_settle"] if n["id"] == odd.id]
    assert [(n["outcome"], n["error_type"], n["ran"]) for n in skipped] == [
        ("skipped", "TaskSkipped", False)
    ]
    assert broker_is_empty(app)


class Lifetimes(Middleware):
    """Notes where each process that runs tasks starts and stops."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def process_start(self) -> None:
        note(self.path, "process_start")

    def process_stop(self) -> None:
        note(self.path, "process_stop")


@pytest.mark.parametrize("pool", POOLS)
def test_every_process_that_ran_tasks_stops_once_after_it_started(
    app: Conveyor, pool: str, tmp_path: Path
) -> None:
    ledger = tmp_path / "lifetimes.jsonl"
    app.add_middleware(Lifetimes(ledger))

    @app.task
    def noop() -> None:
        note(ledger, "ran")

    for _ in range(6):
        noop.delay()
    # Prefork children replaced after 2 tasks each: every one of them stops.
    every = 2 if pool == "prefork" else None
    worker = Worker(
        app,
        pool=pool,
        concurrency=1 if pool == "solo" else 2,
        until_empty=True,
        max_tasks_per_child=every,
    )
    stats = worker.run()
    assert stats.succeeded == 6
    notes = read(ledger)
    ran = {n["pid"] for n in notes if n["hook"] == "ran"}
    starts = {n["pid"] for n in notes if n["hook"] == "process_start"}
    stops = [n["pid"] for n in notes if n["hook"] == "process_stop"]
    # A child still starting when the worker stops is killed, and stops nothing; every process
    # that ran a task (or was up, idle, at the end) stops once, after its start and its tasks.
    assert ran <= set(stops) <= starts and len(set(stops)) == len(stops)
    for pid in stops:
        hooks = [n["hook"] for n in notes if n["pid"] == pid]
        assert hooks[0] == "process_start" and hooks[-1] == "process_stop"
        assert set(hooks[1:-1]) <= {"ran"}
    if pool == "prefork":
        assert os.getpid() not in stops and len(stops) >= 3
    else:
        assert stops == [os.getpid()]
