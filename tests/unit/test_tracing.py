"""OpenTelemetry tracing on the memory broker, in every pool: the sender's trace context in every
message, the task's span a child of the sender's (in a prefork child too), the outcome as the
span's status, retries in the same trace, and spans a prefork child buffered flushed as it exits.

Spans go to the SDK's in-memory exporter where the task runs in this process; a prefork child
exports to a file (`tracing_cases.FileExporter`), which the test reads once the worker stopped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from tracing_cases import FileExporter, read_spans

from conveyor import Conveyor, Request
from conveyor.message import decode
from conveyor.middleware.otel import TracingMiddleware
from conveyor.testing import memory_app, run_until_empty

POOLS = ["prefork", "threads", "asyncio", "solo"]


class Traced:
    """A provider whose spans can be read back, wherever the task ran."""

    def __init__(self, pool: str, path: Path) -> None:
        self.provider = TracerProvider()
        self.memory = InMemorySpanExporter()
        self.path = path
        self.prefork = pool == "prefork"
        self.provider.add_span_processor(SimpleSpanProcessor(self.memory))
        if self.prefork:
            self.provider.add_span_processor(SimpleSpanProcessor(FileExporter(path)))
        self.tracer = self.provider.get_tracer("test")

    def task_spans(self) -> list[dict[str, Any]]:
        """The spans of task runs, in the order they ended."""
        if self.prefork:
            return [s for s in read_spans(self.path) if s["pid"] != os.getpid()]
        return [
            {
                "name": s.name,
                "trace_id": s.context.trace_id,
                "span_id": s.context.span_id,
                "parent": None if s.parent is None else s.parent.span_id,
                "kind": s.kind.name,
                "status": s.status.status_code.name,
                "description": s.status.description,
                "events": [e.name for e in s.events],
                "attributes": dict(s.attributes or {}),
            }
            for s in self.memory.get_finished_spans()
            if s.kind is SpanKind.CONSUMER
        ]


@pytest.fixture
def apps() -> Iterator[list[Conveyor]]:
    made: list[Conveyor] = []
    yield made
    for app in made:
        app.close()


def concurrency(pool: str) -> int:
    return 1 if pool == "solo" else 2


@pytest.mark.parametrize("pool", POOLS)
def test_the_task_span_is_a_child_of_the_senders(
    apps: list[Conveyor], pool: str, tmp_path: Path
) -> None:
    traced = Traced(pool, tmp_path / "spans.jsonl")
    app = memory_app(middleware=[TracingMiddleware(traced.provider)])
    apps.append(app)

    @app.task(name="shop.charge")
    def charge(order: int) -> int:
        return order

    with traced.tracer.start_as_current_span("checkout") as checkout:
        result = charge.delay(42)
    sender = checkout.get_span_context()
    [message] = app.broker.fetch([app.settings.default_queue], 1)
    app.broker.requeue([message], count_delivery=False)
    headers = decode(message.body).headers
    version, trace_id, parent_id, flags = headers["traceparent"].split("-")
    assert (version, trace_id, parent_id) == (
        "00",
        f"{sender.trace_id:032x}",
        f"{sender.span_id:016x}",
    )
    assert int(flags, 16) & 1  # sampled

    stats = run_until_empty(app, pool=pool, concurrency=concurrency(pool))
    assert stats.succeeded == 1 and result.get(timeout=1) == 42
    [span] = traced.task_spans()
    assert span["name"] == "shop.charge"
    assert span["trace_id"] == sender.trace_id
    assert span["parent"] == sender.span_id
    assert span["kind"] == "CONSUMER"
    assert span["status"] == "OK"
    attributes = span["attributes"]
    assert attributes["messaging.system"] == "conveyor"
    assert attributes["messaging.message.id"] == result.id
    assert attributes["messaging.destination.name"] == app.settings.default_queue
    assert attributes["conveyor.task.outcome"] == "success"


@pytest.mark.parametrize("pool", POOLS)
def test_failures_and_retries_keep_the_trace_and_record_the_exception(
    apps: list[Conveyor], pool: str, tmp_path: Path
) -> None:
    traced = Traced(pool, tmp_path / "spans.jsonl")
    app = memory_app(middleware=[TracingMiddleware(traced.provider)])
    apps.append(app)

    @app.task(name="flaky", bind=True, max_retries=1)
    def flaky(self: Any) -> None:
        raise self.retry(exc=ConnectionError("down"), countdown=0)

    with traced.tracer.start_as_current_span("request") as request:
        flaky.delay()
    sender = request.get_span_context()
    stats = run_until_empty(app, pool=pool, concurrency=concurrency(pool))
    assert (stats.retried, stats.failed) == (1, 1)
    spans = traced.task_spans()
    assert [s["status"] for s in spans] == ["ERROR", "ERROR"]
    assert {s["trace_id"] for s in spans} == {sender.trace_id}
    assert {s["parent"] for s in spans} == {sender.span_id}  # every try: the sender's child
    assert [s["attributes"]["conveyor.task.retries"] for s in spans] == [0, 1]
    assert [s["attributes"]["conveyor.task.outcome"] for s in spans] == ["retry", "failure"]
    assert spans[0]["description"] == "will retry: ConnectionError: down"
    assert spans[1]["description"] == "ConnectionError: down"
    assert all(s["events"] == ["exception"] for s in spans)


def test_a_send_without_a_span_starts_a_trace_at_the_task(
    apps: list[Conveyor], tmp_path: Path
) -> None:
    traced = Traced("threads", tmp_path / "spans.jsonl")
    app = memory_app(middleware=[TracingMiddleware(traced.provider)])
    apps.append(app)
    seen: list[Request] = []

    @app.task(name="root", bind=True)
    def root(self: Any) -> None:
        seen.append(self.request)
        app.tasks["leaf"].delay()  # sent from inside the task: it joins the task's trace

    @app.task(name="leaf", bind=True)
    def leaf(self: Any) -> None:
        seen.append(self.request)
        assert trace.get_current_span().is_recording()

    root.delay()
    run_until_empty(app)
    assert "traceparent" not in seen[0].headers
    assert "traceparent" in seen[1].headers
    by_name = {s["name"]: s for s in traced.task_spans()}
    assert by_name["root"]["parent"] is None
    assert by_name["leaf"]["trace_id"] == by_name["root"]["trace_id"]
    assert by_name["leaf"]["parent"] == by_name["root"]["span_id"]


def test_a_prefork_child_flushes_its_buffered_spans_as_it_exits(
    apps: list[Conveyor], tmp_path: Path
) -> None:
    path = tmp_path / "spans.jsonl"
    provider = TracerProvider()
    # A long delay: only the flush at the child's exit can export these spans in time.
    provider.add_span_processor(
        BatchSpanProcessor(FileExporter(path), schedule_delay_millis=60_000)
    )
    app = memory_app(middleware=[TracingMiddleware(provider)])
    apps.append(app)

    @app.task(name="noop")
    def noop() -> None: ...

    for _ in range(5):
        noop.delay()
    stats = run_until_empty(app, pool="prefork", concurrency=2)
    assert stats.succeeded == 5
    lines = read_spans(path)
    assert [s["name"] for s in lines] == ["noop"] * 5
    assert all(s["pid"] != os.getpid() for s in lines)
    provider.shutdown()
