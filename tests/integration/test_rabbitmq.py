"""The RabbitMQ broker against the RabbitMQ server on 127.0.0.1:5672 (guest/guest).

Each test uses queues of its own and deletes them afterwards. Without a server these tests skip
locally and fail in CI.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiormq
import pytest
from aiormq.abc import ChannelFrame
from conftest import delete_rabbitmq_queues, require_rabbitmq, start_worker
from pamqp.body import ContentBody
from pamqp.frame import marshal, unmarshal
from pamqp.header import ContentHeader

from conveyor import Conveyor, Worker
from conveyor.brokers.base import Outgoing, own_endpoints
from conveyor.brokers.rabbitmq import RabbitMQBroker
from conveyor.errors import BrokerError, ConfigurationError, PublishError
from conveyor.message import encode
from conveyor.worker.pools._children import inherited_connections

pytestmark = pytest.mark.integration

URL = "amqp://guest:guest@127.0.0.1:5672/"
Poll = Callable[..., Any]


@pytest.fixture(scope="module", autouse=True)
def rabbitmq() -> None:
    require_rabbitmq()


def _delete(queue: str) -> None:
    delete_rabbitmq_queues(queue)


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


@pytest.fixture
def prioritized() -> Iterator[RabbitMQBroker]:
    """A broker that declares its queues with 10 priority levels."""
    b = RabbitMQBroker(URL, max_priority=9)
    yield b
    b.close()


def test_the_round_trip_is_timed_on_the_attached_loop_once_consuming(queue: str) -> None:
    broker = RabbitMQBroker(URL)

    async def timed() -> tuple[float | None, float | None]:
        broker.attach(asyncio.get_running_loop())
        try:
            before = await broker.round_trip_async()
            await broker.fetch_async([queue], 1)  # declares the queue and consumes it
            return before, await broker.round_trip_async()
        finally:
            await broker.detach()

    before, after = asyncio.run(timed())
    assert before is None, "nothing consumed yet: nothing to time"
    assert after is not None and 0 < after < 1


def test_publish_fetch_ack_in_priority_order(
    prioritized: RabbitMQBroker, queue: str, poll: Poll
) -> None:
    broker = prioritized
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


def test_a_run_given_back_as_lost_is_counted_in_the_message_with_its_priority(
    prioritized: RabbitMQBroker, queue: str, poll: Poll
) -> None:
    """A nack could not carry the count: the copy published instead says `x-conveyor-lost`,
    keeps the priority, and an uncounted give-back moves neither count."""
    broker = prioritized
    broker.publish([Outgoing(queue, b"x", 5), Outgoing(queue, b"low", 0)])
    (first,) = poll(lambda: broker.fetch([queue], 1) or None, what="the message")
    assert (first.body, first.priority, first.lost) == (b"x", 5, 0)
    broker.requeue([first])
    (again,) = poll(lambda: broker.fetch([queue], 1) or None, what="the copy")
    assert (again.body, again.priority, again.delivery_count, again.lost) == (b"x", 5, 2, 1)
    broker.requeue([again], count_delivery=False)
    (third,) = poll(lambda: broker.fetch([queue], 1) or None, what="the copy")
    assert (third.body, third.delivery_count, third.lost) == (b"x", 2, 1)
    broker.ack([third])


def test_a_broker_dropped_without_close_closes_its_connection_and_thread(queue: str) -> None:
    """Otherwise its socket outlives it, and the next prefork worker in the process takes it
    for a connection of the user's (the warning about sockets its children would inherit)."""
    before = inherited_connections(own_endpoints())
    dropped = RabbitMQBroker(URL)
    dropped.publish([Outgoing(queue, b"x")])
    thread = dropped._bridge.thread
    assert thread is not None and thread.is_alive()
    del dropped
    gc.collect()
    assert not thread.is_alive()
    assert inherited_connections(own_endpoints()) == before


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


