"""The RabbitMQ broker against the RabbitMQ server on 127.0.0.1:5672 (guest/guest).

Each test uses queues of its own and deletes them afterwards. Without a server these tests skip
locally and fail in CI.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiormq
import pytest
from conftest import start_worker

from conveyor import Conveyor, Worker
from conveyor.brokers.base import Outgoing
from conveyor.brokers.rabbitmq import BUCKETS_MS, RabbitMQBroker
from conveyor.errors import BrokerError, ConfigurationError, PublishError
from conveyor.message import encode

pytestmark = pytest.mark.integration

URL = "amqp://guest:guest@127.0.0.1:5672/"
Poll = Callable[..., Any]


@pytest.fixture(scope="module", autouse=True)
def rabbitmq() -> None:
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=2).close()
    except OSError:
        if os.environ.get("CI"):
            pytest.fail("RabbitMQ is not reachable on 127.0.0.1:5672, and CI needs it")
        pytest.skip(
            "RabbitMQ is not running on 127.0.0.1:5672 (start it: rabbitmq-server -detached)"
        )


def _delete(queue: str) -> None:
    async def delete() -> None:
        connection = await aiormq.connect(URL)
        channel = await connection.channel()
        for name in (queue, f"{queue}.dead", *(f"{queue}.delay.{ms}" for ms in BUCKETS_MS)):
            await channel.queue_delete(name)
        await connection.close()

    asyncio.run(delete())


@pytest.fixture
def queue() -> Iterator[str]:
    name = f"test-{uuid.uuid4().hex[:10]}"
    yield name
    _delete(name)


@pytest.fixture
def broker() -> Iterator[RabbitMQBroker]:
    b = RabbitMQBroker(URL)
    yield b
    b.close()


def test_publish_fetch_ack_in_priority_order(
    broker: RabbitMQBroker, queue: str, poll: Poll
) -> None:
    broker.publish([Outgoing(queue, f"p{p}".encode(), p) for p in (0, 9, 5)])
    got: list[Any] = []

    def more() -> bool:
        got.extend(broker.fetch([queue], 3 - len(got)))
        return len(got) == 3

    poll(more, what="three deliveries")
    assert [d.body for d in got] == [b"p9", b"p5", b"p0"]
    assert all(d.delivery_count == 1 and not d.redelivered for d in got)
    assert broker.ack(got) == 3
    (stats,) = broker.stats([queue])
    assert (stats.ready, stats.delayed, stats.dead) == (0, 0, 0)


def test_an_unroutable_message_raises(broker: RabbitMQBroker, queue: str) -> None:
    broker.publish([Outgoing(queue, b"first")])
    _delete(queue)  # behind the broker's back: its binding is gone
    with pytest.raises(PublishError, match="NO_ROUTE"):
        broker.publish([Outgoing(queue, b"lost")])


def test_delays_are_held_by_rabbitmq(broker: RabbitMQBroker, queue: str, poll: Poll) -> None:
    broker.publish([Outgoing(queue, b"later", 0, time.time() + 0.5)])
    (stats,) = broker.stats([queue])
    assert (stats.ready, stats.delayed) == (0, 1)
    assert broker.fetch([queue], 1) == []
    (delivery,) = poll(lambda: broker.fetch([queue], 1) or None, timeout=10, what="the delay")
    assert delivery.body == b"later"
    broker.ack([delivery])


def test_dead_letters_keep_their_reason(broker: RabbitMQBroker, queue: str, poll: Poll) -> None:
    broker.publish([Outgoing(queue, b"bad")])
    (delivery,) = poll(lambda: broker.fetch([queue], 1) or None, what="the message")
    broker.dead_letter([(delivery, "malformed JSON")])
    poll(lambda: broker.stats([queue])[0].dead == 1, what="the dead letter")
    (dead,) = broker.dead_letters(queue)
    assert (dead.body, dead.reason) == (b"bad", "malformed JSON")
    assert broker.dead_letters(queue)[0].reason == "malformed JSON", "looking must not consume"
    assert broker.purge(queue, dead=True) == 1


def test_a_lost_delivery_is_counted(queue: str, poll: Poll) -> None:
    first = RabbitMQBroker(URL)
    first.publish([Outgoing(queue, b"crashy")])
    poll(lambda: first.fetch([queue], 1) or None, what="the first delivery")
    first.close()  # as if the worker died before acknowledging
    second = RabbitMQBroker(URL)
    try:
        (delivery,) = poll(lambda: second.fetch([queue], 1) or None, what="the redelivery")
        assert delivery.delivery_count == 2 and delivery.redelivered
        second.ack([delivery])
    finally:
        second.close()


def test_a_stale_delivery_tag_is_never_acked(
    broker: RabbitMQBroker, queue: str, poll: Poll
) -> None:
    broker.publish([Outgoing(queue, b"survivor")])
    (delivery,) = poll(lambda: broker.fetch([queue], 1) or None, what="the message")
    channel = broker._channel
    assert channel is not None
    broker._run(channel.close())  # the channel dies while the task runs
    assert broker.ack([delivery]) == 0
    (again,) = poll(lambda: broker.fetch([queue], 1) or None, what="the redelivery")
    assert again.body == b"survivor" and again.delivery_count == 2
    assert broker.ack([again]) == 1


def test_a_queue_with_other_arguments_gets_a_clear_error(queue: str) -> None:
    async def declare() -> None:
        connection = await aiormq.connect(URL)
        channel = await connection.channel()
        arguments = {"x-dead-letter-exchange": "conveyor.dead", "x-max-priority": 3}
        await channel.queue_declare(queue, durable=True, arguments=arguments)
        await connection.close()

    asyncio.run(declare())
    broker = RabbitMQBroker(URL)
    try:
        with pytest.raises(ConfigurationError, match="x-max-priority") as caught:
            broker.publish([Outgoing(queue, b"x")])
        assert "delete it" in str(caught.value)
    finally:
        broker.close()


def test_a_wrong_password_never_shows() -> None:
    broker = RabbitMQBroker("amqp://guest:s3cret-value@127.0.0.1:5672/")
    try:
        assert "s3cret-value" not in broker.display_url
        with pytest.raises(BrokerError) as caught:
            broker.publish([Outgoing("nowhere", b"x")])
        assert "s3cret-value" not in str(caught.value)
    finally:
        broker.close()


def test_worker_runs_tasks_and_dead_letters_bad_input(queue: str) -> None:
    app = Conveyor("rmq", broker=URL, results="memory://", default_queue=queue)

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    try:
        results = add.map([(n, n) for n in range(200)])
        later = add.apply_async((1, 2), countdown=0.3)
        app.broker.publish([Outgoing(queue, b"not json"), Outgoing(queue, b'{"v":1}')])
        stats = Worker(app, concurrency=2, until_empty=True).run()
        assert [r.get(timeout=5) for r in results] == [2 * n for n in range(200)]
        assert later.get(timeout=5) == 3
        assert (stats.succeeded, stats.rejected) == (201, 2)
        reasons = sorted(d.reason for d in app.broker.dead_letters(queue))
        assert reasons[0].startswith("invalid envelope") and "malformed JSON" in reasons[1]
    finally:
        app.close()


def _publish_raw(queue: str, bodies: list[tuple[bytes, str | None]]) -> None:
    """Messages put straight into a queue, as another program might."""

    async def publish() -> None:
        connection = await aiormq.connect(URL)
        channel = await connection.channel(publisher_confirms=True)
        for body, content_type in bodies:
            properties = aiormq.spec.Basic.Properties(content_type=content_type)
            await channel.basic_publish(body, routing_key=queue, properties=properties)
        await connection.close()

    asyncio.run(publish())


def test_raw_bad_input_is_dead_lettered_and_good_tasks_run(queue: str) -> None:
    app = Conveyor(
        "rmq", broker=URL, results="memory://", default_queue=queue, max_message_size=4096
    )

    @app.task(name="rmq.add")
    def add(x: int, y: int) -> int:
        return x + y

    try:
        good = add.delay(2, 3)  # declares the queue
        envelope = add.envelope((1, 1))
        unknown = encode(envelope).replace(b"rmq.add", b"rmq.nope")
        _publish_raw(
            queue,
            [
                (encode(envelope), "text/plain"),
                (b"x" * 5000, "application/json"),
                (unknown, "application/json"),
                (b"{not json", None),
            ],
        )
        stats = Worker(app, concurrency=2, until_empty=True).run()
        assert good.get(timeout=5) == 5
        assert (stats.succeeded, stats.rejected) == (1, 3)  # content type: at the broker
        reasons = " | ".join(sorted(d.reason for d in app.broker.dead_letters(queue)))
        for expected in ("content type 'text/plain'", "over the 4096-byte", "unknown task"):
            assert expected in reasons
        assert "malformed JSON" in reasons
    finally:
        app.close()


def test_a_two_hour_eta_waits_in_rabbitmq_not_in_the_worker(queue: str, poll: Poll) -> None:
    app = Conveyor("rmq", broker=URL, results="memory://", default_queue=queue)

    @app.task(name="rmq.echo")
    def echo(n: int) -> int:
        return n

    try:
        later = echo.apply_async((0,), countdown=7200)
        now = echo.map([(n,) for n in range(1, 51)])
        worker = Worker(app, concurrency=2)
        thread, errors = start_worker(worker)
        poll(lambda: all(r.ready() for r in now), timeout=30, what="the 50 ready tasks")
        worker.stop()
        thread.join(10)
        assert not errors
        assert worker.stats.received == 50, "the delayed task was never handed to the worker"
        (stats,) = app.broker.stats([queue])
        assert (stats.ready, stats.delayed) == (0, 1)
        assert later.state == "PENDING"
    finally:
        app.close()


def test_a_forked_producer_opens_its_own_connection(queue: str, poll: Poll) -> None:
    broker = RabbitMQBroker(URL)
    try:
        broker.publish([Outgoing(queue, b"parent")])
        parent_connection = broker._connection
        pid = os.fork()
        if pid == 0:  # the child: publish through the same broker object, then leave
            code = 1
            try:
                broker.publish([Outgoing(queue, b"child")])
                code = 0 if broker._connection is not parent_connection else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        broker.publish([Outgoing(queue, b"parent again")])
        poll(lambda: broker.stats([queue])[0].ready == 3, what="all three messages")
    finally:
        broker.close()


CRASH_APP = """
import os
from conveyor import Conveyor

