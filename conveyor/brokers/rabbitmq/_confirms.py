"""Publishing with confirms: messages are written in chunks and wait for RabbitMQ's confirms.

`send` returns once RabbitMQ confirmed every message, and raises `PublishError` for the first
that it did not: a nack, a return (no queue is bound for a mandatory message), a timeout, or a
channel that closed before the confirm arrived.
"""

from __future__ import annotations

import asyncio
import collections
import random
import struct
import time
from collections.abc import Sequence
from typing import Any

import aiormq
import aiormq.abc
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.frame import marshal as _frame
from pamqp.header import ContentHeader

from conveyor.brokers.rabbitmq import _aiormq
from conveyor.errors import PublishError
from conveyor.redact import redact_text

CONFIRM_TIMEOUT_S = 30.0
# Publishing: messages whose frames are written in one go, and unconfirmed messages at most.
CHUNK = 256
WINDOW = 4096


async def send(
    channel: aiormq.abc.AbstractChannel,
    items: Sequence[tuple[str, str, bytes, Basic.Properties]],
    *,
    mandatory: bool = True,
) -> None:
    """Publish messages (mandatory unless told) and wait until RabbitMQ confirmed every one.

    `Channel.basic_publish` costs a task, a lock and a timeout per message; here the frames of
    `CHUNK` messages are written in one go and up to `WINDOW` wait for their confirms at a time.
    The channel's own confirm bookkeeping is kept as `basic_publish` keeps it (`_aiormq`), so
    acks, nacks and returns settle these futures the same way; a channel that closes fails the
    chunks still waiting. The RabbitMQ integration tests cover confirms, returns and closures.
    """
    assert isinstance(channel, aiormq.Channel)
    loop = asyncio.get_running_loop()
    in_flight: collections.deque[_Chunk] = collections.deque()
    waiting = 0
    method_frames: dict[tuple[str, str], bytes] = {}
    try:
        for start in range(0, len(items), CHUNK):
            while in_flight and waiting + CHUNK > WINDOW:
                waiting -= await _confirmed(channel, in_flight.popleft())
            chunk = _Chunk(time.monotonic() + CONFIRM_TIMEOUT_S)
            parts: list[bytes] = []
            number, size = _aiormq.framing(channel)
            async with _aiormq.lock(channel):
                for item in items[start : start + CHUNK]:
                    message_id = marshal(parts, item, number, size, mandatory, method_frames)
                    future = loop.create_future()
                    tag = _aiormq.reserve_confirm(channel, message_id, future)
                    chunk.sent.append((message_id, tag))
                    chunk.futures.append(future)
                await _aiormq.write(channel, b"".join(parts))
            in_flight.append(chunk)
            waiting += len(chunk.futures)
        while in_flight:
            await _confirmed(channel, in_flight.popleft())
    finally:
        for chunk in in_flight:
            chunk.abandon(channel)


def marshal(
    parts: list[bytes],
    item: tuple[str, str, bytes, Basic.Properties],
    number: int,
    size: int,
    mandatory: bool,
    methods: dict[tuple[str, str], bytes],
) -> str:
    """Append one message's frames for channel `number` (bodies cut at `size` bytes) to
    `parts`, with a fresh message id (returned: returns are matched by it); `methods` keeps
    the method frames already made, by exchange and routing key."""
    exchange, key, body, properties = item
    message_id = properties.message_id = f"{random.getrandbits(128):032x}"
    method = methods.get((exchange, key))
    if method is None:
        method = methods[exchange, key] = _publish_frame(exchange, key, mandatory, number)
    parts.append(method)
    if properties.headers is None:
        parts.append(_header_frame(len(body), properties, number))
    else:
        parts.append(_frame(ContentHeader(0, len(body), properties), number))
    for at in range(0, len(body), size):
        parts.append(_frame(ContentBody(body[at : at + size]), number))
    return message_id


# pamqp's marshalling checks and encodes every field of a method or properties, generically:
# measured, about half of the time a blocking send spent in the broker's code (docs/
# worker-performance.md, "Latency"). These two write the frames conveyor publishes the way
# pamqp does (a test compares them byte for byte).

