"""Publishing from the caller's thread: a blocking send writes its frames to the socket itself.

A blocking `publish` made from any thread but the loop's would otherwise hand its messages to the
broker's event-loop thread and wait for that thread to wake and write them: on an idle producer,
most of a send's time to the socket (measured in docs/worker-performance.md, "Latency"). Here,
on a channel of its own (`DirectChannel`), the calling thread numbers its messages and writes
their frames itself; the loop only reads the confirms and wakes the caller.

What holds, and why:

- A channel's delivery tags are numbered by RabbitMQ in the order the messages reach it, so
  numbering and writing happen together under one lock, and nothing else publishes on the
  channel.
- Bytes of two writes never interleave: every write the loop makes to the connection (aiormq's
  writer task writes through the connection's `asyncio.StreamWriter`) takes the same lock.
- A thread writes to the socket only when nothing waits to be written before it (the
  transport's buffer and `pending` are empty). What the socket does not take at once goes to
  `pending`, which the loop writes before anything else of its own.
- The socket is written through a duplicate of its descriptor, closed with the channel: a
  descriptor the loop closes meanwhile can never be reused under a writing thread.
- Only on a plain TCP connection on an asyncio selector loop (the broker's own thread): TLS
  and uvloop keep buffers of their own, and there sends go through the loop.
- A send returns once RabbitMQ acked every message, and raises `PublishError` for a nack, a
  return (no queue is bound), a timeout, or a channel that closed first.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Sequence
from typing import Any

import aiormq.abc
from pamqp.commands import Basic

from conveyor.brokers.rabbitmq import _aiormq
from conveyor.brokers.rabbitmq._confirms import _retrieve, marshal
from conveyor.errors import PublishError

Item = tuple[str, str, bytes, Basic.Properties]  # exchange, routing key, body, properties

CLOSED = "the channel to RabbitMQ closed before it confirmed a message"


class Receipt:
    """What the sender of some messages waits on: released once each is confirmed or failed."""

    __slots__ = ("done", "error", "left")

    def __init__(self, count: int) -> None:
        self.done = threading.Lock()
        self.done.acquire()
        self.left = count
        self.error: str | None = None


class DirectChannel:
    """A channel with publisher confirms that any thread but the loop's publishes on itself.

    Made on the loop, from the channel and the connection's stream writer; it lives as long as
    the channel (`closed` once that closes).
    """

    def __init__(self, channel: aiormq.abc.AbstractChannel, writer: asyncio.StreamWriter) -> None:
        assert isinstance(channel, aiormq.Channel)
        self.number, self.size = _aiormq.framing(channel)
        self.closed = False
        self._lock = threading.Lock()
        self._loop = asyncio.get_running_loop()
        self._tag = 0
        self._waiting: dict[int, tuple[Receipt, str]] = {}  # tag -> receipt, message id
        self._tags: dict[str, int] = {}  # message id -> tag, for returns
        self._pending = bytearray()
        self._transport = writer.transport
        self._fd = os.dup(self._transport.get_extra_info("socket").fileno())
        self._writer, self._write = writer, writer.write
        # An instance attribute: aiormq's writer task looks `write` up at each frame it writes.
        writer.write = self._loop_write  # type: ignore[method-assign]
        _aiormq.ConfirmFrames(channel, self._confirmed, self._returned)
        _aiormq.closing(channel).add_done_callback(self._on_close)

    def send(self, items: Sequence[Item], timeout: float) -> bool:
        """Publish mandatory messages from this thread and wait for their confirms; False when
        the channel is closed (nothing was sent). Raises `PublishError` for a message RabbitMQ
        did not confirm, and `OSError` when the socket is broken."""
        parts: list[bytes] = []
        methods: dict[tuple[str, str], bytes] = {}
        ids = [marshal(parts, item, self.number, self.size, True, methods) for item in items]
        data = b"".join(parts)
        receipt = Receipt(len(ids))
        with self._lock:
            if self.closed or self._transport.is_closing():
                return False
            for message_id in ids:
                self._tag += 1
                self._waiting[self._tag] = (receipt, message_id)
                self._tags[message_id] = self._tag
            try:
                self._put(data)
            except OSError:
                # The connection is gone; the loop closes the channel once it reads that.
                self._close(CLOSED)
                raise
        if not receipt.done.acquire(timeout=timeout):
            with self._lock:
                if receipt.left:  # not settled meanwhile: forget it (a late confirm is ignored)
                    self._forget(ids)
                    raise PublishError(f"RabbitMQ did not confirm a message within {timeout:.0f}s")
        if receipt.error is not None:
            raise PublishError(receipt.error)
        return True

    def _put(self, data: bytes) -> None:
        """Write to the socket now, or leave for the loop what must wait (under the lock)."""
        written = 0
        if not self._pending and not self._transport.get_write_buffer_size():
            with contextlib.suppress(BlockingIOError):  # the socket's buffer is full
                written = os.write(self._fd, data)
        if written < len(data):
            if not self._pending:
                self._loop.call_soon_threadsafe(self._flush)
            self._pending += memoryview(data)[written:]

    def _forget(self, ids: Sequence[str]) -> None:
        for message_id in ids:
            tag = self._tags.pop(message_id, None)
            if tag is not None:
                self._waiting.pop(tag, None)

    # on the loop

    def _loop_write(self, data: bytes | bytearray | memoryview) -> None:
        """The stream writer's `write`: what waits in `pending` goes first."""
        with self._lock:
            if self._pending:
                self._write(bytes(self._pending))
                self._pending.clear()
            self._write(data)

    def _flush(self) -> None:
        with self._lock:
            if self._pending and not self.closed:
                self._write(bytes(self._pending))
                self._pending.clear()

    def _confirmed(self, tag: int, multiple: bool, acked: bool) -> None:
        with self._lock:
            tags = [tag]
            if multiple:  # every tag up to this one; `_waiting` holds them in order
                tags = []
                for each in self._waiting:
                    if each > tag:
                        break
                    tags.append(each)
            for each in tags:
                waiting = self._waiting.pop(each, None)
                if waiting is None:
                    continue  # its sender stopped waiting
                receipt, message_id = waiting
                self._tags.pop(message_id, None)
                if not acked and receipt.error is None:
                    receipt.error = "RabbitMQ did not confirm a message: it answered with a nack"
                self._settle(receipt)

    def _returned(self, message_id: str, reply_text: str) -> None:
        with self._lock:
            tag = self._tags.get(message_id)
            waiting = None if tag is None else self._waiting.get(tag)
            if waiting is not None and waiting[0].error is None:
                waiting[
                    0
                ].error = (
                    f"RabbitMQ did not confirm a message: no queue is bound for it ({reply_text})"
                )

    def _on_close(self, closing: asyncio.Future[Any]) -> None:
        _retrieve(closing)
        with self._lock:
            self._close(CLOSED)

    def _close(self, why: str) -> None:
        """Fail every send still waiting and let go of the socket (under the lock)."""
        if self.closed:
            return
        self.closed = True
        for receipt, _ in self._waiting.values():
            if receipt.error is None:
                receipt.error = why
            self._settle(receipt)
        self._waiting.clear()
        self._tags.clear()
        self._pending.clear()
        self._writer.write = self._write  # type: ignore[method-assign]
        os.close(self._fd)

    @staticmethod
    def _settle(receipt: Receipt) -> None:
        receipt.left -= 1
        if receipt.left == 0:
            receipt.done.release()
