"""`@app.task`: options checked when decorating; inline calls; sends build the right envelopes."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor import Conveyor, Result, Task
from conveyor.brokers import Outgoing
from conveyor.brokers.memory import MemoryBroker
from conveyor.errors import ArgumentError, ConfigurationError, EncodeError
from conveyor.message import Envelope, decode
from conveyor.task import TaskOptions
from conveyor.testing import memory_app


def add(x: int, y: int) -> int:
    """A module-level task function: its default name is `<module>.add`."""
    return x + y


class Namespace:
    @staticmethod
    def nested(x: int) -> int:
        return x


def pair(x: Any, y: Any) -> Any:
    """Takes anything: its arguments must be plain JSON."""
    return [x, y]


def sent(app: Conveyor, queue: str = "default", limit: int = 100) -> list[Envelope]:
    """Decode everything ready on a queue (leasing it, which is fine in these tests)."""
    return [decode(d.body) for d in app.broker.fetch([queue], limit)]


def totals(app: Conveyor) -> int:
    return sum(s.ready + s.delayed + s.in_flight + s.dead for s in app.broker.stats())


@pytest.fixture
def memory_broker(app: Conveyor) -> MemoryBroker:
    broker = app.broker
    assert isinstance(broker, MemoryBroker)
    return broker


# options


def test_defaults_without_options(app: Conveyor) -> None:
    task = app.task(add)
    assert isinstance(task, Task)
    assert task.options == TaskOptions()
    assert task.autoretry_for == ()
    assert task.queue == "default"
    assert task.max_retries == app.settings.default_max_retries == 3


def test_every_option_is_accepted_and_kept(app: Conveyor) -> None:
    options: dict[str, Any] = {
        "name": "shop.resize",
        "queue": "images",
        "priority": 5,
        "max_retries": 7,
        "retry_backoff": 2.5,
        "retry_backoff_max": 30.0,
        "retry_jitter": False,
        "acks_late": False,
        "time_limit": 60.0,
        "soft_time_limit": 50.0,
        "ignore_result": True,
        "result_expires": 600.0,
        "bind": True,
    }
    # Every TaskOptions field is covered here, so a new option cannot go untested.
    assert set(options) == set(TaskOptions.__struct_fields__)

    @app.task(**options, autoretry_for=(ConnectionError, TimeoutError))
    def resize(self: Task[..., Any], path: str) -> str:
        return path

    for key, value in options.items():
        assert getattr(resize.options, key) == value, key
    assert resize.autoretry_for == (ConnectionError, TimeoutError)
    assert resize.name == "shop.resize"
    assert app.tasks["shop.resize"] is resize
    assert resize.queue == "images"
    assert resize.max_retries == 7


def test_retry_backoff_true_is_kept_as_a_bool(app: Conveyor) -> None:
    task = app.task(retry_backoff=True)(add)
    assert task.options.retry_backoff is True


def test_single_exception_class_for_autoretry_for_becomes_a_tuple(app: Conveyor) -> None:
    task = app.task(autoretry_for=ValueError)(add)
    assert task.autoretry_for == (ValueError,)


@pytest.mark.parametrize(
    ("typo", "meant"),
    [
        ("retyr_backoff", "retry_backoff"),
        ("max_retry", "max_retries"),
        ("que", "queue"),
        ("autoretry_fr", "autoretry_for"),
        ("acks_lat", "acks_late"),
        ("ignore_results", "ignore_result"),
    ],
)
def test_unknown_option_is_rejected_at_decoration_with_a_hint(
    app: Conveyor, typo: str, meant: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        app.task(**{typo: 1})
    assert f"unknown task option {typo!r}" in str(info.value)
    assert f"did you mean {meant!r}" in str(info.value)
    assert app.tasks == {}


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("name", ""),
        ("name", 5),
        ("queue", ""),
        ("queue", ["a"]),
        ("priority", 10),
        ("priority", -1),
        ("priority", "high"),
        ("priority", True),
        ("max_retries", -1),
        ("max_retries", 1.5),
        ("retry_backoff", "yes"),
        ("retry_backoff", 0),
        ("retry_backoff", -1.0),
        ("retry_backoff_max", 0),
        ("retry_jitter", "no"),
        ("acks_late", 1),
        ("time_limit", 0),
        ("time_limit", "60"),
        ("soft_time_limit", -5),
        ("ignore_result", None),
        ("bind", "yes"),
        ("autoretry_for", [ValueError]),
        ("autoretry_for", "ValueError"),
        ("autoretry_for", (ValueError, int)),
        ("autoretry_for", ValueError("an instance")),
    ],
)
def test_ill_typed_option_is_rejected_at_decoration(
    app: Conveyor, option: str, value: object
) -> None:
    with pytest.raises(ConfigurationError) as info:
        app.task(**{option: value})
    assert option in str(info.value)


@pytest.mark.parametrize(("soft", "hard"), [(60.0, 60.0), (61.0, 60.0), (100.0, 1.0)])
def test_soft_time_limit_must_be_below_time_limit(app: Conveyor, soft: float, hard: float) -> None:
    with pytest.raises(ConfigurationError, match="soft_time_limit"):
        app.task(soft_time_limit=soft, time_limit=hard)


def test_soft_time_limit_below_time_limit_is_fine(app: Conveyor) -> None:
    task = app.task(soft_time_limit=59.5, time_limit=60)(add)
    assert (task.options.soft_time_limit, task.options.time_limit) == (59.5, 60.0)


def test_bind_needs_a_self_parameter(app: Conveyor) -> None:
    def no_args() -> None:
        pass

    with pytest.raises(ConfigurationError, match="bind=True"):
        app.task(bind=True)(no_args)


# names


def test_default_name_is_module_and_qualname(app: Conveyor) -> None:
    assert app.task(add).name == f"{add.__module__}.add"
    assert app.task(Namespace.nested).name == f"{add.__module__}.Namespace.nested"

    def local(x: int) -> int:
        return x

    task = app.task(local)
    assert task.name == f"{__name__}.test_default_name_is_module_and_qualname.<locals>.local"
    assert app.get_task(task.name) is task


def test_duplicate_names_are_rejected(app: Conveyor) -> None:
    @app.task(name="dup")
    def first() -> int:
        return 1

    def second() -> int:
        return 2

    with pytest.raises(ConfigurationError, match="'dup'"):
        app.task(name="dup")(second)
    assert app.tasks["dup"] is first


def test_same_default_name_from_two_functions_is_rejected(app: Conveyor) -> None:
    app.task(add)
    impostor = Namespace.nested
    with pytest.raises(ConfigurationError):
        app.task(name=f"{add.__module__}.add")(impostor)


def test_registering_the_same_function_twice_is_harmless(app: Conveyor) -> None:
    first = app.task(add)
    again = app.task(add)
    assert again.name == first.name and app.tasks[first.name] is again


def test_apps_have_separate_registries() -> None:
    one, two = memory_app("one"), memory_app("two")
    one.task(add)
    two.task(add)  # the same name on another app is not a duplicate
    assert list(one.tasks) == list(two.tasks)


# inline calls


def test_inline_call_runs_the_function_and_sends_nothing(app: Conveyor) -> None:
    calls: list[tuple[int, int]] = []

    @app.task
    def record(x: int, y: int = 10) -> int:
        calls.append((x, y))
        return x * y

    assert record(3) == 30
    assert record(2, y=4) == 8
    assert calls == [(3, 10), (2, 4)]
    assert totals(app) == 0


def test_inline_call_propagates_exceptions(app: Conveyor) -> None:
    @app.task
    def boom() -> None:
        raise KeyError("inline")

    with pytest.raises(KeyError, match="inline"):
        boom()


def test_inline_call_with_bind_passes_the_task_first(app: Conveyor) -> None:
    seen: list[Any] = []

    @app.task(bind=True)
    def bound(self: Task[..., Any], x: int) -> int:
        seen.append((self, self.request.inline, self.request.args, self.request.task))
        return x + 1

    assert bound(41) == 42
    assert seen == [(bound, True, (41,), bound.name)]


def test_request_outside_a_run_is_an_error(app: Conveyor) -> None:
    task = app.task(bind=True)(lambda self: None)
    with pytest.raises(RuntimeError, match="not running"):
        _ = task.request


# sending


def test_delay_sends_one_envelope(app: Conveyor) -> None:
    task = app.task(add)
    before = time.time()
    result = task.delay(2, y=3)
    assert isinstance(result, Result)
    assert result.task == task.name
    [stats] = app.broker.stats()
    assert (stats.queue, stats.ready, stats.delayed, stats.in_flight) == ("default", 1, 0, 0)
    [env] = sent(app)
    assert env.id == result.id
    assert env.task == task.name
    assert env.args == (2,) and env.kwargs == {"y": 3}
    assert env.queue == "default"
    assert env.priority == 0
    assert env.eta is None and env.expires is None
    assert env.retries == 0 and env.max_retries is None
    assert env.root_id is None and env.parent_id is None
    assert before <= env.sent_at <= time.time()


def test_each_send_gets_a_new_id(app: Conveyor) -> None:
    task = app.task(add)
    ids = {task.delay(1, 2).id for _ in range(20)}
    assert len(ids) == 20


def test_apply_async_with_countdown_is_held_by_the_broker(
    app: Conveyor, memory_broker: MemoryBroker
) -> None:
    task = app.task(add)
    now = time.time()
    memory_broker.clock = lambda: now
    result = task.apply_async((1, 2), countdown=30)
    [stats] = app.broker.stats()
    assert (stats.ready, stats.delayed) == (0, 1)
    assert app.broker.fetch(["default"], 10) == []
    memory_broker.clock = lambda: now + 31
    [env] = sent(app)
    assert env.id == result.id
    assert env.eta is not None and now + 29 <= env.eta <= now + 31


def test_zero_or_negative_countdown_is_not_a_delay(app: Conveyor) -> None:
    task = app.task(add)
    task.apply_async((1, 2), countdown=0)
    task.apply_async((1, 2), countdown=-5)
    envs = sent(app)
    assert [e.eta for e in envs] == [None, None]


def test_apply_async_with_eta_datetime(app: Conveyor, memory_broker: MemoryBroker) -> None:
    task = app.task(add)
    eta = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
    task.apply_async((1, 2), eta=eta)
    assert app.broker.fetch(["default"], 10) == []
    memory_broker.clock = lambda: eta.timestamp() + 1
    [env] = sent(app)
    assert env.eta == pytest.approx(eta.timestamp())


def test_countdown_and_eta_together_are_rejected(app: Conveyor) -> None:
    task = app.task(add)
    with pytest.raises(ConfigurationError, match="countdown or eta"):
        task.apply_async((1, 2), countdown=5, eta=dt.datetime.now(dt.UTC))
    assert totals(app) == 0


def test_apply_async_expires_in_seconds_or_datetime(app: Conveyor) -> None:
    task = app.task(add)
    now = time.time()
    task.apply_async((1, 2), expires=60)
    at = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    task.apply_async((1, 2), expires=at)
    first, second = sent(app)
    assert first.expires is not None and now + 59 <= first.expires <= time.time() + 60
    assert second.expires == pytest.approx(at.timestamp())


def test_apply_async_priority_is_on_the_envelope_and_orders_delivery(app: Conveyor) -> None:
    task = app.task(add)
    low = task.apply_async((1, 1), priority=1)
    high = task.apply_async((2, 2), priority=8)
    envs = sent(app)
    assert [(e.id, e.priority) for e in envs] == [(high.id, 8), (low.id, 1)]


def test_task_priority_option_is_the_default_and_a_send_overrides_it(app: Conveyor) -> None:
    task = app.task(priority=6)(add)
    task.delay(1, 1)
    task.apply_async((1, 1), priority=0)
    assert sorted(e.priority for e in sent(app)) == [0, 6]


def test_queue_option_and_send_queue(app: Conveyor) -> None:
    task = app.task(queue="images")(add)
    task.delay(1, 1)
    task.apply_async((2, 2), queue="urgent")
    by_queue = {s.queue: s.ready for s in app.broker.stats()}
    assert by_queue == {"images": 1, "urgent": 1}
    assert [e.queue for e in sent(app, "urgent")] == ["urgent"]
    assert [e.args for e in sent(app, "images")] == [(1, 1)]


def test_default_queue_setting_is_used(app: Conveyor) -> None:
    other = memory_app(default_queue="elsewhere")
    task = other.task(add)
    task.delay(1, 2)
    assert [s.queue for s in other.broker.stats()] == ["elsewhere"]


def test_apply_async_task_id_headers_idempotency_key_max_retries(app: Conveyor) -> None:
    task = app.task(add)
    result = task.apply_async(
        (1, 2),
        task_id="my-id",
        headers={"trace": "t1"},
        idempotency_key="order-7",
        max_retries=9,
    )
    assert result.id == "my-id"
    [env] = sent(app)
    assert (env.id, env.headers, env.idempotency_key, env.max_retries) == (
        "my-id",
        {"trace": "t1"},
        "order-7",
        9,
    )


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((1,), {}),
        ((1, 2, 3), {}),
        ((1,), {"z": 2}),
        ((1, 2), {"x": 1}),
        ((), {}),
    ],
)
def test_arguments_that_do_not_fit_raise_before_sending(
    app: Conveyor, args: Sequence[Any], kwargs: dict[str, Any]
) -> None:
    task = app.task(add)
    with pytest.raises(ArgumentError) as info:
        task.apply_async(args, kwargs)
    assert isinstance(info.value, TypeError)
    assert task.name in str(info.value)
    with pytest.raises(ArgumentError):
        task.delay(*args, **kwargs)
    assert totals(app) == 0


def test_bound_task_signature_skips_self(app: Conveyor) -> None:
    @app.task(bind=True)
    def bound(self: Task[..., Any], x: int) -> int:
        return x

    bound.delay(1)
    with pytest.raises(ArgumentError):
        bound.delay(1, 2)
    assert [e.args for e in sent(app)] == [(1,)]


@pytest.mark.parametrize(
    "value", [object(), {1, 2}.__iter__(), lambda: 1, Exception("x"), "\ud800"], ids=repr
)
def test_unencodable_arguments_raise_encode_error_and_send_nothing(
    app: Conveyor, value: object
) -> None:
    task = app.task(add)
    with pytest.raises(EncodeError, match="cannot be encoded"):
        task.delay(value, 1)  # type: ignore[arg-type]
    with pytest.raises(EncodeError):
        task.apply_async((1,), {"y": value})
    assert totals(app) == 0


def test_message_over_the_size_limit_is_an_encode_error() -> None:
    small = memory_app(max_message_size=1024)
    task = small.task(pair)
    task.delay("x" * 100, "y")
    with pytest.raises(EncodeError, match="1024-byte limit"):
        task.delay("x" * 2000, "y")
    assert [s.ready for s in small.broker.stats()] == [1]


@pytest.mark.parametrize(
    "options",
    [
        {"priority": 10},
        {"priority": -1},
        {"priority": True},
        {"queue": ""},
        {"queue": "q" * 256},
        {"task_id": "x" * 200},
        {"max_retries": -1},
        {"idempotency_key": "k" * 256},
        {"headers": {"h": 1}},
    ],
    ids=lambda options: next(iter(options)),
)
def test_invalid_send_options_are_rejected_before_sending(
    app: Conveyor, options: dict[str, Any]
) -> None:
    task = app.task(add)
    with pytest.raises(ConfigurationError) as info:
        task.apply_async((1, 2), **options)
    assert next(iter(options)) in str(info.value)
    assert totals(app) == 0


# Regression: out-of-range times were published (then dead-lettered by the worker), and
# inf/nan went out as null.
@pytest.mark.parametrize(
    "options",
    [
        {"countdown": 2e11},
        {"countdown": float("inf")},
        {"eta": dt.datetime(9999, 1, 1, tzinfo=dt.UTC)},
        {"expires": 1e12},
        {"expires": float("nan")},
        {"expires": dt.datetime(1960, 1, 1, tzinfo=dt.UTC)},
    ],
    ids=str,
)
def test_out_of_range_times_are_rejected_before_sending(
    app: Conveyor, options: dict[str, Any]
) -> None:
    task = app.task(add)
    with pytest.raises(ConfigurationError):
        task.apply_async((1, 2), **options)
    assert totals(app) == 0


# Regression: NaN and infinities were encoded as null, so the task silently received None.
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=str)
@pytest.mark.parametrize("where", ["arg", "kwarg", "nested"])
def test_non_finite_float_arguments_are_refused(app: Conveyor, value: float, where: str) -> None:
    task = app.task(pair)
    with pytest.raises(EncodeError, match=r"NaN|infinit"):
        if where == "arg":
            task.delay(value, 1)
        elif where == "kwarg":
            task.delay(1, y=value)
        else:
            task.delay({"a": [1.0, {"b": value}]}, 1)
    assert totals(app) == 0


def test_map_sends_everything_in_one_batch(
    app: Conveyor, memory_broker: MemoryBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = app.task(add)
    batches: list[list[Outgoing]] = []
    publish = memory_broker.publish

    def spy(messages: Sequence[Outgoing]) -> None:
        batches.append(list(messages))
        publish(messages)

    monkeypatch.setattr(memory_broker, "publish", spy)
    results = task.map([(1, 2), (3, 4), (5, 6)])
    assert len(batches) == 1 and len(batches[0]) == 3
    envs = sent(app)
    assert [e.args for e in envs] == [(1, 2), (3, 4), (5, 6)]
    assert [r.id for r in results] == [e.id for e in envs]
    assert len({r.id for r in results}) == 3


def test_map_with_one_bad_item_sends_nothing(app: Conveyor) -> None:
    task = app.task(add)
    with pytest.raises(ArgumentError):
        task.map([(1, 2), (3,)])
    with pytest.raises(EncodeError):
        task.map([(1, 2), (object(), 4)])
    assert totals(app) == 0


def test_map_of_nothing_sends_nothing(app: Conveyor) -> None:
    assert app.task(add).map([]) == []
    assert totals(app) == 0


def test_delay_async(app: Conveyor) -> None:
    task = app.task(add)

    async def produce() -> list[Result[int]]:
        return list(await asyncio.gather(*(task.delay_async(i, i) for i in range(5))))

    results = asyncio.run(produce())
    envs = sent(app)
    assert sorted(e.args for e in envs) == [(i, i) for i in range(5)]
    assert {r.id for r in results} == {e.id for e in envs}


def test_delay_async_checks_arguments_before_sending(app: Conveyor) -> None:
    task = app.task(add)
    with pytest.raises(ArgumentError):
        asyncio.run(task.delay_async(1))  # type: ignore[call-arg]
    assert totals(app) == 0


def test_ignore_result_task_gives_a_handle_without_a_store(app: Conveyor) -> None:
    task = app.task(ignore_result=True)(add)
    result = task.delay(1, 2)
    with pytest.raises(ConfigurationError, match="ignore_result"):
        _ = result.state


# retry delays


def backoff_task(app: Conveyor, **options: Any) -> Task[..., Any]:
    def flaky() -> None:
        pass

    return app.task(name=f"flaky-{len(app.tasks)}", **options)(flaky)


def test_no_backoff_means_no_delay(app: Conveyor) -> None:
    task = backoff_task(app)
    assert [task.retry_delay(n, None) for n in range(5)] == [0.0] * 5


def test_exponential_backoff_from_one_second(app: Conveyor) -> None:
    task = backoff_task(app, retry_backoff=True, retry_jitter=False)
    assert [task.retry_delay(n, None) for n in range(6)] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]


def test_exponential_backoff_from_a_given_base(app: Conveyor) -> None:
    task = backoff_task(app, retry_backoff=0.25, retry_jitter=False)
    assert [task.retry_delay(n, None) for n in range(4)] == [0.25, 0.5, 1.0, 2.0]


def test_backoff_is_capped_by_retry_backoff_max(app: Conveyor) -> None:
    task = backoff_task(app, retry_backoff=True, retry_jitter=False, retry_backoff_max=5)
    assert [task.retry_delay(n, None) for n in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert task.retry_delay(60, None) == 5.0


def test_backoff_cap_defaults_to_the_app_setting() -> None:
    app = memory_app(default_retry_backoff_max=10)
    task = backoff_task(app, retry_backoff=True, retry_jitter=False)
    assert task.retry_delay(3, None) == 8.0
    assert task.retry_delay(4, None) == 10.0
    assert task.retry_delay(50, None) == 10.0


@settings(max_examples=200, deadline=None)
@given(
    retries=st.integers(0, 60),
    base=st.floats(0.001, 100),
    cap=st.floats(0.001, 1000),
)
def test_jitter_stays_within_zero_and_the_capped_delay(
    retries: int, base: float, cap: float
) -> None:
    app = memory_app()
    task = backoff_task(app, retry_backoff=base, retry_backoff_max=cap)
    delay = task.retry_delay(retries, None)
    assert 0.0 <= delay <= min(cap, base * 2.0**retries)


def test_jitter_actually_varies(app: Conveyor) -> None:
    task = backoff_task(app, retry_backoff=True, retry_backoff_max=100)
    delays = {task.retry_delay(5, None) for _ in range(50)}
    assert len(delays) > 10
    assert all(0.0 <= d <= 32.0 for d in delays)


@pytest.mark.parametrize("retry_backoff", [False, True, 3.0])
def test_countdown_wins_over_backoff(app: Conveyor, retry_backoff: bool | float) -> None:
    task = backoff_task(app, retry_backoff=retry_backoff, retry_backoff_max=2)
    assert task.retry_delay(4, 7.5) == 7.5
    assert task.retry_delay(0, 0.0) == 0.0
    assert task.retry_delay(3, -1.0) == 0.0


# Regression: base * 2.0**retries overflowed (OverflowError) once retries reached 1024.
@pytest.mark.parametrize("retry_jitter", [False, True])
def test_backoff_with_very_many_retries_is_capped_not_an_overflow(
    app: Conveyor, retry_jitter: bool
) -> None:
    task = backoff_task(app, retry_backoff=True, retry_backoff_max=60, retry_jitter=retry_jitter)
    assert 0.0 <= task.retry_delay(1100, None) <= 60.0


def test_retry_builds_the_exception_to_raise(app: Conveyor) -> None:
    task = backoff_task(app)
    cause = ValueError("x")
    retry = task.retry(countdown=3, exc=cause, max_retries=4)
    assert (retry.countdown, retry.exc, retry.max_retries) == (3, cause, 4)
