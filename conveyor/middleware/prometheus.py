"""`PrometheusMiddleware`: what a worker did and is doing, as Prometheus metrics.

Everything is counted in the worker's own process, in `after_settle`, which sees every delivery
the worker took exactly once, with its task, its outcome, and the run's time and start measured
where it ran (a prefork child). So one registry in one process holds the whole worker: its
endpoint sums every child, replaced ones included, with no files shared with the children and
nothing for a child to send. Gauges that describe the worker itself (prefork children, tasks in
flight, the broker's reconnections) are read when Prometheus scrapes, not kept up per task.

`MetricsEndpoint` serves a registry over HTTP. The worker makes one when `metrics_port` is set
(`conveyor worker --metrics-port`): bound before the pool forks, so a port in use stops the
worker before it takes a message, and served from a thread once the pool is up.

prometheus-client is imported here only: a worker without metrics never loads it.
"""

from __future__ import annotations

import collections
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
    from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - the extra is part of the dev environment
    raise ConfigurationError(
        "Prometheus metrics need prometheus-client: pip install 'conveyor[prometheus]'"
    ) from exc

if TYPE_CHECKING:
    from conveyor.task import Request, Task
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


class PrometheusMiddleware(Middleware):
    """Counts each worker's tasks by name and outcome, and times them (see docs/metrics.md).

    `registry` is where the metrics go: a registry of their own by default (pass
    `prometheus_client.REGISTRY` to serve them beside the process collectors and your own
    metrics). `buckets` are the run-time and wait-time histograms' upper bounds, in seconds.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        buckets: Sequence[float] = BUCKETS,
    ) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        self._tasks = Counter(
            "conveyor_tasks",
            "Deliveries settled by this worker, by task and outcome.",
            ["task", "outcome"],
            registry=self.registry,
        )
        self._dead = Counter(
            "conveyor_tasks_dead_lettered",
            "Messages this worker dead-lettered, by task and the reason's category.",
            ["task", "reason"],
            registry=self.registry,
        )
        self._run = Histogram(
            "conveyor_task_run_seconds",
            "Seconds each run took, measured in the process that ran it.",
            ["task"],
            buckets=buckets,
            registry=self.registry,
        )
        self._wait = Histogram(
            "conveyor_task_wait_seconds",
            "Seconds from a task's send (or its due time, for a delayed one) to its run's start.",
            ["task"],
            buckets=buckets,
            registry=self.registry,
        )
        # Children of the labelled metrics, by label values: one dict lookup per settlement
        # instead of prometheus-client's labels() (a lock and a few calls).
        self._counts: dict[tuple[str, str], Any] = {}
        self._times: dict[str, tuple[Any, Any]] = {}
        # Task ids admitted and not yet settled, with their task's name: the in-flight gauge.
        self._admitted: dict[str, str] = {}
        self._worker: Worker | None = None
        self.registry.register(_WorkerCollector(self))

    def worker_start(self, worker: Worker) -> None:
        """Remember the worker, for the gauges; show each task's main outcomes at 0."""
        self._worker = worker
        for name in worker.app.tasks:
            for outcome in _INITIAL:
                self._count(name, outcome)

    def worker_stop(self, worker: Worker) -> None:
        """The worker's pool has stopped: it has no children any more."""
        if self._worker is worker:
            self._worker = None

    def before_admit(self, task: Task[Any, Any], request: Request) -> None:
        """The task is in flight from now until it is settled."""
        self._admitted[request.id] = task.name

    def after_settle(self, settled: Settled) -> None:
        """Count the outcome; time the run, and the wait before it."""
        task, envelope = settled.task, settled.envelope
        name = UNREGISTERED if task is None else task.name
        if envelope is not None:
            self._admitted.pop(envelope.id, None)
        counter = self._counts.get((name, settled.outcome))
        if counter is None:
            counter = self._count(name, settled.outcome)
        counter.inc()
        if settled.dead_letter is not None:
            category = DeadLetterReason.of(settled.dead_letter)
            self._dead.labels(name, "other" if category is None else category.value).inc()
        took = settled.took
        if took is None:
            return
        times = self._times.get(name)
        if times is None:
            times = self._times[name] = (self._run.labels(name), self._wait.labels(name))
        times[0].observe(took)
        started = settled.started_at
        if envelope is not None and started is not None and envelope.sent_at:
            due = envelope.sent_at if envelope.eta is None else max(envelope.sent_at, envelope.eta)
            # Clocks of different machines may disagree: a wait is never negative.
            times[1].observe(max(0.0, started - due))

    def _count(self, name: str, outcome: str) -> Any:
        counter = self._counts[name, outcome] = self._tasks.labels(name, outcome)
        return counter

    def in_flight(self) -> dict[str, int]:
        """Tasks admitted and not yet settled, by task name."""
        # list() copies in one step under the GIL: the worker may add or remove meanwhile.
        return collections.Counter(list(self._admitted.values()))


class _WorkerCollector(Collector):
    """The metrics read from the worker when Prometheus scrapes."""

    def __init__(self, middleware: PrometheusMiddleware) -> None:
        self._middleware = middleware

    def collect(self) -> Iterator[Any]:
        middleware = self._middleware
        in_flight = GaugeMetricFamily(
            "conveyor_tasks_in_flight",
            "Tasks admitted by this worker and not yet settled (running or about to run).",
            labels=["task"],
        )
        for name, count in sorted(middleware.in_flight().items()):
            in_flight.add_metric([name], count)
        yield in_flight
        worker = middleware._worker
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
