"""The consumer's hot path through aiormq's internals, in this one file (checked against 7.2.4).

aiormq hands each frame from its connection's reader task to the channel's frame queue, where the
channel's own reader task assembles a message from three frames and starts a new asyncio task per
message to call the consumer. At thousands of messages a second those hops are most of a worker's
time on the broker. Two shortcuts, both behaving as aiormq does:

- `InlineDeliveries` takes the frames of deliveries to chosen consumer tags off the channel's
  queue as the connection's reader puts them there, and calls a plain function with each whole
  message: no queue hop, no task. Every other frame (confirms, RPC replies, returns and their
  content, deliveries to other consumers) goes through the queue as before.
- `FrameReceiver` reads a frame with two reads instead of three, without a lock or a buffer copy,
  for connections opened inside `fast_frames()`.

An aiormq upgrade is checked here: `Channel.frames` (an asyncio.Queue that the connection's
reader `put`s `(weight, frame)` into), `aiormq.connection.FrameReceiver` (built by `connect`) and
the frame exceptions it raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import aiormq
import aiormq.connection
import pamqp.frame
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.exceptions import PAMQPException
from pamqp.header import ContentHeader

log = logging.getLogger("conveyor.brokers.rabbitmq")

OnMessage = Callable[[Basic.Deliver, ContentHeader, bytes], None]

_HEADER_SIZE = 7  # frame type, channel, payload size; the payload and a frame-end byte follow


class InlineDeliveries:
    """Whole deliveries of one channel's chosen consumers, handed to a function as they arrive.

    AMQP sends a delivery's frames in a row on its channel: `Basic.Deliver`, a content header,
    then body frames up to the header's size. Frames that break that order go on to the queue
    (aiormq's channel reader reports them as it would).
    """

    def __init__(self, channel: aiormq.abc.AbstractChannel, on_message: OnMessage) -> None:
        self.tags: set[str] = set()
        # Weak: the channel must not keep the broker object alive (a broker dropped without
        # close() is closed when it is collected).
        self._target = weakref.WeakMethod(on_message)
        frames: asyncio.Queue[Any] = channel.frames
        self._forward = frames.put
        self._deliver: Basic.Deliver | None = None
        self._header: ContentHeader | None = None
        self._parts: list[bytes] = []
        self._size = 0
        # An instance attribute: only this channel's queue changes, and only its `put`.
        frames.put = self._put  # type: ignore[method-assign]

    async def _put(self, item: tuple[int, Any]) -> None:
        frame = item[1]
        deliver = self._deliver
        if deliver is None:
            if type(frame) is Basic.Deliver and frame.consumer_tag in self.tags:
                self._deliver = frame
                return
        elif self._header is None:
            if type(frame) is ContentHeader:
                if frame.body_size:
                    self._header = frame
                    return
                self._deliver = None
                self._on_message(deliver, frame, b"")
                return
            self._deliver = None  # out of order: aiormq's reader sees this frame alone
        elif type(frame) is ContentBody:
            self._parts.append(frame.value)
            self._size += len(frame.value)
            header = self._header
            if self._size >= header.body_size:
                parts, self._parts, self._size = self._parts, [], 0
                self._deliver = self._header = None
                self._on_message(deliver, header, parts[0] if len(parts) == 1 else b"".join(parts))
            return
        else:
            self._deliver = self._header = None
            self._parts, self._size = [], 0
        await self._forward(item)

    def _on_message(self, deliver: Basic.Deliver, header: ContentHeader, body: bytes) -> None:
        on_message = self._target()
        if on_message is not None:
            on_message(deliver, header, body)


class FrameReceiver(aiormq.connection.FrameReceiver):
    """aiormq's frame receiver, reading each frame in two reads (header, then the rest)."""

    async def get_frame(self) -> Any:
        reader = self.reader
        if reader.at_eof():
            del self.reader
            raise StopAsyncIteration
        try:
            head = await reader.readexactly(_HEADER_SIZE)
            if not self.started:
                if head.startswith(b"AMQP"):
                    raise aiormq.exceptions.ProtocolSyntaxError("Unexpected AMQP protocol header")
                self.started = True
            size = int.from_bytes(head[3:7], "big")
            rest = await reader.readexactly(size + 1)
        except asyncio.IncompleteReadError as exc:
            raise AMQPConnectionError(
                "Server connection unexpectedly closed. "
                f"Read {len(exc.partial)} bytes but {exc.expected} bytes expected",
            ) from exc
        except OSError as exc:  # ConnectionError included, as aiormq reports them
            raise AMQPConnectionError(f"Server communication error: {exc!r}") from exc
        try:
            return pamqp.frame.unmarshal(head + rest)
        except PAMQPException as exc:
            raise InvalidFrameError(str(exc)) from exc


@contextlib.contextmanager
def fast_frames() -> Iterator[None]:
    """Connections opened inside read frames with `FrameReceiver`.

    `aiormq.connect` builds its receiver from the module's name, so it is swapped for the call
    and put back after; a connection opened meanwhile elsewhere in the process gets the same
    frames, read the same way.
    """
    original = aiormq.connection.FrameReceiver
    aiormq.connection.FrameReceiver = FrameReceiver  # type: ignore[misc]
    try:
        yield
    finally:
        aiormq.connection.FrameReceiver = original  # type: ignore[misc]
