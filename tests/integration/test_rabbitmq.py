"""The RabbitMQ broker against the RabbitMQ server on 127.0.0.1:5672 (guest/guest).

Each test uses queues of its own and deletes them afterwards. Without a server these tests skip
locally and fail in CI.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import aiormq
import pytest

from conveyor import Conveyor, Worker
from conveyor.brokers.base import Outgoing
from conveyor.brokers.rabbitmq import BUCKETS_MS, RabbitMQBroker
from conveyor.errors import BrokerError, ConfigurationError, PublishError

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
