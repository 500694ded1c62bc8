"""RPC results over RabbitMQ's direct reply-to: a worker sends each task's records back to the
process that sent it, and nothing is stored in RabbitMQ.

The sender and the worker are two apps with brokers of their own (two connections), as two
processes would be: the worker runs on a thread of this one. RabbitMQ is expected on
127.0.0.1:5672; each test uses a queue of its own and deletes it.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import (
    RABBITMQ_URL,
    delete_rabbitmq_queues,
    require_rabbitmq,
    run_bounded,
    start_worker,
)

from conveyor import Conveyor, Worker
from conveyor.errors import ConfigurationError, ResultError, TaskFailed
from conveyor.results import State
from conveyor.results.rpc import RpcResultStore

pytestmark = pytest.mark.integration

Pair = tuple[Conveyor, Conveyor]


@pytest.fixture
def pair() -> Iterator[Callable[..., Pair]]:
    """`pair(**settings)`: a sending app and a worker's app on one new queue, results rpc://."""
    require_rabbitmq()
    queue = f"rpc-{uuid.uuid4().hex[:10]}"
    apps: list[Conveyor] = []

    def make(**settings: Any) -> Pair:
        sender, worker = (
            Conveyor("rpc", broker=RABBITMQ_URL, results="rpc://", default_queue=queue, **settings)
            for _ in range(2)
        )
        apps.extend((sender, worker))
        return sender, worker

    yield make
    for app in apps:
        app.close()
    delete_rabbitmq_queues(queue)


def define(app: Conveyor, gate: threading.Event | None = None) -> dict[str, Any]:
    """The same tasks on each app (names given, so both agree)."""
    tries: dict[str, int] = {}

    @app.task(name="add")
    def add(x: int, y: int) -> int:
        if gate is not None:
            assert gate.wait(10)
        return x + y

    @app.task(name="flaky", max_retries=5, retry_backoff=False)
    def flaky(key: str) -> str:
        tries[key] = tries.get(key, 0) + 1
        if tries[key] < 3:
            raise flaky.retry(countdown=0.01, exc=ValueError("not yet"))
        return "done"

    @app.task(name="boom")
    def boom() -> None:
        raise KeyError("missing")

    @app.task(name="quiet", ignore_result=True)
    def quiet() -> int:
        return 1

    return {"add": add, "flaky": flaky, "boom": boom, "quiet": quiet}


def test_the_sender_gets_started_then_success_with_the_value(
    pair: Callable[..., Pair], poll: Callable[..., Any]
) -> None:
    sender, worker_app = pair()
    gate = threading.Event()
    tasks = define(sender)
    define(worker_app, gate)
    result = tasks["add"].delay(2, 3)
    assert result.state is State.PENDING
    worker = Worker(worker_app, pool="threads", concurrency=2, until_empty=True)
    thread, errors = start_worker(worker)
    try:
        poll(lambda: result.state is State.STARTED, timeout=10, what="STARTED reaches the sender")
        gate.set()
        assert result.get(timeout=10) == 5
    finally:
        gate.set()
        thread.join(15)
    assert not errors
    store = sender.results
    assert isinstance(store, RpcResultStore)
    record = store.get(result.id)
    assert record is not None and record.state is State.SUCCESS
    assert record.worker and record.started_at and record.finished_at
    assert record.finished_at >= record.started_at


def test_retries_and_failures_come_back_with_their_details(pair: Callable[..., Pair]) -> None:
    sender, worker_app = pair()
    tasks = define(sender)
    define(worker_app)
    flaky, boom = tasks["flaky"].delay("a"), tasks["boom"].delay()
    stats = run_bounded(worker_app, timeout=30)
    assert flaky.get(timeout=10) == "done"
    record = sender.results.get(flaky.id)  # type: ignore[union-attr]
    assert record is not None and record.retries == 2
    with pytest.raises(TaskFailed) as failed:
        boom.get(timeout=10)
    assert failed.value.type_name == "KeyError" and "missing" in failed.value.message
    assert "raise KeyError" in failed.value.traceback
    assert (stats.succeeded, stats.failed, stats.retried) == (1, 1, 2)


def test_a_waiting_get_is_woken_by_the_reply_within_milliseconds(
    pair: Callable[..., Pair],
) -> None:
    sender, worker_app = pair()
    tasks = define(sender)
    define(worker_app)
    results = [tasks["add"].delay(n, 1) for n in range(10)]
    lags: list[float] = []
    waiter_errors: list[BaseException] = []

    def wait_all() -> None:
        try:
            for result in results:
                result.get(timeout=20)
                record = sender.results.get(result.id)  # type: ignore[union-attr]
                assert record is not None and record.finished_at is not None
                lags.append(time.time() - record.finished_at)
        except BaseException as exc:
            waiter_errors.append(exc)

    waiter = threading.Thread(target=wait_all)
    waiter.start()  # waiting before the worker starts: woken, never polling
    run_bounded(worker_app, timeout=30)
    waiter.join(20)
    assert not waiter_errors and len(lags) == 10
    assert statistics.median(lags) < 0.05


