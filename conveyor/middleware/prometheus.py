"""`PrometheusMiddleware`: what a worker did and is doing, as Prometheus metrics.

Everything is counted in the worker's own process, in `after_settle`, which sees every delivery
the worker took exactly once, with its task, its outcome, and the run's time and start measured
where it ran (a prefork child). So one registry in one process holds the whole worker: its
endpoint sums every child, replaced ones included, with no files shared with the children and
nothing for a child to send. Gauges that describe the worker itself (tasks in flight, prefork
children, the broker's reconnections) are read from it when Prometheus scrapes, not kept up
per task.

`MetricsEndpoint` serves a registry over HTTP. The worker makes one when `metrics_port` is set
(`conveyor worker --metrics-port`): bound before the pool forks, so a port in use stops the
worker before it takes a message, and served from a thread once the pool is up.

prometheus-client is imported here only: a worker without metrics never loads it.
"""

from __future__ import annotations

import bisect
import math
import socket
import threading
import weakref
from collections.abc import Iterator, Sequence
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from conveyor._fork import forget_in_child
from conveyor.errors import ConfigurationError
from conveyor.middleware.base import Middleware, Settled
from conveyor.reasons import DeadLetterReason

try:
    from prometheus_client import CollectorRegistry, make_wsgi_app
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - the extra is part of the dev environment
    raise ConfigurationError(
        "Prometheus metrics need prometheus-client: pip install 'conveyor[prometheus]'"
    ) from exc

if TYPE_CHECKING:
    from conveyor.worker.worker import Worker

#: Run and wait times, in seconds: from a no-op task's fraction of a millisecond to minutes.
BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)
#: The task label of a message that names no task registered on the worker (any name a sender
#: writes would otherwise become a label value of its own).
UNREGISTERED = "(unregistered)"
#: Outcomes every registered task shows from the start, at 0, so `rate()` sees the first one.
_INITIAL = ("succeeded", "failed", "retried")


class _Times:
    """One task's run and wait histograms: counts per bucket (the last is +Inf) and sums."""

    __slots__ = ("run", "run_sum", "wait", "wait_sum")

    def __init__(self, buckets: int) -> None:
        self.run = [0] * (buckets + 1)
        self.run_sum = 0.0
        self.wait = [0] * (buckets + 1)
        self.wait_sum = 0.0


