"""RabbitMQ (AMQP 0-9-1) through aiormq: durable queues, publisher confirms, broker-held delays.

Topology for a conveyor queue `Q`, declared once per process on first use:

- `Q`, durable, bound to the durable direct exchange `conveyor`, with `x-max-priority`;
- `Q.dead`, bound to the exchange `conveyor.dead`: dead letters, each with its reason in the
  `x-conveyor-reason` header;
- `Q.delay.<ms>`, one per delay bucket, whose messages expire after `<ms>` and are dead-lettered
  back to `conveyor` with routing key `Q`. A delay goes to the longest bucket that fits; a message
  that arrives early is delayed again by the worker for the rest. Workers hold nothing in memory,
  so a two-hour ETA never meets the consumer acknowledgement timeout.

Every publish is persistent and mandatory and waits for the broker's confirm; a nack, a return
(no route) or a timeout raises `PublishError`. Calls are synchronous for any thread: they run on
the broker's own event-loop thread, which owns the connection. A forked child never touches it.

RabbitMQ marks a message redelivered but does not count deliveries on classic queues, so a
redelivered message is published again with the `x-conveyor-deliveries` header one higher
before it is handed out; the worker's poison limit reads that count.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiormq
import aiormq.abc
from pamqp.commands import Basic

from conveyor.brokers.base import Broker, DeadLetter, Delivery, Outgoing, QueueStats
from conveyor.errors import BrokerError, ConfigurationError, PublishError
from conveyor.redact import redact_text, redact_url

T = TypeVar("T")

EXCHANGE = "conveyor"
DEAD_EXCHANGE = "conveyor.dead"
REASON = "x-conveyor-reason"
DELIVERIES = "x-conveyor-deliveries"
DIED_AT = "x-conveyor-died-at"
# Delay buckets in milliseconds: 250 ms doubling to about 36 hours.
BUCKETS_MS: tuple[int, ...] = tuple(250 << k for k in range(20))
CONFIRM_TIMEOUT_S = 30.0
CONTENT_TYPE = "application/json"
CALL_TIMEOUT_S = 60.0

log = logging.getLogger("conveyor.worker")
_live: weakref.WeakSet[RabbitMQBroker] = weakref.WeakSet()


def _forget_after_fork() -> None:
    for broker in list(_live):
        broker._reset()


os.register_at_fork(after_in_child=_forget_after_fork)


class RabbitMQBroker(Broker):
    """A broker on a RabbitMQ server (`amqp://` or `amqps://`)."""

    # RabbitMQ's default consumer_timeout: a delivery unacknowledged for longer closes the channel.
    ack_timeout = 1800.0

    def __init__(self, url: str, *, max_priority: int = 9) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
            raise ConfigurationError(
                f"cannot read RabbitMQ URL {redact_url(url)!r}: write amqp://user:pass@host:5672/"
            )
        self._url = url
        self.display_url = redact_url(url)
        self.max_priority = max_priority
        self._lock = threading.Lock()
        self._reset()
        _live.add(self)

    def _reset(self) -> None:
        """Forget connection state (a new process, or after close)."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._connection: aiormq.abc.AbstractConnection | None = None
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._generation = 0
        self._declared: set[str] = set()
        self._consuming: set[str] = set()
        self._inbox: collections.deque[Delivery] = collections.deque()
        self._arrival: Callable[[], None] | None = None
        self._prefetch = 0

    # the broker's own event loop

    def _run(self, coroutine: Awaitable[T], timeout: float = CALL_TIMEOUT_S) -> T:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="conveyor-amqp", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
            loop = self._loop
        future = asyncio.run_coroutine_threadsafe(_as_coroutine(coroutine), loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise BrokerError(
                f"RabbitMQ at {self.display_url} did not answer within {timeout:.0f}s"
            ) from None
        except (aiormq.exceptions.AMQPError, OSError) as exc:
            raise BrokerError(f"RabbitMQ at {self.display_url}: {redact_text(str(exc))}") from None
        except (asyncio.CancelledError, concurrent.futures.CancelledError):
            # aiormq cancels what was under way when the connection or channel closed.
            raise BrokerError(
                f"the connection to RabbitMQ at {self.display_url} closed during the call"
            ) from None

    async def _chan(self) -> aiormq.abc.AbstractChannel:
        if self._channel is None or self._channel.is_closed:
            if self._connection is None or self._connection.is_closed:
                url = self._url
                if "heartbeat=" not in url:
                    url += ("&" if "?" in url else "?") + "heartbeat=30"
                try:
                    self._connection = await aiormq.connect(url)
                except (OSError, aiormq.exceptions.AMQPError) as exc:
                    raise BrokerError(
                        f"cannot connect to RabbitMQ at {self.display_url}: {redact_text(str(exc))}"
                    ) from None
            self._channel = await self._connection.channel(publisher_confirms=True)
            self._generation += 1
            self._declared.clear()
            self._consuming.clear()
            # Deliveries of the old channel not yet handed out: RabbitMQ delivers them again.
            self._inbox.clear()
        return self._channel

    async def _declare(self, queue: str) -> aiormq.abc.AbstractChannel:
        channel = await self._chan()
        if queue in self._declared:
            return channel
        await channel.exchange_declare(EXCHANGE, exchange_type="direct", durable=True)
        await channel.exchange_declare(DEAD_EXCHANGE, exchange_type="direct", durable=True)
        arguments: dict[str, Any] = {"x-dead-letter-exchange": DEAD_EXCHANGE}
        if self.max_priority:
            arguments["x-max-priority"] = self.max_priority
        try:
            await channel.queue_declare(queue, durable=True, arguments=arguments)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise ConfigurationError(
                f"RabbitMQ queue {queue!r} exists with other arguments ({exc}); delete it "
                "(its messages too) or configure conveyor to match it"
            ) from None
        await channel.queue_bind(queue, EXCHANGE, routing_key=queue)
        await channel.queue_declare(f"{queue}.dead", durable=True)
        await channel.queue_bind(f"{queue}.dead", DEAD_EXCHANGE, routing_key=queue)
        for ms in BUCKETS_MS:
            await channel.queue_declare(
                f"{queue}.delay.{ms}",
                durable=True,
                arguments={
                    "x-message-ttl": ms,
                    "x-dead-letter-exchange": EXCHANGE,
                    "x-dead-letter-routing-key": queue,
                },
            )
        self._declared.add(queue)
        return channel

    # producer side

    def publish(self, messages: Sequence[Outgoing]) -> None:
        """Publish persistent, mandatory messages and wait for every confirm."""
        if messages:
            self._run(self._publish(messages))

    async def publish_async(self, messages: Sequence[Outgoing]) -> None:
        """`publish` for asyncio producers."""
        await asyncio.to_thread(self.publish, messages)

    async def _publish(
        self, messages: Sequence[Outgoing], headers: Sequence[dict[str, Any]] | None = None
    ) -> None:
        for queue in {m.queue for m in messages}:
            await self._declare(queue)
        channel = await self._chan()
        now = time.time()
        sends = []
        for n, message in enumerate(messages):
            delay = 0.0 if message.deliver_at is None else message.deliver_at - now
            exchange, key = (EXCHANGE, message.queue)
            if delay > 0:
                exchange, key = "", f"{message.queue}.delay.{_bucket(delay)}"
            properties = Basic.Properties(
                delivery_mode=2,
                priority=min(message.priority, self.max_priority) if self.max_priority else None,
                content_type=CONTENT_TYPE,
                headers=headers[n] if headers else None,
            )
            sends.append(
                channel.basic_publish(
                    message.body,
                    exchange=exchange,
                    routing_key=key,
                    properties=properties,
                    mandatory=True,
                    timeout=CONFIRM_TIMEOUT_S,
                )
            )
        results = await asyncio.gather(*sends, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) or not isinstance(result, Basic.Ack):
                raise PublishError(
                    f"RabbitMQ did not confirm a message: {redact_text(str(result))}"
                )

    # consumer side

    def fetch(self, queues: Sequence[str], limit: int) -> list[Delivery]:
        """Messages pushed by RabbitMQ, at most `limit`; prefetch keeps them bounded."""
        if limit <= 0:
            return []
        if any(q not in self._consuming for q in queues):
            self._run(self._consume(queues, limit))
        out: list[Delivery] = []
        while self._inbox and len(out) < limit:
            out.append(self._inbox.popleft())
        return out

    async def _consume(self, queues: Sequence[str], prefetch: int) -> None:
        channel = await self._chan()
        if not self._consuming:
            # At most this many unacknowledged messages: the worker's slots when it first asked,
            # kept when consuming resumes on a new channel.
            self._prefetch = self._prefetch or prefetch
            await channel.basic_qos(prefetch_count=self._prefetch)
        for queue in queues:
            if queue not in self._consuming:
                await self._declare(queue)
                await channel.basic_consume(queue, self._on_message(queue))
                self._consuming.add(queue)

    def _on_message(self, queue: str) -> Any:
        async def receive(message: aiormq.abc.DeliveredMessage) -> None:
            headers: dict[str, Any] = dict(message.header.properties.headers or {})
            count = _int(headers.get(DELIVERIES)) + 1
            tag = message.delivery_tag
            if tag is None:
                return
            content_type = message.header.properties.content_type
            if content_type not in (None, "", CONTENT_TYPE):
                # Not an envelope at all: dead-letter it here, where the property is known.
                delivery = Delivery(queue, message.body, (self._generation, tag), count)
                reason = f"content type {content_type!r} is not {CONTENT_TYPE}"
                log.warning("dead-lettered a message on %s: %s", queue, reason)
                await self._dead_letter([(delivery, reason)])
                return
            if message.redelivered:
                # Count the lost delivery in the message itself, then hand out the new copy.
                headers[DELIVERIES] = count
                await self._publish([Outgoing(queue, message.body, _priority(message))], [headers])
                await message.channel.basic_ack(tag)
                return
            receipt = (self._generation, tag)
            self._inbox.append(Delivery(queue, message.body, receipt, count))
            if self._arrival is not None:
                self._arrival()

        return receive

    def on_arrival(self, callback: Callable[[], None]) -> None:
        """Wake the worker when RabbitMQ pushes a message, instead of letting it poll."""
        self._arrival = callback

    def ack(self, deliveries: Sequence[Delivery]) -> int:
        """Acknowledge deliveries of the current channel; stale ones come back by themselves."""
        if not deliveries:
            return 0
        return self._run(self._ack(deliveries))

    async def _ack(self, deliveries: Sequence[Delivery]) -> int:
        channel = await self._chan()
        current = [d.receipt[1] for d in deliveries if d.receipt[0] == self._generation]
        for tag in current:
            await channel.basic_ack(tag)
        return len(current)

    def requeue(
        self, deliveries: Sequence[Delivery], *, delay: float = 0.0, count_delivery: bool = True
    ) -> None:
        """Give messages back: to the queue at once, or through a delay bucket."""
        if deliveries:
            self._run(self._requeue(deliveries, delay, count_delivery))

    async def _requeue(
        self, deliveries: Sequence[Delivery], delay: float, count_delivery: bool
    ) -> None:
        channel = await self._chan()
        current = [d for d in deliveries if d.receipt[0] == self._generation]
        if delay <= 0:
            for d in current:
                await channel.basic_nack(d.receipt[1], requeue=True)
            return
        deliver_at = time.time() + delay
        kept = 0 if count_delivery else 1  # deliveries so far, less this one if it does not count
        await self._publish(
            [Outgoing(d.queue, d.body, 0, deliver_at) for d in current],
            [{DELIVERIES: d.delivery_count - kept} for d in current],
        )
        for d in current:
            await channel.basic_ack(d.receipt[1])

    def dead_letter(self, items: Sequence[tuple[Delivery, str]]) -> None:
        """Publish each message to its dead-letter queue with the reason, then acknowledge it."""
        if items:
            self._run(self._dead_letter(items))

    async def _dead_letter(self, items: Sequence[tuple[Delivery, str]]) -> None:
        channel = await self._chan()
        current = [(d, r) for d, r in items if d.receipt[0] == self._generation]
        for delivery, reason in current:
            await self._declare(delivery.queue)
            headers: dict[str, Any] = {
                REASON: reason[:1000],
                DELIVERIES: delivery.delivery_count,
                DIED_AT: str(time.time()),
            }
            result = await channel.basic_publish(
                delivery.body,
                exchange=DEAD_EXCHANGE,
                routing_key=delivery.queue,
                properties=Basic.Properties(delivery_mode=2, headers=headers),
                mandatory=True,
                timeout=CONFIRM_TIMEOUT_S,
            )
            if not isinstance(result, Basic.Ack):
                raise PublishError(f"RabbitMQ did not confirm a dead letter: {result}")
            await channel.basic_ack(delivery.receipt[1])

    # administration

    def stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        """Ready, delayed and dead counts (RabbitMQ does not report unacknowledged ones here)."""
        names = sorted(self._declared if queues is None else queues)
        return self._run(self._stats(names))

    async def _stats(self, names: Sequence[str]) -> list[QueueStats]:
        out = []
        for queue in names:
            channel = await self._declare(queue)

            async def depth(name: str, channel: aiormq.abc.AbstractChannel = channel) -> int:
                ok = await channel.queue_declare(name, passive=True)
                return int(ok.message_count or 0)

            delayed = [await depth(f"{queue}.delay.{ms}") for ms in BUCKETS_MS]
            out.append(
                QueueStats(queue, await depth(queue), sum(delayed), 0, await depth(f"{queue}.dead"))
            )
        return out

    def purge(self, queue: str, *, dead: bool = False) -> int:
        """Delete a queue's waiting and delayed messages, or its dead letters."""
        return self._run(self._purge(queue, dead))

    async def _purge(self, queue: str, dead: bool) -> int:
        channel = await self._declare(queue)
        names = (
            [f"{queue}.dead"] if dead else [queue, *(f"{queue}.delay.{ms}" for ms in BUCKETS_MS)]
        )
        total = 0
        for name in names:
            ok = await channel.queue_purge(name)
            total += int(ok.message_count or 0)
        return total

    def dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        """Look at up to `limit` dead letters without removing them."""
        return self._run(self._dead_letters(queue, limit))

    async def _dead_letters(self, queue: str, limit: int) -> list[DeadLetter]:
        await self._declare(queue)
        assert self._connection is not None
        # A separate channel: the messages looked at go back when it closes.
        channel = await self._connection.channel()
        out = []
        try:
            for _ in range(limit):
                message = await channel.basic_get(f"{queue}.dead")
                if message.delivery_tag is None:
                    break
                headers = message.header.properties.headers or {}
                died_at = headers.get(DIED_AT)
                out.append(
                    DeadLetter(
                        queue,
                        message.body,
                        str(headers.get(REASON, "")),
                        _int(headers.get(DELIVERIES)) or 1,
                        float(died_at) if isinstance(died_at, str | int | float) else 0.0,
                    )
                )
        finally:
            await channel.close()
        return out

    def close(self) -> None:
        """Close the connection and stop the broker's event-loop thread."""
        loop = self._loop
        if loop is None:
            return
        if self._connection is not None and not loop.is_closed():
            with contextlib.suppress(Exception):  # a dead connection has nothing to release
                self._run(self._connection.close(), timeout=5)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5)
        self._reset()


def _bucket(delay: float) -> int:
    """The longest delay bucket not longer than `delay` (the shortest, for shorter delays)."""
    ms = delay * 1000
    fitting = [b for b in BUCKETS_MS if b <= ms]
    return fitting[-1] if fitting else BUCKETS_MS[0]


def _int(value: object) -> int:
    """A header's integer value, 0 when absent or not a number."""
    return int(value) if isinstance(value, int | float | str) and str(value).isdigit() else 0


def _priority(message: aiormq.abc.DeliveredMessage) -> int:
    return int(message.header.properties.priority or 0)


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable
