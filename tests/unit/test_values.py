"""Values arrive exactly, or the send refuses them: arguments and results, plain or annotated."""

from __future__ import annotations

import datetime as dt
import decimal
import inspect
import re
import sys
import types
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from values_cases import (
    EVERYTHING,
    JSONISH,
    UTC,
    Colour,
    Customer,
    Everything,
    Level,
    Point,
    same,
)

from conveyor import ArgumentError, Conveyor, EncodeError, State, TaskFailed
from conveyor.testing import memory_app, run_until_empty
from conveyor.values import Types, check_plain


def through_a_worker(app: Conveyor, task_fn: Any, *args: Any) -> Any:
    """Send, run with a worker, and return what the task received (it returns its arguments)."""
    result = task_fn.delay(*args)
    run_until_empty(app, pool="threads", concurrency=1)
    return result.get(timeout=5)


# plain values: exactly the JSON types, or refused


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ({1, 2}, "a set would arrive as a list"),
        (frozenset({1}), "a frozenset would arrive as a list"),
        ((1, 2), "a tuple would arrive as a list"),
        (b"abc", "a bytes would arrive as a str"),
        (bytearray(b"abc"), "a bytearray would arrive as a str"),
        (dt.datetime(2026, 1, 2, tzinfo=UTC), "a datetime would arrive as a str"),
        (dt.date(2026, 1, 2), "a date would arrive as a str"),
        (uuid.UUID(int=1), "a UUID would arrive as a str"),
        (decimal.Decimal("1.10"), "a Decimal would arrive as a str"),
        (Level.LOW, "a Level would arrive as a int"),
        (Colour.RED, "a Colour would arrive as a str"),
        (OrderedDict(a=1), "a OrderedDict would arrive as a dict"),
        (Point(1, 2.0, dt.datetime(2026, 1, 1)), "a Point would arrive as a dict"),
        (object(), "a object cannot be encoded as JSON"),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, str) else "",
)
def test_a_value_that_would_arrive_changed_is_refused_at_the_sender(value: Any, says: str) -> None:
    app = memory_app()

    @app.task
    def echo(x):  # type: ignore[no-untyped-def]
        return x

    with pytest.raises(EncodeError, match=rf"argument 'x'\[1\]\['k'\]: {says}"):
        echo.delay([0, {"k": value}])
    with pytest.raises(EncodeError, match=says):
        echo.delay(value)
    assert [s.ready for s in app.broker.stats()] in ([], [0]), "nothing was sent"


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ({1: "a"}, "the key 1 would arrive as the string '1'"),
        ([float("nan")], r"nan has no JSON form"),
        ({"a": float("-inf")}, r"-inf has no JSON form"),
    ],
)
def test_keys_and_floats_json_cannot_carry_are_refused(value: Any, says: str) -> None:
    with pytest.raises(EncodeError, match=says):
        check_plain(value, "argument 'x'")


def test_plain_json_arrives_exactly() -> None:
    app = memory_app()

    @app.task
    def echo(*args: Any, **kwargs: Any) -> Any:
        return [list(args), kwargs]

    values = [0, -1, 10**300, 1.5, -0.0, 1e308, True, None, "", "é\u2028🙂", [[], {}], {"a": [1]}]
    got = through_a_worker(app, echo, *values)
    assert same(got, [values, {}])


def test_a_return_value_that_would_come_back_changed_fails_the_task() -> None:
    app = memory_app()

    @app.task
    def as_set(items: list[int]):  # type: ignore[no-untyped-def]
        return set(items)

    result = as_set.delay([1, 2])
    run_until_empty(app, pool="threads", concurrency=1)
    with pytest.raises(TaskFailed) as info:
        result.get(timeout=5)
    assert info.value.type_name == "EncodeError"
    assert "the return value: a set would arrive as a list" in info.value.message
    assert result.state is State.FAILURE


def test_nan_returned_fails_the_task_instead_of_storing_null() -> None:
    app = memory_app()

    @app.task
    def nan():  # type: ignore[no-untyped-def]
        return float("nan")

    result = nan.delay()
    run_until_empty(app, pool="threads", concurrency=1)
    with pytest.raises(TaskFailed, match="nan has no JSON form"):
        result.get(timeout=5)


