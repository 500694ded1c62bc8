"""Results in a SQLite file (by default the embedded broker's own file)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from conveyor._sqlite import Database, path_from_url
from conveyor.results.base import (
    READY_STATES,
    ResultRecord,
    ResultStore,
    decode_record,
    encode_record,
)

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS conveyor_results (
        id TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        expires_at REAL NOT NULL,
        data BLOB NOT NULL) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS conveyor_results_expiry ON conveyor_results (expires_at)",
)

_FINISHED = ", ".join(f"'{s}'" for s in sorted(READY_STATES))
_UPSERT = f"""
    INSERT INTO conveyor_results (id, state, expires_at, data) VALUES (?, ?, ?, ?)
    ON CONFLICT (id) DO UPDATE SET
        state = excluded.state, expires_at = excluded.expires_at, data = excluded.data
    WHERE conveyor_results.state NOT IN ({_FINISHED}) OR excluded.state IN ({_FINISHED})"""

CLEANUP_INTERVAL_S = 60.0


class SQLiteResultStore(ResultStore):
    """Results with expiry; expired rows are deleted by writers, at most once a minute."""

    def __init__(self, url: str) -> None:
        self.display_url = url
        # Results are rewritten by the next run after a crash, so NORMAL durability suffices.
        # The same object as the SQLite broker's consumer side when they share a file, so a
        # worker stores results and acknowledges messages in one transaction.
        self._db = Database.shared(path_from_url(url), SCHEMA, synchronous="NORMAL")
        self._next_cleanup = 0.0
        self._closed = False

    def put(self, records: Sequence[ResultRecord]) -> None:
        """Upsert records in one transaction."""
        if not records:
            return
        rows = [(r.id, r.state, r.expires_at, encode_record(r)) for r in records]
        with self._db.transaction() as conn:
            conn.executemany(_UPSERT, rows)
        if time.monotonic() >= self._next_cleanup:
            self.cleanup()

    def get(self, task_id: str) -> ResultRecord | None:
        """The live record for a task id."""
        row = (
            self._db.connection()
            .execute(
                "SELECT data FROM conveyor_results WHERE id = ? AND expires_at > ?",
                (task_id, time.time()),
            )
            .fetchone()
        )
        return None if row is None else decode_record(row[0])

    def forget(self, task_id: str) -> None:
        """Delete a record."""
        with self._db.transaction() as conn:
            conn.execute("DELETE FROM conveyor_results WHERE id = ?", (task_id,))

    def cleanup(self) -> int:
        """Delete expired records."""
        self._next_cleanup = time.monotonic() + CLEANUP_INTERVAL_S
        with self._db.transaction() as conn:
            return conn.execute(
                "DELETE FROM conveyor_results WHERE expires_at <= ?", (time.time(),)
            ).rowcount

    def count(self) -> int:
        """Live records."""
        row = (
            self._db.connection()
            .execute("SELECT COUNT(*) FROM conveyor_results WHERE expires_at > ?", (time.time(),))
            .fetchone()
        )
        return int(row[0])

    def close(self) -> None:
        """Close this process's connections (once; later calls do nothing)."""
        if not self._closed:
            self._closed = True
            self._db.close()
