"""Signals: the Signal object itself, and every signal sent from the right process in the
prefork, threads, asyncio and solo pools (through the built-in signal middleware)."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from middleware_cases import Scenario, note, read

from conveyor import Conveyor, State
from conveyor import signals as sig
from conveyor.middleware.signals import SignalDispatch, worker_hooks
from conveyor.signals import Signal
from conveyor.testing import memory_app, run_until_empty

POOLS = ["prefork", "threads", "asyncio", "solo"]


@pytest.fixture
def app() -> Iterator[Conveyor]:
    application = memory_app()
    yield application
    application.close()


@pytest.fixture
def connect() -> Iterator[Callable[..., None]]:
    """`connect(signal, receiver, sender=...)` for this test only."""
    with ExitStack() as stack:

        def add(signal: Signal, receiver: Callable[..., Any], **options: Any) -> None:
            stack.enter_context(signal.connected_to(receiver, **options))

        yield add
    assert not sig.connected(), "a test left a receiver connected"


# the Signal object


def test_connect_as_a_decorator_bare_or_with_a_sender() -> None:
    signal = Signal("something")
    calls: list[tuple[str, object, dict[str, Any]]] = []

    @signal.connect
    def anyone(sender: object, **kwargs: Any) -> str:
        calls.append(("anyone", sender, kwargs))
        return "a"

    @signal.connect(sender="only-me")
    def picky(sender: object, **kwargs: Any) -> str:
        calls.append(("picky", sender, kwargs))
        return "p"

    assert signal.receivers == [anyone, picky]
    answers = signal.send("someone", x=1)
    assert answers == [(anyone, "a")]
    assert calls == [("anyone", "someone", {"signal": signal, "x": 1})]
    assert [fn for fn, _ in signal.send("only-me")] == [anyone, picky]
    assert signal.disconnect(picky, sender="only-me")
    assert not signal.disconnect(picky, sender="only-me")
    signal.connect(anyone)  # connected twice is connected once
    assert signal.receivers == [anyone]


def test_a_sender_matches_by_identity_or_by_name() -> None:
    signal = Signal("named")

    class Named:
        name = "shop.resize"

    sender = Named()
    seen: list[object] = []
    signal.connect(lambda sender, **kw: seen.append(sender), sender="shop.resize")
    signal.send(sender)
    signal.send(object())
    assert seen == [sender]


def test_a_raising_receiver_is_logged_and_the_others_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    signal = Signal("fragile")
    reached: list[int] = []

    def broken(**kwargs: Any) -> None:
        raise RuntimeError("receiver bug")

    signal.connect(broken)
    signal.connect(lambda **kw: reached.append(1))
    with caplog.at_level(logging.ERROR, logger="conveyor.signals"):
        answers = signal.send(None)
    assert reached == [1] and len(answers) == 1
    (record,) = caplog.records
    assert "broken" in record.getMessage() and "fragile" in record.getMessage()


def test_a_receiver_must_be_callable() -> None:
    with pytest.raises(TypeError, match="callable"):
        Signal("x").connect(42)  # type: ignore[call-overload]


def test_without_receivers_the_worker_adds_no_signal_middleware(
    connect: Callable[..., None],
) -> None:
    assert not any(getattr(worker_hooks([]), name) for name in worker_hooks([]).__slots__)
    connect(sig.task_prerun, lambda **kw: None)
    hooks = worker_hooks([])
    assert [name for name, _ in hooks.before_run] == [SignalDispatch.__qualname__]


# every signal, from every pool


def record_all(connect: Callable[..., None], ledger: Path) -> None:
    """Connect a receiver to every signal that notes what it got."""

    def receiver_for(signal: Signal) -> Callable[..., None]:
        def receive(sender: Any, **kwargs: Any) -> None:
            request = kwargs.get("request")
            state = kwargs.get("state")
            note(
                ledger,
                signal.name,
                id=None if request is None else request.id,
                task=getattr(sender, "name", None),
                task_id=kwargs.get("task_id"),
                state=None if state is None else str(state),
                exception=type(kwargs["exception"]).__name__ if "exception" in kwargs else None,
                reason=type(kwargs["reason"]).__name__ if "reason" in kwargs else None,
                result=kwargs.get("result"),
            )

        return receive

    for signal in sig.SIGNALS:
        connect(signal, receiver_for(signal))


@pytest.mark.parametrize("pool", POOLS)
def test_every_signal_is_sent_from_its_process(
    app: Conveyor, pool: str, tmp_path: Path, connect: Callable[..., None]
) -> None:
    ledger = tmp_path / "signals.jsonl"
    record_all(connect, ledger)
    scenario = Scenario(app)
    ids = scenario.send()
    only_double = tmp_path / "double.jsonl"
    connect(
        sig.task_prerun,
        lambda sender, **kw: note(only_double, "double", id=kw["task_id"]),
        sender=scenario.tasks["double"],
    )
    stats = run_until_empty(app, pool=pool)
    assert (stats.succeeded, stats.failed, stats.retried) == (3, 1, 1)
    notes = read(ledger)
    names = {v: k for k, v in ids.items()}
    counts = Counter(n["hook"] for n in notes)
    assert counts["worker_ready"] == counts["worker_shutdown"] == 1
    assert counts["worker_process_init"] >= 1
    for name in ("task_received", "task_prerun", "task_postrun"):
        assert counts[name] == 5, name
    assert (counts["task_success"], counts["task_failure"], counts["task_retry"]) == (3, 1, 1)
    here = os.getpid()
    by = {n["hook"]: n for n in notes}
    runner = {n["pid"] for n in notes if n["hook"] in ("task_prerun", "task_postrun")}
    assert {n["pid"] for n in notes if n["hook"] == "task_received"} == {here}
    assert by["worker_ready"]["pid"] == by["worker_shutdown"]["pid"] == here
    assert (here not in runner) if pool == "prefork" else runner == {here}
    failure = by["task_failure"]
    assert (names[failure["task_id"]], failure["exception"]) == ("boom", "ValueError")
    retry = by["task_retry"]
    assert (names[retry["id"]], retry["reason"]) == ("flaky", "ConnectionError")
    postrun = Counter(
        (names[n["task_id"]], n["state"]) for n in notes if n["hook"] == "task_postrun"
    )
    assert postrun == Counter(
        {
            ("double", State.SUCCESS): 1,
            ("boom", State.FAILURE): 1,
            ("flaky", State.RETRY): 1,
            ("flaky", State.SUCCESS): 1,
            ("echo", State.SUCCESS): 1,
        }
    )
    assert sorted(str(n["result"]) for n in notes if n["hook"] == "task_success") == [
        "42",
        "done",
        "hi",
    ]
    assert [n["id"] for n in read(only_double)] == [ids["double"]]


@pytest.mark.parametrize("pool", POOLS)
def test_a_raising_receiver_loses_no_task(
    app: Conveyor, pool: str, connect: Callable[..., None]
) -> None:
    def broken(**kwargs: Any) -> None:
        raise RuntimeError("receiver bug")

    for signal in sig.SIGNALS:
        connect(signal, broken)
    scenario = Scenario(app)
    ids = scenario.send()
    stats = run_until_empty(app, pool=pool)
    assert (stats.succeeded, stats.failed, stats.retried, stats.rejected) == (3, 1, 1, 0)
    assert app.result(ids["double"]).get(timeout=1) == 42


def test_celery_style_receiver_signature(app: Conveyor, connect: Callable[..., None]) -> None:
    seen: list[tuple[str, tuple[Any, ...]]] = []

    def before(
        sender: Any = None,
        task_id: Any = None,
        task: Any = None,
        args: Any = None,
        kwargs: Any = None,
        **extra: Any,
    ) -> None:
        seen.append((task_id, args))

    connect(sig.task_prerun, before)

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    result = add.delay(1, 2)
    run_until_empty(app)
    assert seen == [(result.id, (1, 2))]
