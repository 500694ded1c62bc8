"""The AMQP frames conveyor writes for a publish, and those it reads: no server needed."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
from aiormq.exceptions import InvalidFrameError
from pamqp.body import ContentBody
from pamqp.commands import Basic, Channel
from pamqp.frame import marshal as pamqp_marshal
from pamqp.frame import unmarshal as pamqp_unmarshal
from pamqp.header import ContentHeader

from conveyor.brokers.rabbitmq._aiormq import ConfirmFrames, FrameReceiver, _simple_frame
from conveyor.brokers.rabbitmq._confirms import marshal
from conveyor.brokers.rabbitmq._pamqp_text import has_raw_text


@pytest.mark.parametrize(
    ("content_type", "delivery_mode", "priority", "reply_to", "headers"),
    [
        *itertools.product(
            [None, "application/json", "application/vnd.conveyor.signed", "tëxt/ünicode"],
            [None, 2],
            [None, 0, 9],
            [None, "amq.rabbitmq.reply-to.g1h2AA5yZXBseUAx"],
            [None],
        ),
        ("application/json", 2, 5, None, {"x-conveyor-deliveries": 3, "x-conveyor-lost": 1}),
    ],
)
def test_a_message_is_framed_as_pamqp_frames_it(
    content_type: str | None,
    delivery_mode: int | None,
    priority: int | None,
    reply_to: str | None,
    headers: dict[str, Any] | None,
) -> None:
    properties = Basic.Properties(
        content_type=content_type,
        delivery_mode=delivery_mode,
        priority=priority,
        reply_to=reply_to,
        headers=headers,
    )
    body = bytes(range(256)) * 5
    parts: list[bytes] = []
    item = ("conveyor", "images.delay.1000", body, properties)
    message_id = marshal(parts, item, 7, 500, True, {})
    assert properties.message_id == message_id and len(message_id) == 32
    expected = [
        Basic.Publish(exchange="conveyor", routing_key="images.delay.1000", mandatory=True),
        ContentHeader(0, len(body), properties),
        *(ContentBody(body[at : at + 500]) for at in range(0, len(body), 500)),
    ]
    assert parts == [pamqp_marshal(frame, 7) for frame in expected]


def test_the_method_frame_is_made_once_per_exchange_and_key() -> None:
    methods: dict[tuple[str, str], bytes] = {}
    for n in range(3):
        marshal([], ("", f"q{n % 2}", b"x", Basic.Properties()), 1, 100, False, methods)
    assert sorted(methods) == [("", "q0"), ("", "q1")]
    assert methods["", "q1"] == pamqp_marshal(Basic.Publish(routing_key="q1"), 1)


def test_a_name_longer_than_a_short_string_is_refused() -> None:
    with pytest.raises(ValueError, match="short string"):
        marshal([], ("", "q" * 256, b"x", Basic.Properties()), 1, 100, True, {})


class _Channel:
    def __init__(self) -> None:
        self.frames: asyncio.Queue[Any] = asyncio.Queue()


def test_confirms_and_returns_are_taken_and_everything_else_goes_on() -> None:
    confirms: list[tuple[int, bool, bool]] = []
    returns: list[tuple[str, str]] = []

    async def scenario() -> list[Any]:
        channel = _Channel()
        ConfirmFrames(
            channel,  # type: ignore[arg-type]
            lambda *confirm: confirms.append(confirm),
            lambda *returned: returns.append(returned),
        )
        returned = Basic.Properties(message_id="m1")
        for frame in [
            Basic.Ack(1),
            Basic.Return(312, "NO_ROUTE", "conveyor", "gone"),
            ContentHeader(0, 6, returned),
            ContentBody(b"abc"),
            ContentBody(b"def"),
            Basic.Ack(2),
            Basic.Nack(4, multiple=True),
            Basic.Return(312, "NO_ROUTE", "conveyor", "gone"),
            ContentHeader(0, 0, Basic.Properties(message_id="m2")),
            Channel.Close(406, "PRECONDITION_FAILED"),
        ]:
            await channel.frames.put((0, frame))
        return [channel.frames.get_nowait()[1] for _ in range(channel.frames.qsize())]

    passed = asyncio.run(scenario())
    assert confirms == [(1, False, True), (2, False, True), (4, True, False)]
    assert returns == [("m1", "NO_ROUTE"), ("m2", "NO_ROUTE")]
    assert [type(frame) for frame in passed] == [Channel.Close]


def _unmarshal(kind: int, frame: Any) -> Any:
    """What pamqp makes of a frame conveyor's receiver decodes by hand, and what it makes."""
    data = pamqp_marshal(frame, 3)
    assert data[0] == kind
    return pamqp_unmarshal(data)[2], _simple_frame(kind, data[7:-1])


