"""Promises of docs/guarantees.md that had no test of their own.

The poison limit with real runs, giving up without `exc=`, BaseException out of a task, the
worker's counts, result expiry as the worker applies it, cold shutdown and redelivery,
`acks_late=False`, priorities through the worker, and the SQLite write gate.
"""

from __future__ import annotations

import asyncio
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import run_bounded, start_worker

import conveyor._sqlite
import conveyor.results.memory
import conveyor.results.sqlite
from conveyor import Conveyor, State, Task, Worker, WorkerStats
from conveyor.brokers import Outgoing
from conveyor.brokers.memory import MemoryBroker
from conveyor.brokers.sqlite import SQLiteBroker
from conveyor.errors import TaskFailed
from conveyor.message import Envelope, decode, encode
from conveyor.results import ResultRecord, ResultStore
from conveyor.testing import memory_app

Q = "default"
POISONED = (
    "poison message: delivered 4 times without finishing (poison limit 3): the process running "
    "it probably died"
)
Poll = Callable[..., Any]


@pytest.fixture(params=["threads", "solo"])
def pool(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def apps() -> Iterator[list[Conveyor]]:
    """Apps a test makes; closed at the end."""
    made: list[Conveyor] = []
    yield made
    for app in made:
        app.close()


class Clock:
    """A wall clock that can be moved forward, for `MemoryBroker.clock`."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def memory_broker(app: Conveyor) -> MemoryBroker:
    broker = app.broker
    assert isinstance(broker, MemoryBroker)
    return broker


def store_of(app: Conveyor) -> ResultStore:
    store = app.results
    assert store is not None
    return store


def record_of(app: Conveyor, task_id: str) -> ResultRecord:
    record = store_of(app).get(task_id)
    assert record is not None, f"no result stored for {task_id}"
    return record


def counts(app: Conveyor) -> tuple[int, int, int, int]:
    [s] = app.broker.stats([Q])
    return (s.ready, s.delayed, s.in_flight, s.dead)


# A message that keeps killing its worker is dead-lettered


def test_poison_limit_3_runs_a_task_at_most_3_times(pool: str, apps: list[Conveyor]) -> None:
    app = memory_app(poison_limit=3)
    apps.append(app)
    broker = memory_broker(app)
    clock = Clock()
    broker.clock = clock
    runs: list[tuple[int, bool]] = []

    @app.task(bind=True, name="crashy")
    def crashy(self: Task[..., Any]) -> None:
        runs.append((self.request.delivery_count, self.request.redelivered))
        # The worker "dies" here: its lease runs out before it can settle the message.
        clock.offset += broker.visibility_timeout + 1
        broker.stats([Q])  # the broker notices the lease ran out

    result = crashy.delay()
    stats = run_bounded(app, pool)

    assert runs == [(1, False), (2, True), (3, True)]
    [letter] = broker.dead_letters(Q)
    assert letter.reason == POISONED
    assert letter.delivery_count == 4
    assert decode(letter.body).id == result.id
    record = record_of(app, result.id)
    assert (record.state, record.error_type) == (State.FAILURE, "WorkerLost")
    with pytest.raises(TaskFailed) as info:
        result.get(timeout=1)
    assert info.value.type_name == "WorkerLost"
    assert (stats.rejected, stats.dead_lettered) == (1, 1)
    assert counts(app) == (0, 0, 0, 1)


def test_poison_limit_counts_expired_sqlite_leases(
    tmp_path: Path, poll: Poll, apps: list[Conveyor]
) -> None:
    # Three deliveries whose leases simply ran out (a worker that died each time), then a
    # healthy worker: it must not run the message a fourth time.
    app = Conveyor(
        "poison", broker=f"sqlite:///{tmp_path}/q.db", visibility_timeout=0.1, poison_limit=3
    )
    apps.append(app)
    ran: list[int] = []

    @app.task(name="crashy")
    def crashy() -> None:
        ran.append(1)

    result = crashy.delay()
    seen = [poll(lambda: app.broker.fetch([Q], 1), what=f"delivery {n}")[0] for n in (1, 2, 3)]
    assert [d.delivery_count for d in seen] == [1, 2, 3]
    poll(lambda: counts(app)[0] == 1, what="the last lease to run out")
    stats = run_bounded(app, "threads")

    assert ran == []
    [letter] = app.broker.dead_letters(Q)
    assert letter.reason == POISONED
    assert record_of(app, result.id).error_type == "WorkerLost"
    assert result.state is State.FAILURE
    assert stats.dead_lettered == 1
    assert counts(app) == (0, 0, 0, 1)


# Running out of retries


@pytest.mark.parametrize(
    ("exc", "error_type", "error_message"),
    [
        (None, "MaxRetriesExceeded", "still failing after 2 retries"),
        (ConnectionError("still down"), "ConnectionError", "still down"),
    ],
    ids=["without-exc", "with-exc"],
)
def test_giving_up_stores_the_failure_and_dead_letters(
    pool: str,
    apps: list[Conveyor],
    exc: BaseException | None,
    error_type: str,
    error_message: str,
) -> None:
    app = memory_app()
    apps.append(app)
    calls: list[int] = []

    @app.task(bind=True, max_retries=2)
    def hopeless(self: Task[..., Any]) -> None:
        calls.append(self.request.retries)
        raise self.retry(countdown=0, exc=exc)

    result = hopeless.delay()
    stats = run_bounded(app, pool)

    assert calls == [0, 1, 2]
    record = record_of(app, result.id)
    assert (record.state, record.error_type, record.error_message) == (
        State.FAILURE,
        error_type,
        error_message,
    )
    with pytest.raises(TaskFailed) as info:
        result.get(timeout=1)
    assert (info.value.type_name, info.value.message) == (error_type, error_message)
    [letter] = app.broker.dead_letters(Q)
    assert (
        letter.reason
        == f"retries exhausted: gave up after 2 retries: {error_type}: {error_message}"
    )
    assert (decode(letter.body).id, decode(letter.body).retries) == (result.id, 2)
    assert (stats.retried, stats.failed, stats.dead_lettered, stats.rejected) == (2, 1, 1, 0)


# Whatever a task raises fails only that task


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_keyboard_interrupt_and_system_exit_fail_only_that_task(
    pool: str, apps: list[Conveyor], exc_type: type[BaseException], kind: str
) -> None:
    app = memory_app()
    apps.append(app)
    done: list[int] = []

    if kind == "sync":

        @app.task(name="quits")
        def quits() -> None:
            raise exc_type("raised by the task")

    else:

        @app.task(name="quits")
        async def quits() -> None:
            await asyncio.sleep(0)
            raise exc_type("raised by the task")

    @app.task(name="fine")
    def fine(n: int) -> int:
        done.append(n)
        return n

    before = [fine.delay(n) for n in range(2)]
    quitter = app.tasks["quits"].delay()
    after = [fine.delay(n) for n in range(2, 6)]
    stats = run_bounded(app, pool)

    record = record_of(app, quitter.id)
    assert (record.state, record.error_type, record.error_message) == (
        State.FAILURE,
        exc_type.__name__,
        "raised by the task",
    )
    assert [r.get(timeout=1) for r in before + after] == [0, 1, 2, 3, 4, 5]
    assert sorted(done) == [0, 1, 2, 3, 4, 5]
    assert (stats.succeeded, stats.failed, stats.dead_lettered) == (6, 1, 0)
    assert counts(app) == (0, 0, 0, 0)


# The worker's counts


def test_worker_stats_after_a_known_mix(pool: str, apps: list[Conveyor]) -> None:
    app = memory_app()
    apps.append(app)

    @app.task
    def ok(n: int) -> int:
        return n

    @app.task
    def bad(n: int) -> None:
        raise ValueError(f"bad {n}")

    @app.task(bind=True)
    def flaky(self: Task[..., Any]) -> str:
        if self.request.retries == 0:
            raise self.retry(countdown=0)
        return "second time lucky"

    @app.task(bind=True, max_retries=1)
    def hopeless(self: Task[..., Any]) -> None:
        raise self.retry(countdown=0)

    for n in range(3):
        ok.delay(n)  # 3 successes
    bad.delay(1)
    bad.delay(2)  # 2 failures
    flaky.delay()  # 1 retry, then a success
    hopeless.delay()  # 1 retry, then it gives up: a failure, dead-lettered
    app.broker.publish([Outgoing(Q, b"this is not JSON")])  # rejected, dead-lettered
    ok.apply_async((99,), expires=-1)  # expired before it started
    sent = 9

    stats = run_bounded(app, pool)

    assert stats == WorkerStats(
        received=11,  # the 9 messages sent and the 2 retries
        succeeded=4,
        failed=3,
        retried=2,
        rejected=1,
        dead_lettered=2,
        expired=1,
        released=0,
    )
    assert stats.finished == stats.succeeded + stats.failed + stats.rejected + stats.expired
    assert stats.finished == sent == stats.received - stats.retried
    reasons = sorted(letter.reason for letter in app.broker.dead_letters(Q))
    assert len(reasons) == 2
    assert reasons[0].startswith("malformed JSON")
    assert reasons[1].startswith("retries exhausted: gave up after 1 retries: MaxRetriesExceeded")


def test_cold_shutdown_of_an_acks_early_task_counts_no_release(
    poll: Poll, apps: list[Conveyor]
) -> None:
    app = memory_app()
    apps.append(app)
    release = threading.Event()
    runs: list[int] = []

    @app.task(acks_late=False)
    def blocker() -> None:
        runs.append(1)
        if not release.wait(10):
            raise RuntimeError("never released")

    blocker.delay()
    worker = Worker(app, pool="threads", concurrency=1, shutdown_grace=60)
    thread, errors = start_worker(worker)
    try:
        poll(lambda: runs, what="the task to start")
        worker.stop()
        worker.stop()
        thread.join(5)
        assert not thread.is_alive() and errors == []
    finally:
        release.set()
    assert counts(app) == (0, 0, 0, 0)  # nothing was given back ...
    assert worker.stats.released == 0  # ... so nothing counts as released


def test_dead_lettered_count_matches_the_dead_letters_for_acks_early_tasks(
    apps: list[Conveyor],
) -> None:
    limit = 2048
    app = memory_app(max_message_size=limit)
    apps.append(app)

    @app.task(name="flaky", autoretry_for=ConnectionError, acks_late=False)
    def flaky(padding: str) -> None:
        raise ConnectionError("down")

    # A message exactly at the limit, sent long ago: its retry (sent now) is a few bytes longer.
    empty = len(encode(Envelope(id="big", task="flaky", queue=Q, args=("",))))
    env = Envelope(id="big", task="flaky", queue=Q, args=("x" * (limit - empty),))
    app.broker.publish([Outgoing(Q, encode(env, max_size=limit))])
    stats = run_bounded(app)
    assert (stats.received, stats.rejected) == (1, 1)
    assert stats.dead_lettered == len(app.broker.dead_letters(Q))


# Results expire


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
@pytest.mark.parametrize(
    ("setting", "seconds"), [(2, 2.0), (None, 86_400.0)], ids=["2s", "default"]
)
def test_the_worker_applies_result_expires(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    apps: list[Conveyor],
    backend: str,
    setting: float | None,
    seconds: float,
) -> None:
    options: dict[str, Any] = {} if setting is None else {"result_expires": setting}
    if backend == "memory":
        app = memory_app(**options)
        module: types.ModuleType = conveyor.results.memory
    else:
        app = Conveyor("expiry", broker=f"sqlite:///{tmp_path}/q.db", **options)
        module = conveyor.results.sqlite
    apps.append(app)

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    result = add.delay(1, 2)
    run_bounded(app)
    record = record_of(app, result.id)
    assert record.state is State.SUCCESS and record.finished_at is not None
    assert abs(record.expires_at - (record.finished_at + seconds)) < 1
    assert result.state is State.SUCCESS

    # Just after the expiry, as the store sees the time: the result is gone.
    later = record.expires_at + 0.5
    fake_time = types.SimpleNamespace(time=lambda: later, monotonic=time.monotonic)
    monkeypatch.setattr(module, "time", fake_time)
    store = store_of(app)
    assert store.get(result.id) is None
    assert result.state is State.PENDING
    assert store.count() == 0
    assert store.cleanup() == 1
    monkeypatch.undo()
    assert store.get(result.id) is None  # deleted, not only hidden


# Cold shutdown gives running tasks back, and the delivery counts


@pytest.mark.parametrize(("pool_name", "kind"), [("threads", "sync"), ("solo", "async")])
@pytest.mark.parametrize("acks_late", [True, False], ids=["acks-late", "acks-early"])
def test_cold_shutdown_releases_the_message_and_the_next_run_is_a_redelivery(
    poll: Poll, apps: list[Conveyor], pool_name: str, kind: str, acks_late: bool
) -> None:
    app = memory_app()
    apps.append(app)
    release = threading.Event()
    runs: list[tuple[int, bool]] = []

    if kind == "sync":

        @app.task(bind=True, name="blocker", acks_late=acks_late)
        def blocker(self: Task[..., Any]) -> str:
            runs.append((self.request.delivery_count, self.request.redelivered))
            if not release.wait(10):
                raise RuntimeError("never released")
            return "done"

    else:

        @app.task(bind=True, name="blocker", acks_late=acks_late)
        async def blocker(self: Task[..., Any]) -> str:
            runs.append((self.request.delivery_count, self.request.redelivered))
            deadline = time.monotonic() + 10
            while not release.is_set():  # the work: wait for the test to let go
                if time.monotonic() > deadline:
                    raise RuntimeError("never released")
                await asyncio.sleep(0.005)
            return "done"

    result = app.tasks["blocker"].delay()
    worker = Worker(app, pool=pool_name, concurrency=1, shutdown_grace=60)
    thread, errors = start_worker(worker)
    try:
        poll(lambda: runs, what="the task to start")
        worker.stop()
        worker.stop()  # the second call is a cold shutdown
        thread.join(5)
        assert not thread.is_alive(), "a cold shutdown waited for the running task"
        assert errors == []
        assert result.state is State.STARTED
        if acks_late:
            assert worker.stats.released == 1
            assert counts(app) == (1, 0, 0, 0), "the running task's message was not given back"
        else:
            # Acknowledged before it ran: at most once, so the shutdown loses it.
            assert counts(app) == (0, 0, 0, 0)
    finally:
        release.set()

    stats = run_bounded(app, pool_name)
    if acks_late:
        assert runs == [(1, False), (2, True)]
        assert result.get(timeout=1) == "done"
        assert stats.succeeded == 1
    else:
        assert runs == [(1, False)]
        assert stats.received == 0
    assert counts(app) == (0, 0, 0, 0)


def test_shutdowns_count_towards_the_poison_limit(poll: Poll, apps: list[Conveyor]) -> None:
    app = memory_app(poison_limit=3)
    apps.append(app)
    release = threading.Event()
    runs: list[int] = []

    @app.task(bind=True, name="blocker")
    def blocker(self: Task[..., Any]) -> None:
        runs.append(self.request.delivery_count)
        if not release.wait(10):
            raise RuntimeError("never released")

    result = blocker.delay()
    try:
        for n in (1, 2, 3):
            worker = Worker(app, pool="threads", concurrency=1, shutdown_grace=60)
            thread, errors = start_worker(worker)
            poll(lambda n=n: len(runs) == n, what=f"run {n} to start")
            worker.stop()
            worker.stop()
            thread.join(5)
            assert not thread.is_alive() and errors == []
            assert worker.stats.released == 1
        stats = run_bounded(app)
    finally:
        release.set()
    assert runs == [1, 2, 3]
    [letter] = app.broker.dead_letters(Q)
    assert letter.reason == POISONED
    assert record_of(app, result.id).error_type == "WorkerLost"
    assert (stats.received, stats.rejected, stats.dead_lettered) == (1, 1, 1)


# acks_late=False


def test_acks_early_task_that_fails_is_not_redelivered(pool: str, apps: list[Conveyor]) -> None:
    app = memory_app()
    apps.append(app)
    broker = memory_broker(app)
    clock = Clock()
    broker.clock = clock
    seen: list[tuple[int, int, int]] = []

    @app.task(acks_late=False)
    def fragile() -> None:
        [s] = broker.stats([Q])
        seen.append((s.ready, s.delayed, s.in_flight))
        raise RuntimeError("fails after the ack")

    result = fragile.delay()
    stats = run_bounded(app, pool)
    assert seen == [(0, 0, 0)]  # gone from the broker before the task ran
    assert result.state is State.FAILURE
    assert (stats.received, stats.failed, stats.dead_lettered) == (1, 1, 0)

    # Long after any lease would have run out, nothing comes back.
    clock.offset += broker.visibility_timeout * 10
    assert broker.fetch([Q], 10) == []
    stats = run_bounded(app, pool)
    assert stats.received == 0
    assert seen == [(0, 0, 0)]
    assert counts(app) == (0, 0, 0, 0)


# Priorities through the worker


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_worker_runs_higher_priorities_first(
    tmp_path: Path, apps: list[Conveyor], pool: str, backend: str
) -> None:
    if backend == "memory":
        app = memory_app()
    else:
        app = Conveyor("priorities", broker=f"sqlite:///{tmp_path}/q.db")
    apps.append(app)
    order: list[str] = []

    @app.task(name="job")
    def job(tag: str) -> None:
        order.append(tag)

    for tag, priority in [("a", 0), ("b", 9), ("c", 5), ("d", 9), ("e", 0)]:
        job.apply_async((tag,), priority=priority)
    stats = run_bounded(app, pool, concurrency=1)
    assert order == ["b", "d", "c", "a", "e"]  # 9, 9, 5, 0, 0: first come first within one
    assert stats.succeeded == 5


# The SQLite write gate


@pytest.mark.parametrize("busy_timeout", [None, 0.0], ids=["default", "no-busy-wait"])
def test_sqlite_brokers_publishing_from_two_threads_never_hit_a_locked_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, busy_timeout: float | None
) -> None:
    # With SQLite's own busy wait turned off, only the gate keeps writers from colliding.
    if busy_timeout is not None:
        monkeypatch.setattr(conveyor._sqlite, "BUSY_TIMEOUT_S", busy_timeout)
    url = f"sqlite:///{tmp_path}/q.db"
    reader = SQLiteBroker(url)
    reader.stats([Q])  # the file exists, in WAL mode, before the writers start
    per_thread = 300
    start = threading.Barrier(2)
    errors: list[str] = []

    def produce(n: int) -> None:
        broker = SQLiteBroker(url)
        try:
            broker.stats([Q])  # this thread's connection, opened before the race
            start.wait(10)
            for i in range(per_thread):
                broker.publish([Outgoing(Q, b"%d-%04d" % (n, i), priority=i % 3)])
        except Exception as exc:
            errors.append(repr(exc))
        finally:
            broker.close()

    threads = [threading.Thread(target=produce, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    [s] = reader.stats([Q])
    assert s.ready == 2 * per_thread
    got = sorted(bytes(d.body) for d in reader.fetch([Q], 10 * per_thread))
    assert got == sorted(b"%d-%04d" % (n, i) for n in range(2) for i in range(per_thread))
    reader.close()
