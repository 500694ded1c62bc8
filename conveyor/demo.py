"""`conveyor demo`: the quickstart's main job, on the embedded broker with nothing to set up.

It sends a batch of orders to a fresh SQLite broker, runs a worker over them with a progress bar,
and prints the rates and a summary. About 1% of orders hit a transient error once and are retried
with backoff; one in a thousand is invalid and fails for good, so every path shows up.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from conveyor.app import Conveyor
from conveyor.task import Task
from conveyor.worker import Worker, WorkerStats

SEND_CHUNK = 1_000


class PaymentGatewayBusy(ConnectionError):
    """A transient failure: the task retries."""


def build_app(path: str) -> Conveyor:
    """The demo app and its one task, on a SQLite file at `path`."""
    app = Conveyor("demo", broker=f"sqlite:///{path}")

    @app.task(
        name="demo.settle_order",
        autoretry_for=(PaymentGatewayBusy,),
        retry_backoff=0.05,
        max_retries=3,
        bind=True,
    )
    def settle_order(self: Task[Any, Any], order_id: int, amount_cents: int) -> str:
        if amount_cents <= 0:
            raise ValueError(f"order {order_id} has a non-positive amount")
        if order_id % 97 == 0 and self.request.retries == 0:
            raise PaymentGatewayBusy("payment gateway busy, try again")
        return hashlib.sha256(f"{order_id}:{amount_cents}".encode()).hexdigest()[:16]

    return app


def run(console: Console, *, tasks: int, concurrency: int) -> WorkerStats:
    """Send `tasks` orders, process them with `concurrency` threads, print the results."""
    # Failures are part of the demo; the summary reports them instead of log lines.
    logging.getLogger("conveyor").setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="conveyor-demo-") as directory:
        app = build_app(os.path.join(directory, "demo.db"))
        try:
            return _run(console, app, tasks, concurrency)
        finally:
            app.close()


def _run(console: Console, app: Conveyor, tasks: int, concurrency: int) -> WorkerStats:
    task = app.tasks["demo.settle_order"]
    orders = [(n, -1 if n % 1000 == 999 else 100 + n % 5000) for n in range(1, tasks + 1)]
    columns = (
        TextColumn("{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("sending", total=tasks)
        started = time.perf_counter()
        results = []
        for i in range(0, tasks, SEND_CHUNK):
            results += task.map(orders[i : i + SEND_CHUNK])
            progress.update(bar, completed=len(results))
        send_seconds = time.perf_counter() - started

        worker = Worker(app, pool="threads", concurrency=concurrency, until_empty=True)
        thread = threading.Thread(target=worker.run, name="conveyor-demo-worker")
        bar = progress.add_task("working", total=tasks)
        started = time.perf_counter()
        thread.start()
        try:
            while thread.is_alive():
                thread.join(0.1)
                s = worker.stats
                progress.update(bar, completed=s.finished)
        except KeyboardInterrupt:
            worker.stop()
            worker.stop()
            thread.join()
            raise
        work_seconds = time.perf_counter() - started

    stats = worker.stats
    sample = results[0].get(timeout=5)
    table = Table(title="conveyor demo: embedded SQLite broker", show_header=False)
    table.add_column(justify="left")
    table.add_column(justify="right")
    table.add_row("tasks sent", f"{tasks:,}")
    table.add_row("sent per second", f"{tasks / send_seconds:,.0f}")
    table.add_row("processed per second", f"{tasks / work_seconds:,.0f}")
    table.add_row("completed", f"{stats.succeeded:,}")
    table.add_row("failed", f"{stats.failed:,}")
    table.add_row("retried", f"{stats.retried:,}")
    table.add_row("dead-lettered", f"{stats.dead_lettered:,}")
    table.add_row("worker", f"threads x{concurrency}")
    console.print(table)
    console.print(f"first result: {sample!r}")
    return stats
