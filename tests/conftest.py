"""Shared fixtures: a fresh memory app, polling with a deadline instead of sleeping, and the
local RabbitMQ (skipped locally when absent, a failure in CI)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import pytest

from conveyor import Conveyor, Worker, WorkerStats, log
from conveyor.testing import memory_app

T = TypeVar("T")

RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"


def require_rabbitmq() -> None:
    """Skip the test when the local RabbitMQ is not running; fail it when CI is set."""
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=2).close()
    except OSError:
        if os.environ.get("CI"):
            pytest.fail("RabbitMQ is not reachable on 127.0.0.1:5672, and CI needs it")
        pytest.skip(
            "RabbitMQ is not running on 127.0.0.1:5672 (start it: rabbitmq-server -detached)"
        )


def delete_rabbitmq_queues(queue: str) -> None:
    """Delete a conveyor queue with its dead-letter and delay queues from the local RabbitMQ."""
    import aiormq

    from conveyor.brokers.rabbitmq import BUCKETS_MS

    async def delete() -> None:
        connection = await aiormq.connect(RABBITMQ_URL)
        channel = await connection.channel()
        for name in (queue, f"{queue}.dead", *(f"{queue}.delay.{ms}" for ms in BUCKETS_MS)):
            await channel.queue_delete(name)
        await connection.close()

    asyncio.run(delete())


def wait_for(condition: Callable[[], T], timeout: float = 5.0, what: str = "condition") -> T:
    """Poll `condition` until it returns something truthy (and return it), or fail at the deadline.

    The suite waits this way (or with a bounded join), never with a bare sleep as synchronization.
    """
    deadline = time.monotonic() + timeout
    interval = 0.001
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not met within {timeout}s (last value: {value!r})")
        time.sleep(interval)
        interval = min(interval * 2, 0.02)


@pytest.fixture
def poll() -> Callable[..., Any]:
    """`poll(condition, timeout=5.0, what="...")`: see `wait_for`."""
    return wait_for


@pytest.fixture
def app() -> Iterator[Conveyor]:
    """A fresh app on the memory broker and memory result store."""
    application = memory_app()
    yield application
    application.close()


def start_worker(worker: Worker) -> tuple[threading.Thread, list[BaseException]]:
    """Run `worker` on a daemon thread; anything escaping `run` is collected, never re-raised
    as is (a KeyboardInterrupt re-raised here would end the test session)."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            worker.run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, errors


def run_bounded(
    app: Conveyor,
    pool: str = "threads",
    concurrency: int = 2,
    timeout: float = 5.0,
    **options: Any,
) -> WorkerStats:
    """Run a worker until the queue is empty, off the main thread; fail instead of hanging
    (for behaviour that could wedge the worker). `options` go to `Worker`."""
    options.setdefault("shutdown_grace", 0)
    worker = Worker(app, pool=pool, concurrency=concurrency, until_empty=True, **options)
    thread, errors = start_worker(worker)
    thread.join(timeout)
    if thread.is_alive():
        worker.stop()
        worker.stop()  # the second stop is a cold shutdown
        thread.join(15)
        raise AssertionError(f"the worker did not drain its queue within {timeout}s")
    if errors:
        raise AssertionError(f"the worker raised {errors[0]!r}") from errors[0]
    return worker.stats


@contextmanager
def fresh_root_logger() -> Iterator[None]:
    """The root logger as a new process has it (no handlers) while the block runs, then as it was.

    pytest's capture handlers sit on the root logger during a test, and `conveyor.log.setup`
    would take them for the user's own configuration; what the block installs (a handler on a
    CliRunner's stderr, which closes) is closed and removed afterwards.
    """
    root = logging.getLogger()
    handlers, level, applied = root.handlers[:], root.level, log._applied
    root.handlers.clear()
    try:
        yield
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
        log._applied = applied
