"""A send that returned is durable: a producer killed mid-stream, and `map` all or nothing.

The killed producer is a real process on a real SQLite file. It prints each task id once `delay`
returned; whatever it printed must be in the queue afterwards, whole.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor import Conveyor
from conveyor._sqlite import _Connection
from conveyor.brokers.sqlite import SQLiteBroker
from conveyor.errors import EncodeError
from conveyor.message import Envelope, decode

pytestmark = pytest.mark.integration

Q = "default"
TASK = "durability.work"

PRODUCER = f"""
import sys

from conveyor import Conveyor

app = Conveyor("durability", broker=sys.argv[1])


@app.task(name="{TASK}")
def work(n: int) -> int:
    return n


n = int(sys.argv[2])
while True:
    result = work.delay(n)
    sys.stdout.write(result.id + "\\n")
    sys.stdout.flush()
    n += 1
"""


def rows_in(db: Path) -> int:
    """Messages stored, ready or delayed, read with a plain connection."""
    conn = sqlite3.connect(db)
    try:
        ready = conn.execute("SELECT COUNT(*) FROM conveyor_messages").fetchone()[0]
        delayed = conn.execute("SELECT COUNT(*) FROM conveyor_delayed").fetchone()[0]
        return int(ready + delayed)
    finally:
        conn.close()


def integrity(db: Path) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("PRAGMA integrity_check").fetchall()
    finally:
        conn.close()


def queued_envelopes(url: str) -> list[Envelope]:
    """Every message in the queue, fetched and decoded (a half-written body fails here)."""
    broker = SQLiteBroker(url)
    try:
        [stats] = broker.stats([Q])
        assert (stats.delayed, stats.in_flight, stats.dead) == (0, 0, 0)
        deliveries = broker.fetch([Q], stats.ready + 1)
        assert len(deliveries) == stats.ready
        envelopes = [decode(bytes(d.body)) for d in deliveries]
        broker.requeue(deliveries, count_delivery=False)  # as they were
        return envelopes
    finally:
        broker.close()


def kill_producer_mid_stream(tmp_path: Path, url: str, first: int, at_least: int) -> list[str]:
    """Run a producer, SIGKILL it once `at_least` sends returned; the ids it printed."""
    script = tmp_path / "producer.py"
    script.write_text(textwrap.dedent(PRODUCER))
    with (tmp_path / "producer.err").open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, str(script), url, str(first)],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    try:
        assert process.stdout is not None
        printed = b""
        lines = 0
        while lines < at_least:
            line = process.stdout.readline()
            if not line:
                process.wait(10)
                problem = (tmp_path / "producer.err").read_text()
                raise AssertionError(f"the producer stopped early:\n{problem}")
            printed += line
            lines += 1
        process.send_signal(signal.SIGKILL)
        printed += process.stdout.read()  # what it wrote before the kill landed
        assert process.wait(10) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        process.stdout.close()  # type: ignore[union-attr]
    # Only whole lines: a send whose line was cut off cannot be known to have returned.
    *complete, _partial = printed.decode().split("\n")
    return complete


def test_every_send_that_returned_survives_a_sigkilled_producer(tmp_path: Path) -> None:
    db = tmp_path / "broker.db"
    url = f"sqlite:///{db}"
    returned: list[str] = []
    # Three producers in a row on the same file, each killed at a different point of its stream.
    for at_least in (300, 400, 500):
        returned += kill_producer_mid_stream(tmp_path, url, len(returned), at_least)
        assert len(set(returned)) == len(returned)

        assert integrity(db) == [("ok",)]
        envelopes = queued_envelopes(url)
        queued = {e.id for e in envelopes}
        lost = [task_id for task_id in returned if task_id not in queued]
        assert lost == [], f"{len(lost)} sends that returned are not in the queue"
        assert all(e.task == TASK for e in envelopes)
        # At most the send in progress at the kill committed without being printed.
        assert len(envelopes) - len(returned) in (0, 1)
        if len(envelopes) > len(returned):
            # Keep the numbering dense: the next producer starts after the unprinted one.
            [extra] = [e for e in envelopes if e.id not in set(returned)]
            returned.append(extra.id)
        assert sorted(e.args[0] for e in envelopes) == list(range(len(envelopes)))


# map() is all or nothing


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Conveyor]:
    application = Conveyor("maps", broker=f"sqlite:///{tmp_path}/broker.db")

    @application.task(name=TASK)
    def work(n: Any) -> Any:
        return n

    yield application
    application.close()


def test_map_with_a_later_unencodable_item_sends_nothing(app: Conveyor, tmp_path: Path) -> None:
    work = app.tasks[TASK]
    db = tmp_path / "broker.db"
    first = work.delay(0)  # already there, so the count shows what the batches added
    with pytest.raises(EncodeError):
        work.map([(1,), (2,), (3,), ({"handle": object()},)])
    with pytest.raises(EncodeError):
        work.map([(1,), (2,), (float("nan"),)])
    assert rows_in(db) == 1
    results = work.map([(n,) for n in range(1, 4)])
    assert rows_in(db) == 4
    assert sorted(e.id for e in queued_envelopes(f"sqlite:///{db}")) == sorted(
        [first.id, *(r.id for r in results)]
    )


class DiskGone(OSError):
    pass


def fail_midway(monkeypatch: pytest.MonkeyPatch, table: str, after: int) -> list[int]:
    """Make `executemany` into `table` raise once `after` rows went in (over all its calls).

    Returns a list that receives how many rows the connection had changed by then, to show the
    failure really came midway.
    """
    written: list[int] = []
    fed = [0]
    start: list[int] = []
    real = sqlite3.Connection.executemany

    def executemany(self: sqlite3.Connection, sql: str, rows: Any) -> sqlite3.Cursor:
        if table not in sql:
            return real(self, sql, rows)
        if not start:
            start.append(self.total_changes)

        def feed() -> Iterator[Any]:
            for row in rows:
                if fed[0] == after:
                    written.append(self.total_changes - start[0])
                    raise DiskGone("the disk went away")
                fed[0] += 1
                yield row

        return real(self, sql, feed())

    monkeypatch.setattr(_Connection, "executemany", executemany)
    return written


def test_map_rolls_back_when_the_insert_fails_midway(
    app: Conveyor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = app.tasks[TASK]
    db = tmp_path / "broker.db"
    first = work.delay(0)
    with monkeypatch.context() as patch:
        written = fail_midway(patch, "conveyor_messages", after=5)
        with pytest.raises(DiskGone):
            work.map([(n,) for n in range(1, 11)])
    assert written == [5], "the insert did not fail midway"
    assert rows_in(db) == 1, "part of the batch was kept"
    # The broker is still usable, and only the earlier message is there.
    results = work.map([(n,) for n in range(1, 4)])
    assert sorted(e.id for e in queued_envelopes(f"sqlite:///{db}")) == sorted(
        [first.id, *(r.id for r in results)]
    )
    assert integrity(db) == [("ok",)]


def test_batch_of_ready_and_delayed_messages_rolls_back_as_one(
    app: Conveyor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The ready rows are inserted first; failing on the delayed ones must take them back too.
    work = app.tasks[TASK]
    db = tmp_path / "broker.db"
    envelopes = [work.envelope((n,)) for n in range(4)]
    envelopes += [work.envelope((n,), countdown=3600) for n in range(4, 8)]
    with monkeypatch.context() as patch:
        written = fail_midway(patch, "conveyor_delayed", after=2)
        with pytest.raises(DiskGone):
            app.send(envelopes)
    assert written == [2]
    assert rows_in(db) == 0
    app.send(envelopes)
    assert rows_in(db) == 8


# A failed commit


def test_a_send_after_a_failed_commit_is_stored(
    app: Conveyor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = app.tasks[TASK]
    db = tmp_path / "broker.db"
    first = work.delay(0)
    real = sqlite3.Connection.execute
    failures: list[str] = []

    def execute(self: sqlite3.Connection, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql.strip().upper() == "COMMIT" and not failures:
            # What SQLite answers when a COMMIT cannot go through now: the transaction stays open.
            failures.append(sql)
            raise sqlite3.OperationalError("database is locked")
        return real(self, sql, *args)

    with monkeypatch.context() as patch:
        patch.setattr(_Connection, "execute", execute)
        with pytest.raises(sqlite3.OperationalError):
            work.delay(1)  # this send failed, and said so
    assert failures == ["COMMIT"], "the commit was not where the test expected it"

    second = work.delay(2)  # this one returned: it must be stored
    conn = sqlite3.connect(db, timeout=1)
    try:
        bodies = [row[0] for row in conn.execute("SELECT body FROM conveyor_messages")]
        stored = {decode(bytes(body)).id for body in bodies}
        assert second.id in stored, "a send that returned is not in the database"
        assert first.id in stored
        with conn:  # and other writers are not locked out
            conn.execute("DELETE FROM conveyor_dead")
    finally:
        conn.close()
