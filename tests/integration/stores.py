"""One factory per result store for the shared suite (test_result_stores.py).

A factory takes the test's `tmp_path` and returns a `StoreSetup`: the results URL, a broker URL
to go with it, a `corrupt(task_id, data)` hook that writes `data` where the store keeps that task's
record, and a `cleanup()` that deletes whatever the test left in the service. A service that is
not running skips the test locally and fails it when the CI variable is set.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sqlite3
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from conveyor.errors import ResultError

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


@dataclass
class StoreSetup:
    """What the shared suite needs to know about one store."""

    results: str
    """The `results=` URL."""
    broker: str
    """The `broker=` URL the store is tested with."""
    corrupt: Callable[[str, bytes], None]
    """`corrupt(task_id, data)`: put `data` where the store keeps the task's record."""
    cleanup: Callable[[], None] = lambda: None
    """Delete what the test left in the service (called after the apps are closed)."""
    shared: bool = True
    """Records are visible to every process and app on the store (not so for RPC: only the
    process that sent a task receives its results)."""


def require_service(name: str, host: str, port: int, start: str) -> None:
    """Skip the test when nothing listens on host:port; fail it when CI is set."""
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not reachable on {host}:{port}, and CI needs it")
        pytest.skip(f"{name} is not running on {host}:{port} ({start})")


def not_wired_in(module: str, what: str, factory: str) -> None:
    """Skip while a store's module does not exist; once it does, until its factory is filled in
    (a failure in CI, so the suite cannot silently leave a store out)."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{what} not built yet")
    message = f"{what} is not in the shared suite yet: fill in {factory}() in {__file__}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


# SQLite


def sqlite_store(tmp_path: Path) -> StoreSetup:
    """The embedded broker and its results in one file."""
    path = tmp_path / "stores.db"
    url = f"sqlite:///{path}"

    def corrupt(task_id: str, data: bytes) -> None:
        with sqlite3.connect(path) as conn:
            changed = conn.execute(
                "UPDATE conveyor_results SET data = ? WHERE id = ?", (data, task_id)
            ).rowcount
        conn.close()
        assert changed == 1, f"no stored result for {task_id} to corrupt"

    return StoreSetup(results=url, broker=url, corrupt=corrupt)


# Redis


def redis_store(tmp_path: Path) -> StoreSetup:
    """Redis results under a key prefix of the test's own; the embedded broker carries tasks."""
    require_service("Redis", REDIS_HOST, REDIS_PORT, "start it: redis-server --daemonize yes")
    import redis

    prefix = f"test-{uuid.uuid4().hex}"
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=0)

    def corrupt(task_id: str, data: bytes) -> None:
        key = f"{prefix}:result:{task_id}"
        assert client.exists(key), f"no stored result for {task_id} to corrupt"
        client.set(key, data)

    def cleanup() -> None:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()

    return StoreSetup(
        results=f"redis://{REDIS_HOST}:{REDIS_PORT}/0?prefix={prefix}",
        broker=f"sqlite:///{tmp_path / 'broker.db'}",
        corrupt=corrupt,
        cleanup=cleanup,
    )


# PostgreSQL


def postgresql_store(tmp_path: Path) -> StoreSetup:
    """PostgreSQL results in a table of the test's own; the embedded broker carries tasks.

    Logs in to the local database `test` as `postgres`, else as the current user (trust auth).
    """
    host, port, database = "127.0.0.1", 5432, "test"
    require_service("PostgreSQL", host, port, f"start it, with a database {database!r}")
    import getpass

    import psycopg

    reasons = []
    for user in dict.fromkeys(("postgres", getpass.getuser())):
        server = f"postgresql://{user}@{host}:{port}/{database}"
        try:
            psycopg.connect(server, connect_timeout=5).close()
            break
        except psycopg.Error as exc:
            reasons.append(f"{user}: {' '.join(str(exc).split())}")
    else:
        message = f"cannot log in to PostgreSQL at {host}:{port}/{database}: {'; '.join(reasons)}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    table = f"conveyor_test_{uuid.uuid4().hex[:12]}"

    def corrupt(task_id: str, data: bytes) -> None:
        with psycopg.connect(server, autocommit=True) as conn:
            changed = conn.execute(
                f"UPDATE {table} SET data = %s WHERE id = %s", (data, task_id)
            ).rowcount
        assert changed == 1, f"no stored result for {task_id} to corrupt"

    def cleanup() -> None:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")

    return StoreSetup(
        results=f"{server}?table={table}",
        broker=f"sqlite:///{tmp_path / 'broker.db'}",
        corrupt=corrupt,
        cleanup=cleanup,
    )


# RPC: TO BE FILLED IN by the RPC store's author.
# URL: rpc:// with RabbitMQ as the broker (conftest.require_rabbitmq, delete_rabbitmq_queues in
# cleanup); shared=False. Replace the body below with the factory.


def rpc_store(tmp_path: Path) -> StoreSetup:
    """Results sent back to the sending process over RabbitMQ's direct reply-to.

    The "store" is the sending process's memory: a corrupt record is one that arrived as a
    reply the sender could not read.
    """
    require_service("RabbitMQ", "127.0.0.1", 5672, "start it: rabbitmq-server -detached")
    from conveyor.results.base import decode_record
    from conveyor.results.rpc import _live

    def corrupt(task_id: str, data: bytes) -> None:
        holders = [store for store in list(_live) if store.get(task_id) is not None]
        assert holders, f"no process here holds a result for {task_id} to corrupt"
        try:
            decode_record(data)
        except ResultError as exc:
            for store in holders:
                store._corrupt[task_id] = str(exc)
        else:
            raise AssertionError("the corrupt data decodes as a record")

    return StoreSetup(
        results="rpc://",
        broker="amqp://guest:guest@127.0.0.1:5672/",
        corrupt=corrupt,
        shared=False,
    )


FACTORIES: dict[str, Callable[[Path], StoreSetup]] = {
    "sqlite": sqlite_store,
    "redis": redis_store,
    "postgresql": postgresql_store,
    "rpc": rpc_store,
}
