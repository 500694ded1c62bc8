"""The AMQP frames conveyor writes for a publish: no server needed."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.frame import marshal as pamqp_marshal
from pamqp.header import ContentHeader

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
