"""Revocations against real stores and brokers: the stores on SQLite, PostgreSQL and Redis
(cursor, expiry, malformed records); a revoked task skipped by a prefork worker started after
the revoke and by one running at it, on the SQLite broker and on RabbitMQ; `--terminate` ending
a long task within a second; and a ledger showing that nothing else is lost or run twice."""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import RABBITMQ_URL, delete_rabbitmq_queues, require_rabbitmq, start_worker
from ledger import connection_resource, new_ledger, record
from stores import postgresql_store, redis_store

from conveyor import Conveyor, State, TaskRevoked, Worker
from conveyor.revocations import Revocation, RevocationStore, from_url

pytestmark = pytest.mark.integration

Poll = Callable[..., Any]
_cleanups: list[Callable[[], None]] = []


def _sqlite(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/store.db"


def _postgres(tmp_path: Path) -> str:
    setup = postgresql_store(tmp_path)
    _cleanups.append(setup.cleanup)
    table = setup.results.rsplit("table=", 1)[1]

    def drop() -> None:
        import psycopg

        with psycopg.connect(setup.results.split("?", maxsplit=1)[0], autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}_revocations")

    _cleanups.append(drop)
    return setup.results  # ?table=...: revocations go to <table>_revocations


def _redis(tmp_path: Path) -> str:
    setup = redis_store(tmp_path)
    _cleanups.append(setup.cleanup)
    return setup.results


STORES: dict[str, Callable[[Path], str]] = {
    "sqlite": _sqlite,
    "postgresql": _postgres,
    "redis": _redis,
}


@pytest.fixture(autouse=True)
def _clean_up() -> Iterator[None]:
    yield
    while _cleanups:
        _cleanups.pop()()


@pytest.fixture(params=sorted(STORES))
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return STORES[request.param](tmp_path)


@pytest.fixture
def store(store_url: str) -> Iterator[RevocationStore]:
    opened = from_url(store_url)
    yield opened
    opened.close()


def test_a_store_keeps_revocations_in_order_behind_a_cursor(store: RevocationStore) -> None:
    now = time.time()
    loaded, cursor = store.load(now)
    assert loaded == []
    store.add([Revocation("a", now + 60)])
    store.add([Revocation("b", now + 60, terminate=True), Revocation("gone", now - 1)])
    found, after = store.since(cursor)
    # An expired one may still be read (the worker drops it); the next write deletes it.
    assert [(r.id, r.terminate) for r in found] == [("a", False), ("b", True), ("gone", False)]
    assert store.since(after) == ([], after), "nothing new"
    store.add([Revocation("c", now + 60)])
    found, _ = store.since(after)
    assert [r.id for r in found] == ["c"]
    # A worker that starts now loads the live ones, and reads on from where they end.
    loaded, cursor = store.load(time.time())
    assert sorted(r.id for r in loaded) == ["a", "b", "c"]
    assert store.since(cursor) == ([], cursor)


def test_a_revocation_written_by_another_process_is_seen(store_url: str) -> None:
    reader, writer = from_url(store_url), from_url(store_url)
    try:
        _, cursor = reader.load(time.time())
        writer.add([Revocation("x", time.time() + 60)])
        found, _ = reader.since(cursor)
        assert [r.id for r in found] == ["x"]
    finally:
        reader.close()
        writer.close()


def test_malformed_records_are_skipped_with_a_log_line(
    store_url: str, store: RevocationStore, caplog: pytest.LogCaptureFixture
) -> None:
    _, cursor = store.load(time.time())
    if store_url.startswith("redis"):
        import redis

        client = redis.Redis.from_url(store_url.split("?", maxsplit=1)[0])
        key = getattr(store, "key")  # noqa: B009
        client.xadd(key, {"id": "no-expiry"})
        client.xadd(key, {"x": "1e12"})
        client.close()
    elif store_url.startswith("sqlite"):
        with sqlite3.connect(store_url.removeprefix("sqlite:///")) as conn:
            conn.execute(
                "INSERT INTO conveyor_revocations (id, terminate, revoked_at, expires_at) "
                "VALUES (?, 0, 0, 'soon'), (?, 0, 0, 1e12)",
                ("bad-expiry", "z" * 300),
            )
        conn.close()
    else:
        import psycopg

        table = getattr(store, "table")  # noqa: B009
        with psycopg.connect(store_url.split("?", maxsplit=1)[0], autocommit=True) as pg:
            pg.execute(
                f"INSERT INTO {table} (id, terminate, revoked_at, expires_at) "
                "VALUES (%s, false, 0, 'NaN'), (%s, false, 0, 1e12)",
                ("bad-expiry", "z" * 300),
            )
    store.add([Revocation("good", time.time() + 60)])
    found, _ = store.since(cursor)
    assert [r.id for r in found] == ["good"]
    assert caplog.text.count("skipped a malformed revocation record") == 2


# workers


BROKER_STORES = [("sqlite", "sqlite"), ("sqlite", "redis"), ("rabbitmq", "postgresql")]


@pytest.fixture(params=BROKER_STORES, ids=lambda p: f"{p[0]}-broker-{p[1]}-store")
def make_app(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Conveyor]]:
    """An app on the case's broker and store, with a queue of its own, and its results in the
    SQLite file (or the store, on RabbitMQ)."""
    broker_kind, store_kind = request.param
    queue = f"revoke-{uuid.uuid4().hex[:10]}"
    store = STORES[store_kind](tmp_path)
    if broker_kind == "rabbitmq":
        require_rabbitmq()
        broker, results = RABBITMQ_URL, f"sqlite:///{tmp_path}/results.db"
    else:
        broker = results = f"sqlite:///{tmp_path}/broker.db"
    apps: list[Conveyor] = []

    def make() -> Conveyor:
        app = Conveyor("revoke", broker=broker, results=results, store=store, default_queue=queue)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()
    if broker_kind == "rabbitmq":
        delete_rabbitmq_queues(queue)


