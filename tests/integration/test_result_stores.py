"""One suite for every result store, on the real services: states and their fields, retries,
failures, ignored results, expiry, forget, `app.result`, waiting without polling, results that
cannot be encoded, `conveyor status`, corrupt records, and forks.

Each test runs once per store (see stores.py). The sending app and the worker's app are two
`Conveyor` objects on the same URLs, as two processes would be; the worker runs on a thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import select
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import stores
from click.testing import CliRunner
from conftest import delete_rabbitmq_queues, run_bounded, start_worker
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stores import StoreSetup
from values_cases import EVERYTHING, JSONISH, Everything, same

from conveyor import Conveyor, State, Worker, WorkerStats
from conveyor.cli import main
from conveyor.errors import ConfigurationError, EncodeError, ResultError, TaskFailed
from conveyor.results import ResultRecord, ResultStore
from conveyor.task import Task

pytestmark = pytest.mark.integration

WAIT_S = 10.0


@pytest.fixture(params=list(stores.FACTORIES))
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreSetup]:
    """The store under test, with a broker to go with it; its leftovers deleted afterwards."""
    setup = stores.FACTORIES[request.param](tmp_path)
    yield setup
    setup.cleanup()


class Harness:
    """A sending app and a worker's app on one store and a queue of the test's own."""

    def __init__(self, setup: StoreSetup) -> None:
        self.setup = setup
        self.queue = f"stores-{uuid.uuid4().hex[:12]}"
        self.apps: list[Conveyor] = []
        self.app = self.make_app()
        self.worker_app = self.make_app()
        self.events: list[threading.Event] = []

    def make_app(self, **settings: Any) -> Conveyor:
        """Another app on the same store and queue."""
        app = Conveyor(
            "stores",
            broker=self.setup.broker,
            results=self.setup.results,
            default_queue=self.queue,
            **settings,
        )
        self.apps.append(app)
        return app

    @property
    def store(self) -> ResultStore:
        """The sending app's store."""
        store = self.app.results
        assert store is not None
        return store

    def task(
        self, *apps: Conveyor, **options: Any
    ) -> Callable[[Callable[..., Any]], Task[Any, Any]]:
        """Register a function on the sending app and the worker's app (or on `apps`); the
        sending app's task is returned."""
        targets = apps or (self.app, self.worker_app)

        def register(fn: Callable[..., Any]) -> Task[Any, Any]:
            tasks = [app.task(**options)(fn) for app in targets]
            return tasks[0]

        return register

    def event(self) -> threading.Event:
        """An event a task can block on; every one is set when the test ends."""
        event = threading.Event()
        self.events.append(event)
        return event

    def run(self, app: Conveyor | None = None) -> WorkerStats:
        """Run a worker until the queue is empty."""
        return run_bounded(app or self.worker_app, pool="threads", concurrency=2, timeout=WAIT_S)

    @contextlib.contextmanager
    def worker(self, concurrency: int = 2) -> Iterator[Worker]:
        """A worker running for the `with` block."""
        worker = Worker(self.worker_app, pool="threads", concurrency=concurrency, shutdown_grace=5)
        thread, errors = start_worker(worker)
        try:
            yield worker
        finally:
            for event in self.events:
                event.set()
            worker.stop()
            thread.join(WAIT_S)
            if thread.is_alive():
                worker.stop()  # a second stop is a cold shutdown
                thread.join(WAIT_S)
        assert not thread.is_alive(), "the worker did not stop"
        assert not errors, errors

    def record(self, task_id: str) -> ResultRecord:
        """The stored record, which must exist."""
        record = self.store.get(task_id)
        assert record is not None, f"no record for {task_id}"
        return record

    def close(self) -> None:
        for event in self.events:
            event.set()
        for app in self.apps:
            app.close()
        if self.setup.broker.startswith("amqp"):
            delete_rabbitmq_queues(self.queue)


@pytest.fixture
def harness(store_url: StoreSetup) -> Iterator[Harness]:
    made = Harness(store_url)
    yield made
    made.close()


# states


def test_pending_for_an_unknown_id_and_before_a_worker_ran(harness: Harness) -> None:
    @harness.task()
    def add(x: int, y: int) -> int:
        return x + y

    unknown = harness.app.result(uuid.uuid4().hex)
    assert unknown.state is State.PENDING
    assert not unknown.ready()
    result = add.delay(1, 2)
    assert result.state is State.PENDING
    assert harness.store.get(result.id) is None
    harness.run()
    assert result.get(timeout=WAIT_S) == 3


