"""`RabbitMQBroker`: publishing, consuming, settling and administration on one connection.

The topology it declares and the invariants it keeps are in the package docstring.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import aiormq
import aiormq.abc
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from conveyor.brokers.base import Broker, DeadLetter, Delivery, Outgoing, QueueStats, connects
from conveyor.brokers.rabbitmq import _aiormq
from conveyor.brokers.rabbitmq._bridge import Bridge
from conveyor.brokers.rabbitmq._confirms import CHUNK, CONFIRM_TIMEOUT_S, _retrieve, send
from conveyor.brokers.rabbitmq._direct import DirectChannel, Item
from conveyor.brokers.rabbitmq._pamqp_text import has_raw_text, install
from conveyor.brokers.rabbitmq._topology import (
    BUCKETS_MS,
    DEAD_EXCHANGE,
    EXCHANGE,
    QUEUE_TYPES,
    bucket,
    dead_queue,
    declare,
    delay_queue,
    existing_priority,
)
from conveyor.errors import BrokerError, ConfigurationError
from conveyor.reasons import DeadLetterReason as Why
from conveyor.redact import redact_text, redact_url
from conveyor.signing import PREFIX as SIGNED_PREFIX

if TYPE_CHECKING:
    from conveyor.brokers.rabbitmq._broadcast import RabbitMQBroadcast

T = TypeVar("T")
REPLY_TO = "amq.rabbitmq.reply-to"  # RabbitMQ's direct reply-to pseudo-queue

REASON = "x-conveyor-reason"
DELIVERIES = "x-conveyor-deliveries"
LOST = "x-conveyor-lost"
DIED_AT = "x-conveyor-died-at"
# The highest delivery count read from a header (a count is never near it; see `_int`).
MAX_COUNT = 1_000_000
CONTENT_TYPE = "application/json"
# A signed envelope (`conveyor.signing`): a signature line, then the JSON.
SIGNED_CONTENT_TYPE = "application/vnd.conveyor.signed"
CALL_TIMEOUT_S = 60.0
# Dead letters a requeue gets, then publishes together, at a time.
REQUEUE_BATCH = 500

log = logging.getLogger("conveyor.worker")
install()
_aiormq.install_log_filter()


class RabbitMQBroker(Broker):
    """A broker on a RabbitMQ server (`amqp://` or `amqps://`)."""

    # RabbitMQ's default consumer_timeout: a delivery unacknowledged for longer closes the channel.
    ack_timeout = 1800.0

    def __init__(
        self,
        url: str,
        *,
        max_priority: int | None = None,
        queue_type: str = "classic",
        delivery_limit: int = 30,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
            raise ConfigurationError(
                f"cannot read RabbitMQ URL {redact_url(url)!r}: write amqp://user:pass@host:5672/"
            )
        if queue_type not in QUEUE_TYPES:
            raise ConfigurationError(
                f"unknown RabbitMQ queue type {queue_type!r}: use one of {', '.join(QUEUE_TYPES)}"
            )
        self._url = url
        self.display_url = redact_url(url)
        try:
            port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
        except ValueError:
            raise ConfigurationError(
                f"cannot read RabbitMQ URL {redact_url(url)!r}: the port must be a number "
                "from 1 to 65535"
            ) from None
        self.endpoints = frozenset({(parts.hostname, port)})
        connects(self)
        self.queue_type = queue_type
        # Quorum queues have no x-max-priority (RabbitMQ 3.10); they count deliveries themselves.
        # None: a new queue gets none, an existing one keeps its own (`existing_priority`).
        self.max_priority = 0 if queue_type == "quorum" else max_priority
        self._priorities: dict[str, int] = {}  # queue -> its x-max-priority, once declared
        self.delivery_limit = delivery_limit
        self._side: RabbitMQBroker | None = None
        self._slots = self._most = 0
        self._replies: Callable[[bytes], None] | None = None
        self._bridge = Bridge(self._reset)
        self._reset()

    def _reset(self) -> None:
        """Forget connection state (a new process, or after close)."""
        self._bridge.forget()
        self._connection: aiormq.abc.AbstractConnection | None = None
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._opening: asyncio.Lock | None = None
        self._generation = 0
        self._declared: set[str] = set()
        self._consuming: dict[str, str] = {}  # queue -> consumer tag
        self._tags: dict[str, str] = {}  # consumer tag -> queue
        self._inline: _aiormq.InlineDeliveries | None = None
        self._direct: DirectChannel | None = None  # the channel other threads publish on
        self._receiving: set[asyncio.Task[Any]] = set()  # deliveries being taken in
        self._inbox: collections.deque[Delivery] = collections.deque()
        # Delivery tags of the current channel not yet acked, nacked or dead-lettered, in order.
        self._unsettled: dict[int, None] = {}
        self._arrival: Callable[[], None] | None = None
        self._prefetch = 0

    # the loop the connection lives on (`_bridge`)

    def _run(self, coroutine: Awaitable[T], timeout: float = CALL_TIMEOUT_S) -> T:
        """Run a coroutine on the connection's loop and wait for it, from any other thread."""
        with self._errors():
            return self._bridge.run(coroutine, timeout)

    async def _run_async(self, coroutine: Awaitable[T], timeout: float = CALL_TIMEOUT_S) -> T:
        """`_run` for a caller on another event loop: it awaits instead of blocking a thread."""
        with self._errors():
            return await self._bridge.run_async(coroutine, timeout)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Turn what aiormq and the socket raise into `BrokerError`, credentials masked."""
        try:
            yield
        except TimeoutError:
            raise BrokerError(f"RabbitMQ at {self.display_url} did not answer in time") from None
        except (aiormq.exceptions.AMQPError, OSError) as exc:
            raise BrokerError(f"RabbitMQ at {self.display_url}: {redact_text(str(exc))}") from None
        except (asyncio.CancelledError, concurrent.futures.CancelledError):
            task = _current_task()
            if task is not None and task.cancelling():
                raise  # the awaiting caller itself was cancelled
            # aiormq cancels what was under way when the connection or channel closed.
            raise BrokerError(
                f"the connection to RabbitMQ at {self.display_url} closed during the call"
            ) from None

    async def _chan(self) -> aiormq.abc.AbstractChannel:
        channel = self._channel
        if channel is not None and not channel.is_closed:
            return channel
        if self._opening is None:
            self._opening = asyncio.Lock()
        # Calls that find the channel closed at once share the one connection the first opens.
        async with self._opening:
            return await self._open_channel()

    async def _open_channel(self) -> aiormq.abc.AbstractChannel:
        if self._channel is None or self._channel.is_closed:
            if self._connection is None or self._connection.is_closed:
                url = self._url
                if "heartbeat=" not in url:
                    url += ("&" if "?" in url else "?") + "heartbeat=30"
                try:
                    # A failure is reported in the BrokerError below, not also by aiormq.
                    connection = await _aiormq.connect(url)
                    self._connection = self._bridge.held.connection = connection
                except (OSError, aiormq.exceptions.AMQPError) as exc:
                    raise BrokerError(
                        f"cannot connect to RabbitMQ at {self.display_url}: {redact_text(str(exc))}"
                    ) from None
            self._channel = await self._connection.channel(publisher_confirms=True)
            self._inline = _aiormq.InlineDeliveries(self._channel, self._on_inline)
            self._generation += 1
            self._declared.clear()
            self._consuming.clear()
            self._tags.clear()
            # Deliveries of the old channel not yet handed out: RabbitMQ delivers them again.
            self._inbox.clear()
            self._unsettled.clear()
            if self._replies is not None:
                await self._consume_replies(self._channel)
        return self._channel

    async def _consume_replies(self, channel: aiormq.abc.AbstractChannel) -> None:
        callback = self._replies
        assert callback is not None

        async def receive(message: aiormq.abc.DeliveredMessage) -> None:
            callback(message.body)

        await channel.basic_consume(REPLY_TO, receive, no_ack=True)

    # RPC results: direct reply-to

    def on_reply(self, callback: Callable[[bytes], None]) -> str:
        """Receive the replies to messages this process sends: a message published with
        `reply_to` set to the returned address (on this broker's channel, which consumes the
        replies) gets its replies delivered to `callback`, on the broker's thread."""
        first = self._replies is None
        self._replies = callback
        if first and self._channel is not None and not self._channel.is_closed:
            channel = self._channel
            if self._bridge.blocked():
                raise ConfigurationError("rpc:// results cannot start on the worker's own loop")
            self._run(self._consume_replies(channel))
        return REPLY_TO

    def reply(self, replies: Sequence[tuple[str, bytes]]) -> None:
        """Send result records to the clients that asked for them (not mandatory: a client
        that is gone took its interest with it)."""
        if not replies:
            return
        if self._bridge.blocked():
            self._beside().reply(replies)
        else:
            self._run(self._reply(replies))

    async def _reply(self, replies: Sequence[tuple[str, bytes]]) -> None:
        channel = await self._chan()
        properties = Basic.Properties(content_type=CONTENT_TYPE)
        await send(channel, [("", to, body, properties) for to, body in replies], mandatory=False)

    async def _declare(self, queue: str) -> aiormq.abc.AbstractChannel:
        channel = await self._chan()
        if queue not in self._declared:
            most = self._priorities.get(queue, self.max_priority)
            if most is None:
                assert self._connection is not None
                most = await existing_priority(self._connection, queue, self.delivery_limit)
            await declare(
                channel,
                queue,
                queue_type=self.queue_type,
                max_priority=most,
                delivery_limit=self.delivery_limit,
            )
            self._priorities[queue] = most
            self._declared.add(queue)
        return channel

    # on the worker's event loop

    def attach(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Run on the worker's event loop from now on, with a connection of its own."""
        if self._bridge.loop is not None:
            self.close()  # used from this process before the worker started: let that go
        self._bridge.attach(loop)
        return True

    async def detach(self) -> None:
        """Close the connection the worker's loop holds; later calls get a thread again."""
        await self._shut()
        self._reset()

    async def _shut(self) -> None:
        """Stop consuming, give back what never started (uncounted), close the connection.

        Each step is best effort: a dead connection has nothing left to release.
        """
        connection = self._connection
        if connection is None or connection.is_closed:
            return
        steps = ((self._stop_consuming, 5.0), (self._release_inbox, 10.0), (connection.close, 5.0))
        for step, seconds in steps:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(step(), seconds)

    async def _release_inbox(self) -> None:
        """Give back what RabbitMQ pushed but the worker never started, without counting it
        as a delivery (closing the channel would: RabbitMQ marks them redelivered)."""
        waiting, self._inbox = list(self._inbox), collections.deque()
        if waiting:
            await self._requeue(waiting, 0.0, count_delivery=False)

    def _beside(self) -> RabbitMQBroker:
        """A broker with its own thread and connection, for blocking calls made on the worker's
        loop thread (a task of the solo or asyncio pool that sends another task)."""
        if self._side is None:
            self._side = RabbitMQBroker(
                self._url,
                max_priority=self.max_priority,
                queue_type=self.queue_type,
                delivery_limit=self.delivery_limit,
            )
        return self._side

    def _priority(self, message: Outgoing) -> int | None:
        """The priority property of `message`: at most its queue's `x-max-priority`. A classic
        queue without priorities orders nothing by it, but the message keeps it (a dead letter
        moved to a queue with priorities is ordered by it there)."""
        if self.queue_type == "quorum":
            return None
        most = self._priorities.get(message.queue, 0)
        return min(message.priority, most) if most else message.priority or None

    async def fetch_async(self, queues: Sequence[str], limit: int) -> list[Delivery]:
        """`fetch`, awaited on the attached loop."""
        if limit <= 0:
            return []
        if self._must_consume(queues, limit):
            with self._errors():
                await self._consume(queues, limit)
        return self._take(limit)

    def _must_consume(self, queues: Sequence[str], limit: int) -> bool:
        """True when consuming must start or resume on a new channel.

        A closed channel counts: an idle worker notices the broker dropped it on its next
        poll, reconnects (or fails and backs off) and consumes again.
        """
        channel = self._channel
        return channel is None or channel.is_closed or any(q not in self._consuming for q in queues)

    async def ack_async(self, deliveries: Sequence[Delivery]) -> int:
        """`ack`, awaited on the attached loop."""
        if not deliveries:
            return 0
        with self._errors():
            return await self._ack(deliveries)

    def ack_nowait(self, deliveries: Sequence[Delivery]) -> int:
        """`ack` on the attached loop's thread: the frames are queued for writing at once."""
        channel = self._channel
        if channel is None or channel.is_closed:
            return 0  # a dead channel: those deliveries come back by themselves
        current = [d.receipt[1] for d in deliveries if d.receipt[0] == self._generation]
        self._settle(channel, acks=current)
        return len(current)

    def take_nowait(self, limit: int) -> list[Delivery] | None:
        """Deliveries already pushed, on the attached loop's thread; None while not consuming
        (never started, or the channel closed)."""
        channel = self._channel
        if channel is None or channel.is_closed or not self._consuming:
            return None
        return self._take(limit)

    async def requeue_async(
        self, deliveries: Sequence[Delivery], *, delay: float = 0.0, count_delivery: bool = True
    ) -> None:
        """`requeue`, awaited on the attached loop."""
        if deliveries:
            with self._errors():
                await self._requeue(deliveries, delay, count_delivery)

    async def dead_letter_async(self, items: Sequence[tuple[Delivery, str]]) -> None:
        """`dead_letter`, awaited on the attached loop."""
        if items:
            with self._errors():
                await self._dead_letter(items)

    async def stats_async(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        """`stats`, awaited on the attached loop."""
        with self._errors():
            return await self._stats(sorted(self._declared if queues is None else queues))

    async def round_trip_async(self) -> float | None:
        """A passive declare of a queue being consumed (it exists), timed on the attached loop:
        the answer is read and handled by that loop, so its own load counts, as it does for a
        delivery."""
        channel = self._channel
        queue = next(iter(self._consuming), None)
        if channel is None or channel.is_closed or queue is None:
            return None
        began = time.monotonic()
        declare = asyncio.ensure_future(channel.queue_declare(queue, passive=True))
        declare.add_done_callback(_retrieve)
        with self._errors():
            # Shielded: a worker that stops cancels the timing, and aiormq closes a channel
            # whose RPC was cancelled, which would hand back its deliveries as redelivered.
            await asyncio.shield(declare)
        return time.monotonic() - began

    # producer side

    def publish(self, messages: Sequence[Outgoing]) -> None:
        """Publish persistent, mandatory messages and wait for every confirm."""
        if self._bridge.blocked():
            self._beside().publish(messages)
        elif messages and not self._publish_direct(messages):
            self._run(self._publish_opening_direct(messages))

    def _publish_direct(self, messages: Sequence[Outgoing]) -> bool:
        """Publish from this thread on the direct channel (`_direct`), if it is open and every
        queue is declared; False if it cannot (nothing was sent).

        A message with a reply address goes through the loop: RabbitMQ takes one for direct
        reply-to only on the channel that consumes the replies (it closes any other).
        """
        direct = self._direct
        if direct is None or direct.closed or len(messages) > CHUNK:
            return False
        declared = self._declared
        if not all(m.queue in declared and m.reply_to is None for m in messages):
            return False
        with self._errors():
            return direct.send(self._items(messages), CONFIRM_TIMEOUT_S)

    async def _publish_opening_direct(self, messages: Sequence[Outgoing]) -> None:
        """`_publish`, then open the direct channel for this thread's next sends."""
        await self._publish(messages)
        if self._direct is None or self._direct.closed:
            await self._open_direct()

    async def _open_direct(self) -> None:
        """Open the channel other threads publish on themselves, on a plain TCP connection of
        the broker's own thread's loop (`_direct`); where there is none, they go through it."""
        connection = self._connection
        writer = None if connection is None else _aiormq.stream_writer(connection)
        selector = isinstance(asyncio.get_running_loop(), asyncio.SelectorEventLoop)
        if writer is None or self._bridge.attached or not selector:
            return
        assert connection is not None
        try:
            channel = await connection.channel(publisher_confirms=True)
        except (aiormq.exceptions.AMQPError, OSError) as exc:
            # The send itself is done; later ones go through the loop until a channel opens.
            log.debug("no channel for direct sends: %s", redact_text(str(exc)))
            return
        self._direct = DirectChannel(channel, writer)

    async def publish_async(self, messages: Sequence[Outgoing]) -> None:
        """`publish` for asyncio producers: thousands of calls can wait for confirms at once."""
        if not messages:
            return
        if self._bridge.attached and self._bridge.loop is asyncio.get_running_loop():
            with self._errors():
                await self._publish(messages)
        else:
            await self._run_async(self._publish(messages))

    async def _publish(
        self, messages: Sequence[Outgoing], headers: Sequence[dict[str, Any]] | None = None
    ) -> None:
        for queue in {m.queue for m in messages}:
            await self._declare(queue)
        channel = await self._chan()
        await send(channel, self._items(messages, headers))

    def _items(
        self, messages: Sequence[Outgoing], headers: Sequence[dict[str, Any]] | None = None
    ) -> list[Item]:
        """What `send` publishes for each message: exchange, routing key, body, properties."""
        now = time.time()
        items = []
        for n, message in enumerate(messages):
            delay = 0.0 if message.deliver_at is None else message.deliver_at - now
            exchange, key = (EXCHANGE, message.queue)
            if delay > 0:
                exchange, key = "", delay_queue(message.queue, bucket(delay))
            properties = Basic.Properties(
                delivery_mode=2,
                priority=self._priority(message),
                content_type=_content_type(message.body),
                headers=headers[n] if headers else None,
                reply_to=message.reply_to,
            )
            items.append((exchange, key, message.body, properties))
        return items

    # consumer side

    def fetch(self, queues: Sequence[str], limit: int) -> list[Delivery]:
        """Messages pushed by RabbitMQ, at most `limit`; prefetch keeps them bounded."""
        if limit <= 0:
            return []
        if self._must_consume(queues, limit):
            self._run(self._consume(queues, limit))
        return self._take(limit)

    def _take(self, limit: int) -> list[Delivery]:
        out: list[Delivery] = []
        while self._inbox and len(out) < limit:
            out.append(self._inbox.popleft())
        return out

    def reserve(self, slots: int, most: int | None = None) -> None:
        """Hold at most `slots` unacknowledged messages, across every queue consumed.

        On classic queues the limit can change while consuming (a per-channel limit, under a
        per-consumer one of `most`); quorum queues only have the per-consumer limit, fixed
        when consuming starts, so they keep the first `slots`.
        """
        changed = slots != self._slots
        self._slots, self._most = slots, max(most or slots, slots)
        if not changed or not self._consuming or self.queue_type == "quorum":
            return
        channel = self._channel
        if channel is None or channel.is_closed:
            return
        update = channel.basic_qos(prefetch_count=slots, global_=True)
        if self._bridge.blocked():
            task = asyncio.get_running_loop().create_task(update)
            self._receiving.add(task)  # a strong reference until it is done
            task.add_done_callback(self._receiving.discard)
        else:
            self._bridge.submit(update)

    async def _consume(self, queues: Sequence[str], prefetch: int) -> None:
        channel = await self._chan()
        if not self._consuming:
            # At most this many unacknowledged messages: the worker's slots (or, if it did not
            # say, what it first asked for), set before any consumer exists, since RabbitMQ
            # applies a per-consumer limit only to consumers created after it. The per-channel
            # limit keeps the total within it when several queues are consumed, and can change
            # later (quorum queues have only the per-consumer one: with several, each gets the
            # worker's slots).
            self._prefetch = self._slots or max(self._prefetch, prefetch)
            if self.queue_type == "quorum":  # RabbitMQ refuses global qos on quorum queues
                await channel.basic_qos(prefetch_count=self._prefetch)
            else:
                await channel.basic_qos(prefetch_count=max(self._most, self._prefetch))
                await channel.basic_qos(prefetch_count=self._prefetch, global_=True)
        for queue in queues:
            if queue not in self._consuming:
                await self._declare(queue)
                # Chosen here, so deliveries are taken in inline from the first one on.
                tag = f"conveyor.{self._generation}.{len(self._tags)}"
                self._tags[tag] = queue
                if self._inline is not None:
                    self._inline.tags.add(tag)
                await channel.basic_consume(queue, self._on_message(queue), consumer_tag=tag)
                self._consuming[queue] = tag

    async def _stop_consuming(self) -> None:
        """Cancel the consumers, so RabbitMQ pushes nothing more to a worker that stops."""
        channel = self._channel
        if channel is not None and not channel.is_closed:
            for tag in self._consuming.values():
                await channel.basic_cancel(tag)
        self._consuming.clear()
        # A redelivery being republished must finish (copy confirmed, original acked) before
        # the connection closes, or both would exist.
        receiving = self._receiving - {asyncio.current_task()}
        if receiving:
            await asyncio.wait(receiving, timeout=CONFIRM_TIMEOUT_S)

    def _on_message(self, queue: str) -> Any:
        """aiormq's callback for a delivery `InlineDeliveries` did not take (none should)."""

        async def receive(message: aiormq.abc.DeliveredMessage) -> None:
            assert isinstance(message.delivery, Basic.Deliver)
            self._delivered(queue, message.delivery, message.header, message.body)

        return receive

    def _on_inline(self, deliver: Basic.Deliver, header: ContentHeader, body: bytes) -> None:
        queue = self._tags.get(deliver.consumer_tag or "")
        if queue is not None:
            self._delivered(queue, deliver, header, body)

    def _delivered(
        self, queue: str, deliver: Basic.Deliver, header: ContentHeader, body: bytes
    ) -> None:
        """Take in a delivery as it arrives, on the connection's loop, without awaiting."""
        tag = deliver.delivery_tag
        if tag is None:
            return
        self._unsettled[tag] = None
        properties = header.properties
        raw = properties.headers
        headers: dict[str, Any] = dict(raw) if raw else {}
        # Deliveries so far: those counted in the message by conveyor (classic queues, and
        # retries through a delay queue), plus those RabbitMQ counted on a quorum queue.
        if headers:
            count = _int(headers.get(DELIVERIES)) + _int(headers.get("x-delivery-count")) + 1
            lost = _int(headers.get(LOST))
        else:
            count, lost = 1, 0
        reply_to = properties.reply_to
        priority = properties.priority or 0
        receipt = (self._generation, tag)
        delivery = Delivery(queue, body, receipt, count, reply_to, lost, priority)
        content_type = properties.content_type
        reason = None
        if (headers and has_raw_text(headers)) or has_raw_text(content_type):
            reason = Why.INVALID_HEADERS("a header name or value is not valid UTF-8")
        elif content_type not in (None, "", CONTENT_TYPE, SIGNED_CONTENT_TYPE):
            reason = Why.WRONG_CONTENT_TYPE(
                f"{content_type!r} is neither {CONTENT_TYPE} nor {SIGNED_CONTENT_TYPE}"
            )
        if reason is not None:
            # Not an envelope conveyor wrote: dead-letter it here, where the properties are.
            log.warning("dead-lettered a message on %s: %s", queue, reason)
            self.refused += 1
            self._in_background(self._dead_letter([(delivery, reason)]))
            return
        if deliver.redelivered and "x-delivery-count" not in headers:
            # A classic queue does not count: count the lost delivery in the message itself,
            # then hand out the new copy.
            headers[DELIVERIES] = count
            copy = Outgoing(queue, body, priority, reply_to=reply_to)
            self._in_background(self._republish(copy, headers, tag))
            return
        self._inbox.append(delivery)
        if self._arrival is not None:
            self._arrival()

    async def _republish(self, copy: Outgoing, headers: dict[str, Any], tag: int) -> None:
        channel = self._channel
        await self._publish([copy], [headers])
        if channel is not None and channel is self._channel and not channel.is_closed:
            self._settle(channel, acks=[tag])

    def _in_background(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run a delivery's rare slow path as a task; shutdown waits for it (`_receiving`)."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._receiving.add(task)
        task.add_done_callback(self._receiving.discard)
        task.add_done_callback(_log_failure)

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
        self._settle(channel, acks=current)
        return len(current)

    def _settle(
        self,
        channel: aiormq.abc.AbstractChannel,
        *,
        acks: Sequence[int] = (),
    ) -> None:
        """Ack delivery tags of the current channel, written to RabbitMQ in one go.

        Acks that cover the oldest unsettled deliveries go as one multi-ack (`multiple=True`
        acknowledges every delivery up to its tag); the rest go one by one. Nothing awaits
        between choosing the tags and writing them, so no other settlement can interleave.
        """
        frames: list[Basic.Ack] = []
        pending = set(acks)
        highest = None
        for tag in self._unsettled:  # oldest first
            if tag not in pending:
                break
            highest = tag
        if highest is not None:
            frames.append(Basic.Ack(highest, multiple=True))
            while self._unsettled:
                tag = next(iter(self._unsettled))
                if tag > highest:
                    break
                del self._unsettled[tag]
                pending.discard(tag)
        for tag in sorted(pending):
            frames.append(Basic.Ack(tag))
            self._unsettled.pop(tag, None)
        if not frames:
            return
        waiting = _aiormq.write_nowait(channel, frames)
        if waiting is not None:
            # The connection's write buffer is full: the frames wait their turn. The tags are
            # settled in this one write only, so its order among others does not matter.
            task = asyncio.get_running_loop().create_task(waiting)
            self._receiving.add(task)
            task.add_done_callback(self._receiving.discard)

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
        # A nack would come back marked redelivered with the counts it had: publish a copy that
        # carries them instead.
        deliver_at = time.time() + delay if delay > 0 else None
        kept, lost = (0, 1) if count_delivery else (1, 0)  # this delivery counts, or does not
        await self._publish(
            [Outgoing(d.queue, d.body, d.priority, deliver_at, d.reply_to) for d in current],
            [{DELIVERIES: d.delivery_count - kept, LOST: d.lost + lost} for d in current],
        )
        self._settle(channel, acks=[d.receipt[1] for d in current])

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
            # The priority goes along, so that a requeue restores it.
            priority = delivery.priority or None
            properties = Basic.Properties(delivery_mode=2, headers=headers, priority=priority)
            await send(channel, [(DEAD_EXCHANGE, delivery.queue, delivery.body, properties)])
            self._settle(channel, acks=[delivery.receipt[1]])

    # administration

    def stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        """Ready, delayed and dead counts (RabbitMQ does not report unacknowledged ones here)."""
        if self._bridge.blocked():
            return self._beside().stats(queues)
        names = sorted(self._declared if queues is None else queues)
        return self._run(self._stats(names))

    async def _stats(self, names: Sequence[str]) -> list[QueueStats]:
        out = []
        for queue in names:
            channel = await self._declare(queue)

            async def depth(name: str, channel: aiormq.abc.AbstractChannel = channel) -> int:
                ok = await channel.queue_declare(name, passive=True)
                return int(ok.message_count or 0)

            delayed = [await depth(delay_queue(queue, ms)) for ms in BUCKETS_MS]
            ready = await depth(queue)
            dead = await depth(dead_queue(queue))
            out.append(QueueStats(queue, ready, sum(delayed), 0, dead))
        return out

    def purge(self, queue: str, *, dead: bool = False) -> int:
        """Delete a queue's waiting and delayed messages, or its dead letters."""
        if self._bridge.blocked():
            return self._beside().purge(queue, dead=dead)
        return self._run(self._purge(queue, dead))

    async def _purge(self, queue: str, dead: bool) -> int:
        channel = await self._declare(queue)
        names = (
            [dead_queue(queue)] if dead else [queue, *(delay_queue(queue, ms) for ms in BUCKETS_MS)]
        )
        total = 0
        for name in names:
            ok = await channel.queue_purge(name)
            total += int(ok.message_count or 0)
        return total

    def dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        """Look at up to `limit` dead letters without removing them."""
        if self._bridge.blocked():
            return self._beside().dead_letters(queue, limit)
        return self._run(self._dead_letters(queue, limit))

    async def _dead_letters(self, queue: str, limit: int) -> list[DeadLetter]:
        await self._declare(queue)
        assert self._connection is not None
        # A separate channel: the messages looked at go back when it closes.
        channel = await self._connection.channel()
        out = []
        try:
            for _ in range(limit):
                message = await channel.basic_get(dead_queue(queue))
                if message.delivery_tag is None:
                    break
                out.append(_letter(queue, message))
        finally:
            await channel.close()
        return out

    def requeue_dead(
        self,
        queue: str,
        select: Callable[[DeadLetter], bool] | None = None,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Publish the selected dead letters back to the queue as new messages, each confirmed
        by RabbitMQ before its dead letter is acknowledged (removed)."""
        if self._bridge.blocked():
            return self._beside().requeue_dead(queue, select, progress=progress)
        # A channel of its own: dead letters not selected stay unacknowledged on it, so the
        # next get moves on, and go back to `Q.dead` in their places when it closes.
        getter = self._run(self._getter(queue))
        moved = 0
        try:
            while True:
                count, more = self._run(self._requeue_dead(getter, queue, select))
                moved += count
                if progress is not None and count:
                    progress(count)
                if not more:
                    return moved
        finally:
            with contextlib.suppress(BrokerError):
                self._run(_close_channel(getter))

    async def _getter(self, queue: str) -> aiormq.abc.AbstractChannel:
        await self._declare(queue)
        assert self._connection is not None
        return await self._connection.channel()

    async def _requeue_dead(
        self,
        getter: aiormq.abc.AbstractChannel,
        queue: str,
        select: Callable[[DeadLetter], bool] | None,
    ) -> tuple[int, bool]:
        """One batch: get up to `REQUEUE_BATCH` dead letters, publish the selected ones (with
        confirms, fresh headers: no delivery or lost-run counts) and then ack them. Returns how
        many went back, and whether `Q.dead` may hold more."""
        chosen: list[tuple[int, DeadLetter]] = []
        more = True
        for _ in range(REQUEUE_BATCH):
            message = await getter.basic_get(dead_queue(queue))
            if message.delivery_tag is None:
                more = False
                break
            letter = _letter(queue, message)
            if select is None or select(letter):
                chosen.append((message.delivery_tag, letter))
        if chosen:
            await self._publish([Outgoing(queue, d.body, d.priority) for _, d in chosen])
            for tag, _ in chosen:
                await getter.basic_ack(tag, wait=False)
        return len(chosen), more

    def exists(self, queue: str) -> bool:
        """True when RabbitMQ has the queue (a passive declare: nothing is created)."""
        if self._bridge.blocked():
            return self._beside().exists(queue)
        return self._run(self._exists(queue))

    async def _exists(self, queue: str) -> bool:
        await self._chan()
        assert self._connection is not None
        # A channel of its own: RabbitMQ closes the channel of a passive declare that fails.
        channel = await self._connection.channel()
        try:
            await channel.queue_declare(queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        finally:
            await _close_channel(channel)
        return True

    def broadcast(self) -> RabbitMQBroadcast:
        """Broadcast over fanout exchanges, on a connection of its own (`_broadcast`)."""
        from conveyor.brokers.rabbitmq._broadcast import RabbitMQBroadcast

        return RabbitMQBroadcast(self._url)

    def held(self) -> list[Delivery]:
        """What RabbitMQ pushed that no job has taken yet (read on the worker's loop)."""
        return list(self._inbox)

    def close(self) -> None:
        """Close the connection and stop the broker's event-loop thread."""
        if self._side is not None:
            self._side.close()
            self._side = None
        loop = self._bridge.loop
        if loop is None:
            return
        if self._bridge.attached:  # the loop is the worker's: only the connection is ours
            if not self._bridge.blocked() and loop.is_running():
                with contextlib.suppress(Exception):
                    self._run(self._shut(), timeout=25)
            self._reset()
            return
        if not loop.is_closed():
            with contextlib.suppress(Exception):
                self._run(self._shut(), timeout=25)
        self._bridge.stop()
        self._reset()


def _letter(queue: str, message: aiormq.abc.DeliveredMessage) -> DeadLetter:
    """A dead letter of `queue` as read from `Q.dead`, reason and counts from its headers."""
    properties = message.header.properties
    headers = properties.headers or {}
    died_at = headers.get(DIED_AT)
    return DeadLetter(
        queue,
        message.body,
        str(headers.get(REASON, "")),
        _int(headers.get(DELIVERIES)) or 1,
        float(died_at) if isinstance(died_at, str | int | float) else 0.0,
        int(properties.priority or 0),
    )


async def _close_channel(channel: aiormq.abc.AbstractChannel) -> None:
    if not channel.is_closed:
        await channel.close()


def _int(value: object) -> int:
    """A delivery count from a header: a whole number up to `MAX_COUNT`, else 0.

    Headers come from whoever published the message: a count that is not plain ASCII digits
    (`"²"` is a digit to `str.isdigit`, not to `int`), negative, or absurdly large must not
    stop the message from being read, nor be written back into a header pamqp cannot encode.
    """
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif not (isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 10):
        return 0
    else:
        number = int(value)
    return min(max(number, 0), MAX_COUNT)


def _content_type(body: bytes) -> str:
    """One content type per body format: a signed body is not plain JSON."""
    return SIGNED_CONTENT_TYPE if body.startswith(SIGNED_PREFIX) else CONTENT_TYPE


def _log_failure(task: asyncio.Task[Any]) -> None:
    """Log what a background step of taking in a delivery raised (its message comes back)."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("could not take in a delivery: %s", redact_text(str(exc)))


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no event loop in this thread
        return None
