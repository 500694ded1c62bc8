"""Publishing with confirms: messages are written in chunks and wait for RabbitMQ's confirms.

`send` returns once RabbitMQ confirmed every message, and raises `PublishError` for the first
that it did not: a nack, a return (no queue is bound for a mandatory message), a timeout, or a
channel that closed before the confirm arrived.
"""

from __future__ import annotations

import asyncio
import collections
import random
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
                for exchange, key, body, properties in items[start : start + CHUNK]:
                    message_id = properties.message_id = f"{random.getrandbits(128):032x}"
                    future = loop.create_future()
                    tag = _aiormq.reserve_confirm(channel, message_id, future)
                    chunk.sent.append((message_id, tag))
                    chunk.futures.append(future)
                    method = method_frames.get((exchange, key))
                    if method is None:
                        publish = Basic.Publish(
                            exchange=exchange, routing_key=key, mandatory=mandatory
                        )
                        method = method_frames[exchange, key] = _frame(publish, number)
                    parts.append(method)
                    parts.append(_frame(ContentHeader(0, len(body), properties), number))
                    for at in range(0, len(body), size):
                        parts.append(_frame(ContentBody(body[at : at + size]), number))
                await _aiormq.write(channel, b"".join(parts))
            in_flight.append(chunk)
            waiting += len(chunk.futures)
        while in_flight:
            await _confirmed(channel, in_flight.popleft())
    finally:
        for chunk in in_flight:
            chunk.abandon(channel)


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
