"""Tracing on the SQLite broker and on RabbitMQ: a traced send shows the sender's trace id in the
span of the worker that ran it, in a prefork child (spans written to a file by the child) and in
the threads and asyncio pools, retries included. RabbitMQ is expected on 127.0.0.1:5672
(guest/guest); each test uses a queue of its own and deletes it afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import RABBITMQ_URL, delete_rabbitmq_queues, require_rabbitmq, run_bounded
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from tracing_cases import FileExporter, read_spans

from conveyor import Conveyor
from conveyor.middleware.otel import TracingMiddleware

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "rabbitmq"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """The broker URL of this case, and a queue of its own."""
    queue = f"trace-{uuid.uuid4().hex[:10]}"
    if request.param == "rabbitmq":
        require_rabbitmq()
        yield RABBITMQ_URL, queue
        delete_rabbitmq_queues(queue)
    else:
        yield f"sqlite:///{tmp_path / 'broker.db'}", queue


@pytest.mark.parametrize("pool", ["prefork", "threads", "asyncio"])
def test_the_worker_span_carries_the_senders_trace(
    broker: tuple[str, str], pool: str, tmp_path: Path
) -> None:
    url, queue = broker
    path = tmp_path / "spans.jsonl"
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(FileExporter(path)))
    app = Conveyor(
        "traced",
        broker=url,
        results=f"sqlite:///{tmp_path / 'results.db'}",
        default_queue=queue,
        middleware=[TracingMiddleware(provider)],
    )
    try:

        @app.task(name="ship")
        def ship(order: int) -> int:
            return order

        @app.task(name="flaky", bind=True, max_retries=1)
        def flaky(self: Any) -> None:
            raise self.retry(exc=TimeoutError("slow"), countdown=0)

        tracer = provider.get_tracer("test")
        with tracer.start_as_current_span("checkout") as checkout:
            ship.delay(7)
            flaky.delay()
        sender = checkout.get_span_context()
        stats = run_bounded(app, pool=pool, timeout=60)
    finally:
        app.close()
    assert (stats.succeeded, stats.retried, stats.failed) == (1, 1, 1)
    spans = [s for s in read_spans(path) if s["kind"] == "CONSUMER"]
    assert sorted(s["name"] for s in spans) == ["flaky", "flaky", "ship"]
    assert {s["trace_id"] for s in spans} == {sender.trace_id}
    assert {s["parent"] for s in spans} == {sender.span_id}
    ran_in = {s["pid"] for s in spans}
    if pool == "prefork":
        assert os.getpid() not in ran_in
    else:
        assert ran_in == {os.getpid()}
    statuses = sorted((s["name"], s["status"]) for s in spans)
    assert statuses == [("flaky", "ERROR"), ("flaky", "ERROR"), ("ship", "OK")]
