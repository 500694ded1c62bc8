"""The metrics endpoint of real workers: a 4-child prefork worker started by `conveyor worker
--metrics-port` on SQLite, and one on RabbitMQ, scraped over HTTP on 127.0.0.1 after 1,000 tasks;
failures, retries and dead letters counted on both brokers; a port in use; and the broker's
reconnections. RabbitMQ is expected on 127.0.0.1:5672 (guest/guest); each test uses a queue of
its own and deletes it afterwards.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import RABBITMQ_URL, delete_rabbitmq_queues, require_rabbitmq, start_worker, wait_for
from prometheus_client.parser import text_string_to_metric_families

from conveyor import Conveyor, Worker
from conveyor.brokers.rabbitmq import RabbitMQBroker

pytestmark = pytest.mark.integration

TASKS = 1000
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
MakeApp = Callable[..., Conveyor]

APP_SOURCE = """
from conveyor import Conveyor

app = Conveyor("metrics", broker="sqlite:///{db}", default_queue="m")


@app.task(name="add")
def add(x, y):
    return x + y
"""


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape_or_none(port: int) -> Samples | None:
    try:
        return scrape(port)
    except OSError:
        return None


def count(samples: Samples | None, task: str, outcome: str) -> float:
    if samples is None:
        return -1
    return samples.get(("conveyor_tasks_total", (("outcome", outcome), ("task", task))), 0.0)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(params=["sqlite", "rabbitmq"])
def make_app(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeApp]:
    """`make_app(**settings)`: an app on this case's broker, with a queue of its own."""
    kind = str(request.param)
    queue = f"metrics-{uuid.uuid4().hex[:10]}"
    results = f"sqlite:///{tmp_path / 'results.db'}"
    if kind == "rabbitmq":
        require_rabbitmq()
        broker = RABBITMQ_URL
    else:
        broker = results = f"sqlite:///{tmp_path / 'broker.db'}"
    apps: list[Conveyor] = []

    def make(**settings: Any) -> Conveyor:
        settings.setdefault("metrics_host", "127.0.0.1")
        app = Conveyor("metrics", broker=broker, results=results, default_queue=queue, **settings)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()
    if kind == "rabbitmq":
        delete_rabbitmq_queues(queue)


