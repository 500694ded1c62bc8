"""The RabbitMQ broker while its server misbehaves: every connection closed, the node restarted.

These tests break their broker, so they run against a private RabbitMQ node of their own (see
`rabbit_node`), started once for the module, never against the shared server on port 5672. Every
task execution is recorded by the task itself, so lost and duplicated work are counted exactly.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import start_worker
from rabbit_node import RabbitNode, private_node

from conveyor import Conveyor, Result, Task, Worker
from conveyor.errors import BrokerError

pytestmark = pytest.mark.integration

Poll = Callable[..., Any]
TASKS = 1000
HOLD_AT = 200
# The worker's prefetch is its concurrency: at most this many deliveries are unacknowledged when a
# connection drops, so at most this many tasks run twice per drop.
CONCURRENCY = 2


@pytest.fixture(scope="module")
def node() -> Iterator[RabbitNode]:
    with private_node() as started:
        yield started


@pytest.fixture
def queue() -> str:
    return f"chaos-{uuid.uuid4().hex[:10]}"  # the node, queues and all, goes with the module


class Hold:
    """Holds every task after the first `after` runs until released, so the broker breaks
    mid-run with exactly the worker's `CONCURRENCY` deliveries in flight, however fast it is."""

    def __init__(self, after: int) -> None:
        self.after = after
        self.released = threading.Event()

    def __call__(self, runs: list[int]) -> None:
        if len(runs) > self.after:
            self.released.wait(60)

    def holding(self, runs: list[int]) -> bool:
        """True once every worker slot is held."""
        return len(runs) >= self.after + CONCURRENCY


def recording_app(
    node: RabbitNode,
    queue: str,
    runs: list[int],
    *,
    results: str = "memory://",
    hold: Callable[[list[int]], None] | None = None,
) -> tuple[Conveyor, Task[[int], int]]:
    """An app on the private node whose task appends its argument to `runs` each time it runs
    (in this process: the workers below use the threads pool)."""
    app = Conveyor("chaos", broker=node.url, results=results, default_queue=queue)

    @app.task(name="chaos.record")
    def record(n: int) -> int:
        runs.append(n)
        if hold is not None:
            hold(runs)
        return n

    return app, record


def duplicates(runs: list[int]) -> int:
    """Executions beyond the first of each argument."""
    return len(runs) - len(set(runs))


@pytest.mark.timeout(180)
def test_no_task_is_lost_when_the_broker_closes_every_connection(
    node: RabbitNode, queue: str, poll: Poll
) -> None:
    runs: list[int] = []
    hold = Hold(HOLD_AT)
    app, record = recording_app(node, queue, runs, hold=hold)
    try:
        results = record.map([(n,) for n in range(TASKS)])
        worker = Worker(app, pool="threads", concurrency=CONCURRENCY, until_empty=True)
        thread, errors = start_worker(worker)
        poll(lambda: hold.holding(runs), timeout=30, what=f"the first {HOLD_AT} tasks")
        closed = node.close_all_connections("chaos test")
        hold.released.set()
        thread.join(60)
        assert not thread.is_alive(), "the worker did not finish within 60s of the closure"
        assert not errors
        # The worker's two: its consumer's, and its events and inspection beacon's.
        assert closed == 2, "the worker's connections were closed"
        lost = set(range(TASKS)) - set(runs)
        print(
            f"\nclose_all_connections with {HOLD_AT + CONCURRENCY} of {TASKS} tasks run: "
            f"count lost: {len(lost)}; duplicates {duplicates(runs)}; "
            f"stale settlements {worker.stats.stale}"
        )
        assert not lost
        assert [r.get(timeout=5) for r in results] == list(range(TASKS))
        assert duplicates(runs) <= CONCURRENCY, "only deliveries in flight may run twice"
    finally:
        hold.released.set()
        app.close()


