"""The AMQP frames conveyor writes for a publish, and the confirms it reads: no server needed."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
from pamqp.body import ContentBody
from pamqp.commands import Basic, Channel
from pamqp.frame import marshal as pamqp_marshal
from pamqp.header import ContentHeader

from conveyor.brokers.rabbitmq._aiormq import ConfirmFrames
from conveyor.brokers.rabbitmq._confirms import marshal


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