class PrometheusMiddleware(Middleware):
    """Counts each worker's tasks by name and outcome, and times them (see docs/metrics.md).

    `registry` is where the metrics go: a registry of their own by default (pass
    `prometheus_client.REGISTRY` to serve them beside the process collectors and your own
    metrics). `buckets` are the run-time and wait-time histograms' upper bounds, in seconds.

    The counts are plain numbers under one lock, turned into Prometheus metrics when scraped:
    a settlement costs a few dictionary operations, where prometheus-client's own counters and
    histograms would take a lock per sample (measured in docs/metrics.md).
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        buckets: Sequence[float] = BUCKETS,
    ) -> None:
        bounds = sorted({float(b) for b in buckets} - {math.inf})
        if not bounds or bounds[0] < 0 or any(math.isnan(b) for b in bounds):
            raise ConfigurationError(
                f"PrometheusMiddleware: buckets must be upper bounds in seconds, at least one "
                f"and none negative, not {list(buckets)!r}"
            )
        self.registry = CollectorRegistry() if registry is None else registry
        self.buckets = tuple(bounds)
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}
        self._dead: dict[tuple[str, str], int] = {}
        self._times: dict[str, _Times] = {}
        self._worker: Worker | None = None
        self.registry.register(_Collector(self))

    def worker_start(self, worker: Worker) -> None:
        """Remember the worker, for the gauges; show each of the app's tasks' main outcomes at
        0 (the built-in ones of workflows are counted once they run)."""
        from conveyor.workflows.bulk import BUILTINS

        with self._lock:
            self._worker = worker
            for name in worker.app.tasks:
                if name in BUILTINS:
                    continue
                for outcome in _INITIAL:
                    self._counts.setdefault((name, outcome), 0)

    def worker_stop(self, worker: Worker) -> None:
        """The worker has stopped: no children, nothing in flight any more."""
        with self._lock:
            if self._worker is worker:
                self._worker = None

    def after_settle(self, settled: Settled) -> None:
        """Count the outcome; time the run, and the wait before it."""
        task, envelope = settled.task, settled.envelope
        name = UNREGISTERED if task is None else task.name
        took, started = settled.took, settled.started_at
        with self._lock:
            key = (name, settled.outcome)
            counts = self._counts
            counts[key] = counts.get(key, 0) + 1
            if settled.dead_letter is not None:
                category = DeadLetterReason.of(settled.dead_letter)
                dead = (name, "other" if category is None else category.value)
                self._dead[dead] = self._dead.get(dead, 0) + 1
            if took is None:
                return
            times = self._times.get(name)
            if times is None:
                times = self._times[name] = _Times(len(self.buckets))
            times.run[bisect.bisect_left(self.buckets, took)] += 1
            times.run_sum += took
            if envelope is not None and started is not None and envelope.sent_at:
                eta = envelope.eta
                due = envelope.sent_at if eta is None or eta < envelope.sent_at else eta
                # Clocks of different machines may disagree: a wait is never negative.
                wait = started - due if started > due else 0.0
                times.wait[bisect.bisect_left(self.buckets, wait)] += 1
                times.wait_sum += wait


class _Collector(Collector):
    """The middleware's counts as Prometheus metrics, and the gauges read from the worker."""

    def __init__(self, middleware: PrometheusMiddleware) -> None:
        self._middleware = middleware

    def collect(self) -> Iterator[Any]:
        m = self._middleware
        with m._lock:
            counts = sorted(m._counts.items())
            dead = sorted(m._dead.items())
            times = sorted((name, _copy(t)) for name, t in m._times.items())
            worker = m._worker
        tasks = CounterMetricFamily(
            "conveyor_tasks",
            "Deliveries settled by this worker, by task and outcome.",
            labels=["task", "outcome"],
        )
        for labels, value in counts:
            tasks.add_metric(labels, value)
        yield tasks
        dead_lettered = CounterMetricFamily(
            "conveyor_tasks_dead_lettered",
            "Messages this worker dead-lettered, by task and the reason's category.",
            labels=["task", "reason"],
        )
        for labels, value in dead:
            dead_lettered.add_metric(labels, value)
        yield dead_lettered
        run = HistogramMetricFamily(
            "conveyor_task_run_seconds",
            "Seconds each run took, measured in the process that ran it.",
            labels=["task"],
        )
        wait = HistogramMetricFamily(
            "conveyor_task_wait_seconds",
            "Seconds from a task's send (or its due time, for a delayed one) to its run's start.",
            labels=["task"],
        )
        bounds = [*(repr(b) for b in m.buckets), "+Inf"]
        for name, t in times:
            run.add_metric([name], _cumulative(bounds, t.run), t.run_sum)
            wait.add_metric([name], _cumulative(bounds, t.wait), t.wait_sum)
        yield run
        yield wait
        in_flight = GaugeMetricFamily(
            "conveyor_tasks_in_flight",
            "Tasks this worker took and has not settled: running, or waiting in the pool.",
            labels=["task"],
        )
        for name, value in sorted((worker.in_flight() if worker is not None else {}).items()):
            in_flight.add_metric([name], value)
        yield in_flight
        pool = None if worker is None else worker.pool
        yield GaugeMetricFamily(
            "conveyor_worker_children",
            "Prefork child processes up and taking tasks (0 with the other pools).",
            value=0 if pool is None else pool.children,
        )
        broker = None if worker is None else worker.app.broker
        yield CounterMetricFamily(
            "conveyor_broker_reconnects",
            "Times the worker's broker connection was opened again after it was lost.",
            value=0 if broker is None else broker.reconnects,
        )
        yield CounterMetricFamily(
            "conveyor_broker_refused",
            "Messages the broker dead-lettered on arrival, before the worker saw them "
            "(a content type or header no worker reads, a body over the size limit).",
            value=0 if broker is None else broker.refused,
        )


def _copy(times: _Times) -> _Times:
    copy = _Times(0)
    copy.run, copy.run_sum = list(times.run), times.run_sum
    copy.wait, copy.wait_sum = list(times.wait), times.wait_sum
    return copy


def _cumulative(bounds: list[str], counts: list[int]) -> list[tuple[str, float]]:
    total = 0
    out: list[tuple[str, float]] = []
    for bound, count in zip(bounds, counts, strict=True):
        total += count
        out.append((bound, total))
    return out


def metrics_of(middleware: Sequence[object]) -> PrometheusMiddleware | None:
    """The app's own `PrometheusMiddleware`, if it has one."""
    return next((m for m in middleware if isinstance(m, PrometheusMiddleware)), None)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not worth a line each."""


# Endpoints open in this process: a forked child closes its copies of their sockets, so a
# prefork child never holds the worker's port (it would outlive a killed worker).
_open: weakref.WeakSet[MetricsEndpoint] = weakref.WeakSet()


class MetricsEndpoint:
    """An HTTP endpoint serving `registry` at any path (Prometheus asks for `/metrics`).

    Made bound: a port in use raises `ConfigurationError` here, before anything is served.
    `start` serves from a daemon thread; `close` stops and frees the port.
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        server_class = _Server6 if ":" in host else _Server
        try:
            self._server = make_server(
                host, port, make_wsgi_app(registry), server_class, handler_class=_Quiet
            )
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ConfigurationError(
                f"cannot serve metrics on {host}:{port}: {reason}; choose another metrics "
                "port (--metrics-port, or the metrics_port setting), or 0 for any free one"
            ) from None
        self.host = host
        self.port: int = self._server.server_address[1]
        """The port it listens on (the one chosen, when asked for port 0)."""
        self._thread: threading.Thread | None = None
        _open.add(self)

    def start(self) -> None:
        """Serve from a thread of its own."""
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="conveyor-metrics", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop serving and free the port."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()
        _open.discard(self)

    def _forget(self) -> None:
        self._server.socket.close()


@forget_in_child
def _close_in_child() -> None:
    for endpoint in list(_open):
        endpoint._forget()
    _open.clear()