def test_cli_prefork_worker_serves_exactly_what_its_four_children_ran(tmp_path: Path) -> None:
    (tmp_path / "metrics_app.py").write_text(APP_SOURCE.format(db=tmp_path / "q.db"))
    sys.path.insert(0, str(tmp_path))
    try:
        import metrics_app
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("metrics_app", None)
    app: Conveyor = metrics_app.app
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env["CONVEYOR_METRICS_HOST"] = "127.0.0.1"
    worker = subprocess.Popen(
        [sys.executable, "-m", "conveyor", "worker", "metrics_app:app", "--pool", "prefork",
         "--concurrency", "4", "--quiet-tasks", "--metrics-port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        first = wait_for(lambda: scrape_or_none(port), timeout=30, what="the endpoint to answer")
        assert count(first, "add", "succeeded") == 0
        app.tasks["add"].map([(n, n) for n in range(TASKS)])
        wait_for(
            lambda: count(scrape_or_none(port), "add", "succeeded") >= TASKS,
            timeout=120,
            what=f"{TASKS} tasks to succeed",
        )
        (stats,) = app.broker.stats(["m"])
        assert stats.ready + stats.delayed + stats.in_flight == 0
        samples = scrape(port)
        assert count(samples, "add", "succeeded") == TASKS
        assert count(samples, "add", "failed") == 0
        assert samples[("conveyor_task_run_seconds_count", (("task", "add"),))] == TASKS
        assert samples[("conveyor_task_wait_seconds_count", (("task", "add"),))] == TASKS
        assert samples[("conveyor_worker_children", ())] == 4
        assert samples.get(("conveyor_tasks_in_flight", (("task", "add"),)), 0) == 0
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            _, stderr = worker.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            _, stderr = worker.communicate()
        app.close()
    assert worker.returncode == 0, stderr
    assert f"serving metrics on 127.0.0.1:{port}" in stderr


def test_prefork_worker_counts_a_thousand_tasks(make_app: MakeApp) -> None:
    app = make_app()

    @app.task(name="add")
    def add(x: int, y: int) -> int:
        return x + y

    add.map([(n, 1) for n in range(TASKS)])
    worker = Worker(app, pool="prefork", concurrency=4, metrics_port=0)
    thread, errors = start_worker(worker)
    try:
        wait_for(lambda: worker.metrics is not None and worker.started.is_set(), timeout=30)
        assert worker.metrics is not None
        port = worker.metrics.port
        wait_for(
            lambda: count(scrape_or_none(port), "add", "succeeded") >= TASKS,
            timeout=120,
            what=f"{TASKS} tasks to succeed",
        )
        samples = scrape(port)
        assert count(samples, "add", "succeeded") == TASKS
        assert samples[("conveyor_worker_children", ())] == 4
        assert samples[("conveyor_broker_reconnects_total", ())] == 0
    finally:
        worker.stop()
        thread.join(30)
    assert not thread.is_alive() and errors == []
    assert worker.stats.succeeded == TASKS


@pytest.mark.parametrize("pool", ["prefork", "threads", "asyncio"])
def test_failures_retries_and_dead_letters_are_counted(make_app: MakeApp, pool: str) -> None:
    app = make_app()

    @app.task(name="boom")
    def boom() -> None:
        raise ValueError("no")

    @app.task(name="again", bind=True, max_retries=2)
    def again(self: Any) -> None:
        raise self.retry(countdown=0)

    @app.task(name="ok")
    def ok() -> int:
        return 1

    for _ in range(3):
        boom.delay()
    again.delay()
    ok.delay()
    # Not until_empty: the endpoint closes with the worker, and the test scrapes it first.
    worker = Worker(app, pool=pool, concurrency=2, metrics_port=0)
    thread, errors = start_worker(worker)
    samples: Samples | None = None

    def settled() -> bool:
        nonlocal samples
        assert worker.metrics is not None
        samples = scrape_or_none(worker.metrics.port)
        return (
            count(samples, "again", "failed") == 1
            and count(samples, "ok", "succeeded") == 1
            and count(samples, "boom", "failed") == 3
        )

    try:
        wait_for(lambda: worker.metrics is not None, timeout=30)
        wait_for(settled, timeout=60, what="every task to settle")
    finally:
        worker.stop()
        thread.join(30)
    assert errors == []
    assert count(samples, "boom", "failed") == 3
    assert count(samples, "again", "retried") == 2
    assert count(samples, "again", "failed") == 1
    assert samples is not None
    dead = (
        "conveyor_tasks_dead_lettered_total",
        (("reason", "retries exhausted"), ("task", "again")),
    )
    assert samples[dead] == 1
    assert samples[("conveyor_task_run_seconds_count", (("task", "again"),))] == 3


def test_a_port_in_use_is_a_clear_error_before_any_message_is_taken(make_app: MakeApp) -> None:
    app = make_app()

    @app.task(name="ok")
    def ok() -> None: ...

    ok.delay()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker = Worker(app, pool="prefork", concurrency=2, metrics_port=port, until_empty=True)
        with pytest.raises(Exception, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            worker.run()
    assert worker.stats.received == 0
    (stats,) = app.broker.stats([app.settings.default_queue])
    assert (stats.ready, stats.in_flight) == (1, 0)


def test_rabbitmq_reconnections_are_counted() -> None:
    require_rabbitmq()
    queue = f"metrics-{uuid.uuid4().hex[:10]}"
    broker = RabbitMQBroker(RABBITMQ_URL)
    try:
        assert broker.stats([queue])[0].ready == 0  # connects (and declares the queue)
        assert broker.reconnects == 0
        connection = broker._connection
        assert connection is not None
        broker._run(connection.close())  # as if the server had dropped it
        assert broker.stats([queue])[0].ready == 0  # connects again
        assert broker.reconnects == 1
    finally:
        broker.close()
        delete_rabbitmq_queues(queue)


def test_cli_port_in_use_is_one_line_and_exit_status_1(tmp_path: Path) -> None:
    (tmp_path / "metrics_app.py").write_text(APP_SOURCE.format(db=tmp_path / "q.db"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env["CONVEYOR_METRICS_HOST"] = "127.0.0.1"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "conveyor", "worker", "metrics_app:app",
             "--metrics-port", str(port)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr == (
        f"Error: cannot serve metrics on 127.0.0.1:{port}: Address already in use; choose "
        "another metrics port (--metrics-port, or the metrics_port setting), or 0 for any "
        "free one\n"
    )