def test_started_while_the_task_runs(harness: Harness, poll: Callable[..., Any]) -> None:
    release = harness.event()
    running = harness.event()

    @harness.task()
    def block() -> str:
        running.set()
        assert release.wait(WAIT_S)
        return "done"

    result = block.delay()
    before = time.time()
    with harness.worker():
        assert running.wait(WAIT_S)
        poll(lambda: result.state is State.STARTED, timeout=WAIT_S, what="state STARTED")
        record = harness.record(result.id)
        assert record.started_at is not None and before <= record.started_at <= time.time()
        assert record.worker and record.finished_at is None
        assert record.task == block.name
        release.set()
        assert result.get(timeout=WAIT_S) == "done"


def test_success_record(harness: Harness) -> None:
    @harness.task()
    def square(x: int) -> dict[str, Any]:
        return {"square": x * x, "of": [x]}

    before = time.time()
    result = square.delay(7)
    harness.run()
    assert result.get(timeout=WAIT_S) == {"square": 49, "of": [7]}
    assert result.state is State.SUCCESS and result.ready()
    record = harness.record(result.id)
    assert record.state is State.SUCCESS
    assert record.task == square.name
    assert record.retries == 0
    assert record.worker
    assert record.started_at is not None and record.finished_at is not None
    assert before <= record.started_at <= record.finished_at <= record.updated_at <= time.time()
    assert record.expires_at > time.time() + 3600  # the default: a day
    assert record.error_type is record.error_message is record.traceback is None


def test_retries_then_success(harness: Harness, poll: Callable[..., Any]) -> None:
    @harness.task(bind=True, max_retries=3)
    def flaky(self: Task[Any, Any]) -> int:
        retries: int = self.request.retries
        if retries < 2:
            # The first retry waits half a second in the broker: time to see RETRY.
            raise self.retry(countdown=0.5 if retries == 0 else 0)
        return retries

    result = flaky.delay()
    with harness.worker():
        poll(lambda: result.state is State.RETRY, timeout=WAIT_S, what="state RETRY")
        retrying = harness.record(result.id)
        assert retrying.retries == 0 and retrying.finished_at is not None
        assert result.get(timeout=WAIT_S) == 2
    record = harness.record(result.id)
    assert (record.state, record.retries) == (State.SUCCESS, 2)


def test_failure_keeps_type_message_and_traceback(harness: Harness) -> None:
    @harness.task()
    def explode(n: int) -> None:
        raise ValueError(f"bad input {n}")

    result = explode.delay(42)
    harness.run()
    with pytest.raises(TaskFailed) as failed:
        result.get(timeout=WAIT_S)
    assert failed.value.type_name == "ValueError"
    assert failed.value.message == "bad input 42"
    assert "explode" in failed.value.traceback and "ValueError" in failed.value.traceback
    assert result.state is State.FAILURE and result.ready()
    record = harness.record(result.id)
    assert (record.error_type, record.error_message) == ("ValueError", "bad input 42")
    assert record.traceback == failed.value.traceback
    assert record.finished_at is not None and record.worker


def test_ignore_result_per_task(harness: Harness) -> None:
    @harness.task(ignore_result=True)
    def quiet() -> int:
        return 1

    @harness.task()
    def loud() -> int:
        return 2

    before = harness.store.count()
    ignored, kept = quiet.delay(), loud.delay()
    harness.run()
    assert kept.get(timeout=WAIT_S) == 2
    assert harness.store.count() == before + 1
    assert harness.store.get(ignored.id) is None
    assert harness.app.result(ignored.id).state is State.PENDING
    with pytest.raises(ConfigurationError, match="ignore_result"):
        ignored.get(timeout=WAIT_S)


def test_ignore_results_app_wide(harness: Harness) -> None:
    sender = harness.make_app(ignore_results=True)
    worker_app = harness.make_app(ignore_results=True)
    assert sender.results is None

    @harness.task(sender, worker_app)
    def nothing_kept() -> int:
        return 3

    before = harness.store.count()
    result = nothing_kept.delay()
    stats = harness.run(worker_app)
    assert stats.succeeded == 1
    assert harness.store.count() == before
    assert harness.store.get(result.id) is None
    with pytest.raises(ConfigurationError, match="no result store"):
        result.get(timeout=WAIT_S)