app = Conveyor("crash", broker="{url}", default_queue="{queue}", poison_limit=3)


@app.task(name="crash.die")
def die() -> None:
    os._exit(3)  # as a segfault or the OOM killer would end the process
"""


def test_a_task_that_kills_its_worker_is_dead_lettered_after_the_limit(
    queue: str, tmp_path: Path
) -> None:
    (tmp_path / "crashapp.py").write_text(CRASH_APP.format(url=URL, queue=queue))
    producer = Conveyor("crash", broker=URL, default_queue=queue)
    producer.task(name="crash.die")(lambda: None).delay()
    codes = []
    for _ in range(4):
        command = ["worker", "crashapp:app", "-c", "1", "--until-empty"]
        worker = subprocess.run(
            [sys.executable, "-m", "conveyor", *command],
            cwd=tmp_path,
            capture_output=True,
            timeout=60,
            check=False,
        )
        codes.append(worker.returncode)
    try:
        assert codes == [3, 3, 3, 0]
        (dead,) = producer.broker.dead_letters(queue)
        assert "poison limit 3" in dead.reason and dead.delivery_count == 4
    finally:
        producer.close()


def test_the_worker_reconnects_and_loses_nothing_when_the_connection_drops(
    queue: str, poll: Poll
) -> None:
    app = Conveyor("rmq", broker=URL, results="memory://", default_queue=queue)
    runs: list[int] = []

    @app.task(name="rmq.record")
    def record(n: int) -> int:
        runs.append(n)
        return n

    try:
        results = record.map([(n,) for n in range(300)])
        worker = Worker(app, concurrency=2, until_empty=True)
        thread, errors = start_worker(worker)
        poll(lambda: len(runs) >= 50, timeout=30, what="the first 50 tasks")
        broker = app.broker
        assert isinstance(broker, RabbitMQBroker)
        connection = broker._connection
        assert connection is not None
        broker._run(connection.close())  # the connection drops mid-run
        thread.join(60)
        assert not thread.is_alive() and not errors
        assert [r.get(timeout=5) for r in results] == list(range(300))
        duplicates = len(runs) - len(set(runs))
        print(f"\nconnection dropped after 50+ tasks: 0 lost, {duplicates} ran twice")
        assert sorted(set(runs)) == list(range(300))
        assert duplicates <= 2, "only tasks in flight at the drop may run twice"
        assert broker._connection is not connection, "the broker reconnected"
    finally:
        app.close()