@pytest.mark.parametrize(
    "deliver",
    [
        Basic.Deliver("conveyor.1.0", 1, False, "conveyor", "default"),
        Basic.Deliver("conveyor.12.3", 2**63 - 1, True, "", "images.delay.60000"),
        Basic.Deliver("ünïcode", 7, False, "x" * 127, "q"),
    ],
)
def test_a_delivery_is_read_as_pamqp_reads_it(deliver: Basic.Deliver) -> None:
    expected, read = _unmarshal(1, deliver)
    assert isinstance(read, Basic.Deliver)
    assert vars(read) == vars(expected)


@pytest.mark.parametrize(
    "properties",
    [
        Basic.Properties(),
        Basic.Properties(content_type="application/json", delivery_mode=2, message_id="m" * 32),
        Basic.Properties(delivery_mode=2, priority=0, reply_to="amq.rabbitmq.reply-to.x"),
        Basic.Properties(content_type="tëxt", priority=9, message_id=""),
    ],
)
def test_a_content_header_is_read_as_pamqp_reads_it(properties: Basic.Properties) -> None:
    expected, read = _unmarshal(2, ContentHeader(0, 1234, properties))
    assert isinstance(read, ContentHeader)
    assert (read.body_size, read.weight) == (expected.body_size, expected.weight) == (1234, 0)
    assert read.properties == expected.properties


def test_text_that_is_not_utf8_is_read_as_pamqp_text_reads_it() -> None:
    data = bytearray(pamqp_marshal(ContentHeader(0, 5, Basic.Properties(content_type="ab")), 3))
    at = data.index(b"ab")
    data[at : at + 2] = b"\xff\xfe"
    expected = pamqp_unmarshal(bytes(data))[2]
    read = _simple_frame(2, bytes(data[7:-1]))
    assert isinstance(read, ContentHeader)
    assert read.properties == expected.properties
    assert has_raw_text(read.properties.content_type)


@pytest.mark.parametrize(
    "frame",
    [
        ContentHeader(0, 5, Basic.Properties(headers={"x-conveyor-deliveries": 2})),
        ContentHeader(0, 5, Basic.Properties(correlation_id="c", message_id="m")),
        Basic.Ack(3),
        ContentBody(b"abc"),
    ],
)
def test_anything_else_is_left_to_pamqp(frame: Any) -> None:
    data = pamqp_marshal(frame, 3)
    assert _simple_frame(data[0], data[7:-1]) is None


def test_the_receiver_reads_frames_in_a_row_and_leaves_broken_ones_to_pamqp() -> None:
    frames = [
        Basic.Deliver("conveyor.1.0", 9, False, "conveyor", "q"),
        ContentHeader(0, 3, Basic.Properties(content_type="application/json")),
        ContentBody(b"abc"),
        Basic.Ack(9),
    ]

    async def read(data: bytes, count: int) -> list[Any]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        receiver = FrameReceiver(reader)
        return [await receiver.get_frame() for _ in range(count)]

    stream = b"".join(pamqp_marshal(frame, 2) for frame in frames)
    got = asyncio.run(read(stream, len(frames)))
    assert [(size, channel) for size, channel, _ in got] == [
        (len(pamqp_marshal(frame, 2)), 2) for frame in frames
    ]
    assert [type(frame) for _, _, frame in got] == [type(frame) for frame in frames]
    short = bytearray(pamqp_marshal(frames[1], 2))
    del short[-2]  # the content type a byte short of its length
    short[3:7] = (len(short) - 8).to_bytes(4, "big")
    ((_, _, header),) = asyncio.run(read(bytes(short), 1))
    assert header.properties == pamqp_unmarshal(bytes(short))[2].properties  # as pamqp has it
    broken = bytearray(pamqp_marshal(frames[0], 2))
    broken[-1] = 0  # no frame end
    with pytest.raises(InvalidFrameError):
        asyncio.run(read(bytes(broken), 1))
