"""The worker on the memory broker, in both in-process pools: outcomes, retries, bad input."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import msgspec
import pytest
from conftest import run_bounded

from conveyor import Conveyor, State, Task, WorkerStats
from conveyor.brokers import Outgoing
from conveyor.errors import TaskFailed
from conveyor.message import Envelope, decode, encode, new_id
from conveyor.results import ResultRecord
from conveyor.testing import memory_app, run_until_empty
from conveyor.worker.consumer import Consumer
from conveyor.worker.pools.threads import ThreadPool

Q = "default"
MAX_SIZE = 2048


@pytest.fixture(params=["threads", "solo"])
def pool(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def app() -> Iterator[Conveyor]:
    application = memory_app(max_message_size=MAX_SIZE)
    yield application
    application.close()


def run(app: Conveyor, pool: str) -> WorkerStats:
    return run_until_empty(app, pool=pool, concurrency=2)


def broker_is_empty(app: Conveyor) -> bool:
    return all(s.ready + s.delayed + s.in_flight + s.dead == 0 for s in app.broker.stats())


def record_of(app: Conveyor, task_id: str) -> ResultRecord:
    store = app.results
    assert store is not None
    record = store.get(task_id)
    assert record is not None
    return record


def spy_on_results(app: Conveyor, monkeypatch: pytest.MonkeyPatch) -> list[ResultRecord]:
    """Every record the worker writes, in order."""
    store = app.results
    assert store is not None
    written: list[ResultRecord] = []
    put = store.put

    def spy(records: Sequence[ResultRecord]) -> None:
        written.extend(records)
        put(records)

    monkeypatch.setattr(store, "put", spy)
    return written


# outcomes


def test_success_stores_the_value(app: Conveyor, pool: str) -> None:
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    before = time.time()
    results = [add.delay(i, 10) for i in range(5)]
    stats = run(app, pool)
    assert [r.get(timeout=1) for r in results] == [10, 11, 12, 13, 14]
    assert all(r.state is State.SUCCESS for r in results)
    assert (stats.received, stats.succeeded, stats.failed, stats.dead_lettered) == (5, 5, 0, 0)
    assert broker_is_empty(app)
    rec = record_of(app, results[0].id)
    assert rec.task == add.name and rec.worker
    assert rec.started_at is not None and rec.finished_at is not None
    assert before <= rec.started_at <= rec.finished_at <= time.time()


def test_failure_stores_the_error_and_acks(app: Conveyor, pool: str) -> None:
    @app.task
    def boom(width: int) -> None:
        raise ValueError(f"bad width {width}")

    result = boom.delay(7)
    stats = run(app, pool)
    assert result.state is State.FAILURE
    with pytest.raises(TaskFailed) as info:
        result.get(timeout=1)
    assert (info.value.type_name, info.value.message) == ("ValueError", "bad width 7")
    assert "Traceback" in info.value.traceback and "boom" in info.value.traceback
    assert (stats.failed, stats.succeeded, stats.retried, stats.dead_lettered) == (1, 0, 0, 0)
    assert app.broker.dead_letters(Q) == []
    assert broker_is_empty(app)


def test_autoretry_retries_then_succeeds(
    app: Conveyor, pool: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = spy_on_results(app, monkeypatch)
    tries: list[tuple[int, bool, float]] = []

    @app.task(
        bind=True,
        autoretry_for=(ConnectionError,),
        retry_backoff=0.02,
        retry_jitter=False,
        max_retries=3,
    )
    def flaky(self: Task[..., Any]) -> str:
        tries.append((self.request.retries, self.request.redelivered, time.monotonic()))
        if len(tries) < 3:
            raise ConnectionError(f"down {len(tries)}")
        return "ok"

    result = flaky.delay()
    stats = run(app, pool)
    assert result.get(timeout=1) == "ok"
    assert [(n, redelivered) for n, redelivered, _ in tries] == [(0, False), (1, False), (2, False)]
    # The broker held each retry for its backoff: 0.02 s, then 0.04 s.
    assert tries[1][2] - tries[0][2] >= 0.02
    assert tries[2][2] - tries[1][2] >= 0.04
    assert (stats.retried, stats.succeeded, stats.failed) == (2, 1, 0)
    transitions = [(r.state, r.retries) for r in written if r.id == result.id]
    finished = [t for t in transitions if t[0] is not State.STARTED]
    assert finished == [(State.RETRY, 0), (State.RETRY, 1), (State.SUCCESS, 2)]
    retry_records = [r for r in written if r.id == result.id and r.state is State.RETRY]
    assert [(r.error_type, r.error_message) for r in retry_records] == [
        ("ConnectionError", "down 1"),
        ("ConnectionError", "down 2"),
    ]
    assert broker_is_empty(app)


def test_exceptions_outside_autoretry_for_fail_at_once(app: Conveyor, pool: str) -> None:
    @app.task(autoretry_for=ConnectionError, retry_backoff=0.01)
    def other_error() -> None:
        raise KeyError("not retried")

    result = other_error.delay()
    stats = run(app, pool)
    assert (stats.retried, stats.failed) == (0, 1)
    assert result.state is State.FAILURE


def test_bound_task_raises_self_retry(app: Conveyor, pool: str) -> None:
    tries: list[float] = []

    @app.task(bind=True)
    def once_more(self: Task[..., Any], x: int) -> int:
        tries.append(time.monotonic())
        if self.request.retries == 0:
            raise self.retry(countdown=0.05)
        return x * 10 + self.request.retries

    result = once_more.delay(4)
    stats = run(app, pool)
    assert result.get(timeout=1) == 41
    assert len(tries) == 2 and tries[1] - tries[0] >= 0.05
    assert (stats.retried, stats.succeeded) == (1, 1)
    assert broker_is_empty(app)


@pytest.mark.parametrize("how", ["self.retry", "autoretry_for"])
def test_max_retries_exhausted_fails_and_dead_letters(app: Conveyor, pool: str, how: str) -> None:
    calls: list[int] = []

    @app.task(bind=True, max_retries=2, autoretry_for=ConnectionError, retry_backoff=0.01)
    def hopeless(self: Task[..., Any]) -> None:
        calls.append(self.request.retries)
        if how == "self.retry":
            raise self.retry(countdown=0.01)
        raise ConnectionError("still down")

    result = hopeless.delay()
    stats = run(app, pool)
    assert calls == [0, 1, 2]
    assert (stats.retried, stats.failed, stats.succeeded) == (2, 1, 0)
    assert result.state is State.FAILURE
    [letter] = app.broker.dead_letters(Q)
    assert "gave up after 2 retries" in letter.reason
    if how == "autoretry_for":
        assert "ConnectionError: still down" in letter.reason
        with pytest.raises(TaskFailed, match="ConnectionError"):
            result.get(timeout=1)
    dead = decode(letter.body)
    assert (dead.id, dead.retries) == (result.id, 2)
    [s] = app.broker.stats([Q])
    assert (s.ready, s.delayed, s.in_flight, s.dead) == (0, 0, 0, 1)


@pytest.mark.parametrize(
    ("where", "expected_calls"), [("message", [0]), ("retry", [0, 1]), ("app", [0, 1, 2, 3, 4])]
)
def test_max_retries_precedence(pool: str, where: str, expected_calls: list[int]) -> None:
    app = memory_app(default_max_retries=4)
    calls: list[int] = []

    @app.task(bind=True)
    def hopeless(self: Task[..., Any]) -> None:
        calls.append(self.request.retries)
        raise self.retry(countdown=0, max_retries=1 if where == "retry" else None)

    hopeless.apply_async(max_retries=0 if where == "message" else None)
    run(app, pool)
    assert calls == expected_calls
    assert len(app.broker.dead_letters(Q)) == 1


def test_request_sees_retries_and_redelivered(app: Conveyor, pool: str) -> None:
    seen: list[tuple[Any, ...]] = []

    @app.task(bind=True, name="peek")
    def peek(self: Task[..., Any], tag: str) -> None:
        r = self.request
        seen.append((tag, r.id, r.retries, r.redelivered, r.delivery_count, r.inline, r.args))

    fresh = peek.delay("fresh")
    run(app, pool)
    again = peek.delay("again")
    # As if a worker died holding it: the lease ends without a settlement.
    [delivery] = app.broker.fetch([Q], 1)
    app.broker.requeue([delivery])
    run(app, pool)
    assert seen == [
        ("fresh", fresh.id, 0, False, 1, False, ("fresh",)),
        ("again", again.id, 0, True, 2, False, ("again",)),
    ]


def test_poison_limit_dead_letters_a_message_that_keeps_coming_back(pool: str) -> None:
    app = memory_app(poison_limit=2)
    ran: list[int] = []

    @app.task
    def crashy() -> None:
        ran.append(1)

    result = crashy.delay()
    for _ in range(2):
        [delivery] = app.broker.fetch([Q], 1)
        app.broker.requeue([delivery])
    stats = run(app, pool)
    assert ran == []
    assert stats.dead_lettered == 1
    [letter] = app.broker.dead_letters(Q)
    assert "delivered 3 times" in letter.reason and "poison limit 2" in letter.reason
    assert result.state is State.FAILURE


class _LearnsRoundTrips(ThreadPool):
    """A pool that notes the round trips the consumer tells it of."""

    def __init__(self, concurrency: int) -> None:
        super().__init__(concurrency)
        self.round_trips: list[float] = []

    def observe_round_trip(self, seconds: float) -> None:
        self.round_trips.append(seconds)


def test_a_consumer_on_an_attached_broker_tells_the_pool_what_a_replacement_takes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its ack waits up to ACK_DELAY_S, then the broker is a round trip away: timed at once,
    then every ROUND_TRIP_PROBE_S while tasks run; never while none does."""
    from conveyor.worker import consumer as module

    app = memory_app()
    pool = _LearnsRoundTrips(1)
    consumer = Consumer(app, pool, [Q], WorkerStats())
    consumer._native = True  # as with RabbitMQ on the worker's loop
    answers = iter([None, 0.0003, 0.0005])

    async def round_trip() -> float | None:
        return next(answers, 0.0005)

    monkeypatch.setattr(app.broker, "round_trip_async", round_trip)
    monkeypatch.setattr(module, "ROUND_TRIP_PROBE_S", 0.001)

    async def probe_for(seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(consumer._time_round_trips(), seconds)

    asyncio.run(probe_for(0.1))
    assert pool.round_trips == [pytest.approx(module.ACK_DELAY_S + 0.0003)], "idle after one"
    consumer._running.add(object())  # type: ignore[arg-type]
    asyncio.run(probe_for(0.1))
    assert len(pool.round_trips) > 2
    assert pool.round_trips[-1] == pytest.approx(module.ACK_DELAY_S + 0.0005)
    app.close()


def test_a_slot_freed_with_nothing_waiting_wakes_a_worker_that_stops_when_empty(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its round loop may sleep for want of a free slot; a slot that frees with no message in
    the broker's inbox must wake it to check the queues (else it never sees them empty)."""
    app = memory_app()
    monkeypatch.setattr(app.broker, "take_nowait", lambda limit: [])  # consuming, inbox empty
    draining = Consumer(app, ThreadPool(1), [Q], WorkerStats(), until_empty=True)
    draining._loop_thread = threading.get_ident()
    draining._take_arrivals()
    assert draining._woken
    serving = Consumer(app, ThreadPool(1), [Q], WorkerStats())
    serving._loop_thread = threading.get_ident()
    serving._take_arrivals()
    assert not serving._woken, "a worker that runs on waits for arrivals"
    app.close()


class _Submits(ThreadPool):
    """A pool that notes what it is given, and runs nothing."""

    def __init__(self, concurrency: int) -> None:
        super().__init__(concurrency)
        self.given: list[str] = []

    def submit(self, job: Any, done: Any) -> None:
        self.given.append(job.envelope.id)


def _pushing(app: Conveyor, count: int) -> tuple[Consumer, _Submits, list[str]]:
    """A consumer on the running loop as with RabbitMQ (native), whose broker's inbox holds
    `count` sent tasks."""

    @app.task(name="t.pushed")
    def pushed() -> None:
        pass

    ids = [pushed.delay().id for _ in range(count)]
    inbox = app.broker.fetch([Q], count)
    pool = _Submits(count + 1)
    consumer = Consumer(app, pool, [Q], WorkerStats())
    consumer._native, consumer._loop_thread = True, threading.get_ident()
    consumer._loop = asyncio.get_running_loop()

    def take_nowait(limit: int) -> list[Any]:
        taken, inbox[:limit] = inbox[:limit], []
        return taken

    app.broker.take_nowait = take_nowait  # type: ignore[method-assign]
    return consumer, pool, ids


def test_a_message_pushed_to_an_idle_worker_starts_at_once_and_its_started_record_follows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No loop turn between a push and its start on an idle worker; the round that writes its
    STARTED record comes STARTED_DELAY_S later, not at once (it would compete with the start).
    The delay is stretched here so that a busy machine cannot blur the order."""
    from conveyor.worker import consumer as module

    delay = 0.2
    monkeypatch.setattr(module, "STARTED_DELAY_S", delay)

    async def scenario() -> None:
        consumer, pool, ids = _pushing(memory_app(), 1)
        pushed = time.monotonic()
        consumer._pushed()
        assert pool.given == ids, "started within the push"
        assert consumer._pending.records and not consumer._woken
        for _ in range(3):
            await asyncio.sleep(0)
        assert not consumer._woken, "not at once"
        deadline = pushed + 30
        while not consumer._woken and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert consumer._woken, "a round writes the STARTED record"
        assert time.monotonic() - pushed >= delay

    asyncio.run(scenario())


def test_messages_pushed_while_tasks_run_start_together_at_the_end_of_the_loop_turn() -> None:
    async def scenario() -> None:
        consumer, pool, ids = _pushing(memory_app(), 2)
        consumer._running.add(object())  # type: ignore[arg-type]
        consumer._pushed()
        consumer._pushed()
        assert pool.given == []
        await asyncio.sleep(0)
        assert pool.given == ids

    asyncio.run(scenario())


def test_a_consumer_on_an_embedded_broker_times_nothing() -> None:
    app = memory_app()
    pool = _LearnsRoundTrips(1)
    consumer = Consumer(app, pool, [Q], WorkerStats())
    asyncio.run(asyncio.wait_for(consumer._time_round_trips(), 1.0))  # returns at once
    assert pool.round_trips == []
    app.close()


@pytest.mark.parametrize(
    "expires",
    [-1.0, dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)],
    ids=["seconds", "datetime"],
)
def test_expired_task_is_not_run(app: Conveyor, pool: str, expires: float | dt.datetime) -> None:
    ran: list[int] = []

    @app.task
    def late() -> None:
        ran.append(1)

    result = late.apply_async(expires=expires)
    kept = late.apply_async(expires=3600)
    stats = run(app, pool)
    assert ran == [1]  # only the unexpired one
    assert result.state is State.FAILURE
    with pytest.raises(TaskFailed) as info:
        result.get(timeout=1)
    assert info.value.type_name == "TaskExpired"
    assert kept.state is State.SUCCESS
    assert (stats.expired, stats.succeeded, stats.dead_lettered) == (1, 1, 0)
    assert broker_is_empty(app)  # acked, not dead-lettered


@pytest.mark.parametrize(("acks_late", "in_flight_while_running"), [(True, 1), (False, 0)])
def test_acks_late_false_acks_before_running(
    app: Conveyor, pool: str, acks_late: bool, in_flight_while_running: int
) -> None:
    seen: list[int] = []

    @app.task(acks_late=acks_late)
    def look() -> None:
        [s] = app.broker.stats([Q])
        seen.append(s.in_flight)
        raise RuntimeError("fails after looking")

    result = look.delay()
    stats = run(app, pool)
    assert seen == [in_flight_while_running]
    assert result.state is State.FAILURE and stats.failed == 1
    assert broker_is_empty(app)


def test_ignore_result_stores_nothing(app: Conveyor, pool: str) -> None:
    ran: list[int] = []

    @app.task(ignore_result=True)
    def quiet(x: int) -> int:
        ran.append(x)
        return x

    @app.task(ignore_result=True)
    def quiet_failure() -> None:
        raise ValueError("x")

    quiet.delay(1)
    quiet.delay(2)
    quiet_failure.delay()
    stats = run(app, pool)
    assert sorted(ran) == [1, 2]
    assert (stats.succeeded, stats.failed) == (2, 1)
    assert app.results is not None and app.results.count() == 0


def test_app_ignore_results_stores_nothing(pool: str) -> None:
    app = memory_app(results=None)

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    add.delay(1, 2)
    stats = run(app, pool)
    assert stats.succeeded == 1 and app.results is None


def test_async_tasks_run(app: Conveyor, pool: str) -> None:
    @app.task
    async def double(x: int) -> int:
        await asyncio.sleep(0)
        return x * 2

    @app.task
    async def fail_async() -> None:
        await asyncio.sleep(0)
        raise LookupError("async failure")

    results = [double.delay(i) for i in range(6)]
    failed = fail_async.delay()
    stats = run(app, pool)
    assert [r.get(timeout=1) for r in results] == [0, 2, 4, 6, 8, 10]
    with pytest.raises(TaskFailed, match="LookupError"):
        failed.get(timeout=1)
    assert (stats.succeeded, stats.failed) == (6, 1)


def test_async_bound_task_retries(app: Conveyor, pool: str) -> None:
    @app.task(bind=True)
    async def later(self: Task[..., Any]) -> int:
        await asyncio.sleep(0)
        if self.request.retries < 2:
            raise self.retry(countdown=0.01)
        return self.request.retries

    result = later.delay()
    stats = run(app, pool)
    assert result.get(timeout=1) == 2 and stats.retried == 2


def test_unencodable_return_value_fails_the_task_and_the_worker_goes_on(
    app: Conveyor, pool: str
) -> None:
    @app.task
    def bad() -> object:
        return object()

    @app.task
    def good() -> str:
        return "fine"

    first = good.delay()
    broken = bad.delay()
    last = good.delay()
    stats = run(app, pool)
    with pytest.raises(TaskFailed) as info:
        broken.get(timeout=1)
    assert info.value.type_name == "EncodeError"
    assert "cannot be encoded" in info.value.message
    assert first.get(timeout=1) == last.get(timeout=1) == "fine"
    assert (stats.succeeded, stats.failed, stats.dead_lettered) == (2, 1, 0)
    assert broker_is_empty(app)


def test_a_task_sent_from_a_task_knows_its_parent_and_root(app: Conveyor, pool: str) -> None:
    @app.task(bind=True)
    def child(self: Task[..., Any]) -> list[str | None]:
        return [self.request.parent_id, self.request.root_id]

    @app.task(bind=True)
    def parent(self: Task[..., Any]) -> str:
        return child.delay().id

    top = parent.delay()
    stats = run(app, pool)  # the child, sent while the worker runs, runs too
    child_id = top.get(timeout=1)
    assert app.result(child_id).get(timeout=1) == [top.id, top.id]
    assert stats.succeeded == 2


# bad input straight onto the broker


def envelope_bytes(**changes: Any) -> bytes:
    """A valid `add(1, 2)` envelope, with some fields changed (or added)."""
    env = Envelope(id=new_id(), task="add", queue=Q, args=(1, 2))
    data = msgspec.json.decode(encode(env))
    data.update(changes)
    return msgspec.json.encode(data)


BAD_INPUT: list[tuple[str, Callable[[], bytes], str, str | None]] = [
    # (case, body, text the dead-letter reason must contain, error type stored as the result)
    ("malformed-json", lambda: b'{"v": 1, "id": "x", "task": ', "malformed JSON", None),
    ("binary-junk", lambda: b"\x89PNG\r\n\x1a\n\x00\x00", "undecodable message", None),
    ("json-but-not-an-object", lambda: b"[1, 2, 3]", "not an envelope", None),
    ("wrong-field-type", lambda: envelope_bytes(priority="high"), "$.priority", None),
    ("wrong-id-type", lambda: envelope_bytes(id=12), "$.id", None),
    ("unknown-version", lambda: envelope_bytes(v=2), "unknown envelope version: 2", None),
    ("unknown-field", lambda: envelope_bytes(pickle="gASV"), "unknown field `pickle`", None),
    (
        "unknown-task",
        lambda: envelope_bytes(id="unknown-task-id", task="nope.missing"),
        "unknown task: 'nope.missing'",
        "UnknownTaskError",
    ),
    (
        "oversized",
        lambda: envelope_bytes(args=["x" * MAX_SIZE, 2]),
        f"over the {MAX_SIZE}-byte limit",
        None,
    ),
    (
        "arguments-do-not-fit",
        lambda: envelope_bytes(id="misfit-id", args=[1, 2, 3]),
        "bad arguments: they do not fit task add",
        "ArgumentError",
    ),
    (
        "unknown-keyword",
        lambda: envelope_bytes(id="misfit-kw-id", args=[1], kwargs={"z": 2}),
        "bad arguments: they do not fit task add",
        "ArgumentError",
    ),
]


@pytest.mark.parametrize(
    ("case", "body", "reason", "error_type"), BAD_INPUT, ids=[c[0] for c in BAD_INPUT]
)
def test_bad_input_is_dead_lettered_logged_once_and_the_worker_goes_on(
    app: Conveyor,
    pool: str,
    caplog: pytest.LogCaptureFixture,
    case: str,
    body: Callable[[], bytes],
    reason: str,
    error_type: str | None,
) -> None:
    caplog.set_level(logging.INFO, logger="conveyor.worker")

    @app.task(name="add")
    def add(x: int, y: int) -> int:
        return x + y

    bad = body()
    before = add.delay(1, 2)
    app.broker.publish([Outgoing(Q, bad)])
    after = add.delay(3, 4)
    stats = run(app, pool)

    assert before.get(timeout=1) == 3 and after.get(timeout=1) == 7
    assert (stats.succeeded, stats.dead_lettered, stats.failed) == (2, 1, 0)
    [letter] = app.broker.dead_letters(Q)
    assert reason in letter.reason, letter.reason
    assert bytes(letter.body) == bad
    [s] = app.broker.stats([Q])
    assert (s.ready, s.delayed, s.in_flight, s.dead) == (0, 0, 0, 1)
    mentions = [r for r in caplog.records if letter.reason in r.getMessage()]
    assert len(mentions) == 1, [r.getMessage() for r in mentions]
    assert mentions[0].name == "conveyor.worker"
    assert mentions[0].levelno == logging.WARNING
    if error_type is not None:
        task_id = msgspec.json.decode(bad)["id"]
        failed = record_of(app, task_id)
        assert (failed.state, failed.error_type) == (State.FAILURE, error_type)


def test_many_bad_messages_at_once(app: Conveyor, pool: str) -> None:
    @app.task(name="add")
    def add(x: int, y: int) -> int:
        return x + y

    goods = [add.delay(i, i) for i in range(5)]
    app.broker.publish([Outgoing(Q, case[1]()) for case in BAD_INPUT])
    goods += [add.delay(i, 1) for i in range(5)]
    stats = run(app, pool)
    assert [r.get(timeout=1) for r in goods] == [0, 2, 4, 6, 8, 1, 2, 3, 4, 5]
    assert stats.dead_lettered == len(BAD_INPUT)
    reasons = [letter.reason for letter in app.broker.dead_letters(Q)]
    for _, _, expected, _ in BAD_INPUT:
        assert any(expected in r for r in reasons), expected


# regressions: things that used to crash or wedge the worker (run bounded: fail, never hang)


DEEP = b"[" * 100_000 + b"]" * 100_000


def test_deeply_nested_junk_does_not_crash_the_worker(pool: str) -> None:
    app = memory_app()  # the default size limit: the junk is well under it

    @app.task(name="add")
    def add(x: int, y: int) -> int:
        return x + y

    app.broker.publish([Outgoing(Q, b'{"x":' + DEEP + b"}")])
    good = add.delay(1, 2)
    stats = run_bounded(app, pool)
    assert good.get(timeout=1) == 3
    assert stats.dead_lettered == 1


# Regression: the OverflowError above, inside the worker's settlement: the message was
# never settled and the worker hung.
def test_retry_after_very_many_retries_is_scheduled(app: Conveyor) -> None:
    @app.task(
        name="flaky",
        bind=True,
        autoretry_for=ConnectionError,
        retry_backoff=True,
        retry_backoff_max=0.01,
        max_retries=5000,
    )
    def flaky(self: Task[..., Any]) -> int:
        if self.request.retries == 1100:
            raise ConnectionError("down")
        return self.request.retries

    env = Envelope(id="many", task="flaky", queue=Q, retries=1100)
    app.broker.publish([Outgoing(Q, encode(env))])
    run_bounded(app)
    assert app.result("many").get(timeout=1) == 1101


# Regression: the EncodeError of a retry that outgrew max_message_size was lost in a loop
# callback: the message was never settled and the worker hung.
def test_retry_that_would_exceed_the_size_limit_fails_cleanly(app: Conveyor) -> None:
    @app.task(name="flaky", autoretry_for=ConnectionError, retry_backoff=0.01)
    def flaky(padding: str) -> None:
        raise ConnectionError("down")

    empty = len(encode(Envelope(id="big", task="flaky", queue=Q, args=("",))))
    env = Envelope(id="big", task="flaky", queue=Q, args=("x" * (MAX_SIZE - empty),))
    body = encode(env, max_size=MAX_SIZE)
    assert len(body) == MAX_SIZE  # fits now; one more retry will not
    app.broker.publish([Outgoing(Q, body)])
    good = app.task(name="add")(lambda x, y: x + y).delay(1, 2)
    stats = run_bounded(app)
    assert app.result("big").state is State.FAILURE
    [letter] = app.broker.dead_letters(Q)
    assert decode(letter.body).id == "big"
    assert "EncodeError" in letter.reason
    assert good.get(timeout=1) == 3
    assert stats.succeeded == 1


def test_sys_exit_in_a_task_fails_the_task_not_the_worker(app: Conveyor, pool: str) -> None:
    @app.task
    def quits() -> None:
        raise SystemExit(3)

    @app.task
    def fine() -> int:
        return 1

    quitter = quits.delay()
    good = fine.delay()
    stats = run_bounded(app, pool)
    with pytest.raises(TaskFailed) as info:
        quitter.get(timeout=1)
    assert info.value.type_name == "SystemExit"
    assert good.get(timeout=1) == 1
    assert (stats.failed, stats.succeeded) == (1, 1)


@pytest.mark.parametrize(
    ("pool_name", "kind"), [("threads", "sync"), ("threads", "async"), ("solo", "async")]
)
def test_leases_of_running_tasks_are_renewed(pool_name: str, kind: str) -> None:
    # A lease of 0.15 s and a task of 0.6 s: without renewal the message would come back and
    # run again on the free slot.
    app = memory_app(visibility_timeout=0.15)
    runs: list[tuple[int, bool]] = []

    if kind == "sync":

        @app.task(bind=True, name="slow")
        def slow(self: Task[..., Any]) -> None:
            runs.append((self.request.delivery_count, self.request.redelivered))
            threading.Event().wait(0.6)  # the work itself, not synchronization

    else:

        @app.task(bind=True, name="slow")
        async def slow(self: Task[..., Any]) -> None:
            runs.append((self.request.delivery_count, self.request.redelivered))
            await asyncio.sleep(0.6)  # the work itself, not synchronization

    result = app.tasks["slow"].delay()
    stats = run_until_empty(app, pool=pool_name, concurrency=2)
    assert runs == [(1, False)]
    assert result.state is State.SUCCESS
    assert (stats.received, stats.succeeded) == (1, 1)


def test_worker_consumes_only_its_queues(app: Conveyor, pool: str) -> None:
    @app.task(queue="images")
    def resize() -> str:
        return "resized"

    @app.task
    def other() -> str:
        return "other"

    mine = resize.delay()
    theirs = other.delay()
    stats = run_until_empty(app, queues=["images"], pool=pool)
    assert mine.get(timeout=1) == "resized"
    assert theirs.state is State.PENDING
    assert stats.received == 1
    assert {s.queue: s.ready for s in app.broker.stats()} == {"images": 0, Q: 1}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_async_task_raising_cancelled_error_fails_and_the_worker_goes_on(
    app: Conveyor, pool: str
) -> None:
    @app.task
    async def cancelled() -> None:
        await asyncio.sleep(0)
        raise asyncio.CancelledError()

    @app.task
    def fine() -> int:
        return 1

    broken = cancelled.delay()
    good = fine.delay()
    run_bounded(app, pool)
    assert broken.state is State.FAILURE
    assert good.get(timeout=1) == 1
    assert broker_is_empty(app)


def test_retry_that_could_not_be_scheduled_is_not_counted_as_retried(app: Conveyor) -> None:
    @app.task(name="flaky", autoretry_for=ConnectionError, retry_backoff=0.01)
    def flaky(padding: str) -> None:
        raise ConnectionError("down")

    empty = len(encode(Envelope(id="big", task="flaky", queue=Q, args=("",))))
    env = Envelope(id="big", task="flaky", queue=Q, args=("x" * (MAX_SIZE - empty),))
    app.broker.publish([Outgoing(Q, encode(env, max_size=MAX_SIZE))])
    stats = run_bounded(app)
    assert (stats.retried, stats.dead_lettered) == (0, 1)
