"""Bad input written straight into the SQLite queue table: dead-lettered, logged once, no harm done.

This is what a producer that bypasses conveyor (another language, the sqlite3 shell, a bug) can do
to the embedded broker. The worker must quarantine each message with its reason and go on.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from conveyor import Conveyor, State, Worker, WorkerStats
from conveyor.message import Envelope, encode, new_id
from conveyor.testing import run_until_empty

pytestmark = pytest.mark.integration

Q = "default"
MAX_SIZE = 2048


def envelope_bytes(**changes: Any) -> bytes:
    """A valid `add(1, 2)` envelope, with some fields changed (or added)."""
    data = msgspec.json.decode(encode(Envelope(id=new_id(), task="add", queue=Q, args=(1, 2))))
    data.update(changes)
    return msgspec.json.encode(data)


# (case, body as stored in the table, text the dead-letter reason must contain)
BAD_INPUT: list[tuple[str, bytes | str, str]] = [
    ("malformed-json", b'{"v": 1, "id": "x", "task": ', "malformed JSON"),
    ("binary-junk", b"\x89PNG\r\n\x1a\n\x00\x00", "undecodable message: not valid UTF-8"),
    ("text-column", "plain text typed into the sqlite3 shell", "malformed JSON"),
    ("json-array", b"[1, 2, 3]", "not an envelope"),
    ("wrong-field-type", envelope_bytes(priority="high"), "$.priority"),
    ("wrong-id-type", envelope_bytes(id=12), "$.id"),
    ("unknown-version", envelope_bytes(v=2), "unknown envelope version: 2"),
    ("unknown-field", envelope_bytes(pickle="gASV"), "unknown field `pickle`"),
    ("unknown-task", envelope_bytes(task="nope.missing"), "unknown task: 'nope.missing'"),
    ("oversized", envelope_bytes(args=["x" * MAX_SIZE, 2]), f"over the {MAX_SIZE}-byte limit"),
    (
        "arguments-do-not-fit",
        envelope_bytes(args=[1, 2, 3]),
        "bad arguments: they do not fit task add",
    ),
    (
        "unknown-keyword",
        envelope_bytes(args=[1], kwargs={"z": 2}),
        "bad arguments: they do not fit task add",
    ),
]


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Conveyor]:
    application = Conveyor("it", broker=f"sqlite:///{tmp_path}/q.db", max_message_size=MAX_SIZE)

    @application.task(name="add")
    def add(x: int, y: int) -> int:
        return x + y

    application.broker.stats()  # creates the tables
    yield application
    application.close()


def insert(db: Path, bodies: list[bytes | str], priority: int = 0) -> None:
    with sqlite3.connect(db) as conn:
        conn.executemany(
            "INSERT INTO conveyor_messages (queue, priority, body) VALUES (?, ?, ?)",
            [(Q, priority, body) for body in bodies],
        )
    conn.close()


def dead_rows(db: Path) -> list[tuple[str, str, bytes | str]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT queue, reason, body FROM conveyor_dead ORDER BY id").fetchall()
    conn.close()
    return rows


@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_bad_rows_are_dead_lettered_with_reasons_and_good_ones_succeed(
    app: Conveyor, tmp_path: Path, caplog: pytest.LogCaptureFixture, pool: str
) -> None:
    caplog.set_level(logging.INFO, logger="conveyor.worker")
    add = app.tasks["add"]
    db = tmp_path / "q.db"
    goods = [add.delay(i, 100) for i in range(3)]
    insert(db, [body for _, body, _ in BAD_INPUT])
    goods += [add.delay(i, 200) for i in range(3)]
    # Bad rows with a high priority are claimed first, in the same batches as good ones.
    insert(db, [envelope_bytes(v=3), b"{}"], priority=9)

    stats = run_until_empty(app, pool=pool, concurrency=2)

    assert [r.get(timeout=5) for r in goods] == [100, 101, 102, 200, 201, 202]
    assert all(r.state is State.SUCCESS for r in goods)
    expected = len(BAD_INPUT) + 2
    assert (stats.succeeded, stats.dead_lettered, stats.failed) == (6, expected, 0)

    rows = dead_rows(db)
    assert len(rows) == expected
    reasons = [reason for _, reason, _ in rows]
    stored = {body if isinstance(body, bytes) else body.encode(): r for _, r, body in rows}
    for case, body, reason_text in BAD_INPUT:
        raw = body if isinstance(body, bytes) else body.encode()
        assert raw in stored, f"{case}: not in conveyor_dead"
        assert reason_text in stored[raw], f"{case}: {stored[raw]}"
    assert any("unknown envelope version: 3" in r for r in reasons)
    assert all(queue == Q for queue, _, _ in rows)

    # Logged once each: as many warnings as rows, each reason as often as it was dead-lettered
    # (two junk rows can share a reason).
    for reason, times in Counter(reasons).items():
        mentions = [r for r in caplog.records if reason in r.getMessage()]
        assert len(mentions) == times, (reason, [m.getMessage() for m in mentions])
        assert all(m.name == "conveyor.worker" for m in mentions)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == expected
    [s] = app.broker.stats([Q])
    assert (s.ready, s.delayed, s.in_flight, s.dead) == (0, 0, 0, expected)


def test_a_second_worker_run_finds_nothing_left(app: Conveyor, tmp_path: Path) -> None:
    insert(tmp_path / "q.db", [b"junk", envelope_bytes(task="nope")])
    first = run_until_empty(app, pool="threads")
    second = run_until_empty(app, pool="threads")
    assert first.dead_lettered == 2
    assert (second.received, second.dead_lettered) == (0, 0)
    assert len(app.broker.dead_letters(Q)) == 2


def run_bounded(app: Conveyor, timeout: float = 3.0) -> WorkerStats:
    """Run a worker until empty in a thread; stop it and fail if it is not done by `timeout`."""
    worker = Worker(app, pool="threads", concurrency=2, until_empty=True, shutdown_grace=0)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        worker.stop()
        worker.stop()
        thread.join(10)
        raise AssertionError(f"the worker did not drain its queue within {timeout}s")
    return worker.stats


# Regression: a TEXT body that is not valid UTF-8 made every claim fail in sqlite3 itself
# (Could not decode to UTF-8): the worker retried the same claim forever.
def test_text_body_with_invalid_utf8_is_dead_lettered(app: Conveyor, tmp_path: Path) -> None:
    add = app.tasks["add"]
    good = add.delay(1, 2)
    with sqlite3.connect(tmp_path / "q.db") as conn:
        conn.execute(
            "INSERT INTO conveyor_messages (queue, priority, body) "
            "VALUES (?, 9, CAST(X'FF7B' AS TEXT))",
            (Q,),
        )
    conn.close()
    stats = run_bounded(app)
    assert good.get(timeout=1) == 3
    assert stats.dead_lettered == 1
    [letter] = app.broker.dead_letters(Q)
    assert "JSON" in letter.reason or "undecodable" in letter.reason