def test_only_the_sender_sees_its_results(pair: Callable[..., Pair]) -> None:
    sender, worker_app = pair()
    tasks = define(sender)
    define(worker_app)
    result = tasks["add"].delay(1, 1)
    run_bounded(worker_app, timeout=30)
    assert result.get(timeout=10) == 2
    assert worker_app.result(result.id).state is State.PENDING, "another process: not its result"
    assert sender.result(result.id).get(timeout=1) == 2
    sender.result(result.id).forget()
    assert sender.result(result.id).state is State.PENDING


def test_ignore_result_sends_no_reply_address(pair: Callable[..., Pair]) -> None:
    sender, worker_app = pair()
    tasks = define(sender)
    define(worker_app)
    quiet = tasks["quiet"].delay()
    with pytest.raises(ConfigurationError):
        quiet.get(timeout=1)
    (outgoing,) = sender._outgoing([_envelope(sender, "quiet")])
    assert outgoing.reply_to is None
    (outgoing,) = sender._outgoing([_envelope(sender, "add")])
    assert outgoing.reply_to == "amq.rabbitmq.reply-to"
    stats = run_bounded(worker_app, timeout=30)
    assert stats.succeeded == 1 and sender.results.count() == 0  # type: ignore[union-attr]


def _envelope(app: Conveyor, task: str) -> Any:
    from conveyor.message import Envelope

    return Envelope(id=uuid.uuid4().hex, task=task, queue=app.settings.default_queue)


def test_a_sender_that_is_gone_costs_the_worker_nothing(
    pair: Callable[..., Pair], caplog: pytest.LogCaptureFixture
) -> None:
    sender, worker_app = pair()
    tasks = define(sender)
    define(worker_app)
    results = [tasks["add"].delay(n, n) for n in range(20)]
    sender.close()  # its reply consumer is gone with its channel
    with caplog.at_level(logging.WARNING, logger="conveyor"):
        stats = run_bounded(worker_app, timeout=30)
    assert stats.succeeded == 20 and stats.failed == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    (queue,) = worker_app.broker.stats([worker_app.settings.default_queue])
    assert queue.ready == 0 and queue.dead == 0
    assert len(results) == 20


def test_prefork_workers_send_results_back_too(pair: Callable[..., Pair]) -> None:
    sender, worker_app = pair()
    tasks = define(sender)
    define(worker_app)

    @worker_app.task(name="whoami")
    def whoami_worker() -> int:
        return os.getpid()

    @sender.task(name="whoami")
    def whoami() -> int:
        return os.getpid()

    results = [whoami.delay() for _ in range(20)] + [tasks["flaky"].delay("p")]
    run_bounded(worker_app, pool="prefork", timeout=60)
    pids = {r.get(timeout=10) for r in results[:-1]}
    assert os.getpid() not in pids
    assert results[-1].get(timeout=10) == "done"


def test_a_reply_that_is_not_a_record_raises_our_error(pair: Callable[..., Pair]) -> None:
    sender, _ = pair()
    store = sender.results
    assert isinstance(store, RpcResultStore)
    store._arrived(b'{"id": "t1", "state": "NOT-A-STATE"}')
    with pytest.raises(ResultError, match="corrupt or not conveyor's"):
        sender.result("t1").get(timeout=1)
    store._arrived(b"\x80garbage")  # no id to file it under: logged and dropped
    assert sender.result("t2").state is State.PENDING


def test_rpc_needs_rabbitmq() -> None:
    app = Conveyor("rpc", broker="memory://", results="rpc://")

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    with pytest.raises(ConfigurationError, match="amqp://"):
        add.delay(1, 2)


def test_a_forked_child_starts_with_no_results(pair: Callable[..., Pair]) -> None:
    sender, worker_app = pair()
    tasks = define(sender)
    define(worker_app)
    result = tasks["add"].delay(4, 4)
    run_bounded(worker_app, timeout=30)
    assert result.get(timeout=10) == 8
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        code = 1
        try:
            state = sender.result(result.id).state
            os.write(write, state.value.encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    report = os.read(read, 64).decode()
    os.close(read)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert report == "PENDING"
    assert sender.result(result.id).get(timeout=1) == 8, "the parent's are untouched"