@pytest.mark.timeout(180)
def test_every_send_that_returned_runs_when_the_broker_closes_every_connection(
    node: RabbitNode, queue: str, poll: Poll, tmp_path: Path
) -> None:
    runs: list[int] = []
    results = f"sqlite:///{tmp_path / 'results.db'}"  # one store for every app below
    app, _ = recording_app(node, queue, runs, results=results)
    # A producer of its own, with its own connection, as producers usually are.
    producer, record = recording_app(node, queue, [], results=results)
    drainer, _ = recording_app(node, queue, runs, results=results)
    sent: list[Result[int]] = []
    sent_args: list[int] = []
    failed: list[tuple[int, BrokerError]] = []
    enough = threading.Event()

    def produce() -> None:
        n = 0
        while not enough.is_set():
            try:
                sent.append(record.delay(n))
                sent_args.append(n)
            except BrokerError as exc:  # allowed: the caller knows the send may not have happened
                failed.append((n, exc))
            n += 1

    sender = threading.Thread(target=produce, daemon=True)
    worker = Worker(app, pool="threads", concurrency=CONCURRENCY)
    try:
        sender.start()
        thread, errors = start_worker(worker)
        poll(lambda: len(runs) >= 200, timeout=30, what="the first 200 tasks")
        closed = node.close_all_connections("chaos test")
        after = len(sent) + len(failed)
        poll(lambda: len(sent) >= after + 200, timeout=30, what="200 sends after the closure")
        enough.set()
        sender.join(30)
        assert not sender.is_alive(), "the producer is stuck"
        worker.stop()
        thread.join(30)
        assert not thread.is_alive() and not errors
        app.close()  # what it fetched and did not start goes back to the queue
        by_worker = len(set(runs))
        # What the first worker left (it may have stopped with tasks still queued), a fresh
        # worker runs.
        stats = Worker(drainer, pool="threads", concurrency=CONCURRENCY, until_empty=True).run()
        assert closed == 3, "the producer's and the worker's two connections were closed"
        confirmed = set(sent_args)
        failed_but_ran = {n for n, _ in failed} & set(runs)
        print(
            f"\nproducer through close_all_connections ({closed} closed): "
            f"{len(sent) + len(failed)} sends, {len(failed)} raised "
            f"({len(failed_but_ran)} of those ran anyway); count lost: "
            f"{len(confirmed - set(runs))}; duplicates {duplicates(runs)}; "
            f"the running worker ran {by_worker}, a fresh one {stats.succeeded}"
        )
        for n, exc in failed:
            print(f"  send {n} raised {type(exc).__name__}: {exc}")
        assert confirmed <= set(runs), "every send that returned ran"
        assert [drainer.result(r.id).get(timeout=5) for r in sent] == sent_args
        assert duplicates(runs) <= CONCURRENCY, "only deliveries in flight may run twice"
        assert len(failed) <= 1, "only the send under way at the closure may fail"
    finally:
        enough.set()
        for application in (producer, app, drainer):
            application.close()


@pytest.mark.timeout(60)
def test_an_idle_worker_consumes_again_after_the_broker_closes_its_connection(
    node: RabbitNode, queue: str, poll: Poll
) -> None:
    app, _ = recording_app(node, queue, [])
    producer, record = recording_app(node, queue, [])
    worker = Worker(app, pool="threads", concurrency=CONCURRENCY)
    thread, errors = start_worker(worker)
    try:
        first = record.delay(1)
        poll(lambda: app.result(first.id).ready(), timeout=30, what="the first task")
        poll(lambda: node.unacknowledged(queue) == 0, timeout=10, what="its acknowledgement")
        # The producer's, and the worker's two (its consumer's and its beacon's).
        assert node.close_all_connections("chaos test") == 3
        second = record.delay(2)  # the producer reconnects and the message is stored
        poll(lambda: app.result(second.id).ready(), timeout=10, what="a task sent after it")
    finally:
        worker.stop()
        thread.join(10)
        producer.close()
        app.close()
    assert not thread.is_alive() and not errors


@pytest.mark.timeout(240)
@pytest.mark.parametrize("how", ["stop", "kill"])
def test_the_worker_comes_back_after_the_node_restarts_and_loses_nothing(
    node: RabbitNode, queue: str, poll: Poll, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="conveyor.worker")
    runs: list[int] = []
    hold = Hold(HOLD_AT)
    app, record = recording_app(node, queue, runs, hold=hold)
    try:
        results = record.map([(n,) for n in range(TASKS)])
        worker = Worker(app, pool="threads", concurrency=CONCURRENCY, until_empty=True)
        thread, errors = start_worker(worker)
        poll(lambda: hold.holding(runs), timeout=30, what=f"the first {HOLD_AT} tasks")
        if how == "stop":
            node.stop()  # clients are told the connection is closing
        else:
            node.kill()  # a crash: clients see the socket die
        hold.released.set()  # the tasks held finish while the node is down
        poll(
            lambda: any("retrying the broker" in r.message for r in caplog.records),
            timeout=30,
            what="the worker backing off",
        )
        restarted_in = node.start()
        thread.join(120)
        assert not thread.is_alive(), "the worker did not finish within 120s of the restart"
        assert not errors
        lost = set(range(TASKS)) - set(runs)
        messages = [r.getMessage() for r in caplog.records]
        backoffs = [m for m in messages if m.startswith("retrying the broker")]
        depth_checks = [m for m in messages if m.startswith("could not read queue depths")]
        print(
            f"\nnode {how} with {HOLD_AT + CONCURRENCY} of {TASKS} tasks run, back in "
            f"{restarted_in:.1f}s: {len(backoffs)} backoffs, {len(depth_checks)} failed depth "
            f"checks; count lost: {len(lost)}; duplicates {duplicates(runs)}"
        )
        assert not lost, "persistent messages survive the restart"
        assert [r.get(timeout=5) for r in results] == list(range(TASKS))
        assert any("answers again" in m for m in messages), "the worker reconnected"
        # A clean stop writes the acknowledgements to disk. A crash loses those of the last
        # moments (the server syncs its queue index lazily), though the server had them (with a
        # prefetch of 2 it sent the next messages): those tasks run again, from RabbitMQ's side.
        in_flight = CONCURRENCY if how == "stop" else HOLD_AT + CONCURRENCY
        assert duplicates(runs) <= in_flight
    finally:
        hold.released.set()
        app.close()
