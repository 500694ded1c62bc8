"""An execution ledger in PostgreSQL: one row per run of a task, so a test counts exactly.

Every run of a ledger task inserts (task id, attempt, pid, time) before it returns. After a run
full of faults, `tally` compares the rows with the task ids whose sends returned: a sent id with
no row is lost, every row beyond the first of an id is a duplicate, and an id nobody sent is a
stranger. PostgreSQL keeps the ledger outside everything the faults hit (workers, children,
brokers), and its clock stamps each row, so the rows also give the throughput second by second.

Each ledger is a table of its own (`conveyor_ledger_<random>`), dropped when the test ends.
"""

from __future__ import annotations

import collections
import os
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from conveyor import Conveyor, Resource

DSN = os.environ.get("CONVEYOR_TEST_POSTGRES", "postgresql://127.0.0.1:5432/test")
DSN_ENV = "CONVEYOR_LEDGER_DSN"
TABLE_ENV = "CONVEYOR_LEDGER_TABLE"


@dataclass(frozen=True)
class Tally:
    """What the ledger says about the tasks whose sends returned."""

    sent: int
    ran: int
    """Distinct sent tasks with at least one run."""
    runs: int
    """Rows in the ledger: every run, duplicates included."""
    lost: list[str]
    duplicates: int
    """Runs beyond the first of a task."""
    strangers: int
    """Runs of task ids that were never sent."""
    processes: int
    """Distinct pids that ran tasks."""

    def describe(self) -> str:
        """One line for a report or an assertion message."""
        return (
            f"{self.sent:,} sent, {self.ran:,} ran, {len(self.lost):,} lost, "
            f"{self.duplicates:,} duplicate runs, {self.strangers:,} strangers, "
            f"{self.processes:,} processes"
        )


class Ledger:
    """One ledger table; `record` is the task side, the rest is for the test."""

    def __init__(self, dsn: str, table: str) -> None:
        self.dsn = dsn
        self.table = table

    @classmethod
    def create(cls, dsn: str = DSN) -> Ledger:
        """A new, empty ledger table."""
        ledger = cls(dsn, f"conveyor_ledger_{secrets.token_hex(6)}")
        with psycopg.connect(dsn, autocommit=True) as conn:
            # Unlogged: the ledger's server is never crashed by these tests, and runs are fast.
            conn.execute(
                f"CREATE UNLOGGED TABLE {ledger.table} (task_id text NOT NULL, "
                "attempt integer NOT NULL, pid integer NOT NULL, "
                "at double precision NOT NULL DEFAULT extract(epoch FROM clock_timestamp()))"
            )
        return ledger

    @property
    def env(self) -> dict[str, str]:
        """The environment a worker needs to record into this ledger."""
        return {DSN_ENV: self.dsn, TABLE_ENV: self.table}

    def drop(self) -> None:
        """Delete the table."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {self.table}")

    def distinct(self) -> int:
        """How many different tasks have run so far."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute(f"SELECT count(DISTINCT task_id) FROM {self.table}").fetchone()
        return int(row[0]) if row else 0

    def rows(self) -> list[tuple[str, int, int, float]]:
        """Every run: task id, attempt (the delivery count), pid, time."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return conn.execute(f"SELECT task_id, attempt, pid, at FROM {self.table}").fetchall()

    def tally(self, sent: Iterable[str]) -> Tally:
        """Lost, duplicated and stranger runs, against the ids whose sends returned."""
        rows = self.rows()
        runs = collections.Counter(task_id for task_id, _, _, _ in rows)
        expected = set(sent)
        return Tally(
            sent=len(expected),
            ran=sum(1 for task_id in expected if task_id in runs),
            runs=len(rows),
            lost=sorted(task_id for task_id in expected if task_id not in runs),
            duplicates=sum(n - 1 for task_id, n in runs.items() if task_id in expected),
            strangers=sum(n for task_id, n in runs.items() if task_id not in expected),
            processes=len({pid for _, _, pid, _ in rows}),
        )

    def per_second(self) -> dict[int, int]:
        """Runs finished in each whole second of the epoch."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            found = conn.execute(
                f"SELECT floor(at)::bigint, count(*) FROM {self.table} GROUP BY 1"
            ).fetchall()
        return {int(second): int(count) for second, count in found}


def connection_resource(app: Conveyor, name: str) -> Resource[psycopg.Connection[Any]]:
    """The task side: register `name` on `app`, each worker process's own connection to the
    ledger named by the environment."""
    return app.resource(
        lambda: psycopg.connect(os.environ[DSN_ENV], autocommit=True),
        name=name,
        check=lambda conn: not conn.closed and not conn.broken,
        close=lambda conn: conn.close(),
    )


def record(conn: psycopg.Connection[tuple[object, ...]], task_id: str, attempt: int) -> None:
    """The task side: note one run of `task_id` in the ledger named by the environment."""
    conn.execute(
        f"INSERT INTO {os.environ[TABLE_ENV]} (task_id, attempt, pid) VALUES (%s, %s, %s)",
        (task_id, attempt, os.getpid()),
    )


def postgres_reachable(dsn: str = DSN) -> bool:
    """True if the ledger's PostgreSQL answers."""
    try:
        with psycopg.connect(dsn, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


@contextmanager
def new_ledger() -> Iterator[Ledger]:
    """A fresh ledger for one test; skips (or fails under CI) without PostgreSQL."""
    if not postgres_reachable():
        message = "PostgreSQL is not reachable on 127.0.0.1:5432 (needed for the task ledger)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    ledger = Ledger.create()
    try:
        yield ledger
    finally:
        ledger.drop()