def test_per_task_expiry(harness: Harness, poll: Callable[..., Any]) -> None:
    @harness.task(result_expires=1)
    def brief() -> int:
        return 4

    @harness.task()
    def lasting() -> int:
        return 5

    short, long = brief.delay(), lasting.delay()
    harness.run()
    assert short.get(timeout=WAIT_S) == 4
    assert harness.record(short.id).expires_at <= time.time() + 1
    poll(lambda: short.state is State.PENDING, timeout=WAIT_S, what="the result expired")
    assert harness.store.get(short.id) is None
    assert long.get(timeout=0) == 5


def test_forget(harness: Harness) -> None:
    @harness.task()
    def once() -> int:
        return 6

    result = once.delay()
    harness.run()
    assert result.get(timeout=WAIT_S) == 6
    before = harness.store.count()
    result.forget()
    assert result.state is State.PENDING
    assert harness.store.get(result.id) is None
    assert harness.store.count() == before - 1
    result.forget()  # forgetting twice is fine


def test_app_result_sees_the_same_record(harness: Harness) -> None:
    if not harness.setup.shared:
        pytest.skip("records reach only the process that sent the task")

    @harness.task()
    def greet(name: str) -> str:
        return f"hello {name}"

    result = greet.delay("store")
    harness.run()
    handle = harness.app.result(result.id)
    assert handle.get(timeout=WAIT_S) == "hello store"
    assert handle.state is State.SUCCESS
    other = harness.make_app().result(result.id)  # another app, as another process would
    assert other.get(timeout=WAIT_S) == "hello store"
    assert harness.store.get(result.id) == harness.record(result.id)


# waiting


def test_a_waiting_get_returns_within_milliseconds(harness: Harness) -> None:
    @harness.task()
    def echo(n: int) -> int:
        return n

    results = [echo.delay(n) for n in range(10)]
    returned: dict[str, tuple[Any, float]] = {}

    def wait(index: int) -> None:
        value = results[index].get(timeout=WAIT_S)
        returned[results[index].id] = (value, time.time())

    waiters = [threading.Thread(target=wait, args=(n,)) for n in range(10)]
    for waiter in waiters:
        waiter.start()
    # Every get() is waiting before the worker runs: one task at a time finishes.
    with harness.worker(concurrency=1):
        for waiter in waiters:
            waiter.join(WAIT_S)
    assert [returned[r.id][0] for r in results] == list(range(10))
    latencies = []
    for result in results:
        finished_at = harness.record(result.id).finished_at
        assert finished_at is not None
        latencies.append(returned[result.id][1] - finished_at)
    median = statistics.median(latencies)
    assert median < 0.05, f"get() returned {median * 1000:.1f} ms after the task finished"


# bad values


def test_a_result_that_cannot_be_encoded_fails_only_its_task(harness: Harness) -> None:
    @harness.task()
    def opaque() -> object:
        return object()

    @harness.task()
    def plain() -> str:
        return "fine"

    bad = opaque.delay()
    harness.run()
    with pytest.raises(TaskFailed) as failed:
        bad.get(timeout=WAIT_S)
    assert failed.value.type_name == "EncodeError"
    assert "encode" in failed.value.message and "object" in failed.value.message
    assert bad.state is State.FAILURE
    good = plain.delay()
    stats = harness.run()
    assert good.get(timeout=WAIT_S) == "fine" and stats.succeeded == 1


