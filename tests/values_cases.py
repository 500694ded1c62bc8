"""Values for the tests of "values arrive exactly, or not at all": types of every kind, one
value holding them all, a hypothesis strategy of Python values, and an exact comparison."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import math
import uuid
from typing import Any

import msgspec
import pydantic
from hypothesis import strategies as st

UTC = dt.UTC


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: float
    at: dt.datetime


class Order(msgspec.Struct, frozen=True):
    id: uuid.UUID
    total: decimal.Decimal
    tags: frozenset[str]


class Customer(pydantic.BaseModel):
    name: str
    since: dt.date


def same(a: Any, b: Any) -> bool:
    """Equal, and of exactly the same types all the way down (1 is not 1.0 or True)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(
            same(k1, k2) and same(a[k1], b[k2]) for k1, k2 in zip(a, b, strict=True)
        )
    return bool(a == b)


@dataclasses.dataclass(frozen=True)
class Everything:
    when: dt.datetime
    day: dt.date
    span: dt.timedelta
    ident: uuid.UUID
    amount: decimal.Decimal
    raw: bytes
    tags: set[str]
    pair: tuple[int, str]
    by_id: dict[int, str]
    colour: Colour
    level: Level
    point: Point
    order: Order
    customer: Customer
    maybe: dt.datetime | None


EVERYTHING = Everything(
    when=dt.datetime(2026, 3, 29, 2, 30, 15, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2))),
    day=dt.date(2026, 2, 28),
    span=dt.timedelta(days=1, microseconds=5),
    ident=uuid.UUID("12345678-1234-5678-1234-567812345678"),
    amount=decimal.Decimal("10.500"),
    raw=b"\x00\xffbytes",
    tags={"a", "b"},
    pair=(1, "one"),
    by_id={1: "a", 20: "b"},
    colour=Colour.BLUE,
    level=Level.HIGH,
    point=Point(1, 2.5, dt.datetime(2026, 1, 1, 12)),
    order=Order(uuid.UUID(int=7), decimal.Decimal("0.10"), frozenset({"x"})),
    customer=Customer(name="Ada", since=dt.date(1843, 1, 1)),
    maybe=None,
)


JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text()
    | st.binary(max_size=8)
    | st.datetimes()
    | st.uuids()
    | st.decimals(allow_nan=False, places=3)
    | st.sampled_from(list(Level)),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.frozensets(st.integers() | st.text(max_size=3), max_size=3)
        | st.dictionaries(st.text(max_size=5) | st.integers(), inner, max_size=4)
    ),
    max_leaves=12,
)
