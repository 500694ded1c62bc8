"""Benchmark conveyor's embedded SQLite broker so its figures can sit next to Huey's.

Same command line and JSON line as ``huey_runner.py``. Each run uses a fresh SQLite file in a
temporary directory (WAL adds -wal and -shm files beside it) and measures two rates:

* enqueue: one producer sends N no-op tasks with ``Task.map()``, conveyor's documented bulk send,
  in tasks/second. It returns once the broker has stored every message durably (one
  ``synchronous=FULL`` transaction). The producer's connection is opened and the schema created
  before the clock starts, as ``SqliteHuey`` does in its constructor.
* process: ``Worker(until_empty=True)``, in tasks/second.

  - ``--worker-type thread``: one worker in this process with the threads pool and ``--workers``
    threads, timed from ``run()`` to its return.
  - ``--worker-type process``: one worker in this process with the prefork pool (conveyor's
    default) and ``--workers`` child processes, timed from ``run()`` (which forks the children,
    as Huey's consumer does inside its timed window) to its return.

Results go to the broker's SQLite file (the default), so every task costs result writes as well.
Logging is what `conveyor worker` sets up by default (`conveyor.log.setup("INFO")`, on stderr),
with its default `task_log` (a line per task while few finish, summaries while many do) unless
``--task-log`` says otherwise; the JSON line counts the lines it wrote about tasks.
A run counts only if every task succeeded exactly once: the workers' counts must equal N, and the
queue must end empty with no dead letters. Otherwise the runner exits non-zero and prints nothing.

Prints one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import sqlite3
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from typing import Any

from conveyor import Conveyor, Task, Worker, WorkerStats, log

# An explicit name, because the default (module.function) differs between the ways this module is
# loaded: "conveyor_runner" as a script or in spawned children, "bench.conveyor_runner" when
# imported. Producer and workers must agree on it or every message is dead-lettered.
NOOP_NAME = "bench.conveyor_runner.noop"


def noop() -> None:
    """The benchmarked task. Module level, so spawned worker processes find it on import."""


def make_app(path: str) -> tuple[Conveyor, Task[[], None]]:
    """The benchmark app on `path`, with conveyor's defaults (results in the same file)."""
    app = Conveyor("bench", broker=f"sqlite:///{path}")
    return app, app.task(name=NOOP_NAME)(noop)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker-type", choices=("thread", "process"), default="thread")
    parser.add_argument("--dir", default=None, help="where to create the temporary database")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up after this long")
    parser.add_argument(
        "--task-log",
        choices=("auto", "each", "quiet"),
        default=None,
        help="the worker's task_log (default: the setting's, auto)",
    )
    return parser.parse_args()


class TaskLines(logging.Handler):
    """Counts what the worker logged about finished tasks: per-task lines and summaries."""

    def __init__(self) -> None:
        super().__init__()
        self.lines = 0
        self.summaries = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("task "):
            self.lines += 1
        else:
            self.summaries += 1


def process_in_threads(app: Conveyor, args: argparse.Namespace) -> tuple[float, WorkerStats]:
    """Drain the queue with one worker of `args.workers` threads in this process."""
    worker = Worker(
        app, pool="threads", concurrency=args.workers, until_empty=True, task_log=args.task_log
    )
    # A warm shutdown at the deadline ends run() with fewer successes than tasks, which fails.
    deadline = threading.Timer(args.timeout, worker.stop)
    deadline.daemon = True
    deadline.start()
    try:
        started = time.perf_counter()
        stats = worker.run()
        return time.perf_counter() - started, stats
    finally:
        deadline.cancel()


def process_in_prefork(app: Conveyor, args: argparse.Namespace) -> tuple[float, WorkerStats]:
    """Drain the queue with one prefork worker of `args.workers` child processes."""
    worker = Worker(
        app, pool="prefork", concurrency=args.workers, until_empty=True, task_log=args.task_log
    )
    deadline = threading.Timer(args.timeout, worker.stop)
    deadline.daemon = True
    deadline.start()
    try:
        started = time.perf_counter()
        stats = worker.run()
        return time.perf_counter() - started, stats
    finally:
        deadline.cancel()


