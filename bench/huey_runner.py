"""Benchmark Huey's SQLite storage so its figures can sit next to conveyor's.

Each run uses a fresh SQLite file in a temporary directory (WAL adds -wal and -shm files beside
it) and measures two rates:

* enqueue: one producer enqueues N no-op tasks, in tasks/second. Huey has no bulk enqueue:
  ``TaskWrapper.map()`` and ``group`` both call ``Huey.enqueue()`` once per task, and each call is
  its own ``begin exclusive`` transaction. The storage lock is not re-entrant, so the inserts cannot
  be wrapped in one transaction either. The producer therefore calls the task, the documented
  way; ``map()`` does the same work per task and measured the same within noise.
* process: a Huey consumer runs in this process with the requested workers, in tasks/second from
  ``Consumer.start()`` to the moment every task has run. A receiver of Huey's ``complete`` signal,
  which fires after a task's own bookkeeping writes, bumps a lock-protected
  ``multiprocessing.Value`` (fork-inherited, so it counts thread and process workers alike); the
  main thread polls it every millisecond, then confirms that ``huey.pending_count()`` is zero.

Prints one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from typing import Any

import huey
from huey import SqliteHuey
from huey.signals import SIGNAL_COMPLETE

POLL_S = 0.001
# SQLite storage is not blocking: a worker that finds the queue empty waits initial_delay, then
# backs off up to max_delay (Huey's defaults: 0.1 s, x1.15, 10 s). 1 ms flat is the floor that
# still sleeps; 0 would spin on the storage lock. The queue is full until the tail, so this
# mostly guards against a late wake-up. The scheduler cannot be disabled and wakes at most once a
# second. Health checks only run inside Consumer.run(), which is not used here.
CONSUMER = {
    "initial_delay": 0.001,
    "backoff": 1.0,
    "max_delay": 0.001,
    "periodic": False,
    "scheduler_interval": 1,
    "check_worker_health": True,
    "shutdown_timeout": 30.0,
}
# Huey's own defaults, spelled out so the report says what durability the figures bought.
STORAGE = {"journal_mode": "wal", "fsync": None, "cache_mb": 8, "timeout": 5}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker-type", choices=("thread", "process"), default="thread")
    parser.add_argument("--dir", default=None, help="where to create the temporary database")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up after this long")
    return parser.parse_args()


def run(args: argparse.Namespace, path: str) -> dict[str, Any]:
    n = args.tasks
    done = multiprocessing.Value("q", 0)
    queue = SqliteHuey("bench", filename=path, **STORAGE)

    @queue.task()
    def noop() -> None:
        pass

    @queue.signal(SIGNAL_COMPLETE)
    def completed(_signal: str, _task: Any) -> None:
        with done.get_lock():
            done.value += 1

    started = time.perf_counter()
    for _ in range(n):
        noop()
    enqueue_s = time.perf_counter() - started
    if queue.pending_count() != n:
        raise RuntimeError(f"expected {n} pending tasks, found {queue.pending_count()}")
    # fsync=None leaves SQLite's compiled-in default, so record what it actually is.
    synchronous = queue.storage.sql("pragma synchronous", results=True)[0][0]

    consumer = queue.create_consumer(workers=args.workers, worker_type=args.worker_type, **CONSUMER)
    # start() installs handlers that only record the signal for Consumer.run(), which is not used
    # here; putting the old ones back keeps Ctrl-C able to stop the run.
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    started = time.perf_counter()
    consumer.start()
    for signum, handler in saved.items():
        if handler is not None:
            signal.signal(signum, handler)
    try:
        deadline = started + args.timeout
        while done.value < n:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"only {done.value} of {n} tasks ran in {args.timeout}s")
            time.sleep(POLL_S)
        process_s = time.perf_counter() - started
    finally:
        consumer.stop(graceful=True)

    left = queue.pending_count()
    if left or done.value != n:
        raise RuntimeError(f"{done.value} tasks ran and {left} are still queued, expected {n}")
    queue.storage.close()
    return {
        "peer": "huey",
        "version": huey.__version__,
        "tasks": n,
        "workers": args.workers,
        "worker_type": args.worker_type,
        "enqueue_per_s": round(n / enqueue_s, 1),
        "process_per_s": round(n / process_s, 1),
        "settings": {
            "storage": "SqliteHuey",
            "enqueue": "task call, one transaction per task",
            "consumer": CONSUMER,
            "sqlite": {**STORAGE, "synchronous": synchronous},
            "completion_poll_s": POLL_S,
            "python": sys.version.split()[0],
        },
    }


def main() -> int:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="huey-bench-", dir=args.dir) as tmp:
        result = run(args, os.path.join(tmp, "huey.db"))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
