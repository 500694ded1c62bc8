"""The SQLite broker's broadcast: tables in the broker's own file, polled by their readers.

`conveyor_broadcast` holds what is published, one row per body with its channel; a listener
starts at the newest row when it is made and reads the rows after its cursor (the row id, which
AUTOINCREMENT never hands out twice). The table keeps the newest `KEEP` rows: a reader that falls
further behind skips what was trimmed and counts it as dropped. Private listeners are channels
with a random name. `conveyor_roster` holds each member's newest entry with its expiry.

Readers only read (WAL: they never wait for the worker's write lock); publishers write in one
short transaction per batch. The polling happens on the caller's thread, off a worker's rounds.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Sequence

from conveyor._sqlite import Database, path_from_url
from conveyor.brokers.broadcast import LISTEN_LIMIT, Broadcast, Listener

#: Rows the broadcast table keeps; older ones are deleted as new ones come.
KEEP = 20_000
#: Seconds between a listener's polls while it waits.
POLL_S = 0.1

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS conveyor_broadcast (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        channel TEXT NOT NULL,
        body BLOB NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS conveyor_broadcast_channel ON conveyor_broadcast (channel, id)",
    """CREATE TABLE IF NOT EXISTS conveyor_roster (
        roster TEXT NOT NULL,
        member TEXT NOT NULL,
        expires_at REAL NOT NULL,
        body BLOB NOT NULL,
        PRIMARY KEY (roster, member))""",
)


class _SQLiteListener(Listener):
    def __init__(self, owner: SQLiteBroadcast, channel: str, limit: int, poll: float) -> None:
        self._owner, self._channel, self._limit, self._poll = owner, channel, limit, poll
        self.address = channel
        self._dropped = 0
        self._closed = threading.Event()
        row = owner._db.connection().execute("SELECT max(id) FROM conveyor_broadcast").fetchone()
        self._cursor = int(row[0] or 0)

    @property
    def dropped(self) -> int:
        """Rows this listener skipped: trimmed before it read them, or more than it holds."""
        return self._dropped

    def read(self, timeout: float) -> list[bytes]:
        """The rows after the cursor, polling until one comes or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while True:
            bodies = self._fetch()
            left = deadline - time.monotonic()
            if bodies or left <= 0 or self._closed.is_set():
                return bodies
            self._closed.wait(min(self._poll, left))

    def _fetch(self) -> list[bytes]:
        conn = self._owner._db.connection()
        rows = conn.execute(
            "SELECT id, CAST(body AS BLOB) FROM conveyor_broadcast WHERE channel = ? AND id > ? "
            "ORDER BY id LIMIT ?",
            (self._channel, self._cursor, self._limit + 1),
        ).fetchall()
        if not rows:
            return []
        oldest = conn.execute("SELECT min(id) FROM conveyor_broadcast").fetchone()[0]
        if oldest is not None and self._cursor and oldest > self._cursor + 1:
            # Trimmed before this reader got to them: at most what it would have held.
            self._dropped += min(oldest - self._cursor - 1, self._limit)
        if len(rows) > self._limit:  # more came than the listener holds: the oldest go
            self._dropped += len(rows) - self._limit
            rows = rows[-self._limit :]
        self._cursor = rows[-1][0]
        return [bytes(body) for _, body in rows]

    def close(self) -> None:
        """Let go of this process's connection (once)."""
        self._closed.set()


class SQLiteBroadcast(Broadcast):
    """Broadcast through tables of the SQLite broker's file (`sqlite:///...`)."""

    def __init__(self, url: str, *, poll: float = POLL_S) -> None:
        # A database of its own, not the broker's shared one: closing it closes the connections
        # its threads opened (a worker's beacon thread, which ends before the worker does).
        self._db = Database(path_from_url(url), SCHEMA, synchronous="NORMAL")
        self._poll = poll
        self._closed = False

    def publish(self, channel: str, bodies: Sequence[bytes]) -> None:
        """Give the bodies to the channel's listeners."""
        if not bodies:
            return
        with self._db.transaction() as conn:
            conn.executemany(
                "INSERT INTO conveyor_broadcast (channel, body) VALUES (?, ?)",
                [(channel, body) for body in bodies],
            )
            last = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
            if last % 100 < len(bodies) or len(bodies) >= 100:
                conn.execute("DELETE FROM conveyor_broadcast WHERE id <= ?", (last - KEEP,))

    def listen(self, channel: str, *, limit: int = LISTEN_LIMIT) -> Listener:
        """Listen to a channel from now on."""
        return _SQLiteListener(self, channel, limit, self._poll)

    def listen_private(self, *, limit: int = LISTEN_LIMIT) -> Listener:
        """A listener with an address of its own."""
        return self.listen(f"private.{secrets.token_hex(8)}", limit=limit)

    def send(self, address: str, body: bytes) -> None:
        """Give a body to the private listener at `address`."""
        self.publish(address, [body])

    def register(self, roster: str, member: str, body: bytes, lease: float) -> None:
        """Make `body` the newest entry of `member`, for `lease` seconds."""
        now = time.time()
        with self._db.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO conveyor_roster (roster, member, expires_at, body) "
                "VALUES (?, ?, ?, ?)",
                (roster, member, now + lease, body),
            )
            conn.execute("DELETE FROM conveyor_roster WHERE expires_at < ?", (now - 3600,))

    def unregister(self, roster: str, member: str) -> None:
        """Take `member` out of the roster."""
        with self._db.transaction() as conn:
            conn.execute(
                "DELETE FROM conveyor_roster WHERE roster = ? AND member = ?", (roster, member)
            )

    def members(self, roster: str) -> list[bytes]:
        """The newest live entry of each member."""
        rows = (
            self._db.connection()
            .execute(
                "SELECT CAST(body AS BLOB) FROM conveyor_roster "
                "WHERE roster = ? AND expires_at > ? ORDER BY member",
                (roster, time.time()),
            )
            .fetchall()
        )
        return [bytes(body) for (body,) in rows]

    def close(self) -> None:
        """Let go of this process's connection (once)."""
        if not self._closed:
            self._closed = True
            self._db.close()