_FRAME = struct.Struct(">BHI")  # frame type, channel, payload size
_PUBLISH = struct.Struct(">HHH")  # class 60 (basic), method 40 (publish), the reserved ticket
# The frame end, the content header's layout and the property flags conveyor sets: the same as
# the worker reads deliveries with.
_FRAME_END, _CONTENT = _aiormq.FRAME_END, _aiormq.CONTENT
_CONTENT_TYPE, _DELIVERY_MODE, _PRIORITY, _REPLY_TO, _MESSAGE_ID = _aiormq.PROPERTY_FLAGS


def _short(text: str) -> bytes:
    data = text.encode()
    if len(data) > 255:
        raise ValueError(f"{text[:40]!r}... is longer than an AMQP short string (255 bytes)")
    return bytes((len(data),)) + data


def _publish_frame(exchange: str, key: str, mandatory: bool, number: int) -> bytes:
    """A `Basic.Publish` method frame."""
    payload = _PUBLISH.pack(60, 40, 0) + _short(exchange) + _short(key) + bytes((mandatory,))
    return _FRAME.pack(1, number, len(payload)) + payload + _FRAME_END


def _header_frame(body_size: int, properties: Basic.Properties, number: int) -> bytes:
    """A content header frame with the properties conveyor sets (content type, delivery mode,
    priority, reply-to, message id), any of them None; headers go through pamqp."""
    flags = 0
    values = []
    if properties.content_type is not None:
        flags |= _CONTENT_TYPE
        values.append(_short(properties.content_type))
    if properties.delivery_mode is not None:
        flags |= _DELIVERY_MODE
        values.append(bytes((properties.delivery_mode,)))
    if properties.priority is not None:
        flags |= _PRIORITY
        values.append(bytes((properties.priority,)))
    if properties.reply_to is not None:
        flags |= _REPLY_TO
        values.append(_short(properties.reply_to))
    if properties.message_id is not None:
        flags |= _MESSAGE_ID
        values.append(_short(properties.message_id))
    payload = _CONTENT.pack(60, 0, body_size, flags) + b"".join(values)
    return _FRAME.pack(2, number, len(payload)) + payload + _FRAME_END


class _Chunk:
    """Messages written together: their message ids, delivery tags and confirm futures."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.sent: list[tuple[str, int]] = []
        self.futures: list[asyncio.Future[Any]] = []

    def abandon(self, channel: aiormq.Channel) -> None:
        """Stop waiting: a late confirm is then ignored, and the channel forgets the ids."""
        for future in self.futures:
            future.cancel()
        _aiormq.forget_confirms(channel, self.sent)


async def _confirmed(channel: aiormq.Channel, chunk: _Chunk) -> int:
    """Wait for one chunk's confirms; raise `PublishError` for any message not confirmed."""
    every = asyncio.gather(*chunk.futures, return_exceptions=True)
    closing = _aiormq.closing(channel)
    try:
        timeout = max(0.0, chunk.deadline - time.monotonic())
        await asyncio.wait([every, closing], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if not every.done():
            if closing.done():
                raise PublishError("the channel to RabbitMQ closed before it confirmed a message")
            raise PublishError(
                f"RabbitMQ did not confirm a message within {CONFIRM_TIMEOUT_S:.0f}s"
            )
        for result in every.result():
            if not isinstance(result, Basic.Ack):
                raise PublishError(f"RabbitMQ did not confirm a message: {_why(result)}")
    finally:
        closing.cancel()
        every.cancel()
        every.add_done_callback(_retrieve)
        chunk.abandon(channel)
    return len(chunk.futures)


def _why(result: object) -> str:
    """Why a publish was not confirmed, for an error message."""
    if isinstance(result, aiormq.exceptions.PublishError):
        return f"no queue is bound for it ({getattr(result.frame, 'reply_text', '')})"
    if isinstance(result, Basic.Nack):
        return "RabbitMQ answered with a nack"
    if result is None:
        return "the channel closed before the confirm arrived"
    return redact_text(str(result))


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Read a future's outcome so asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()
