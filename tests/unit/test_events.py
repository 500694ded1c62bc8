"""Events and inspection on the memory broker: every task event where it is produced, the bound
of the worker's buffer, events off unless enabled or asked for, inspection of live and silent
workers, and malformed control and event messages."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import run_bounded, start_worker, wait_for

from conveyor import Conveyor, Worker
from conveyor.brokers import Delivery
from conveyor.brokers.broadcast import MemoryBroadcast
from conveyor.control import EventReader, TaskEvent, WorkerEvent, inspect
from conveyor.control import beacon as beacon_module
from conveyor.control import client as client_module
from conveyor.control import events as events_module
from conveyor.control.events import TaskEvents, decode_batch, encode_batch
from conveyor.control.protocol import (
    EventsOn,
    control_channel,
    decode_request,
    encode,
    events_channel,
)
from conveyor.errors import TaskSkipped
from conveyor.middleware import Middleware
from conveyor.worker.verdict import Verdict


def collect(
    reader: EventReader, until: Callable[[list[Any]], bool], timeout: float = 10
) -> list[Any]:
    """Events read until `until(events)` holds; fails at the deadline."""
    seen: list[Any] = []

    def done() -> bool:
        seen.extend(reader.read(0.05))
        return until(seen)

    wait_for(done, timeout, "the expected events")
    return seen


def task_events(events: list[Any]) -> list[TaskEvent]:
    return [e for e in events if isinstance(e, TaskEvent)]


@pytest.fixture
def running(app: Conveyor) -> Iterator[Callable[..., Worker]]:
    """`running(**options)`: a worker on a thread, stopped (cold) after the test."""
    workers: list[tuple[Worker, threading.Thread]] = []

    def start(**options: Any) -> Worker:
        options.setdefault("pool", "threads")
        options.setdefault("concurrency", 2)
        options.setdefault("shutdown_grace", 0)
        worker = Worker(app, **options)
        thread, _ = start_worker(worker)
        assert worker.started.wait(10)
        workers.append((worker, thread))
        return worker

    yield start
    for worker, thread in workers:
        if thread.is_alive():
            worker.stop()
            worker.stop()
        thread.join(15)


def test_every_task_event_a_worker_produces(app: Conveyor) -> None:
    class Skip(Middleware):
        def before_admit(self, task: Any, request: Any) -> None:
            if task.name.endswith("skipped"):
                raise TaskSkipped("not today")

    app.add_middleware(Skip())

    @app.task
    def ok(x: int) -> int:
        return x

    @app.task
    def boom() -> None:
        raise ValueError("boom")

    @app.task(max_retries=1, retry_backoff=False, autoretry_for=(KeyError,))
    def flaky() -> None:
        raise KeyError("again")

    @app.task
    def skipped() -> None: ...

    ids = {
        "ok": ok.delay(1).id,
        "boom": boom.delay().id,
        "flaky": flaky.delay().id,
        "skipped": skipped.delay().id,
        "expired": ok.apply_async(
            (2,), expires=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
        ).id,
    }
    expected = {"task-succeeded", "task-failed", "task-dead-lettered", "task-skipped"}
    expected.add("task-expired")
    with EventReader(app, request=False) as reader:
        run_bounded(app, events=True, timeout=15)
        # The worker published everything before it stopped.
        seen = collect(reader, lambda e: expected <= {x.type for x in e})
    events = task_events(seen)
    kinds = {(e.type, e.id) for e in events}
    assert ("task-received", ids["ok"]) in kinds
    assert ("task-started", ids["ok"]) in kinds
    assert ("task-succeeded", ids["ok"]) in kinds
    assert ("task-failed", ids["boom"]) in kinds
    assert ("task-retried", ids["flaky"]) in kinds
    assert ("task-dead-lettered", ids["flaky"]) in kinds
    assert ("task-skipped", ids["skipped"]) in kinds
    assert ("task-expired", ids["expired"]) in kinds
    assert ("task-started", ids["skipped"]) not in kinds
    failed = next(e for e in events if e.type == "task-failed")
    assert (failed.error_type, failed.error_message, failed.task) == (
        "ValueError",
        "boom",
        boom.name,
    )
    assert failed.runtime is not None and failed.runtime >= 0
    dead = next(e for e in events if e.type == "task-dead-lettered")
    assert dead.reason is not None and "retries" in dead.reason
    assert dead.retries == 1
    succeeded = next(e for e in events if e.type == "task-succeeded")
    assert succeeded.queue == "default" and succeeded.worker


def test_an_undecodable_message_is_received_and_dead_lettered(app: Conveyor) -> None:
    from conveyor.brokers import Outgoing

    app.broker.publish([Outgoing("default", b"not an envelope")])
    with EventReader(app, request=False) as reader:
        run_bounded(app, events=True)
        seen = collect(reader, lambda e: any(x.type == "task-dead-lettered" for x in e))
    [received] = [e for e in task_events(seen) if e.type == "task-received"]
    [dead] = [e for e in task_events(seen) if e.type == "task-dead-lettered"]
    assert received.id is None and dead.id is None
    assert dead.reason is not None and "malformed JSON" in dead.reason


def test_revoked_is_an_event_of_its_own() -> None:
    # The outcome a revoked task settles with maps to its own event type.
    events = TaskEvents("w:1")
    delivery = Delivery("default", b"", None)
    events.settled(delivery, Verdict(("revoked",), "revoked", ack=True), None, None)
    [event] = decode_batch(encode_batch(events.take(10)))
    assert isinstance(event, TaskEvent)
    assert (event.type, event.worker, event.queue) == ("task-revoked", "w:1", "default")


def test_heartbeats_say_what_the_worker_is(app: Conveyor, running: Callable[..., Worker]) -> None:
    with EventReader(app, request=False) as reader:
        running(events=True, concurrency=3)
        seen = collect(reader, lambda e: any(x.type == "worker-heartbeat" for x in e))
    beat = next(e for e in seen if e.type == "worker-heartbeat")
    assert isinstance(beat, WorkerEvent)
    assert (beat.app, beat.pool, beat.concurrency, beat.events) == (app.name, "threads", 3, True)
    assert beat.pid > 0 and beat.hostname and beat.interval == beacon_module.HEARTBEAT_S
    assert len(beat.load) == 3


def test_nothing_is_published_unless_enabled_or_asked(
    app: Conveyor, running: Callable[..., Worker]
) -> None:
    @app.task
    def ok() -> None: ...

    broadcast = app.broker.broadcast()
    with broadcast.listen(events_channel(app.name)) as listener:
        worker = running()
        for _ in range(20):
            ok.delay()
        wait_for(lambda: worker.stats.succeeded == 20, what="20 tasks done")
        # Past a heartbeat's interval: a worker with events off publishes not even those.
        assert listener.read(beacon_module.HEARTBEAT_S + 0.5) == []
    assert worker._consumer is not None and not worker._consumer.events.on
    assert len(worker._consumer.events) == 0


def test_a_reader_turns_events_on_and_they_stop_after_it_goes(
    app: Conveyor, running: Callable[..., Worker], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "EVENTS_ON_S", 0.5)
    monkeypatch.setattr(client_module, "RENEW_S", 0.2)

    @app.task
    def ok() -> None: ...

    worker = running()
    consumer = worker._consumer
    assert consumer is not None and not consumer.events.on
    with EventReader(app) as reader:
        wait_for(lambda: consumer.events.on, what="events on")
        ok.delay()
        collect(reader, lambda e: any(x.type == "task-succeeded" for x in e))
        assert consumer.events.on  # the renewals keep it on while the reader is open
    wait_for(lambda: not consumer.events.on, 5, "events off after the reader left")


def test_a_full_buffer_drops_new_events_and_counts_them(
    app: Conveyor, running: Callable[..., Worker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker that cannot take events (publish blocks): the worker holds at most the buffer's
    limit and counts the rest as dropped, and its tasks run on."""
    monkeypatch.setattr(events_module, "BUFFER_LIMIT", 50)
    stalled = threading.Event()
    released = threading.Event()
    publish = MemoryBroadcast.publish

    def stuck(self: MemoryBroadcast, channel: str, bodies: Any) -> None:
        if channel.startswith("events."):
            stalled.set()
            released.wait(30)
        publish(self, channel, bodies)

    monkeypatch.setattr(MemoryBroadcast, "publish", stuck)

    @app.task
    def ok() -> None: ...

    worker = running(events=True)
    consumer = worker._consumer
    assert consumer is not None
    ok.delay()
    assert stalled.wait(10)
    for _ in range(200):
        ok.delay()
    wait_for(lambda: worker.stats.succeeded == 201, what="every task done")
    try:
        assert len(consumer.events) == 50
        assert consumer.events.dropped >= 200 * 3 - 50
    finally:
        released.set()
    wait_for(lambda: len(consumer.events) == 0, what="the buffer drained")


