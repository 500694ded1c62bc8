"""RabbitMQ's broadcast: fanout exchanges, exclusive queues, and a roster queue, on a connection
of its own.

A channel `C` is the fanout exchange `conveyor.C` (durable, so that declaring it again never
clashes). Each listener declares an exclusive, auto-delete, server-named queue bound to it, with
`x-max-length` (drop-head: the broker keeps the newest) and a prefetch: a reader that stops
reading holds at most its limit at the broker and its prefetch in memory. A private listener is
such a queue bound to nothing, addressed through the default exchange. Nothing is published
persistent, mandatory or confirmed: a body with no listener is dropped, which is the point.

A roster `R` is the queue `conveyor.roster.R` whose messages expire after the lease
(`x-message-ttl`): a member registers by publishing its entry, and a reader takes every message
with `basic.get` and closes its channel without acknowledging, which puts them all back. The
newest entry per member counts; `unregister` publishes a tombstone that hides older entries.

The connection lives on a loop of its own (`Bridge`): a worker's broadcast never shares the
connection that carries its tasks, and a forked child never uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Iterator, Sequence
from typing import Any, TypeVar

import aiormq
import aiormq.abc
from pamqp.commands import Basic

from conveyor.brokers.broadcast import LISTEN_LIMIT, Broadcast, Listener, Queue
from conveyor.brokers.rabbitmq import _aiormq
from conveyor.brokers.rabbitmq._bridge import Bridge
from conveyor.errors import BrokerError
from conveyor.redact import redact_text, redact_url

T = TypeVar("T")
PREFIX = "conveyor."
ROSTER_PREFIX = "conveyor.roster."
CALL_TIMEOUT_S = 10.0
#: Messages a listener takes from the broker ahead of its reader.
PREFETCH = 64
#: Header that marks a roster entry as a tombstone, and names its member.
MEMBER = "x-conveyor-member"
GONE = "x-conveyor-gone"
#: A roster queue unused this long (no worker declares it) is deleted by RabbitMQ.
ROSTER_EXPIRES_MS = 24 * 3600 * 1000
ROSTER_MAX = 100_000


class _RabbitListener(Listener):
    def __init__(self, owner: RabbitMQBroadcast, limit: int) -> None:
        self._owner = owner
        self._limit = limit
        self.queue = Queue(PREFETCH * 2)
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._last_tag = 0
        self._acked = 0

    async def open(self, exchange: str | None) -> None:
        connection = await self._owner._connect()
        channel = self._channel = await connection.channel()
        arguments: dict[str, Any] = {"x-max-length": self._limit, "x-overflow": "drop-head"}
        declared = await channel.queue_declare(
            "", exclusive=True, auto_delete=True, arguments=arguments
        )
        assert declared.queue is not None
        self.address = declared.queue
        if exchange is not None:
            await channel.exchange_declare(exchange, exchange_type="fanout", durable=True)
            await channel.queue_bind(declared.queue, exchange, routing_key="")
        await channel.basic_qos(prefetch_count=PREFETCH)
        await channel.basic_consume(declared.queue, self._on_message)

    async def _on_message(self, message: aiormq.abc.DeliveredMessage) -> None:
        self._last_tag = message.delivery_tag or self._last_tag
        self.queue.put(message.body)

    @property
    def dropped(self) -> int:
        """Bodies dropped here (RabbitMQ drops the oldest itself past `x-max-length`)."""
        return self.queue.dropped

    def read(self, timeout: float) -> list[bytes]:
        """What RabbitMQ delivered, acknowledged so that it sends more."""
        channel = self._channel
        if channel is None or channel.is_closed:
            raise BrokerError(
                f"the broadcast connection to RabbitMQ at {self._owner.display_url} closed"
            )
        bodies = self.queue.take(timeout)
        if bodies and self._last_tag > self._acked:
            self._acked = tag = self._last_tag
            with contextlib.suppress(Exception):  # the channel is closing: nothing to ack
                self._owner._bridge.submit(channel.basic_ack(tag, multiple=True))
        return bodies

    def close(self) -> None:
        self.queue.close()
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(Exception):
                self._owner._run(channel.close(), 5.0)


class RabbitMQBroadcast(Broadcast):
    """Broadcast over a RabbitMQ server (see the module's docstring)."""

    def __init__(self, url: str) -> None:
        self._url = url
        self.display_url = redact_url(url)
        self._bridge = Bridge(self._reset)
        self._reset()

    def _reset(self) -> None:
        self._bridge.forget()
        self._connection: aiormq.abc.AbstractConnection | None = None
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._declared: set[str] = set()
        self._opening: asyncio.Lock | None = None

    def _run(self, coroutine: Awaitable[T], timeout: float = CALL_TIMEOUT_S) -> T:
        with self._errors():
            return self._bridge.run(coroutine, timeout)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except TimeoutError:
            raise BrokerError(f"RabbitMQ at {self.display_url} did not answer in time") from None
        except (aiormq.exceptions.AMQPError, OSError, asyncio.CancelledError) as exc:
            # Not chained: the cause's text may carry the URL with its password.
            raise BrokerError(f"RabbitMQ at {self.display_url}: {redact_text(str(exc))}") from None

    async def _connect(self) -> aiormq.abc.AbstractConnection:
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._connection is None or self._connection.is_closed:
                try:
                    connection = await _aiormq.connect(self._url)
                except (OSError, aiormq.exceptions.AMQPError) as exc:
                    raise BrokerError(
                        f"cannot connect to RabbitMQ at {self.display_url}: {redact_text(str(exc))}"
                    ) from None
                self._connection = self._bridge.held.connection = connection
                self._channel = None
            return self._connection

    async def _chan(self) -> aiormq.abc.AbstractChannel:
        connection = await self._connect()
        if self._channel is None or self._channel.is_closed:
            self._channel = await connection.channel()
            self._declared.clear()
        return self._channel

    async def _exchange(self, channel: aiormq.abc.AbstractChannel, name: str) -> None:
        if name not in self._declared:
            await channel.exchange_declare(name, exchange_type="fanout", durable=True)
            self._declared.add(name)

    def publish(self, channel: str, bodies: Sequence[bytes]) -> None:
        if bodies:
            self._run(self._publish(PREFIX + channel, bodies))

    async def _publish(self, exchange: str, bodies: Sequence[bytes]) -> None:
        channel = await self._chan()
        await self._exchange(channel, exchange)
        for body in bodies:
            await channel.basic_publish(body, exchange=exchange, routing_key="")

    def listen(self, channel: str, *, limit: int = LISTEN_LIMIT) -> Listener:
        listener = _RabbitListener(self, limit)
        self._run(listener.open(PREFIX + channel))
        return listener

    def listen_private(self, *, limit: int = LISTEN_LIMIT) -> Listener:
        listener = _RabbitListener(self, limit)
        self._run(listener.open(None))
        return listener

    def send(self, address: str, body: bytes) -> None:
        self._run(self._send(address, body))

    async def _send(self, address: str, body: bytes) -> None:
        channel = await self._chan()
        await channel.basic_publish(body, exchange="", routing_key=address)

    def register(self, roster: str, member: str, body: bytes, lease: float) -> None:
        self._run(self._register(roster, member, body, lease, gone=False))

    def unregister(self, roster: str, member: str) -> None:
        self._run(self._register(roster, member, b"", 0.0, gone=True))

    async def _roster(self, channel: aiormq.abc.AbstractChannel, roster: str) -> str:
        name = ROSTER_PREFIX + roster
        # Declared each time: a roster queue only published to would expire (x-expires).
        await channel.queue_declare(
            name,
            arguments={
                "x-expires": ROSTER_EXPIRES_MS,
                "x-max-length": ROSTER_MAX,
                "x-overflow": "drop-head",
            },
        )
        return name

    async def _register(
        self, roster: str, member: str, body: bytes, lease: float, *, gone: bool
    ) -> None:
        channel = await self._chan()
        name = await self._roster(channel, roster)
        headers: dict[str, Any] = {MEMBER: member}
        if gone:
            headers[GONE] = 1
        # A tombstone lives as long as the longest lease could: an hour.
        ttl = 3_600_000 if gone else max(int(lease * 1000), 1)
        properties = Basic.Properties(headers=headers, expiration=str(ttl))
        await channel.basic_publish(body, exchange="", routing_key=name, properties=properties)

    def members(self, roster: str) -> list[bytes]:
        return self._run(self._members(roster))

    async def _members(self, roster: str) -> list[bytes]:
        connection = await self._connect()
        channel = await connection.channel()
        newest: dict[str, bytes | None] = {}
        try:
            name = await self._roster(channel, roster)
            for _ in range(ROSTER_MAX):
                message = await channel.basic_get(name, no_ack=False)
                if not isinstance(message.delivery, Basic.GetOk):
                    break
                headers = message.header.properties.headers or {}
                member = headers.get(MEMBER)
                if isinstance(member, bytes):
                    member = member.decode("utf-8", "replace")
                if isinstance(member, str):
                    # In queue order: a later entry (or tombstone) replaces an earlier one.
                    newest[member] = None if headers.get(GONE) else message.body
        finally:
            # Unacknowledged, every entry goes back to the roster as it was.
            with contextlib.suppress(Exception):
                await channel.close()
        return [body for _, body in sorted(newest.items()) if body is not None]

    def close(self) -> None:
        connection = self._connection
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(Exception):
                self._run(connection.close(), 5.0)
        self._bridge.stop()
        self._reset()