def check(app: Conveyor, queue_name: str, n: int, stats: WorkerStats) -> None:
    """Refuse the run unless every task ran exactly once and nothing is left behind."""
    counts = asdict(stats)
    # Every counter other than these two must be zero (failed, retried, dead-lettered, released,
    # and any counter added later), so a new way of going wrong cannot slip past this check.
    expected = {name: n if name in ("received", "succeeded") else 0 for name in counts}
    if "received" not in counts or "succeeded" not in counts or counts != expected:
        raise RuntimeError(f"expected {n} tasks received and succeeded once each, got {counts}")
    (left,) = app.broker.stats([queue_name])
    if left.ready or left.delayed or left.in_flight or left.dead:
        raise RuntimeError(f"the queue is not empty after the run: {left}")
    store = app.results
    if store is not None and store.count() != n:
        raise RuntimeError(f"expected {n} stored results, found {store.count()}")


def synchronous_levels(app: Conveyor) -> dict[str, int | str]:
    """PRAGMA synchronous on each of this thread's connections, so the report says what was paid.

    These are private attributes of the SQLite broker and store; if they move, say so rather
    than guess.
    """
    out: dict[str, int | str] = {}
    sources = {
        "producer": getattr(app.broker, "_producer_db", None),
        "consumer": getattr(app.broker, "_consumer_db", None),
        "results": getattr(app.results, "_db", None),
    }
    for role, db in sources.items():
        try:
            row = db.connection().execute("pragma synchronous").fetchone()  # type: ignore[union-attr]
            out[role] = int(row[0])
        except Exception:
            out[role] = "unknown"
    return out


def run(args: argparse.Namespace, path: str) -> dict[str, Any]:
    n = args.tasks
    app, task = make_app(path)
    # Open the producer's connection and create the schema now, as SqliteHuey's constructor does.
    app.broker.stats([task.queue])

    started = time.perf_counter()
    sent = task.map([() for _ in range(n)])
    enqueue_s = time.perf_counter() - started
    (ready,) = app.broker.stats([task.queue])
    if len(sent) != n or ready.ready != n:
        raise RuntimeError(f"expected {n} queued tasks, found {ready.ready}")

    counted = TaskLines()
    logging.getLogger("conveyor.worker.tasklog").addHandler(counted)
    if args.worker_type == "thread":
        process_s, stats = process_in_threads(app, args)
    else:
        process_s, stats = process_in_prefork(app, args)
    logging.getLogger("conveyor.worker.tasklog").removeHandler(counted)
    check(app, task.queue, n, stats)
    # Read after the timed part, so no extra connection is open while it runs.
    synchronous = synchronous_levels(app)

    with sqlite3.connect(path) as conn:
        journal_mode = conn.execute("pragma journal_mode").fetchone()[0]
    settings = app.settings
    app.close()
    worker: dict[str, Any] = {
        "pool": "threads" if args.worker_type == "thread" else "prefork",
        "until_empty": True,
        "processes": 1 if args.worker_type == "thread" else 1 + args.workers,
        "slots_per_process": args.workers if args.worker_type == "thread" else 1,
    }
    return {
        "peer": "conveyor",
        "version": importlib.metadata.version("conveyor"),
        "tasks": n,
        "workers": args.workers,
        "worker_type": args.worker_type,
        "enqueue_per_s": round(n / enqueue_s, 1),
        "process_per_s": round(n / process_s, 1),
        "logged": {"task_lines": counted.lines, "summaries": counted.summaries},
        "settings": {
            "broker": "embedded SQLite",
            "results": (
                "none" if settings.ignore_results else (settings.results or "the broker's file")
            ),
            "enqueue": "Task.map, one transaction for all tasks",
            "worker": worker,
            "sqlite": {"journal_mode": journal_mode, "synchronous": synchronous},
            "visibility_timeout": settings.visibility_timeout,
            "logging": {"level": "INFO", "task_log": args.task_log or settings.task_log},
            # CONVEYOR_* variables change settings silently; list them so a report shows them.
            "environment": {k: v for k, v in os.environ.items() if k.startswith("CONVEYOR_")},
            "python": sys.version.split()[0],
        },
    }


def main() -> int:
    args = parse_args()
    log.setup("INFO")  # as `conveyor worker` does by default
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-", dir=args.dir) as tmp:
        result = run(args, os.path.join(tmp, "conveyor.db"))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