def test_inspect_two_live_workers_and_a_silent_one(
    app: Conveyor, running: Callable[..., Worker]
) -> None:
    gate = threading.Event()

    @app.task
    def hold() -> None:
        gate.wait(10)

    first, second = running(), running(concurrency=1)
    task_id = hold.delay().id
    wait_for(lambda: first.stats.received + second.stats.received == 1, what="the task started")
    ghost = WorkerEvent(
        type="worker-heartbeat",
        time=time.time() - 3,
        worker="ghost:1",
        hostname="ghost",
        pid=1,
        app=app.name,
        pool="prefork",
        concurrency=1,
    )
    app.broker.broadcast().register(app.name, "ghost:1", encode(ghost), 10)
    try:
        result = inspect(app, timeout=1.0)
    finally:
        gate.set()
    assert len(result.reports) == 2
    assert [(s.worker, s.pid) for s in result.silent] == [("ghost:1", 1)]
    assert sorted(r.concurrency for r in result.reports) == [1, 2]
    [active] = [t for r in result.reports for t in r.active]
    assert (active.id, active.task) == (task_id, hold.name)
    for report in result.reports:
        assert report.registered == [hold.name]
        assert report.app == app.name and report.broker == "memory://"
        assert report.stats["received"] in (0, 1)
    assert len({r.worker for r in result.reports}) == 2


