"""Prometheus metrics on the memory broker: what `PrometheusMiddleware` counts in each pool, the
gauges read at a scrape, the worker's endpoint (`metrics_port`), and `after_settle` telling of
every delivery a worker took, including those a shutdown gives up on."""

from __future__ import annotations

import socket
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import start_worker, wait_for
from prometheus_client.parser import text_string_to_metric_families

from conveyor import ConfigurationError, Conveyor, Worker
from conveyor.brokers import Outgoing
from conveyor.errors import Retry
from conveyor.message import Envelope, encode
from conveyor.middleware import Middleware, Settled
from conveyor.middleware.prometheus import PrometheusMiddleware
from conveyor.testing import memory_app, run_until_empty

POOLS = ["prefork", "threads", "asyncio", "solo"]
Poll = Callable[..., Any]


@pytest.fixture
def apps() -> Iterator[list[Conveyor]]:
    made: list[Conveyor] = []
    yield made
    for app in made:
        app.close()


def sample(metrics: PrometheusMiddleware, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample the endpoint serves, by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


class Settlements(Middleware):
    """Keeps every `Settled` the worker reports."""

    def __init__(self) -> None:
        self.seen: list[Settled] = []

    def after_settle(self, settled: Settled) -> None:
        self.seen.append(settled)


@pytest.mark.parametrize("pool", POOLS)
def test_outcomes_times_and_dead_letters_are_counted_by_task(
    apps: list[Conveyor], pool: str
) -> None:
    metrics = PrometheusMiddleware()
    app = memory_app(middleware=[metrics])
    apps.append(app)

    @app.task(name="ok")
    def ok(x: int) -> int:
        return x

    @app.task(name="boom")
    def boom() -> None:
        raise ValueError("no")

    @app.task(name="again", bind=True, max_retries=1)
    def again(self: Any) -> None:
        raise self.retry(countdown=0)

    for n in range(5):
        ok.delay(n)
    boom.delay()
    again.delay()
    stats = run_until_empty(app, pool=pool, concurrency=1 if pool == "solo" else 2)
    assert (stats.succeeded, stats.failed, stats.retried, stats.dead_lettered) == (5, 2, 1, 1)

    total = "conveyor_tasks_total"
    assert sample(metrics, total, task="ok", outcome="succeeded") == 5
    assert sample(metrics, total, task="ok", outcome="failed") == 0  # shown from the start
    assert sample(metrics, total, task="boom", outcome="failed") == 1
    assert sample(metrics, total, task="again", outcome="retried") == 1
    assert sample(metrics, total, task="again", outcome="failed") == 1
    dead = "conveyor_tasks_dead_lettered_total"
    assert sample(metrics, dead, task="again", reason="retries exhausted") == 1
    assert sample(metrics, "conveyor_task_run_seconds_count", task="ok") == 5
    assert sample(metrics, "conveyor_task_run_seconds_count", task="again") == 2
    assert sample(metrics, "conveyor_task_wait_seconds_count", task="ok") == 5
    assert 0 <= sample(metrics, "conveyor_task_wait_seconds_sum", task="ok") < 60
    assert sample(metrics, "conveyor_tasks_in_flight", task="ok") == 0


def test_a_message_for_no_registered_task_is_counted_under_one_label(
    apps: list[Conveyor],
) -> None:
    metrics = PrometheusMiddleware()
    app = memory_app(middleware=[metrics])
    apps.append(app)
    for n in range(3):  # a sender with tasks this worker does not know
        envelope = Envelope(id=f"{n:032x}", task=f"elsewhere.t{n}", queue="default")
        app.broker.publish([Outgoing("default", encode(envelope))])
    stats = run_until_empty(app)
    assert stats.rejected == 3
    total = "conveyor_tasks_total"
    assert sample(metrics, total, task="(unregistered)", outcome="rejected") == 3
    reason = "unknown task"
    assert (
        sample(metrics, "conveyor_tasks_dead_lettered_total", task="(unregistered)", reason=reason)
        == 3
    )
    families = {f.name for f in metrics.registry.collect()}
    assert "conveyor_tasks" in families
    assert not any(
        s.labels.get("task", "").startswith("elsewhere")
        for f in metrics.registry.collect()
        for s in f.samples
    )


def test_any_outcome_counts_as_its_own_value() -> None:
    metrics = PrometheusMiddleware()
    envelope = Envelope(id="a" * 32, task="t", queue="q")
    metrics.after_settle(Settled("revoked", "q", envelope, None))
    assert sample(metrics, "conveyor_tasks_total", task="(unregistered)", outcome="revoked") == 1


@pytest.mark.parametrize("pool", ["prefork", "threads", "asyncio"])
def test_gauges_show_tasks_in_flight_and_children(
    apps: list[Conveyor], pool: str, poll: Poll, tmp_path: Path
) -> None:
    metrics = PrometheusMiddleware()
    app = memory_app(middleware=[metrics])
    apps.append(app)
    gate = tmp_path / "go"

    @app.task(name="wait")
    def wait() -> None:
        import time

        deadline = time.monotonic() + 20
        while not gate.exists():  # a file: the prefork child sees it too
            if time.monotonic() > deadline:
                raise RuntimeError("never let go")
            time.sleep(0.002)

    wait.delay()
    wait.delay()
    worker = Worker(app, pool=pool, concurrency=3, until_empty=True)
    thread, errors = start_worker(worker)
    try:
        poll(lambda: sample(metrics, "conveyor_tasks_in_flight", task="wait") == 2, timeout=20)
        children = 3 if pool == "prefork" else 0  # the third child may still be starting
        poll(lambda: sample(metrics, "conveyor_worker_children") == children, timeout=20)
        assert sample(metrics, "conveyor_broker_reconnects_total") == 0
    finally:
        gate.touch()
    thread.join(20)
    assert not thread.is_alive() and errors == []
    assert sample(metrics, "conveyor_tasks_in_flight", task="wait") == 0
    assert sample(metrics, "conveyor_tasks_total", task="wait", outcome="succeeded") == 2
    assert sample(metrics, "conveyor_worker_children") == 0  # the worker stopped


@pytest.mark.parametrize("acks_late", [True, False], ids=["acks-late", "acks-early"])
@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_a_cold_shutdown_tells_after_settle_of_every_job_it_gives_up(
    apps: list[Conveyor], poll: Poll, tmp_path: Path, pool: str, acks_late: bool
) -> None:
    seen = Settlements()
    metrics = PrometheusMiddleware()
    app = memory_app(middleware=[seen, metrics])
    apps.append(app)
    started = tmp_path / "started"
    gate = tmp_path / "go"

    @app.task(name="hold", acks_late=acks_late)
    def hold() -> None:
        import time

        started.touch()
        deadline = time.monotonic() + 20
        while not gate.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("never let go")
            time.sleep(0.002)

    hold.delay()
    worker = Worker(app, pool=pool, concurrency=1, shutdown_grace=60)
    thread, errors = start_worker(worker)
    try:
        poll(started.exists, timeout=20, what="the task to start")
        assert sample(metrics, "conveyor_tasks_in_flight", task="hold") == 1
        worker.stop()
        worker.stop()  # cold: the running job is given up
        thread.join(20)
        assert not thread.is_alive() and errors == []
    finally:
        gate.touch()
    expected = "released" if acks_late else "abandoned"
    assert [s.outcome for s in seen.seen] == [expected]
    assert seen.seen[0].task is app.tasks["hold"] and seen.seen[0].took is None
    assert getattr(worker.stats, expected) == 1
    assert sample(metrics, "conveyor_tasks_in_flight", task="hold") == 0
    assert sample(metrics, "conveyor_tasks_total", task="hold", outcome=expected) == 1
    (stats,) = app.broker.stats()
    assert stats.ready == (1 if acks_late else 0)


def test_jobs_whose_early_ack_failed_are_released(apps: list[Conveyor]) -> None:
    seen = Settlements()
    app = memory_app(middleware=[seen])
    apps.append(app)
    runs: list[int] = []

    @app.task(name="early", acks_late=False)
    def early() -> None:
        runs.append(1)

    early.delay()
    broker = app.broker
    failing = {"left": 1}
    real_ack = broker.ack

    def ack(deliveries: Any) -> int:
        if failing["left"]:
            failing["left"] -= 1
            raise ConnectionError("the broker went away")
        return real_ack(deliveries)

    broker.ack = ack  # type: ignore[method-assign]
    worker = Worker(app, pool="threads", concurrency=1, shutdown_grace=0)
    thread, errors = start_worker(worker)
    try:
        wait_for(lambda: seen.seen, timeout=10, what="the failed ack to be told")
    finally:
        worker.stop()
        worker.stop()
        thread.join(10)
    assert errors == []
    assert seen.seen[0].outcome == "released" and seen.seen[0].took is None
    assert worker.stats.released >= 1


def test_the_worker_serves_the_metrics_of_its_own_middleware(
    apps: list[Conveyor], poll: Poll
) -> None:
    app = memory_app()  # no middleware: the port alone turns metrics on
    apps.append(app)

    @app.task(name="ok")
    def ok() -> None: ...

    for _ in range(7):
        ok.delay()
    worker = Worker(app, pool="threads", concurrency=2, metrics_port=0)
    app_host = app.settings.metrics_host
    assert app_host == "0.0.0.0"
    thread, errors = start_worker(worker)
    try:
        poll(lambda: worker.stats.succeeded == 7, timeout=10)
        assert worker.metrics is not None
        port = worker.metrics.port
        samples = poll(lambda: scrape(port), timeout=10)
        key = ("conveyor_tasks_total", (("outcome", "succeeded"), ("task", "ok")))
        assert samples[key] == 7
        assert samples[("conveyor_worker_children", ())] == 0
    finally:
        worker.stop()
        thread.join(10)
    assert errors == []
    assert app.middleware == []  # the worker's own, not added to the app
    with pytest.raises(OSError):
        scrape(port)  # closed with the worker


def test_a_port_in_use_stops_the_worker_before_it_takes_anything(apps: list[Conveyor]) -> None:
    app = memory_app(metrics_host="127.0.0.1")
    apps.append(app)
    runs: list[int] = []

    @app.task(name="ok")
    def ok() -> None:
        runs.append(1)

    ok.delay()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker = Worker(app, pool="prefork", concurrency=1, metrics_port=port, until_empty=True)
        with pytest.raises(ConfigurationError) as caught:
            worker.run()
    message = str(caught.value)
    assert message.startswith(f"cannot serve metrics on 127.0.0.1:{port}: Address already in use")
    assert "--metrics-port" in message
    assert runs == [] and worker.stats.received == 0 and worker.pool is None
    (stats,) = app.broker.stats()
    assert stats.ready == 1  # nothing was taken


def test_the_setting_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_METRICS_PORT", "9108")
    app = memory_app()
    try:
        assert app.settings.metrics_port == 9108
        assert Worker(app).metrics_port == 9108
        assert Worker(app, metrics_port=0).metrics_port == 0
    finally:
        app.close()
    monkeypatch.setenv("CONVEYOR_METRICS_PORT", "70000")
    with pytest.raises(ConfigurationError, match="CONVEYOR_METRICS_PORT"):
        memory_app()


def test_scrapes_while_tasks_settle_never_fail(apps: list[Conveyor]) -> None:
    metrics = PrometheusMiddleware()
    app = memory_app(middleware=[metrics])
    apps.append(app)

    @app.task(name="ok")
    def ok() -> None: ...

    ok.map([() for _ in range(2000)])
    done = threading.Event()
    failures: list[BaseException] = []

    def scraper() -> None:
        while not done.is_set():
            try:
                list(metrics.registry.collect())
            except BaseException as exc:
                failures.append(exc)
                return

    thread = threading.Thread(target=scraper)
    thread.start()
    try:
        stats = run_until_empty(app, concurrency=4)
    finally:
        done.set()
        thread.join(10)
    assert failures == []
    assert stats.succeeded == 2000
    assert sample(metrics, "conveyor_tasks_total", task="ok", outcome="succeeded") == 2000


def test_retry_error_type_is_not_a_label() -> None:
    # Labels are the task and the outcome only: an exception's type or text never becomes one.
    metrics = PrometheusMiddleware()
    envelope = Envelope(id="b" * 32, task="t", queue="q")
    metrics.after_settle(
        Settled("failed", "q", envelope, None, error_type=Retry.__name__, error_message="x")
    )
    labels = {name for f in metrics.registry.collect() for s in f.samples for name in s.labels}
    assert labels <= {"task", "outcome", "reason", "le"}


def test_histograms_count_each_time_in_its_bucket() -> None:
    metrics = PrometheusMiddleware(buckets=[0.001, 0.1, 1.0])
    sent = 1_000.0
    envelope = Envelope(id="c" * 32, task="t", queue="q", sent_at=sent)
    for took, waited in [(0.0005, 0.0), (0.001, 0.05), (0.5, 0.5), (7.0, 30.0)]:
        metrics.after_settle(
            Settled("succeeded", "q", envelope, None, took=took, started_at=sent + waited)
        )
    late = Envelope(id="d" * 32, task="t", queue="q", sent_at=sent, eta=sent + 60)
    metrics.after_settle(Settled("succeeded", "q", late, None, took=0.0, started_at=sent + 59))
    task = "(unregistered)"
    run = [sample(metrics, "conveyor_task_run_seconds_bucket", task=task, le=le) for le in
           ("0.001", "0.1", "1.0", "+Inf")]  # fmt: skip
    assert run == [3, 3, 4, 5]
    wait = [sample(metrics, "conveyor_task_wait_seconds_bucket", task=task, le=le) for le in
            ("0.001", "0.1", "1.0", "+Inf")]  # fmt: skip
    assert wait == [2, 3, 4, 5]  # the delayed one waited from its due time: not at all
    assert sample(metrics, "conveyor_task_run_seconds_sum", task=task) == pytest.approx(7.5015)
    assert sample(metrics, "conveyor_task_wait_seconds_count", task=task) == 5


def test_buckets_must_be_seconds() -> None:
    with pytest.raises(ConfigurationError, match="buckets"):
        PrometheusMiddleware(buckets=[-1.0, 1.0])
    with pytest.raises(ConfigurationError, match="buckets"):
        PrometheusMiddleware(buckets=[])
    with pytest.raises(ConfigurationError, match="buckets"):
        PrometheusMiddleware(buckets=[1.0, float("nan")])
    assert PrometheusMiddleware(buckets=[2, 1, 1, float("inf")]).buckets == (1.0, 2.0)
