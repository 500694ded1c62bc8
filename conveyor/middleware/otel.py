"""`TracingMiddleware`: a task's run as an OpenTelemetry span in the trace of whoever sent it.

The sender's trace context goes into the message's headers (`before_send`, through the
propagator OpenTelemetry is configured with: W3C `traceparent` by default), so it is in the
message wherever it goes, and a retry, which is the same message again, keeps it. The process
that runs the task (a prefork child, with that pool) reads it back and runs the task in a span
whose parent is the sender's (`before_run`), ending it with the outcome as its status and the
exception recorded (`after_run`). Tasks sent from inside a task join the same trace.

Only the OpenTelemetry API is needed (`conveyor[otel]`): where spans go is the application's
choice of SDK and exporter, as OpenTelemetry intends for libraries.
"""

from __future__ import annotations

import contextvars
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

from conveyor.errors import ConfigurationError
from conveyor.middleware.base import Middleware, RunOutcome

try:
    from opentelemetry import context, propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError as exc:  # pragma: no cover - the extra is part of the dev environment
    raise ConfigurationError(
        "tracing needs the OpenTelemetry API: pip install 'conveyor[otel]'"
    ) from exc

if TYPE_CHECKING:
    from conveyor.message import Envelope
    from conveyor.task import Request, Task

# The span of the task running in this context, and the token that restores the context it
# replaced: set by before_run, read by after_run in the same thread or asyncio task.
_running: contextvars.ContextVar[tuple[trace.Span, contextvars.Token[context.Context]] | None] = (
    contextvars.ContextVar("conveyor_span", default=None)
)


class TracingMiddleware(Middleware):
    """Carries the trace context through messages and runs each task in a span.

    `tracer_provider` makes the spans: the global one (`trace.set_tracer_provider`) by default,
    looked up when a span starts, so it may be set after the middleware is made, in each
    process. See docs/tracing.md.
    """

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self._provider = tracer_provider
        self._tracer = trace.get_tracer(
            "conveyor", version("conveyor"), tracer_provider=tracer_provider
        )

    def before_send(self, envelope: Envelope, headers: dict[str, str]) -> None:
        """Put the current trace context into the message (nothing when no span is active)."""
        propagate.inject(headers)

    def before_run(self, task: Task[Any, Any], request: Request) -> None:
        """Start the task's span, a child of the sender's, and make it current."""
        parent = propagate.extract(request.headers)
        span = self._tracer.start_span(
            task.name,
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "conveyor",
                "messaging.operation.type": "process",
                "messaging.destination.name": request.queue,
                "messaging.message.id": request.id,
                "conveyor.task.name": task.name,
                "conveyor.task.retries": request.retries,
            },
        )
        token = context.attach(trace.set_span_in_context(span, parent))
        _running.set((span, token))

    def after_run(self, task: Task[Any, Any], request: Request, outcome: RunOutcome) -> None:
        """End the span: OK on success, ERROR with the exception otherwise."""
        held = _running.get()
        if held is None:
            return
        _running.set(None)
        span, token = held
        try:
            span.set_attribute("conveyor.task.outcome", outcome.state)
            exc = outcome.exception
            if outcome.state == "success":
                span.set_status(Status(StatusCode.OK))
            else:
                if exc is not None:
                    span.record_exception(exc)
                what = "no exception" if exc is None else f"{type(exc).__name__}: {exc}"
                prefix = "will retry: " if outcome.state == "retry" else ""
                span.set_status(Status(StatusCode.ERROR, prefix + what))
            span.end()
        finally:
            context.detach(token)

    def process_stop(self) -> None:
        """Export what the provider still buffers: a prefork child exits without `atexit`."""
        provider = self._provider or trace.get_tracer_provider()
        flush = getattr(provider, "force_flush", None)
        if callable(flush):
            flush()