def _dead_letters_of(
    queue: str, items: list[tuple[bytes, int, str]], poll: Poll, max_priority: int | None = None
) -> None:
    """Publish (body, priority) pairs, give each back once as a lost run, then dead-letter
    each with its reason: dead letters whose headers carry counts. A broker of its own does
    it, so that the test's broker is not consuming the queue."""
    worker = RabbitMQBroker(URL, max_priority=max_priority)
    try:
        worker.publish([Outgoing(queue, body, priority) for body, priority, _ in items])
        worker.requeue(_take(worker, queue, len(items), poll))
        again = _take(worker, queue, len(items), poll)
        assert all((d.delivery_count, d.lost) == (2, 1) for d in again)
        reasons = {body: reason for body, _, reason in items}
        worker.dead_letter([(d, reasons[d.body]) for d in again])
    finally:
        worker.close()
    poll(lambda: _depths(queue) == (0, len(items)), what="the dead letters")


def _take(broker: RabbitMQBroker, queue: str, count: int, poll: Poll) -> list[Any]:
    """Fetch exactly `count` deliveries."""
    broker.reserve(count)
    got: list[Any] = []

    def more() -> bool:
        got.extend(broker.fetch([queue], count - len(got)))
        return len(got) == count

    poll(more, timeout=20, what=f"{count} deliveries")
    return got


def _depths(queue: str) -> tuple[int, int]:
    """Ready and dead messages of `queue`, asked by a broker that consumes nothing."""
    observer = RabbitMQBroker(URL)
    try:
        (stats,) = observer.stats([queue])
        return stats.ready, stats.dead
    finally:
        observer.close()


def test_requeue_dead_sends_fresh_copies_and_keeps_the_rest_in_order(
    prioritized: RabbitMQBroker, queue: str, poll: Poll
) -> None:
    """Selected dead letters come back with no delivery or lost-run counts and their priority;
    the others stay in the dead-letter queue, in their order."""
    broker = prioritized
    items = [
        (b"a", 2, "poison message: 1"),
        (b"b", 0, "unknown task: 2"),
        (b"c", 7, "poison message: 3"),
        (b"d", 0, "bad arguments: 4"),
    ]
    _dead_letters_of(queue, items, poll, max_priority=9)
    assert sorted((d.body, d.priority) for d in broker.dead_letters(queue))[2] == (b"c", 7)
    progress: list[int] = []

    moved = broker.requeue_dead(
        queue, lambda d: d.reason.startswith("poison message"), progress=progress.append
    )

    assert moved == 2 and sum(progress) == 2
    assert _depths(queue) == (2, 2)
    assert [d.body for d in broker.dead_letters(queue)] == [b"b", b"d"]
    got = _take(broker, queue, 2, poll)
    assert [(d.body, d.priority) for d in got] == [(b"c", 7), (b"a", 2)]
    assert all((d.delivery_count, d.lost, d.redelivered) == (1, 0, False) for d in got)
    broker.ack(got)
    assert broker.requeue_dead(queue) == 2
    assert sorted(d.body for d in _take(broker, queue, 2, poll)) == [b"b", b"d"]
    assert _depths(queue)[1] == 0