# annotated values: converted by the annotation, on both sides


def test_annotated_arguments_and_results_arrive_as_their_types() -> None:
    app = memory_app()
    seen: list[Any] = []

    @app.task
    def keep(
        everything: Everything,
        when: dt.datetime,
        raw: bytes,
        tags: frozenset[int],
        by_id: dict[int, list[dt.date]],
        *more: uuid.UUID,
        **named: decimal.Decimal,
    ) -> Everything:
        seen.append((everything, when, raw, tags, by_id, more, named))
        return everything

    args = (
        EVERYTHING,
        EVERYTHING.when,
        b"x",
        frozenset({1, 2}),
        {3: [dt.date(2026, 1, 1)]},
        uuid.UUID(int=1),
        uuid.UUID(int=2),
    )
    named = {"price": decimal.Decimal("9.99")}
    result = keep.delay(*args, **named)
    run_until_empty(app, pool="threads", concurrency=1)
    got = result.get(timeout=5)
    assert same(got, EVERYTHING) and type(got.customer) is Customer
    [(everything, when, raw, tags, by_id, more, received)] = seen
    assert same(everything, EVERYTHING)
    assert same(when, EVERYTHING.when) and when.utcoffset() == dt.timedelta(hours=2)
    assert same(raw, b"x") and same(tags, frozenset({1, 2}))
    assert same(by_id, {3: [dt.date(2026, 1, 1)]})
    assert same(more, (uuid.UUID(int=1), uuid.UUID(int=2)))
    assert same(received, named)


def test_an_argument_that_does_not_fit_its_annotation_is_refused_at_the_sender() -> None:
    app = memory_app()

    @app.task
    def at(when: dt.datetime, count: int) -> None:
        return None

    with pytest.raises(ArgumentError, match=r"argument 'count' does not fit its annotation int"):
        at.delay(dt.datetime(2026, 1, 1), "5")  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match="argument 'when' does not fit its annotation datetime"):
        at.delay("not a time", 5)  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match="count"):
        at.delay(dt.datetime(2026, 1, 1), True)
    assert [s.ready for s in app.broker.stats()] in ([], [0])


def test_an_annotated_container_of_anything_keeps_its_items_plain() -> None:
    app = memory_app()

    @app.task
    def store(items: list[Any]) -> None:
        return None

    with pytest.raises(EncodeError, match="would arrive changed"):
        store.delay([{1, 2}])
    store.delay([1, "a", {"k": [None]}])


def test_a_message_whose_arguments_do_not_fit_is_dead_lettered_with_the_reason() -> None:
    """Sent by something else (another sender, an older version): the worker refuses it."""
    app = memory_app()
    ran: list[Any] = []

    @app.task
    def at(when: dt.datetime) -> None:
        ran.append(when)

    envelope = msgspec.structs.replace(at.envelope((dt.datetime(2026, 1, 1),)), args=("soon",))
    app.send([envelope])
    stats = run_until_empty(app, pool="threads", concurrency=1)
    assert ran == [] and stats.dead_lettered == 1
    [letter] = app.broker.dead_letters(app.settings.default_queue)
    assert letter.reason.startswith(
        "bad arguments: they do not fit task test_values.test_a_message_whose_arguments_do_not_"
    )
    assert "argument 'when' does not fit its annotation datetime" in letter.reason


def test_annotations_that_do_not_resolve_count_as_none() -> None:
    """A name imported only for type checkers: its parameter is taken as plain JSON."""
    app = memory_app()

    @app.task
    def later(path: NotImportedHere, n: int) -> int:  # type: ignore[name-defined]  # noqa: F821
        return n

    assert through_a_worker(app, later, "a/b", 2) == 2
    with pytest.raises(EncodeError, match="argument 'path'"):
        later.delay(b"a/b", 2)


# property: exactly, or refused; never a third outcome


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(JSONISH, min_size=1, max_size=8))
def test_every_value_arrives_exactly_or_is_refused(values: list[Any]) -> None:
    app = memory_app()

    @app.task
    def echo(x):  # type: ignore[no-untyped-def]
        return x

    sent = []
    for value in values:
        try:
            sent.append((value, echo.delay(value)))
        except EncodeError:
            continue
    run_until_empty(app, pool="threads", concurrency=2)
    for value, result in sent:
        got = result.get(timeout=5)
        assert same(got, value), (value, got)
    app.close()


