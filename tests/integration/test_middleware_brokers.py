"""Middleware and signals on the SQLite broker and on RabbitMQ, in the prefork, threads and
asyncio pools: every hook where it belongs, a raising middleware that loses nothing, the
Request's fields, and the Sentry middleware of docs/middleware.md run against a fake sentry_sdk.

Hooks in a prefork child note what they saw in a file (see tests/middleware_cases.py), which the
test reads once the worker drained its queue. RabbitMQ is expected on 127.0.0.1:5672 (guest/guest);
each test uses a queue of its own and deletes it afterwards.
"""

from __future__ import annotations

import contextlib
import sys
import types
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from conftest import delete_rabbitmq_queues, require_rabbitmq, run_bounded
from docblocks import blocks
from middleware_cases import Exploding, Recorder, Scenario, check_scenario, note, read

from conveyor import ConfigurationError, Conveyor, Task
from conveyor import signals as sig

pytestmark = pytest.mark.integration

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
POOLS = ["prefork", "threads", "asyncio"]
DOCS = Path(__file__).resolve().parents[2] / "docs"
MakeApp = Callable[..., Conveyor]


@pytest.fixture(params=["sqlite", "rabbitmq"])
def make_app(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeApp]:
    """`make_app(**settings)`: an app on this case's broker, with a queue of its own; results
    in a SQLite file, where a prefork child's sends can reach them too."""
    kind = str(request.param)
    queue = f"mw-{uuid.uuid4().hex[:10]}"
    results = f"sqlite:///{tmp_path / 'results.db'}"
    if kind == "rabbitmq":
        require_rabbitmq()
        broker = AMQP_URL
    else:
        broker = results = f"sqlite:///{tmp_path / 'broker.db'}"
    apps: list[Conveyor] = []

    def make(**settings: Any) -> Conveyor:
        app = Conveyor("mw", broker=broker, results=results, default_queue=queue, **settings)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()
    if kind == "rabbitmq":
        delete_rabbitmq_queues(queue)


def drained(app: Conveyor) -> bool:
    (stats,) = app.broker.stats([app.settings.default_queue])
    return stats.ready + stats.delayed + stats.in_flight + stats.dead == 0


@pytest.mark.parametrize("pool", POOLS)
def test_every_hook_runs_where_it_belongs(make_app: MakeApp, pool: str, tmp_path: Path) -> None:
    ledger = tmp_path / "hooks.jsonl"
    app = make_app(middleware=[Recorder(ledger)])
    scenario = Scenario(app)
    ids = scenario.send()
    stats = run_bounded(app, pool=pool, timeout=60)
    check_scenario(read(ledger), ids, prefork=pool == "prefork")
    assert (stats.succeeded, stats.failed, stats.retried, stats.rejected) == (3, 1, 1, 0)
    assert drained(app)


@pytest.mark.parametrize("pool", POOLS)
def test_a_raising_middleware_loses_nothing_and_the_worker_stays_up(
    make_app: MakeApp, pool: str, tmp_path: Path
) -> None:
    ledger = tmp_path / "hooks.jsonl"
    app = make_app(middleware=[Exploding(ledger), Recorder(ledger)])
    scenario = Scenario(app)
    ids = scenario.send()
    stats = run_bounded(app, pool=pool, timeout=60)
    notes = read(ledger)
    check_scenario(notes, ids, prefork=pool == "prefork")
    exploded = Counter(n["hook"] for n in notes if n["by"] == "exploding")
    assert exploded["before_run"] == exploded["after_run"] == exploded["after_settle"] == 5
    assert exploded["worker_start"] == exploded["worker_stop"] == 1
    assert (stats.succeeded, stats.failed, stats.retried, stats.rejected, stats.lost) == (
        3,
        1,
        1,
        0,
        0,
    )
    assert app.result(ids["double"]).get(timeout=5) == 42
    assert app.result(ids["flaky"]).get(timeout=5) == "done"
    assert drained(app)


@pytest.mark.parametrize("pool", POOLS)
def test_signals_are_sent_where_they_belong(make_app: MakeApp, pool: str, tmp_path: Path) -> None:
    ledger = tmp_path / "signals.jsonl"
    app = make_app()
    scenario = Scenario(app)
    ids = scenario.send()
    with ExitStack() as stack:
        for signal in sig.SIGNALS:

            def receive(sender: Any, _name: str = signal.name, **kwargs: Any) -> None:
                request = kwargs.get("request")
                note(ledger, _name, id=None if request is None else request.id)

            stack.enter_context(signal.connected_to(receive))
        stats = run_bounded(app, pool=pool, timeout=60)
    notes = read(ledger)
    counts = Counter(n["hook"] for n in notes)
    for name in ("task_received", "task_prerun", "task_postrun"):
        assert counts[name] == 5, name
    assert (counts["task_success"], counts["task_failure"], counts["task_retry"]) == (3, 1, 1)
    assert counts["worker_ready"] == counts["worker_shutdown"] == 1
    assert {n["id"] for n in notes if n["hook"] == "task_prerun"} == set(ids.values())
    assert stats.succeeded == 3


