"""Chains, groups and chords on real stores and brokers: SQLite alone, and the Redis and
PostgreSQL stores with the embedded broker and with RabbitMQ. The sender and the worker are
separate apps, so everything a workflow needs travels through the broker and the store."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import stores
from conftest import RABBITMQ_URL, delete_rabbitmq_queues, require_rabbitmq, run_bounded
from stores import StoreSetup

from conveyor import ConfigurationError, Conveyor, MemberFailed, TaskFailed, chain, chord, group

pytestmark = pytest.mark.integration

WAIT_S = 20.0
SETUPS = [
    ("sqlite", False),
    ("redis", False),
    ("postgresql", False),
    ("redis", True),
    ("postgresql", True),
]


@pytest.fixture(
    params=SETUPS, ids=[f"{s}+{'rabbitmq' if r else 'sqlite'}-broker" for s, r in SETUPS]
)
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[StoreSetup, str]]:
    store, rabbit = request.param
    made = stores.FACTORIES[store](tmp_path)
    queue = f"workflows-{uuid.uuid4().hex[:12]}"
    if rabbit:
        require_rabbitmq()
        made.broker = RABBITMQ_URL
    yield made, queue
    if rabbit:
        delete_rabbitmq_queues(queue)
    made.cleanup()
    if store == "postgresql":
        drop_workflow_tables(made.results)


def drop_workflow_tables(results: str) -> None:
    """The tables the chord joins made beside the test's results table."""
    import psycopg

    server, _, query = results.partition("?table=")
    with psycopg.connect(server, autocommit=True) as conn:
        for suffix in ("chords", "chord_members", "runs"):
            conn.execute(f"DROP TABLE IF EXISTS {query}_{suffix}")


class Apps:
    """A sender and a worker app with the same tasks; the callbacks' runs counted."""

    def __init__(self, setup: StoreSetup, queue: str) -> None:
        self.totals: list[list[int]] = []
        self.lock = threading.Lock()
        self.sender = self.make(setup, queue)
        self.worker = self.make(setup, queue)

    def make(self, setup: StoreSetup, queue: str) -> Conveyor:
        app = Conveyor("wf", broker=setup.broker, results=setup.results, default_queue=queue)

        @app.task(name="wf.add")
        def add(x: int, y: int) -> int:
            return x + y

        @app.task(name="wf.total")
        def total(values: list[int]) -> int:
            with self.lock:
                self.totals.append(values)
            return sum(values)

        @app.task(name="wf.boom")
        def boom(x: int) -> int:
            raise ValueError(f"boom {x}")

        @app.task(name="wf.flaky", bind=True)
        def flaky(task: Any, x: int) -> int:
            if task.request.retries < 2:
                raise task.retry(countdown=0)
            return x

        return app

    def task(self, name: str) -> Any:
        return self.sender.tasks[f"wf.{name}"]

    def run(self) -> None:
        run_bounded(self.worker, concurrency=4, timeout=WAIT_S)

    def close(self) -> None:
        self.sender.close()
        self.worker.close()


@pytest.fixture
def apps(setup: tuple[StoreSetup, str]) -> Iterator[Apps]:
    made = Apps(*setup)
    yield made
    made.close()


def test_chain_group_and_chord(apps: Apps) -> None:
    add, total, boom = apps.task("add"), apps.task("total"), apps.task("boom")
    piped = (add.s(1, 2) | add.s(10) | add.s(100)).apply_async()
    failing = chain(add.s(1, 1), boom.s(), add.s(1)).apply_async()
    members = group(add.s(i, i) for i in range(10)).apply_async()
    joined = chord([add.s(i, 0) for i in range(25)], total.s()).apply_async()
    nested = (add.s(1, 1) | chord([add.s(1), add.s(2)], total.s()) | add.s(1)).apply_async()
    broken = chord([add.s(1, 1), boom.s(4)], total.s()).apply_async()
    bulk = add.starmap([(i, 1) for i in range(50)]).apply_async()
    chunked = add.chunks([(i, 1) for i in range(5)], 2).apply_async()
    apps.run()
    assert piped.get(WAIT_S) == 113
    with pytest.raises(TaskFailed, match="boom 2"):
        failing.get(WAIT_S)
    assert members.get(WAIT_S) == [2 * i for i in range(10)]
    assert members.ready() and members.completed_count() == 10
    assert joined.get(WAIT_S) == sum(range(25))
    assert nested.get(WAIT_S) == 8
    with pytest.raises(TaskFailed, match="chord member 1"):
        broken.get(WAIT_S)
    assert sorted(map(len, apps.totals)) == [2, 25]
    assert bulk.get(WAIT_S) == [i + 1 for i in range(50)]
    assert chunked.get(WAIT_S) == [[1, 2], [3, 4], [5]]
    failed_group = group(add.s(1, 1), boom.s(2)).apply_async()
    apps.run()
    with pytest.raises(MemberFailed) as failure:
        failed_group.get(WAIT_S)
    assert failure.value.index == 1


def test_members_that_retry_twice_each_call_back_once(apps: Apps) -> None:
    flaky, total = apps.task("flaky"), apps.task("total")
    result = chord([flaky.s(i) for i in range(20)], total.s()).apply_async()
    apps.run()
    assert result.get(WAIT_S) == sum(range(20))
    assert apps.totals == [list(range(20))]


def test_rpc_results_refuse_workflows() -> None:
    require_rabbitmq()
    app = Conveyor("wf", broker=RABBITMQ_URL, results="rpc://")

    @app.task(name="wf.one")
    def one() -> int:
        return 1

    with pytest.raises(ConfigurationError, match="rpc://"):
        chord([one.si()], one.si()).apply_async()
    app.close()