ANNOTATED = st.one_of(
    st.tuples(st.just(dt.datetime), st.datetimes(timezones=st.just(UTC)) | st.datetimes()),
    st.tuples(st.just(bytes), st.binary()),
    st.tuples(st.just(set[int]), st.sets(st.integers())),
    st.tuples(st.just(tuple[int, str]), st.tuples(st.integers(), st.text())),
    st.tuples(st.just(dict[int, float]), st.dictionaries(st.integers(), st.floats())),
    st.tuples(st.just(decimal.Decimal), st.decimals()),
    st.tuples(st.just(list[uuid.UUID]), st.lists(st.uuids(), max_size=3)),
    st.tuples(st.just(float), st.floats() | st.integers(-(2**53), 2**53)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ANNOTATED)
def test_every_annotated_value_arrives_as_its_type_or_is_refused(case: tuple[Any, Any]) -> None:
    kind, value = case
    app = memory_app()

    def echo(x: Any) -> Any:
        return x

    echo.__annotations__ = {"x": kind, "return": kind}
    task = app.task(echo)
    try:
        result = task.delay(value)
    except (EncodeError, ArgumentError):
        return
    run_until_empty(app, pool="threads", concurrency=1)
    got = result.get(timeout=5)
    expected = msgspec.convert(value, kind) if kind is float else value
    assert type(got) is type(expected) and got == expected
    app.close()


def test_the_values_examples_of_getting_started_run_as_written() -> None:
    """The two examples of docs/getting-started.md's section on values, on a memory app."""
    page = (Path(__file__).parents[2] / "docs" / "getting-started.md").read_text()
    section = page.split("## Values arrive exactly, or not at all", 1)[1].split("\n## ", 1)[0]
    refused, booking = re.findall(r"```python\n(.*?)```", section, re.S)
    app = memory_app()
    module = types.ModuleType("values_example")  # dataclasses need a module of their own
    module.app = app  # type: ignore[attr-defined]
    module.run_worker = lambda: run_until_empty(app, pool="threads", concurrency=1)  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    try:
        with pytest.raises(EncodeError, match="argument 'x': a tuple would arrive as a list"):
            exec(refused, module.__dict__)
        sending, getting = booking.split("booking, count = ")
        exec(sending + "run_worker()\nbooking, count = " + getting, module.__dict__)
    finally:
        del sys.modules[module.__name__]
    booked = module.booking  # type: ignore[attr-defined]
    assert type(booked).__name__ == "Booking" and module.count == 1  # type: ignore[attr-defined]
    assert isinstance(booked.start, dt.datetime)


# checking a call without Signature.bind (which costs microseconds per message)


def _shapes() -> list[Any]:
    def plain(a, b, c=3): ...  # type: ignore[no-untyped-def]
    def only(a, /, b, *, c, d=4): ...  # type: ignore[no-untyped-def]
    def star(a, *rest, k=1, **more): ...  # type: ignore[no-untyped-def]
    def none(): ...  # type: ignore[no-untyped-def]
    def keywords(*, x, y=2): ...  # type: ignore[no-untyped-def]

    return [plain, only, star, none, keywords]


@settings(max_examples=400, deadline=None)
@given(
    fn=st.sampled_from(_shapes()),
    args=st.lists(st.integers(), max_size=5),
    names=st.sets(st.sampled_from(["a", "b", "c", "d", "k", "x", "y", "rest", "more", "z"])),
)
def test_the_fast_fit_check_agrees_with_signature_bind(
    fn: Any, args: list[int], names: set[str]
) -> None:
    signature = inspect.signature(fn)
    shape = Types(fn, signature).shape
    kwargs = {name: n for n, name in enumerate(sorted(names))}
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        assert not shape.fits(args, kwargs)
        return
    assert shape.fits(args, kwargs)
    for name, value in bound.arguments.items():
        assert shape.value(name, args, kwargs) == value