@pytest.mark.parametrize("pool", POOLS)
def test_request_fields_celery_users_rely_on(make_app: MakeApp, pool: str) -> None:
    app = make_app()

    @app.task(bind=True, time_limit=30, soft_time_limit=20)
    def top(self: Task[Any, Any]) -> dict[str, Any]:
        r = self.request
        return {
            "id": r.id,
            "root_id": r.root_id,
            "limits": [r.time_limit, r.soft_time_limit],
            "delivery_info": r.delivery_info,
            "child": inner.delay().id,
        }

    @app.task(bind=True)
    def inner(self: Task[Any, Any]) -> list[Any]:
        r = self.request
        return [r.root_id, r.parent_id, r.time_limit, r.soft_time_limit]

    result = top.apply_async(priority=6)
    run_bounded(app, pool=pool, timeout=60)
    answer = result.get(timeout=5)
    assert answer["root_id"] == answer["id"] == result.id
    assert answer["limits"] == [30, 20]
    queue = app.settings.default_queue
    assert answer["delivery_info"] == {
        "queue": queue,
        "routing_key": queue,
        "priority": 6,
        "redelivered": False,
    }
    assert app.result(answer["child"]).get(timeout=5) == [result.id, result.id, None, None]


# the Sentry middleware of docs/middleware.md, against a stand-in sentry_sdk


def fake_sentry_sdk(ledger: Path) -> types.ModuleType:
    """Just the sentry_sdk calls the documented middleware makes; each notes itself in `ledger`
    (from whichever process calls it)."""
    module = types.ModuleType("sentry_sdk")

    class Scope:
        def __init__(self) -> None:
            self.tags: dict[str, str] = {}
            self.contexts: dict[str, Any] = {}

        def set_tag(self, key: str, value: str) -> None:
            self.tags[key] = value

        def set_context(self, key: str, value: Any) -> None:
            self.contexts[key] = value

    scopes: list[Scope] = []

    @contextlib.contextmanager
    def new_scope() -> Iterator[Scope]:
        scopes.append(Scope())
        try:
            yield scopes[-1]
        finally:
            scopes.pop()

    def init(dsn: str) -> None:
        note(ledger, "init", dsn=dsn)

    def capture_exception(error: BaseException) -> None:
        scope = scopes[-1]
        note(ledger, "capture", error=repr(error), tags=scope.tags, contexts=scope.contexts)

    module.init = init  # type: ignore[attr-defined]
    module.new_scope = new_scope  # type: ignore[attr-defined]
    module.capture_exception = capture_exception  # type: ignore[attr-defined]
    return module


@pytest.mark.parametrize("pool", POOLS)
def test_the_documented_sentry_middleware_reports_failures(
    make_app: MakeApp, pool: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = tmp_path / "sentry.jsonl"
    monkeypatch.setitem(sys.modules, "sentry_sdk", fake_sentry_sdk(ledger))
    (block,) = [b for b in blocks(DOCS / "middleware.md") if b.name == "sentry_middleware.py"]
    namespace: dict[str, Any] = {"__name__": "sentry_middleware"}
    exec(compile(block.text, "sentry_middleware.py", "exec"), namespace)
    app = make_app(middleware=[namespace["Sentry"]("https://key@sentry.example/1")])

    @app.task
    def broken() -> None:
        raise ValueError("reported")

    @app.task(report_errors=False)
    def quiet() -> None:
        raise ValueError("not reported")

    @app.task(bind=True, max_retries=1)
    def flaky(self: Task[Any, Any]) -> str:
        if self.request.retries == 0:
            raise self.retry(countdown=0)  # a retry is not a failure: not reported
        return "ok"

    with pytest.raises(ConfigurationError, match="report_errors"):
        app.task(report_errors="no")(lambda: None)
    failed = broken.delay()
    quiet.delay()
    flaky.delay()
    stats = run_bounded(app, pool=pool, timeout=60)
    assert (stats.succeeded, stats.failed, stats.retried) == (1, 2, 1)
    notes = read(ledger)
    assert [n["dsn"] for n in notes if n["hook"] == "init"] != []
    (capture,) = [n for n in notes if n["hook"] == "capture"]
    assert capture["error"] == "ValueError('reported')"
    assert capture["tags"] == {"task": broken.name}
    assert capture["contexts"] == {"task": {"id": failed.id, "retries": 0}}