def test_requeue_dead_of_more_than_one_batch(
    broker: RabbitMQBroker, queue: str, poll: Poll
) -> None:
    count = 1100  # over two of requeue_dead's batches
    worker = RabbitMQBroker(URL)
    try:
        worker.publish([Outgoing(queue, b"%d" % n) for n in range(count)])
        worker.dead_letter([(d, "r: x") for d in _take(worker, queue, count, poll)])
    finally:
        worker.close()
    poll(lambda: _depths(queue) == (0, count), what="the dead letters")
    progress: list[int] = []
    even = broker.requeue_dead(queue, lambda d: int(d.body) % 2 == 0, progress=progress.append)
    assert even == count // 2 and sum(progress) == even and len(progress) >= 2
    assert _depths(queue) == (count // 2, count // 2)
    assert {int(d.body) % 2 for d in broker.dead_letters(queue, count)} == {1}


def test_nothing_is_lost_when_the_requeued_copy_is_not_confirmed(
    broker: RabbitMQBroker, queue: str, poll: Poll
) -> None:
    """A copy RabbitMQ refuses (here: no route to the queue) leaves its dead letter where it
    was: the dead letter is acknowledged only after its copy is confirmed."""
    _dead_letters_of(queue, [(b"x", 0, "r: 1"), (b"y", 0, "r: 2")], poll)
    assert broker.exists(queue)  # declares nothing, but connects: the unbinding comes after

    async def unbind() -> None:
        connection = await aiormq.connect(URL)
        channel = await connection.channel()
        await channel.queue_unbind(queue, "conveyor", routing_key=queue)
        await connection.close()

    broker._declared.add(queue)  # as if this broker had declared it before the unbinding
    asyncio.run(unbind())
    with pytest.raises(PublishError, match="NO_ROUTE"):
        broker.requeue_dead(queue)
    poll(lambda: _depths(queue) == (0, 2), what="the dead letters back")
    assert [d.body for d in broker.dead_letters(queue)] == [b"x", b"y"]


def test_exists_is_a_passive_declare_that_creates_nothing(
    broker: RabbitMQBroker, queue: str
) -> None:
    assert not broker.exists(queue)
    assert not broker.exists(queue)  # still not: the first look created nothing
    broker.publish([Outgoing(queue, b"x")])
    assert broker.exists(queue)
    assert broker.purge(queue) == 1
    assert broker.exists(queue)  # an empty queue is still there


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


def _declare_with_priorities(queue: str, most: int) -> None:
    """Declare `queue` as an earlier conveyor would have: with `x-max-priority` `most`."""

    async def declare() -> None:
        connection = await aiormq.connect(URL)
        channel = await connection.channel()
        arguments = {"x-dead-letter-exchange": "conveyor.dead", "x-max-priority": most}
        await channel.queue_declare(queue, durable=True, arguments=arguments)
        await connection.close()

    asyncio.run(declare())


def test_a_queue_with_other_arguments_gets_a_clear_error(queue: str) -> None:
    _declare_with_priorities(queue, 3)
    broker = RabbitMQBroker(URL, max_priority=9)
    try:
        with pytest.raises(ConfigurationError, match="x-max-priority") as caught:
            broker.publish([Outgoing(queue, b"x")])
        message = str(caught.value)
        assert "x-max-priority 3 where conveyor asks for 9" in message
        assert "queue_max_priority" in message and "delete the queue" in message
    finally:
        broker.close()


def test_a_new_queue_has_no_priorities_but_its_messages_keep_theirs(
    broker: RabbitMQBroker, queue: str, poll: Poll
) -> None:
    """The default: first in, first out, whatever the priority; each message still carries
    the priority it was sent with."""
    broker.publish([Outgoing(queue, f"p{p}".encode(), p) for p in (0, 9, 5)])
    got = _take(broker, queue, 3, poll)
    assert [(d.body, d.priority) for d in got] == [(b"p0", 0), (b"p9", 9), (b"p5", 5)]
    broker.ack(got)
    assert broker._priorities == {queue: 0}


def test_an_existing_queue_keeps_its_priorities_when_the_setting_is_unset(
    broker: RabbitMQBroker, queue: str, poll: Poll
) -> None:
    """A queue declared with priorities (as by earlier releases, whose default was 9) is used
    with them, and priorities above its maximum count as the maximum."""
    _declare_with_priorities(queue, 5)
    broker.publish([Outgoing(queue, f"p{p}".encode(), p) for p in (0, 9, 3, 5)])
    got = _take(broker, queue, 4, poll)
    assert [(d.body, d.priority) for d in got] == [(b"p9", 5), (b"p5", 5), (b"p3", 3), (b"p0", 0)]
    broker.ack(got)
    assert broker._priorities == {queue: 5}


def test_the_priorities_example_of_the_docs_declares_three_levels(queue: str) -> None:
    """docs/brokers.md's example, run against this RabbitMQ on a queue of the test's own."""
    page = (Path(__file__).resolve().parents[2] / "docs" / "brokers.md").read_text()
    blocks = [b.split("```")[0] for b in page.split("```python\n")[1:]]
    (example,) = [b for b in blocks if "queue_max_priority=3" in b]
    namespace: dict[str, Any] = {}
    exec(example, namespace)
    app = namespace["app"]
    try:
        namespace["charge"].apply_async((7,), queue=queue)
        assert app.broker._priorities == {queue: 3}
    finally:
        app.close()


def test_a_worker_stops_at_a_queue_declared_otherwise_instead_of_retrying(queue: str) -> None:
    """No retry can mend a refused declaration: the worker stops at once and says why."""
    _declare_with_priorities(queue, 3)
    app = Conveyor("rmq", broker=URL, results=None, default_queue=queue, queue_max_priority=9)
    try:
        worker = Worker(app, pool="threads", concurrency=1)
        stats = worker.run()  # returns: no signal needed
        assert worker.failure is not None
        assert "x-max-priority 3 where conveyor asks for 9" in worker.failure
        assert "unset it" in worker.failure
        assert stats.succeeded == 0
    finally:
        app.close()


def test_changing_queue_max_priority_takes_a_drained_queue_deleted(queue: str) -> None:
    """What docs/brokers.md says to do: drain, delete the queue itself, start with the new
    setting. Its dead letters, in a queue of their own, stay."""
    old = Conveyor("rmq", broker=URL, results=None, default_queue=queue, queue_max_priority=9)
    new = Conveyor("rmq", broker=URL, results=None, default_queue=queue, queue_max_priority=3)

    @old.task(name="rmq.noop")
    def noop() -> None:
        """Nothing."""

    @new.task(name="rmq.noop")
    def noop_too() -> None:
        """Nothing."""

    try:
        noop.delay()
        old.broker.publish([Outgoing(queue, b"not json")])
        with pytest.raises(ConfigurationError, match="x-max-priority 9 where conveyor asks for 3"):
            noop_too.delay()
        stats = Worker(old, pool="threads", concurrency=1, until_empty=True).run()
        assert (stats.succeeded, stats.rejected) == (1, 1)
        (left,) = old.broker.stats([queue])
        assert (left.ready, left.delayed) == (0, 0)

        async def delete() -> None:
            connection = await aiormq.connect(URL)
            channel = await connection.channel()
            await channel.queue_delete(queue, if_empty=True)
            await connection.close()

        asyncio.run(delete())
        noop_too.apply_async(priority=9)  # declared anew, with x-max-priority 3
        stats = Worker(new, pool="threads", concurrency=1, until_empty=True).run()
        assert stats.succeeded == 1
        assert len(new.broker.dead_letters(queue)) == 1
    finally:
        old.close()
        new.close()


def test_a_wrong_password_never_shows() -> None:
    broker = RabbitMQBroker("amqp://guest:s3cret-value@127.0.0.1:5672/")
    try:
        assert "s3cret-value" not in broker.display_url
        with pytest.raises(BrokerError) as caught:
            broker.publish([Outgoing("nowhere", b"x")])
        assert "s3cret-value" not in str(caught.value)
    finally:
        broker.close()


def test_aiormq_logs_a_failed_connect_only_when_it_is_not_conveyors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """conveyor reports its own failed connects in its error, so aiormq's record of one is
    dropped (it printed bare beside the error); aiormq's records of the user's own connections
    are left alone."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"amqp://guest:guest@127.0.0.1:{probe.getsockname()[1]}/"
    caplog.set_level(logging.DEBUG, logger="aiormq")
    broker = RabbitMQBroker(url)
    try:
        with pytest.raises(BrokerError, match="cannot connect to RabbitMQ"):
            broker.publish([Outgoing("nowhere", b"x")])
    finally:
        broker.close()
    ours = [r for r in caplog.records if r.name == "aiormq.connection" and r.levelno >= 30]
    assert ours == []

    async def users_own() -> None:
        await aiormq.connect(url)

    with pytest.raises(aiormq.exceptions.AMQPConnectionError):
        asyncio.run(users_own())
    theirs = [r.getMessage() for r in caplog.records if r.name == "aiormq.connection"]
    assert any(m.startswith("error when creating transport") for m in theirs), theirs


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


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_prefork_worker_runs_its_connection_on_the_loop_asked_for(queue: str, loop: str) -> None:
    """With prefork the worker's own loop holds the connection: deliveries, pipes and acks."""
    app = Conveyor("rmq", broker=URL, results="memory://", default_queue=queue)

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    try:
        results = add.map([(n, n) for n in range(500)])
        worker = Worker(app, pool="prefork", concurrency=2, until_empty=True, loop=loop)
        stats = worker.run()
        assert [r.get(timeout=5) for r in results] == [2 * n for n in range(500)]
        assert (stats.succeeded, stats.failed, stats.stale) == (500, 0, 0)
        assert worker.loop_name == loop
        ran_on = type(worker._loop).__module__.partition(".")[0]
        assert ran_on == loop
        (left,) = app.broker.stats([queue])
        assert (left.ready, left.dead) == (0, 0)
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


def _publish_with_raw_headers(queue: str, body: bytes, swaps: dict[bytes, bytes]) -> None:
    """Publish one message whose header bytes are then swapped for bytes that are not UTF-8.

    aiormq only writes valid text, so the frames are marshalled with pamqp and the swap made
    in the wire bytes (each replacement has the same length as what it replaces).
    """

    async def publish() -> None:
        connection = await aiormq.connect(URL)
        channel = await connection.channel(publisher_confirms=False)
        properties = aiormq.spec.Basic.Properties(
            content_type="application/json", headers={"x-origin": "abcd", "x-tag": "ok"}
        )
        publish = aiormq.spec.Basic.Publish(exchange="", routing_key=queue)
        raw = b"".join(
            marshal(frame, channel.number)
            for frame in (publish, ContentHeader(0, len(body), properties), ContentBody(body))
        )
        for old, new in swaps.items():
            assert len(old) == len(new) and old in raw
            raw = raw.replace(old, new)
        await channel.write_queue.put(ChannelFrame(raw, False))
        await channel.basic_qos(prefetch_count=1)  # a round trip: the publish went first
        await connection.close()

    asyncio.run(publish())


def test_raw_bad_input_is_dead_lettered_and_good_tasks_run(
    queue: str, caplog: pytest.LogCaptureFixture
) -> None:
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
        # A header name, then a header value, that are not UTF-8: the first would make the
        # AMQP library drop the connection on every delivery if it were not caught.
        _publish_with_raw_headers(queue, encode(envelope), {b"x-origin": b"x-or\xffgin"})
        _publish_with_raw_headers(queue, encode(envelope), {b"abcd": b"a\xfe\xffd"})
        after = add.delay(3, 4)  # behind all the bad input
        with caplog.at_level(logging.WARNING, logger="conveyor"):
            stats = Worker(app, concurrency=2, until_empty=True).run()
        assert good.get(timeout=5) == 5 and after.get(timeout=5) == 7
        # Three refused by the worker, three (content type, headers) by the broker as they came.
        assert (stats.succeeded, stats.rejected, stats.dead_lettered) == (2, 6, 6)
        dead = app.broker.dead_letters(queue)
        reasons = " | ".join(sorted(d.reason for d in dead))
        for expected in ("wrong content type: 'text/plain'", "over the 4096-byte", "unknown task"):
            assert expected in reasons
        assert "malformed JSON" in reasons
        assert reasons.count("invalid headers: a header name or value is not valid UTF-8") == 2
        assert len(dead) == 6 and all(d.delivery_count == 1 for d in dead)
        logged = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(logged) == 6, "each bad message is logged once"
        assert app.broker.stats([queue])[0].ready == 0, "every bad message was acked"
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


def _run_crash_worker(tmp_path: Path, queue: str, *options: str) -> int:
    command = ["worker", "crashapp:app", "-c", "1", "--until-empty", *options]
    worker = subprocess.run(
        [sys.executable, "-m", "conveyor", *command],
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
        check=False,
    )
    return worker.returncode


def test_a_task_that_kills_its_worker_is_dead_lettered_after_the_limit(
    queue: str, tmp_path: Path
) -> None:
    (tmp_path / "crashapp.py").write_text(CRASH_APP.format(url=URL, queue=queue))
    producer = Conveyor("crash", broker=URL, default_queue=queue)
    producer.task(name="crash.die")(lambda: None).delay()
    try:
        # With threads the task takes the whole worker down, each time.
        codes = [_run_crash_worker(tmp_path, queue, "-P", "threads") for _ in range(4)]
        assert codes == [3, 3, 3, 0]
        (dead,) = producer.broker.dead_letters(queue)
        assert "poison limit 3" in dead.reason and dead.delivery_count == 4
    finally:
        producer.close()


def test_a_task_that_kills_its_prefork_child_is_dead_lettered_by_one_worker(
    queue: str, tmp_path: Path
) -> None:
    (tmp_path / "crashapp.py").write_text(CRASH_APP.format(url=URL, queue=queue))
    producer = Conveyor("crash", broker=URL, default_queue=queue)
    producer.task(name="crash.die")(lambda: None).delay()
    try:
        # The child dies three times; the worker stays up, gives the message back each time,
        # and dead-letters it at the fourth delivery.
        assert _run_crash_worker(tmp_path, queue) == 0
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
        worker = Worker(app, pool="threads", concurrency=2, until_empty=True)
        thread, errors = start_worker(worker)
        poll(lambda: len(runs) >= 50, timeout=30, what="the first 50 tasks")
        broker = app.broker
        assert isinstance(broker, RabbitMQBroker)
        connection = broker._connection
        assert connection is not None
        with contextlib.suppress(BrokerError):  # the close may itself be cut short
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


def _written_frames(broker: RabbitMQBroker) -> list[Any]:
    """Record the frames the broker writes on its channel from now on."""
    channel = broker._channel
    assert isinstance(channel, aiormq.Channel)
    frames: list[Any] = []
    put = channel.write_queue.put_nowait

    def record(item: ChannelFrame) -> None:
        data = item.payload
        while data:
            consumed, _, frame = unmarshal(data)
            frames.append(frame)
            data = data[consumed:]
        put(item)

    channel.write_queue.put_nowait = record  # type: ignore[method-assign]
    return frames


def test_acks_of_the_oldest_deliveries_go_as_one_multi_ack(
    broker: RabbitMQBroker, queue: str, poll: Poll
) -> None:
    broker.publish([Outgoing(queue, f"m{n}".encode()) for n in range(5)])
    got: list[Any] = []
    poll(lambda: got.extend(broker.fetch([queue], 5 - len(got))) or len(got) == 5, what="5")
    tags = [d.receipt[1] for d in got]
    frames = _written_frames(broker)
    assert broker.ack(got[:3]) == 3
    assert [(f.name, f.delivery_tag, f.multiple) for f in frames] == [("Basic.Ack", tags[2], True)]
    frames.clear()
    broker.ack([got[4]])  # the fourth is still running: this one goes alone
    assert [(f.delivery_tag, f.multiple) for f in frames] == [(tags[4], False)]
    frames.clear()
    broker.ack([got[3]])
    assert [(f.delivery_tag, f.multiple) for f in frames] == [(tags[3], True)]
    broker.close()
    assert RabbitMQBroker(URL).stats([queue])[0].ready == 0, "all five were acked, none twice"


def test_quorum_queues_count_deliveries_and_dead_letter_a_poison_task(
    queue: str, poll: Poll
) -> None:
    app = Conveyor("rmq", broker=URL, results="memory://", queue_type="quorum", default_queue=queue)
    ran: list[str] = []

    @app.task(name="rmq.note")
    def note(what: str) -> None:
        ran.append(what)

    def quorum() -> RabbitMQBroker:
        return RabbitMQBroker(URL, queue_type="quorum", delivery_limit=30)

    try:
        crashy = encode(note.envelope(("crashy",)))
        app.broker.publish([Outgoing(queue, crashy)])
        later = note.apply_async(("later",), countdown=0.3)  # through a delay queue and back
        counts = []
        for _ in range(3):  # three workers die holding the message
            consumer = quorum()
            (delivery,) = poll(
                lambda c=consumer: c.fetch([queue], 1) or None,
                what="a delivery",
            )
            assert delivery.body == crashy
            counts.append(delivery.delivery_count)
            consumer.close()
        assert counts == [1, 2, 3], "RabbitMQ's x-delivery-count, not a republished copy"

        async def declare_again() -> None:
            connection = await aiormq.connect(URL)
            channel = await connection.channel()
            try:  # succeeds only when the queue has exactly these arguments
                await channel.queue_declare(
                    queue,
                    durable=True,
                    arguments={
                        "x-queue-type": "quorum",
                        "x-delivery-limit": 31,
                        "x-dead-letter-exchange": "conveyor.dead",
                    },
                )
            finally:
                await connection.close()

        asyncio.run(declare_again())
        stats = Worker(app, pool="threads", concurrency=1, until_empty=True).run()
        later.get(timeout=5)
        assert ran == ["later"] and (stats.succeeded, stats.dead_lettered) == (1, 1)
        (poison,) = app.broker.dead_letters(queue)
        assert "poison limit 3" in poison.reason and poison.delivery_count == 4
    finally:
        app.close()


def test_many_threads_and_thousands_of_async_sends_share_one_connection(queue: str) -> None:
    app = Conveyor("rmq", broker=URL, results="memory://", default_queue=queue)

    @app.task(name="rmq.count")
    def count(n: int) -> int:
        return n

    async def send_async() -> list[Any]:
        return list(await asyncio.gather(*(count.delay_async(n) for n in range(2000))))

    try:
        count.delay(-1)  # connects and declares

        def send_from_thread(k: int) -> None:
            for n in range(100):
                count.delay(10_000 + 100 * k + n)

        threads = [threading.Thread(target=send_from_thread, args=(k,)) for k in range(8)]
        for thread in threads:
            thread.start()
        async_results = asyncio.run(send_async())  # while the threads send too
        for thread in threads:
            thread.join(60)
        assert len(async_results) == 2000
        broker = app.broker
        assert isinstance(broker, RabbitMQBroker)
        assert broker.stats([queue])[0].ready == 1 + 800 + 2000
    finally:
        app.close()


STATUS_APP = """
from conveyor import Conveyor

app = Conveyor("shop", broker="{url}", default_queue="{queue}")


@app.task(name="shop.ping")
def ping() -> None:
    pass
"""


def test_status_and_purge_through_the_cli(
    broker: RabbitMQBroker, queue: str, tmp_path: Path, poll: Poll
) -> None:
    (tmp_path / "shopapp.py").write_text(STATUS_APP.format(url=URL, queue=queue))
    broker.publish([Outgoing(queue, b"one")])
    (delivery,) = poll(lambda: broker.fetch([queue], 1) or None, what="a delivery")
    broker.dead_letter([(delivery, "for the status table")])
    later = time.time() + 3600
    broker.publish([Outgoing(queue, b"r") for _ in range(3)] + [Outgoing(queue, b"d", 0, later)])
    broker.close()

    def conveyor(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "conveyor", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
            env={**os.environ, "COLUMNS": "200"},
        )
        return done.stdout

    table = conveyor("status", "shopapp:app")
    assert "amqp://guest:***@127.0.0.1:5672/" in table and "guest:guest" not in table
    (row,) = [line for line in table.splitlines() if queue in line]
    assert [cell.strip() for cell in row.split("│")[1:6]] == [queue, "3", "1", "0", "1"]
    assert conveyor("purge", "shopapp:app", "-Q", queue, "--yes").strip() == (
        f"purged 4 messages from {queue}"  # three ready, one delayed
    )
    assert conveyor("purge", "shopapp:app", "-Q", queue, "--dead", "-y").strip() == (
        f"purged 1 message from {queue} (dead letters)"
    )


REQUEUE_APP = """
from conveyor import Conveyor

app = Conveyor("shop", broker="{url}", default_queue="{queue}")
"""
POISON = "poison message: the process running it died in 3 runs (poison limit 3)"


def test_dead_letters_and_requeue_through_the_cli(queue: str, tmp_path: Path, poll: Poll) -> None:
    """Poison messages listed, sent back by id and then all, and run again as first deliveries
    (with their lost runs counted still, the worker would dead-letter them again at once)."""
    (tmp_path / "requeueapp.py").write_text(REQUEUE_APP.format(url=URL, queue=queue))
    app = Conveyor("shop", broker=URL, results=f"sqlite:///{tmp_path}/r.db", default_queue=queue)

    @app.task(name="shop.count", bind=True)
    def count(self: Any, n: int) -> list[int]:
        return [n, self.request.delivery_count]

    def conveyor(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "conveyor", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "COLUMNS": "250"},
        )

    try:
        sent = [count.delay(n) for n in range(3)]
        worker = RabbitMQBroker(URL)
        try:
            for _ in range(3):
                worker.requeue(_take(worker, queue, 3, poll))
            dying = _take(worker, queue, 3, poll)
            assert all(d.lost == 3 for d in dying)
            worker.dead_letter([(d, POISON) for d in dying])
        finally:
            worker.close()
        poll(lambda: _depths(queue) == (0, 3), what="the dead letters")

        listing = conveyor("dead-letters", "requeueapp:app", "--queue", queue)
        assert listing.returncode == 0, listing.stderr
        rows = [line for line in listing.stdout.splitlines() if queue in line and "│" in line]
        assert len(rows) == 3 and all("shop.count" in row and POISON in row for row in rows)
        assert {r.id for r in sent} == {row.split("│")[5].strip() for row in rows}

        one = conveyor("requeue", "requeueapp:app", "-Q", queue, "--id", sent[1].id, "--yes")
        assert (one.returncode, one.stdout) == (0, f"requeued 1 dead letter to {queue}\n")
        assert _depths(queue) == (1, 2)
        typo = conveyor("requeue", "requeueapp:app", "-Q", f"{queue}-typo", "--yes")
        assert typo.returncode == 1
        assert typo.stderr == (
            f"Error: no queue '{queue}-typo' on amqp://guest:***@127.0.0.1:5672/; known queues: "
            f"{queue} (the app's own, and those holding messages)\n"
        )
        rest = conveyor("requeue", "requeueapp:app", "-Q", queue, "--reason", "poison", "-y")
        assert (rest.returncode, rest.stdout) == (0, f"requeued 2 dead letters to {queue}\n")
        assert _depths(queue) == (3, 0)

        stats = Worker(app, pool="threads", concurrency=1, until_empty=True).run()
        assert (stats.succeeded, stats.dead_lettered) == (3, 0)
        assert [r.get(timeout=5) for r in sent] == [[0, 1], [1, 1], [2, 1]]
    finally:
        app.close()
    probe = RabbitMQBroker(URL)
    try:
        assert not probe.exists(f"{queue}-typo")  # looking created nothing
    finally:
        probe.close()


@pytest.mark.parametrize("pool", ["solo", "asyncio", "prefork"])
def test_a_task_sends_another_task_from_every_pool(queue: str, tmp_path: Path, pool: str) -> None:
    """The worker's broker runs on its event loop; a task that blocks there to send (solo and
    asyncio pools run tasks on that loop's thread) goes through a second connection."""
    app = Conveyor(
        "rmq", broker=URL, results=f"sqlite:///{tmp_path}/results.db", default_queue=queue
    )

    @app.task(name="rmq.child")
    def child(n: int) -> int:
        return n * 10

    @app.task(name="rmq.parent")
    def parent(n: int) -> str:
        return child.delay(n).id

    try:
        sent = parent.delay(4)
        stats = Worker(app, pool=pool, concurrency=1, until_empty=True).run()
        assert stats.succeeded == 2 and stats.failed == 0
        assert app.result(sent.get(timeout=5)).get(timeout=5) == 40
    finally:
        app.close()