class _Mkdir:
    """Unpickled, this would create a directory: proof that nothing stored is ever executed."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.path,))


@pytest.mark.parametrize("kind", ["garbage", "pickle", "json"])
def test_a_corrupt_record_raises_our_error(harness: Harness, tmp_path: Path, kind: str) -> None:
    @harness.task()
    def value() -> int:
        return 7

    result = value.delay()
    harness.run()
    assert result.get(timeout=WAIT_S) == 7
    marker = tmp_path / "executed"
    data = {
        "garbage": b"\x00\xffnot a record\x80",
        "pickle": pickle.dumps(_Mkdir(marker)),
        "json": json.dumps({"id": result.id, "state": "SUCCESS", "value": 1, "retries": "x"}),
    }[kind]
    harness.setup.corrupt(result.id, data if isinstance(data, bytes) else data.encode())
    for read in (lambda: result.state, lambda: result.get(timeout=1), result.ready):
        with pytest.raises(ResultError, match="corrupt or not conveyor's"):
            read()
    with pytest.raises(ResultError, match="corrupt or not conveyor's"):
        harness.app.result(result.id).get(timeout=1)
    assert not marker.exists()
    result.forget()  # the way out: the corrupt record can be deleted
    assert result.state is State.PENDING


# the command line


def test_status_shows_the_store_and_its_size(
    harness: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    @harness.task()
    def counted(n: int) -> int:
        return n

    for n in range(3):
        counted.delay(n)
    harness.run()
    count = harness.store.count()
    assert count == 3
    module = f"stores_app_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(
        "from conveyor import Conveyor\n\n"
        f"app = Conveyor('stores', broker={harness.setup.broker!r}, "
        f"results={harness.setup.results!r}, default_queue={harness.queue!r})\n"
    )
    monkeypatch.syspath_prepend(tmp_path)
    monkeypatch.setenv("COLUMNS", "400")  # rich neither wraps nor truncates the URL
    try:
        outcome = CliRunner().invoke(main, ["status", f"{module}:app"], prog_name="conveyor")
    finally:
        loaded = sys.modules.pop(module, None)
        if loaded is not None:
            loaded.app.close()
    assert outcome.exit_code == 0, outcome.output
    rows = [
        [cell.strip() for cell in re.split(r"[│┃]", line) if cell.strip()]
        for line in outcome.stdout.splitlines()
    ]
    # RPC results live in the process that sent the tasks: another process holds none.
    seen = count if harness.setup.shared else 0
    assert [harness.store.display_url, str(seen)] in rows, outcome.stdout


# fork


def test_a_forked_child_uses_the_store_and_the_parent_keeps_it(harness: Harness) -> None:
    if not harness.setup.shared:
        pytest.skip("records reach only the process that sent the task")

    @harness.task()
    def double(x: int) -> int:
        return 2 * x

    done = double.delay(1)
    harness.run()
    assert done.get(timeout=WAIT_S) == 2  # the parent's connections are open at the fork
    later = double.delay(2)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, and never return into pytest
        code = 1
        try:
            os.close(read_end)
            values = [harness.app.result(r.id).get(timeout=WAIT_S) for r in (done, later)]
            os.write(write_end, json.dumps(values).encode())
            code = 0
        except BaseException as exc:
            os.write(write_end, json.dumps(repr(exc)).encode())
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        harness.run()  # the child is waiting for `later` meanwhile
        ready, _, _ = select.select([read_end], [], [], WAIT_S)
        assert ready, "the child did not report"
        report = json.loads(os.read(read_end, 65536))
    finally:
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
    assert report == [2, 4]
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's store still works, for reads, waits and the worker's writes.
    assert done.get(timeout=WAIT_S) == 2 and later.get(timeout=WAIT_S) == 4
    again = double.delay(3)
    waiting = threading.Thread(target=lambda: returned.append(again.get(timeout=WAIT_S)))
    returned: list[int] = []
    waiting.start()
    harness.run()
    waiting.join(WAIT_S)
    assert returned == [6]


# values: exactly as sent, through each broker and store, or refused at the sender


def test_every_value_arrives_and_returns_exactly_or_is_refused(harness: Harness) -> None:
    @harness.task()
    def echo(x):  # type: ignore[no-untyped-def]
        return x

    @settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(values=st.lists(JSONISH, min_size=1, max_size=10))
    def through(values: list[Any]) -> None:
        sent = []
        for value in values:
            try:
                sent.append((value, echo.delay(value)))
            except EncodeError:
                continue
        harness.run()
        for value, result in sent:
            got = result.get(timeout=WAIT_S)
            assert same(got, value), (value, got)

    through()


def test_annotated_values_arrive_and_return_as_their_types(harness: Harness) -> None:
    @harness.task()
    def keep(everything: Everything) -> Everything:
        return everything

    result = keep.delay(EVERYTHING)
    harness.run()
    got = result.get(timeout=WAIT_S)
    assert same(got, EVERYTHING)
