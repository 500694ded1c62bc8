"""Blocking sends written by the calling thread itself (`_direct`), against the RabbitMQ server on
127.0.0.1:5672 (guest/guest). Each test uses queues of its own and deletes them afterwards.
Without a server these tests skip locally and fail in CI.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import delete_rabbitmq_queues, require_rabbitmq

from conveyor.brokers.base import Outgoing
from conveyor.brokers.rabbitmq import RabbitMQBroker
from conveyor.brokers.rabbitmq._direct import DirectChannel
from conveyor.errors import PublishError

pytestmark = pytest.mark.integration

URL = "amqp://guest:guest@127.0.0.1:5672/"
Poll = Callable[..., Any]


@pytest.fixture(scope="module", autouse=True)
def rabbitmq() -> None:
    require_rabbitmq()


@pytest.fixture
def queue() -> Iterator[str]:
    name = f"test-{uuid.uuid4().hex[:10]}"
    yield name
    delete_rabbitmq_queues(name)


@pytest.fixture
def broker() -> Iterator[RabbitMQBroker]:
    b = RabbitMQBroker(URL, max_priority=9)  # queues with priorities: the order shows them kept
    yield b
    b.close()


def _no_loop_sends(broker: RabbitMQBroker, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Note every publish that goes through the broker's loop instead of the direct channel."""
    through_loop: list[str] = []
    publish = broker._publish_opening_direct

    def noted(messages: Any) -> Any:
        through_loop.extend(m.body.decode() for m in messages)
        return publish(messages)

    monkeypatch.setattr(broker, "_publish_opening_direct", noted)
    return through_loop


def _bodies(broker: RabbitMQBroker, queue: str, count: int, poll: Poll) -> list[bytes]:
    """Exactly `count` bodies, in the order RabbitMQ holds them, acked."""
    broker.reserve(count)
    got: list[Any] = []

    def more() -> bool:
        got.extend(broker.fetch([queue], count - len(got)))
        return len(got) == count

    poll(more, timeout=20, what=f"{count} deliveries")
    broker.ack(got)
    return [d.body for d in got]


def test_sends_after_the_first_are_written_by_the_calling_thread(
    broker: RabbitMQBroker, queue: str, poll: Poll, monkeypatch: pytest.MonkeyPatch
) -> None:
    through_loop = _no_loop_sends(broker, monkeypatch)
    for n in range(5):
        broker.publish([Outgoing(queue, f"{n}".encode(), priority=n % 3)])
    broker.publish([Outgoing(queue, f"{n}".encode()) for n in range(5, 8)])
    assert through_loop == ["0"], "the first send opens the channel; the rest go direct"
    assert isinstance(broker._direct, DirectChannel) and not broker._direct.closed
    # Priorities kept (the queue orders by them), every body once.
    assert _bodies(broker, queue, 8, poll) == [b"2", b"1", b"4", b"0", b"3", b"5", b"6", b"7"]


def test_a_direct_send_that_no_queue_takes_raises(broker: RabbitMQBroker, queue: str) -> None:
    broker.publish([Outgoing(queue, b"first")])
    assert broker._direct is not None
    delete_rabbitmq_queues(queue)  # behind the broker's back: its binding is gone
    with pytest.raises(PublishError, match=r"no queue is bound for it.*NO_ROUTE"):
        broker.publish([Outgoing(queue, b"lost")])
    assert not broker._direct.closed, "a return leaves the channel usable"


def test_threads_sending_at_once_while_a_large_message_waits_for_the_socket(
    broker: RabbitMQBroker, queue: str, poll: Poll, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message larger than the socket takes at once leaves its rest to the loop; the sends
    of other threads meanwhile queue behind it, not inside it, and every one is confirmed."""
    broker.publish([Outgoing(queue, b"first")])
    through_loop = _no_loop_sends(broker, monkeypatch)
    large = bytes(range(256)) * (16 * 1024)  # 4 MiB, cut into many body frames
    errors: list[BaseException] = []

    def send(label: str, count: int, body: bytes = b"") -> None:
        try:
            for n in range(count):
                broker.publish([Outgoing(queue, body or f"{label}-{n}".encode())])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(f"t{k}", 50)) for k in range(6)]
    threads.append(threading.Thread(target=send, args=("large", 3, large)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert through_loop == []
    bodies = _bodies(broker, queue, 1 + 6 * 50 + 3, poll)
    assert bodies.count(large) == 3
    small = sorted(b.decode() for b in bodies if b != large)
    assert small == sorted(["first", *(f"t{k}-{n}" for k in range(6) for n in range(50))])


def test_a_send_not_confirmed_in_time_raises_and_the_late_confirm_is_ignored(
    broker: RabbitMQBroker, queue: str, poll: Poll
) -> None:
    broker.publish([Outgoing(queue, b"first")])
    direct = broker._direct
    assert direct is not None
    with pytest.raises(PublishError, match="did not confirm a message within"):
        direct.send(broker._items([Outgoing(queue, b"late")]), timeout=0.0)
    broker.publish([Outgoing(queue, b"next")])  # sent and confirmed after the ignored confirm
    assert _bodies(broker, queue, 3, poll) == [b"first", b"late", b"next"]


def test_a_closed_direct_channel_fails_what_waits_and_a_new_one_opens(
    broker: RabbitMQBroker, queue: str, poll: Poll
) -> None:
    broker.publish([Outgoing(queue, b"first")])
    first = broker._direct
    assert first is not None
    assert broker._connection is not None
    # RabbitMQ closes a channel that publishes to an exchange that does not exist.
    with pytest.raises(PublishError, match="closed before it confirmed"):
        first.send(_nowhere(broker), 10)
    poll(lambda: first.closed, what="the direct channel closed")
    broker.publish([Outgoing(queue, b"again")])  # through the loop, which opens another
    broker.publish([Outgoing(queue, b"direct again")])
    assert broker._direct is not first and broker._direct is not None
    assert not broker._direct.closed
    assert _bodies(broker, queue, 3, poll) == [b"first", b"again", b"direct again"]


def _nowhere(broker: RabbitMQBroker) -> list[Any]:
    exchange = f"missing-{uuid.uuid4().hex[:8]}"
    ((_, _, body, properties),) = broker._items([Outgoing("q", b"nowhere")])
    return [(exchange, "q", body, properties)]


def test_a_send_with_a_reply_address_goes_through_the_channel_that_takes_the_replies(
    broker: RabbitMQBroker, queue: str, poll: Poll, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RabbitMQ takes a direct reply-to address only on the channel consuming the replies."""
    address = broker.on_reply(lambda body: None)
    broker.publish([Outgoing(queue, b"first")])
    through_loop = _no_loop_sends(broker, monkeypatch)
    broker.publish([Outgoing(queue, b"asks", reply_to=address)])
    broker.publish([Outgoing(queue, b"tells")])
    assert through_loop == ["asks"]
    assert broker._direct is not None and not broker._direct.closed
    assert _bodies(broker, queue, 3, poll) == [b"first", b"asks", b"tells"]
