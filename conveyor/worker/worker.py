"""The worker's lifecycle, top to bottom: start the pool, consume, shut down.

The first SIGTERM or SIGINT starts a warm shutdown: nothing more is fetched, running tasks get
`shutdown_grace` seconds to finish, and whatever is still running then is given back to the broker.
A second signal is a cold shutdown: running tasks' messages go back at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from conveyor import fleet, revocations
from conveyor.app import Conveyor
from conveyor.control.beacon import Beacon
from conveyor.middleware.hooks import call
from conveyor.middleware.signals import worker_hooks
from conveyor.redact import redact_url
from conveyor.revocations import no_store
from conveyor.revocations.watch import RevocationWatch
from conveyor.worker import pools
from conveyor.worker.consumer import Consumer
from conveyor.worker.loops import choose
from conveyor.worker.tasklog import TaskLog, TaskLogMode
from conveyor.worker.verdict import WorkerStats
from conveyor.workflows.bulk import register as register_bulk

if TYPE_CHECKING:
    from conveyor.middleware.prometheus import MetricsEndpoint
    from conveyor.worker.pools.base import Pool

log = logging.getLogger("conveyor.worker")


class Worker:
    """Runs an app's tasks from the given queues."""

    def __init__(
        self,
        app: Conveyor,
        *,
        queues: Sequence[str] | None = None,
        pool: str | None = None,
        concurrency: int | None = None,
        until_empty: bool = False,
        shutdown_grace: float | None = None,
        max_tasks_per_child: int | None = None,
        max_memory_per_child: int | None = None,
        task_log: TaskLogMode | None = None,
        loop: str | None = None,
        metrics_port: int | None = None,
        events: bool | None = None,
    ) -> None:
        settings = app.settings
        self.app = app
        self.queues = list(queues or [settings.default_queue])
        self.pool_name = pool or settings.pool
        self.concurrency = concurrency or settings.concurrency
        self.until_empty = until_empty
        self.max_tasks_per_child = max_tasks_per_child or settings.max_tasks_per_child
        self.max_memory_per_child = max_memory_per_child or settings.max_memory_per_child
        self.shutdown_grace = settings.shutdown_grace if shutdown_grace is None else shutdown_grace
        self.task_log: TaskLogMode = task_log or settings.task_log
        #: The event loop the worker runs on, "asyncio" or "uvloop" (`loop`: auto, asyncio or
        #: uvloop; auto is uvloop when it is installed).
        self.loop_name, self._loop_factory = choose(loop or settings.loop)
        #: Serve Prometheus metrics on this port (0: any free one); None for no endpoint.
        self.metrics_port = settings.metrics_port if metrics_port is None else metrics_port
        #: The metrics endpoint while the worker runs, when it serves one (its `port` is bound).
        self.metrics: MetricsEndpoint | None = None
        #: The pool while the worker runs.
        self.pool: Pool | None = None
        #: Publish task events and heartbeats from the start, not only while a reader asks.
        self.events = settings.events if events is None else events
        self.stats = WorkerStats()
        self.started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._consumer: Consumer | None = None
        self._signals = 0
        #: Why the worker stopped by itself, if it did: its pool broke (see `Pool.on_broken`).
        self.failure: str | None = None

    def run(self) -> WorkerStats:
        """Run until stopped (or, with `until_empty`, until the queues are empty)."""
        with asyncio.Runner(loop_factory=self._loop_factory) as runner:
            runner.run(self._main())
        return self.stats

    def in_flight(self) -> dict[str, int]:
        """Tasks taken and not yet settled (running, or waiting in the pool), by task name;
        from any thread."""
        consumer = self._consumer
        return {} if consumer is None else consumer.in_flight()

    @property
    def event_loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop the worker runs on, while it runs."""
        return self._loop

    def stop(self) -> None:
        """Ask for a shutdown from any thread; a second call makes it cold."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._on_signal)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        # Before the pool starts: prefork children are forked with the hooks worked out here,
        # and a metrics port in use stops the worker before it forks or takes anything.
        middleware = self._serve_metrics()
        try:
            await self._work(middleware)
        finally:
            if self.metrics is not None:
                self.metrics.close()

    async def _work(self, middleware: list[object]) -> None:
        app = self.app
        app.hooks = worker_hooks(middleware)
        register_bulk(app)  # the built-in task of `task.starmap` and `task.chunks` messages
        pool = self.pool = pools.create(
            self.pool_name,
            self.concurrency,
            app=self.app,
            max_tasks_per_child=self.max_tasks_per_child,
            max_memory_per_child=self.max_memory_per_child,
        )
        consumer = self._consumer = Consumer(
            self.app,
            pool,
            self.queues,
            self.stats,
            until_empty=self.until_empty,
            task_log=TaskLog(self.task_log),
        )
        log.info(
            "worker for %s starting: broker %s, queues %s, pool %s x%d, loop %s",
            self.app.name,
            redact_url(self.app.broker.display_url),
            ",".join(self.queues),
            self.pool_name,
            pool.concurrency,
            self.loop_name,
        )
        self._warn_about_ack_timeout()
        if self.pool_name != "prefork":
            if self.max_tasks_per_child or self.max_memory_per_child:
                log.warning(
                    "max_tasks_per_child and max_memory_per_child apply to the prefork pool "
                    "only: ignored with the %s pool",
                    self.pool_name,
                )
            for hook in self.app.process_start_hooks:  # this process runs the tasks
                hook()
            app.hooks = worker_hooks(middleware)  # receivers those hooks connected
            call(app.hooks.process_start, "process_start")
        pool.on_broken = self._on_broken
        consumer.on_fatal = self._on_misconfigured
        await pool.start()
        if self.metrics is not None:
            self.metrics.start()
            log.info("serving metrics on %s:%d", self.metrics.host, self.metrics.port)
        # After the fork of the pool's zygote: no child inherits the store's connection.
        watch = await _watch_revocations(app, consumer)
        beacon = Beacon(self, consumer, pool, always=self.events)
        beacon.start()  # after the pool: its thread is never in a fork
        installed = self._install_signals()
        call(app.hooks.worker_start, "worker_start", self)
        self.started.set()
        watching = None if watch is None else asyncio.create_task(watch.run())
        try:
            await consumer.run()
        finally:
            if watching is not None and watch is not None:
                watching.cancel()
                watch.close()
            loop = asyncio.get_running_loop()
            for sig in installed:
                loop.remove_signal_handler(sig)
            await pool.stop()
            if self.pool_name != "prefork":  # this process ran the tasks
                call(app.hooks.process_stop, "process_stop")
            beacon.stop()  # bounded: it publishes what is left, then lets go
            call(app.hooks.worker_stop, "worker_stop", self)
            # Connections the tasks opened in this process (a prefork child closes its own).
            self.app.resources.close_all()
            s = self.stats
            log.info(
                "worker stopped: %d succeeded, %d failed, %d retried, %d dead-lettered, "
                "%d released",
                s.succeeded,
                s.failed,
                s.retried,
                s.dead_lettered,
                s.released,
            )

    def _serve_metrics(self) -> list[object]:
        """Bind the metrics endpoint, if the worker serves one; the middleware to run.

        The app's `PrometheusMiddleware` is served if it has one; else this worker counts with
        one of its own (its hooks all run in this process: prefork children need none).
        """
        middleware = list(self.app.middleware)
        if self.metrics_port is None:
            return middleware
        from conveyor.middleware.prometheus import (
            MetricsEndpoint,
            PrometheusMiddleware,
            metrics_of,
        )

        metrics = metrics_of(middleware)
        if metrics is None:
            metrics = PrometheusMiddleware()
            middleware.append(metrics)
        host = self.app.settings.metrics_host
        self.metrics = MetricsEndpoint(metrics.registry, host, self.metrics_port)
        return middleware

    def _warn_about_ack_timeout(self) -> None:
        """A task allowed to run longer than the broker waits for its ack runs twice."""
        limit = self.app.broker.ack_timeout
        if limit is None:
            return
        for task in self.app.tasks.values():
            time_limit = task.options.time_limit
            if time_limit is not None and time_limit > limit:
                log.warning(
                    "task %s may run %.0fs but the broker takes back unacknowledged messages "
                    "after %.0fs (RabbitMQ's consumer_timeout): raise the broker's timeout or "
                    "lower the task's time_limit",
                    task.name,
                    time_limit,
                    limit,
                )

    def _install_signals(self) -> list[signal.Signals]:
        if threading.current_thread() is not threading.main_thread():
            return []
        assert self._loop is not None
        installed = [signal.SIGTERM, signal.SIGINT]
        for sig in installed:
            self._loop.add_signal_handler(sig, self._on_signal)
        return installed

    def _on_signal(self) -> None:
        consumer, loop = self._consumer, self._loop
        if consumer is None or loop is None:
            return
        self._signals += 1
        if self._signals == 1:
            log.info(
                "warm shutdown: finishing %d running tasks (up to %.0fs); signal again to stop now",
                consumer.running,
                self.shutdown_grace,
            )
            consumer.stop()
            loop.call_later(self.shutdown_grace, self._grace_over)
        else:
            log.warning("cold shutdown: giving %d running tasks back", consumer.running)
            consumer.abandon()

    def _on_broken(self, reason: str) -> None:
        """The pool cannot go on: shut down warm, and let `run`'s caller see the failure."""
        self._fail(reason, "the worker stops so that a new one can start")

    def _on_misconfigured(self, reason: str) -> None:
        """The broker refused the configuration, which no retry mends: the same, and a new
        worker started with the same settings would stop too."""
        self._fail(reason, "the worker stops")

    def _fail(self, reason: str, consequence: str) -> None:
        if self.failure is not None:
            return
        self.failure = reason
        log.error("%s: %s", reason, consequence)
        if self._signals == 0:
            self._on_signal()

    def _grace_over(self) -> None:
        if self._consumer is not None and self._consumer.running:
            log.warning("shutdown grace over: giving %d running tasks back", self._consumer.running)
            self._consumer.abandon()


async def _watch_revocations(app: Conveyor, consumer: Consumer) -> RevocationWatch | None:
    """Load the revocations before the first fetch, and the watch that keeps up with them;
    None (said once) when the app has no store for them."""
    url = fleet.store_url(app.settings, memory=True)
    if url is None:
        log.info("revocations are not checked: %s", no_store())
        return None
    try:
        # A store of the worker's own, closed when it stops (an in-memory one is the app's).
        store = app.revocations if url.startswith("memory:") else revocations.from_url(url)
    except Exception as exc:  # a store URL that cannot be used: the worker runs without
        log.error("revocations are not checked: %s", exc)
        return None
    assert store is not None
    watch = RevocationWatch(store, consumer.revoke, owned=not url.startswith("memory:"))
    await watch.load()
    return watch