def _run(app: Conveyor, **options: Any) -> tuple[Worker, threading.Thread, list[BaseException]]:
    worker = Worker(app, pool="prefork", concurrency=2, shutdown_grace=0, **options)
    thread, errors = start_worker(worker)
    assert worker.started.wait(30), "the worker did not start"
    return worker, thread, errors


def _stop(worker: Worker, thread: threading.Thread, errors: list[BaseException]) -> None:
    worker.stop()
    thread.join(30)
    assert not thread.is_alive() and not errors


def test_a_task_revoked_before_it_starts_never_runs(
    make_app: Callable[[], Conveyor], tmp_path: Path, poll: Poll
) -> None:
    app = make_app()
    marks = tmp_path / "ran"
    marks.mkdir()

    @app.task
    def mark(name: str) -> str:
        (marks / name).touch()
        return name

    # Revoked before any worker runs: the worker that starts later skips it.
    early = mark.delay("early")
    early.revoke()
    kept = mark.delay("kept")
    worker, thread, errors = _run(app)
    try:
        assert kept.get(timeout=30) == "kept"
        with pytest.raises(TaskRevoked):
            early.get(timeout=30)
        # Revoked while this worker runs, before the task is sent.
        later_id = f"later-{uuid.uuid4().hex}"
        app.result(later_id).revoke()
        consumer = worker._consumer
        assert consumer is not None
        poll(lambda: later_id in consumer.revoked, timeout=1.5, what="the worker to learn it")
        later = mark.apply_async(("later",), task_id=later_id)
        with pytest.raises(TaskRevoked):
            later.get(timeout=30)
    finally:
        _stop(worker, thread, errors)
    assert sorted(p.name for p in marks.iterdir()) == ["kept"]
    assert (worker.stats.revoked, worker.stats.lost, worker.stats.dead_lettered) == (2, 0, 0)
    [stats] = app.broker.stats([app.settings.default_queue])
    assert (stats.ready, stats.in_flight, stats.dead) == (0, 0, 0), "settled, not dead-lettered"


def test_terminate_ends_a_running_task_within_a_second_on_prefork(
    make_app: Callable[[], Conveyor], poll: Poll
) -> None:
    app = make_app()

    @app.task
    def sleepy(seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    worker, thread, errors = _run(app)
    try:
        long = sleepy.delay(60)
        poll(lambda: long.state is State.STARTED, timeout=30, what="the task to start")
        began = time.monotonic()
        report = long.revoke(terminate=True)
        assert report.known == "running"
        with pytest.raises(TaskRevoked, match="was killed"):
            long.get(timeout=5)
        took = time.monotonic() - began
        assert took < 1.0, f"the revoked task ended {took:.2f}s after the revoke"
        # The child was replaced, and the pool still runs tasks on both.
        assert [r.get(timeout=30) for r in sleepy.map([(0.01,)] * 4)] == [0.01] * 4
    finally:
        _stop(worker, thread, errors)
    s = worker.stats
    assert (s.revoked, s.lost, s.dead_lettered, s.succeeded) == (1, 0, 0, 4)
    [stats] = app.broker.stats([app.settings.default_queue])
    assert (stats.ready, stats.in_flight, stats.dead) == (0, 0, 0)


def test_revoked_tasks_are_skipped_and_every_other_runs_exactly_once(
    make_app: Callable[[], Conveyor], poll: Poll, monkeypatch: pytest.MonkeyPatch
) -> None:
    """200 short tasks through a running prefork worker, 20 of them revoked first: the ledger
    (PostgreSQL) shows each of the other 180 once and none of the 20."""
    app = make_app()
    with new_ledger() as ledger:
        for name, value in ledger.env.items():
            monkeypatch.setenv(name, value)
        conn = connection_resource(app, f"revoke-ledger-{uuid.uuid4().hex[:6]}")

        @app.task(bind=True)
        def noted(self: Any) -> None:
            record(conn(), self.request.id, self.request.delivery_count)

        ids = [f"ledger-{n}-{uuid.uuid4().hex[:8]}" for n in range(200)]
        revoked = set(ids[::10])
        worker, thread, errors = _run(app)
        try:
            for task_id in revoked:
                app.result(task_id).revoke()
            consumer = worker._consumer
            assert consumer is not None
            poll(lambda: revoked <= set(consumer.revoked.ids), timeout=1.5, what="revocations")
            results = [noted.apply_async(task_id=task_id) for task_id in ids]
            for r in results:
                if r.id in revoked:
                    with pytest.raises(TaskRevoked):
                        r.get(timeout=60)
                else:
                    r.get(timeout=60)
        finally:
            _stop(worker, thread, errors)
        tally = ledger.tally(set(ids) - revoked)
        assert (tally.ran, tally.duplicates, tally.strangers) == (180, 0, 0), tally.describe()
        assert not tally.lost
        assert worker.stats.revoked == 20 and worker.stats.succeeded == 180


def test_an_unreachable_store_never_stops_a_worker(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = f"sqlite:///{tmp_path}/broker.db"
    # Nothing listens on port 1: the store refuses every connection.
    app = Conveyor("r", broker=broker, store="redis://127.0.0.1:1/0")

    @app.task
    def one() -> int:
        return 1

    result = one.delay()
    worker = Worker(app, pool="threads", concurrency=1, until_empty=True, shutdown_grace=0)
    thread, errors = start_worker(worker)
    thread.join(30)
    assert not thread.is_alive() and not errors
    assert result.get(timeout=1) == 1
    assert "could not load revocations from redis://127.0.0.1:1/0" in caplog.text
    app.close()
