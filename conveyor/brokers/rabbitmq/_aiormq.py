"""Every use conveyor makes of aiormq's internals, in this one file (checked against aiormq 7.2.4).

Everywhere else conveyor uses aiormq's public face only: `connect`, a connection's `channel()`,
a channel's AMQP methods (`basic_*`, `queue_*`, `exchange_*`, `close`) and `is_closed`, the
types of `aiormq.abc` and `aiormq.exceptions`. An aiormq upgrade is checked here, part by part.

Receiving (the consumer's hot path). aiormq hands each frame from its connection's reader task
to the channel's frame queue, where the channel's own reader task assembles a message from three
frames and starts a new asyncio task per message to call the consumer. At thousands of messages
a second those hops are most of a worker's time on the broker. Two shortcuts, both behaving as
aiormq does:

- `InlineDeliveries` takes the frames of deliveries to chosen consumer tags off the channel's
  queue as the connection's reader puts them there, and calls a plain function with each whole
  message: no queue hop, no task. Every other frame (confirms, RPC replies, returns and their
  content, deliveries to other consumers) goes through the queue as before.
- `FrameReceiver` reads a frame with two reads instead of three, without a lock or a buffer copy,
  for connections opened inside `fast_frames()`, and decodes a `Basic.Deliver` and a content
  header with only the properties conveyor sets itself, into the objects pamqp would make.

It relies on `Channel.frames` (an asyncio.Queue that the connection's reader `put`s `(weight,
frame)` into), `aiormq.connection.FrameReceiver` (built by `connect`) and the frame exceptions it
raises.

Writing. Acks and published messages go to RabbitMQ as marshalled frames put straight on the
connection's write queue (`Channel.write_queue`, `ChannelFrame`), not through `basic_ack` and
`basic_publish`, which cost a task, a lock and a timeout per call. `write` and `write_nowait`
do that; `framing` gives the channel number frames carry and `Channel.max_content_size`.

Confirms. Published that way, a message is still confirmed through the channel's own
bookkeeping, kept as `basic_publish` keeps it, so that acks, nacks and returns settle its future
the same way: under `Channel.lock`, `Channel.delivery_tag` numbers messages,
`Channel.confirmations` maps a tag to the future a confirm settles, and
`Channel.message_id_delivery_tag` maps a message id to its tag for returns (`reserve_confirm`,
`forget_confirms`). `Channel.closing` gives a new future per access, done when the channel
closes, which its caller cancels (`closing`).

Publishing from other threads (`_direct`). A plain TCP connection is opened with a transport
factory (`aiormq.TransportFactory`, aiormq's own hook) that keeps the `asyncio.StreamWriter`
aiormq's writer task writes through (`stream_writer`). On the channel those threads publish on,
`ConfirmFrames` takes the confirms (`Basic.Ack`, `Basic.Nack`) and returns (`Basic.Return`
with its content frames) off `Channel.frames` the way `InlineDeliveries` takes deliveries, and
hands them to plain functions; aiormq's own confirm bookkeeping never sees that channel's.

Logging. aiormq logs a connect whose socket cannot be opened at ERROR, as `error when creating
transport: <...>` from `Connection.connect` on the `aiormq.connection` logger, and then raises.
conveyor turns that exception into one clear error (`cannot connect to RabbitMQ at ...: ...`).
Where the program configured no logging (the `conveyor` command, most scripts), Python's
last-resort handler would print aiormq's record bare on stderr: a second line, without context,
beside it. `quiet_connect()` marks conveyor's own connects. While it is active (a context
variable, so only the coroutine that connects and the tasks it starts see it), records emitted
by aiormq's `Connection.connect` itself are dropped: what they say reaches the user in
conveyor's error. Every other aiormq record, and aiormq's records about connections the user's
own code opens, pass as before.

Importing. `aiormq.connection` asks `importlib.metadata.version("aiormq")` at import, for the
version in the client properties it sends. importlib.metadata brings email, zipfile, csv and
more along: 1.3 MiB in a worker, which every process of a prefork pool maps, and which nothing
else of an idle worker uses. So while aiormq is imported here (first, before any other module of
this package), a stand-in for importlib.metadata answers that question from the name of aiormq's
`.dist-info` directory; whatever else it is asked, the real module answers. Where that directory
cannot be found (an unusual install), aiormq is imported as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.machinery
import logging
import struct
import sys
import types
import weakref
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any

_METADATA = "importlib.metadata"


class _MetadataStandIn(types.ModuleType):
    """importlib.metadata while aiormq is imported: `version("aiormq")` from what was found."""

    def __init__(self, aiormq_version: str) -> None:
        super().__init__(_METADATA)
        self._aiormq_version = aiormq_version

    def version(self, name: str) -> str:
        """The version of distribution `name`, as importlib.metadata.version gives it."""
        if name == "aiormq":
            return self._aiormq_version
        return str(self._real().version(name))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # the import system's questions (`__path__`): not a package
            raise AttributeError(name)
        return getattr(self._real(), name)

    @staticmethod
    def _real() -> types.ModuleType:
        if isinstance(sys.modules.get(_METADATA), _MetadataStandIn):
            del sys.modules[_METADATA]
        return importlib.import_module(_METADATA)


def installed_version(name: str) -> str | None:
    """The version in the name of package `name`'s `<name>-<version>.dist-info` directory beside
    it, or None if there is not exactly one."""
    spec = importlib.machinery.PathFinder.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    beside = Path(next(iter(spec.submodule_search_locations))).parent
    found = list(beside.glob(f"{name}-*.dist-info"))
    if len(found) != 1:
        return None
    return found[0].name[len(name) + 1 : -len(".dist-info")]


@contextlib.contextmanager
def _without_metadata() -> Iterator[None]:
    """While the body runs, `importlib.metadata` is the stand-in (see the module docstring)."""
    version = None
    if _METADATA not in sys.modules and "aiormq" not in sys.modules:
        version = installed_version("aiormq")
    if version is None:
        yield
        return
    stand_in = _MetadataStandIn(version)
    sys.modules[_METADATA] = stand_in
    try:
        yield
    finally:
        if sys.modules.get(_METADATA) is stand_in:
            del sys.modules[_METADATA]


with _without_metadata():
    import aiormq
    import aiormq.abc
    import aiormq.connection
    import pamqp.frame
    from aiormq.abc import ChannelFrame
    from aiormq.exceptions import AMQPConnectionError, InvalidFrameError
    from pamqp.body import ContentBody
    from pamqp.commands import Basic
    from pamqp.exceptions import PAMQPException
    from pamqp.header import ContentHeader

log = logging.getLogger("conveyor.brokers.rabbitmq")

OnMessage = Callable[[Basic.Deliver, ContentHeader, bytes], None]
OnConfirm = Callable[[int, bool, bool], None]  # delivery tag, multiple, acked (else nacked)
OnReturn = Callable[[str, str], None]  # the returned message's id, RabbitMQ's reply text

_HEADER_SIZE = 7  # frame type, channel, payload size; the payload and a frame-end byte follow


# receiving


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


class ConfirmFrames:
    """Confirms and returns of one channel, handed to functions as they arrive.

    A return comes as `Basic.Return`, a content header (whose properties carry the message id)
    and body frames up to the header's size; RabbitMQ sends it before the message's confirm.
    Every other frame goes on to aiormq's channel reader.
    """

    def __init__(
        self, channel: aiormq.abc.AbstractChannel, on_confirm: OnConfirm, on_return: OnReturn
    ) -> None:
        self._on_confirm, self._on_return = on_confirm, on_return
        frames: asyncio.Queue[Any] = channel.frames
        self._forward = frames.put
        self._returned: Basic.Return | None = None
        self._message_id = ""
        self._left = -1  # body bytes of the returned message still to come; -1: no header yet
        frames.put = self._put  # type: ignore[method-assign]

    async def _put(self, item: tuple[int, Any]) -> None:
        frame = item[1]
        kind = type(frame)
        if self._returned is not None:
            if self._left < 0 and kind is ContentHeader:
                self._message_id = frame.properties.message_id or ""
                self._left = frame.body_size
            elif self._left > 0 and kind is ContentBody:
                self._left -= len(frame.value)
            else:  # out of order: aiormq's reader sees this frame alone
                self._returned, self._left = None, -1
                await self._forward(item)
                return
            if self._left <= 0:
                returned, self._returned, self._left = self._returned, None, -1
                self._on_return(self._message_id, returned.reply_text or "")
            return
        if kind is Basic.Ack or kind is Basic.Nack:
            self._on_confirm(frame.delivery_tag or 0, bool(frame.multiple), kind is Basic.Ack)
        elif kind is Basic.Return:
            self._returned = frame
        else:
            await self._forward(item)


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
        if rest[-1:] == _FRAME_END:
            try:
                frame = _simple_frame(head[0], rest[:-1])
            except (IndexError, ValueError, struct.error):
                frame = None  # pamqp says what is wrong with it
            if frame is not None:
                return size + _HEADER_SIZE + 1, int.from_bytes(head[1:3], "big"), frame
        try:
            return pamqp.frame.unmarshal(head + rest)
        except PAMQPException as exc:
            raise InvalidFrameError(str(exc)) from exc


FRAME_END = b"\xce"
_DELIVER = b"\x00\x3c\x00\x3c"  # class 60 (basic), method 60 (deliver)
_LONG = struct.Struct(">Q")
CONTENT = struct.Struct(">HHQH")  # class, weight, body size, property flags
# The properties conveyor sets on what it publishes, by flag bit, in the order AMQP encodes them:
# content type, delivery mode, priority, reply-to, message id.
PROPERTY_FLAGS = (1 << 15, 1 << 12, 1 << 11, 1 << 9, 1 << 7)
_FRAME_END, _CONTENT = FRAME_END, CONTENT
_CONTENT_TYPE, _DELIVERY_MODE, _PRIORITY, _REPLY_TO, _MESSAGE_ID = PROPERTY_FLAGS
_SIMPLE = _CONTENT_TYPE | _DELIVERY_MODE | _PRIORITY | _REPLY_TO | _MESSAGE_ID


def _simple_frame(kind: int, payload: bytes) -> Basic.Deliver | ContentHeader | None:
    """A `Basic.Deliver`, or a content header with no other properties than conveyor sets,
    decoded as pamqp decodes it (short strings as `_pamqp_text` has them); None for pamqp.

    pamqp decodes every field of a frame generically, checking each: for these two, three times
    as long (docs/worker-performance.md, "Latency").
    """
    if kind == 1 and payload[:4] == _DELIVER:
        consumer_tag, at = _short(payload, 4)
        (delivery_tag,) = _LONG.unpack_from(payload, at)
        redelivered = bool(payload[at + 8] & 1)
        exchange, at = _short(payload, at + 9)
        routing_key, at = _short(payload, at)
        if at != len(payload):
            return None
        return Basic.Deliver(consumer_tag, delivery_tag, redelivered, exchange, routing_key)
    if kind != 2:
        return None
    class_id, weight, body_size, flags = _CONTENT.unpack_from(payload)
    if class_id != 60 or flags & ~_SIMPLE:
        return None
    at = _CONTENT.size
    values: dict[str, Any] = {}
    if flags & _CONTENT_TYPE:
        values["content_type"], at = _short(payload, at)
    if flags & _DELIVERY_MODE:
        values["delivery_mode"], at = payload[at], at + 1
    if flags & _PRIORITY:
        values["priority"], at = payload[at], at + 1
    if flags & _REPLY_TO:
        values["reply_to"], at = _short(payload, at)
    if flags & _MESSAGE_ID:
        values["message_id"], at = _short(payload, at)
    if at != len(payload):
        return None
    return ContentHeader(weight, body_size, Basic.Properties(**values))


def _short(data: bytes, at: int) -> tuple[str, int]:
    """The short string at `at`, and where the next field starts."""
    end = at + 1 + data[at]
    if end > len(data):
        raise ValueError("a short string runs past its frame")
    return data[at + 1 : end].decode("utf-8", "surrogateescape"), end


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


# connecting

#: The logger aiormq's connection module logs to, and the function whose records are dropped.
_LOGGER = "aiormq.connection"
_FUNCTION = "connect"

_connecting: ContextVar[bool] = ContextVar("conveyor_amqp_connecting", default=False)


_writers: weakref.WeakKeyDictionary[Any, asyncio.StreamWriter] = weakref.WeakKeyDictionary()


async def connect(url: str) -> aiormq.abc.AbstractConnection:
    """`aiormq.connect`, reading frames with `FrameReceiver`; aiormq's record of a failure is
    dropped (conveyor's own error says what it would). A plain TCP connection's stream writer
    is kept for `stream_writer`."""
    factory = _KeepWriter() if url.startswith("amqp:") else None
    with quiet_connect(), fast_frames():
        connection = await aiormq.connect(url, transport_factory=factory)
    if factory is not None and factory.writer is not None:
        _writers[connection] = factory.writer
    return connection


def stream_writer(connection: aiormq.abc.AbstractConnection) -> asyncio.StreamWriter | None:
    """The stream writer a plain TCP connection (opened by `connect`) writes its frames through;
    None for TLS."""
    return _writers.get(connection)


class _KeepWriter(aiormq.connection.TCPTransportFactory):
    """aiormq's plain TCP transport, remembering the stream writer it makes."""

    writer: asyncio.StreamWriter | None = None

    async def create(
        self, url: Any, **kwargs: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, self.writer = await super().create(url, **kwargs)
        return reader, self.writer


class _OwnConnect(logging.Filter):
    """Drops the records of `Connection.connect` made while conveyor connects."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_connecting.get() and record.funcName == _FUNCTION)


_filter = _OwnConnect()


def install_log_filter() -> None:
    """Add the filter to aiormq's connection logger (once; it does nothing outside
    `quiet_connect`)."""
    logger = logging.getLogger(_LOGGER)
    if _filter not in logger.filters:
        logger.addFilter(_filter)


@contextlib.contextmanager
def quiet_connect() -> Iterator[None]:
    """Around conveyor's own `aiormq.connect`, whose failures conveyor reports itself."""
    token = _connecting.set(True)
    try:
        yield
    finally:
        _connecting.reset(token)


# writing


def framing(channel: aiormq.Channel) -> tuple[int, int]:
    """The channel's number, which its frames carry, and the most body bytes one frame holds."""
    return channel.number, channel.max_content_size


async def write(channel: aiormq.Channel, data: bytes) -> None:
    """Queue marshalled frames for the connection's writer, waiting while its buffer is full."""
    await channel.write_queue.put(ChannelFrame(data, False))


def write_nowait(
    channel: aiormq.abc.AbstractChannel, frames: Sequence[pamqp.frame.FrameTypes]
) -> Coroutine[Any, Any, None] | None:
    """Queue `frames` for the connection's writer at once, in one write.

    When its buffer is full, nothing is queued: the coroutine returned queues them once there is
    room, for the caller to run.
    """
    assert isinstance(channel, aiormq.Channel)
    number = channel.number
    frame = ChannelFrame(b"".join([pamqp.frame.marshal(f, number) for f in frames]), False)
    try:
        channel.write_queue.put_nowait(frame)
    except asyncio.QueueFull:
        return channel.write_queue.put(frame)
    return None


# confirms


def lock(channel: aiormq.Channel) -> contextlib.AbstractAsyncContextManager[None]:
    """The channel's lock, held while messages are numbered and written (as `basic_publish`
    holds it); entering it raises `ChannelInvalidStateError` on a closed channel."""
    return channel.lock


def reserve_confirm(channel: aiormq.Channel, message_id: str, future: asyncio.Future[Any]) -> int:
    """Number the channel's next published message, its delivery tag (returned), and register
    `future` for its confirm (an ack or nack) or its return to settle; under `lock`, before the
    message's frames are written."""
    channel.delivery_tag += 1
    tag = channel.delivery_tag
    channel.confirmations[tag] = future
    channel.message_id_delivery_tag[message_id] = tag
    return tag


def forget_confirms(channel: aiormq.Channel, sent: Iterable[tuple[str, int]]) -> None:
    """Drop the message ids (which returns are matched by) of messages no longer waited for."""
    ids = channel.message_id_delivery_tag
    for message_id, tag in sent:
        if ids.get(message_id) == tag:
            del ids[message_id]


def closing(channel: aiormq.Channel) -> asyncio.Future[Any]:
    """A future done when the channel closes; cancel it once no longer needed."""
    return channel.closing