def test_a_worker_that_stops_leaves_the_roster(
    app: Conveyor, running: Callable[..., Worker]
) -> None:
    worker = running()
    wait_for(lambda: app.broker.broadcast().members(app.name), what="the worker registered")
    worker.stop()
    wait_for(lambda: not app.broker.broadcast().members(app.name), what="the worker gone")
    assert inspect(app, timeout=0.2).silent == []


def test_malformed_control_messages_are_dropped_and_the_worker_answers(
    app: Conveyor, running: Callable[..., Worker], caplog: pytest.LogCaptureFixture
) -> None:
    worker = running()
    broadcast = app.broker.broadcast()
    wait_for(lambda: broadcast.members(app.name), what="the worker registered")
    bad = [
        b"not json",
        b'{"type": "reboot"}',
        b'{"type": "events", "seconds": -1}',
        b'{"type": "inspect", "id": "x"}',
        b"[1, 2, 3]",
        b"x" * 70_000,
    ]
    with caplog.at_level(logging.WARNING, logger="conveyor.events"):
        broadcast.publish(control_channel(app.name), bad)
        result = inspect(app, timeout=2.0)
    assert [r.worker for r in result.reports] == [worker_id(app)]
    dropped = [r for r in caplog.records if "malformed control message" in r.getMessage()]
    assert len(dropped) == len(bad)
    assert worker.failure is None


def worker_id(app: Conveyor) -> str:
    [body] = app.broker.broadcast().members(app.name)
    [beat] = decode_batch(b"[" + body + b"]")
    return beat.worker


def test_malformed_event_messages_are_dropped_by_the_reader(
    app: Conveyor, caplog: pytest.LogCaptureFixture
) -> None:
    broadcast = app.broker.broadcast()
    good = encode_batch([("task-received", 1.0, "w:1", "id", "t", "q", 0)])
    with EventReader(app, request=False) as reader, caplog.at_level(logging.WARNING):
        broadcast.publish(events_channel(app.name), [b"{bad", b'[{"type": 3}]', good])
        events = collect(reader, bool)
    assert [(e.type, e.id) for e in events] == [("task-received", "id")]
    assert reader.malformed == 2
    lines = [r for r in caplog.records if "malformed events message" in r.getMessage()]
    assert len(lines) == 2


def test_requests_are_checked() -> None:
    assert decode_request(encode(EventsOn(seconds=5))) == EventsOn(seconds=5)
    with pytest.raises(ValueError, match="over the limit"):
        decode_request(b" " * 70_000)
    with pytest.raises(ValueError):
        decode_request(b'{"type": "events", "seconds": 99999}')


def test_a_listener_that_is_never_read_holds_at_most_its_limit() -> None:
    broadcast = MemoryBroadcast()
    with broadcast.listen("c", limit=10) as listener:
        broadcast.publish("c", [str(n).encode() for n in range(100)])
        assert listener.read(0) == [str(n).encode() for n in range(90, 100)]
        assert listener.dropped == 90
