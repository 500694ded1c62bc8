"""The embedded broker: a SQLite file in WAL mode, safe for many processes on one machine.

Ready and leased messages live in `conveyor_messages`. A claim sets a random lease token and makes
the row invisible until `visible_at`; if the worker dies, the lease expires and the message becomes
claimable again with a higher delivery count. Settling (ack, requeue, dead-letter) checks the lease
token, so a worker that lost its lease can never remove a message someone else now holds.

Delayed messages wait in `conveyor_delayed`, indexed by due time, and move to the ready table in
the claim transaction once due, so a backlog of delayed messages never slows down claims.

Producers' connections commit with `synchronous=FULL`: a publish that returned is on disk. The
consumer's connection uses `NORMAL`; WAL keeps commits in order, so a power loss can only drop a
suffix of them (an ack, which means a redelivery, never a lost message).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import random
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from conveyor._sqlite import Database, path_from_url
from conveyor.brokers.base import Broker, DeadLetter, Delivery, Outgoing, QueueStats
from conveyor.message import DEFAULT_MAX_SIZE, oversize
from conveyor.reasons import DeadLetterReason as Why

if TYPE_CHECKING:
    from conveyor.brokers.sqlite_broadcast import SQLiteBroadcast

log = logging.getLogger("conveyor.worker")
# Dead letters read at a time by `requeue_dead`.
REQUEUE_CHUNK = 500

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS conveyor_messages (
        id INTEGER PRIMARY KEY,
        queue TEXT NOT NULL,
        priority INTEGER NOT NULL,
        visible_at REAL NOT NULL DEFAULT 0,
        lease INTEGER,
        deliveries INTEGER NOT NULL DEFAULT 0,
        body BLOB NOT NULL,
        lost INTEGER NOT NULL DEFAULT 0)""",
    # Files made before `lost` existed get it here (`Database` skips a column already there).
    "ALTER TABLE conveyor_messages ADD COLUMN lost INTEGER NOT NULL DEFAULT 0",
    """CREATE INDEX IF NOT EXISTS conveyor_messages_claim
        ON conveyor_messages (queue, priority DESC, id)""",
    """CREATE TABLE IF NOT EXISTS conveyor_delayed (
        id INTEGER PRIMARY KEY,
        queue TEXT NOT NULL,
        priority INTEGER NOT NULL,
        due_at REAL NOT NULL,
        deliveries INTEGER NOT NULL DEFAULT 0,
        body BLOB NOT NULL,
        lost INTEGER NOT NULL DEFAULT 0)""",
    "ALTER TABLE conveyor_delayed ADD COLUMN lost INTEGER NOT NULL DEFAULT 0",
    "CREATE INDEX IF NOT EXISTS conveyor_delayed_due ON conveyor_delayed (due_at)",
    """CREATE TABLE IF NOT EXISTS conveyor_dead (
        id INTEGER PRIMARY KEY,
        queue TEXT NOT NULL,
        reason TEXT NOT NULL,
        deliveries INTEGER NOT NULL,
        died_at REAL NOT NULL,
        body BLOB NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0)""",
    "CREATE INDEX IF NOT EXISTS conveyor_dead_queue ON conveyor_dead (queue, id)",
    # Files made before dead letters kept their priority get it here (a requeue restores it).
    "ALTER TABLE conveyor_dead ADD COLUMN priority INTEGER NOT NULL DEFAULT 0",
)

_CLAIM = """
    UPDATE conveyor_messages SET lease = ?, visible_at = ?, deliveries = deliveries + 1
    WHERE id IN (SELECT id FROM conveyor_messages WHERE queue = ? AND visible_at <= ?
                 ORDER BY priority DESC, id LIMIT ?)
    RETURNING id, priority, deliveries, CASE WHEN length(body) <= ? THEN CAST(body AS BLOB) END,
              length(body), lost"""
_PROMOTE = """
    INSERT INTO conveyor_messages (queue, priority, visible_at, deliveries, body, lost)
    SELECT queue, priority, 0, deliveries, body, lost FROM conveyor_delayed
    WHERE due_at <= ? ORDER BY due_at, id"""


class SQLiteBroker(Broker):
    """The embedded default broker (`sqlite:///conveyor.db`)."""

    local = True

    def __init__(
        self,
        url: str,
        *,
        visibility_timeout: float = 60.0,
        max_message_size: int = DEFAULT_MAX_SIZE,
    ) -> None:
        self.display_url = url
        self.visibility_timeout = visibility_timeout
        self.max_message_size = max_message_size
        path = path_from_url(url)
        self._producer_db = Database.shared(path, SCHEMA, synchronous="FULL")
        self._consumer_db = Database.shared(path, SCHEMA, synchronous="NORMAL")
        self._rotation = itertools.count()
        self._closed = False

    def publish(self, messages: Sequence[Outgoing]) -> None:
        """Insert messages in one durable transaction."""
        if not messages:
            return
        now = time.time()
        ready = [(m.queue, m.priority, m.body) for m in messages if not _is_delayed(m, now)]
        delayed = [
            (m.queue, m.priority, m.deliver_at, m.body) for m in messages if _is_delayed(m, now)
        ]
        # A worker re-publishing a retry inside its batch must use the batch's own connection.
        db = self._consumer_db if self._consumer_db.in_transaction() else self._producer_db
        with db.transaction() as conn:
            if ready:
                conn.executemany(
                    "INSERT INTO conveyor_messages (queue, priority, body) VALUES (?, ?, ?)", ready
                )
            if delayed:
                conn.executemany(
                    "INSERT INTO conveyor_delayed (queue, priority, due_at, body) "
                    "VALUES (?, ?, ?, ?)",
                    delayed,
                )

    def fetch(self, queues: Sequence[str], limit: int) -> list[Delivery]:
        """Lease up to `limit` messages; queues take turns being asked first."""
        if limit <= 0 or not queues:
            return []
        conn = self._consumer_db.connection()
        now = time.time()
        if not conn.in_transaction and not self._anything_due(conn, queues, now):
            return []
        lease = random.getrandbits(62)  # unique per claim, not secret: no system call
        start = next(self._rotation) % len(queues)
        out: list[Delivery] = []
        with self._consumer_db.transaction(conn):
            self._promote_due(conn, now)
            for queue in (*queues[start:], *queues[:start]):
                claim = (lease, now + self.visibility_timeout, queue, now, limit - len(out))
                rows = conn.execute(_CLAIM, (*claim, self.max_message_size)).fetchall()
                rows.sort(key=lambda r: (-r[1], r[0]))
                too_big = [(rid, size) for rid, _, _, body, size, _ in rows if body is None]
                if too_big:
                    self._dead_letter_oversized(conn, queue, lease, too_big, now)
                out.extend(
                    Delivery(queue, body, (rid, lease), n, lost=lost)
                    for rid, _, n, body, _, lost in rows
                    if body is not None
                )
                if len(out) >= limit:
                    break
        return out

    def ack(self, deliveries: Sequence[Delivery]) -> int:
        """Delete settled messages, if we still hold their leases."""
        if not deliveries:
            return 0
        with self._consumer_db.transaction() as conn:
            before = conn.total_changes
            conn.executemany(
                "DELETE FROM conveyor_messages WHERE id = ? AND lease = ?",
                [d.receipt for d in deliveries],
            )
            return conn.total_changes - before

    def requeue(
        self, deliveries: Sequence[Delivery], *, delay: float = 0.0, count_delivery: bool = True
    ) -> None:
        """Release leases, now or after a delay."""
        if not deliveries:
            return
        # The claim counted the delivery: take it back, or count the lost run as well.
        uncount, lost = (0, 1) if count_delivery else (1, 0)
        receipts = [d.receipt for d in deliveries]
        with self._consumer_db.transaction() as conn:
            if delay <= 0:
                conn.executemany(
                    "UPDATE conveyor_messages SET visible_at = 0, lease = NULL, "
                    f"deliveries = deliveries - {uncount}, lost = lost + {lost} "
                    "WHERE id = ? AND lease = ?",
                    receipts,
                )
                return
            due = time.time() + delay
            for rid, lease in receipts:
                moved = conn.execute(
                    "INSERT INTO conveyor_delayed "
                    "(queue, priority, due_at, deliveries, body, lost) "
                    f"SELECT queue, priority, ?, deliveries - {uncount}, body, lost + {lost} "
                    "FROM conveyor_messages WHERE id = ? AND lease = ?",
                    (due, rid, lease),
                ).rowcount
                if moved:
                    conn.execute("DELETE FROM conveyor_messages WHERE id = ?", (rid,))

    def dead_letter(self, items: Sequence[tuple[Delivery, str]]) -> None:
        """Move messages to `conveyor_dead` with their reasons."""
        if not items:
            return
        now = time.time()
        with self._consumer_db.transaction() as conn:
            for delivery, reason in items:
                rid, lease = delivery.receipt
                moved = conn.execute(
                    "INSERT INTO conveyor_dead "
                    "(queue, reason, deliveries, died_at, body, priority) "
                    "SELECT queue, ?, deliveries, ?, body, priority FROM conveyor_messages "
                    "WHERE id = ? AND lease = ?",
                    (reason, now, rid, lease),
                ).rowcount
                if moved:
                    conn.execute("DELETE FROM conveyor_messages WHERE id = ?", (rid,))

    def _dead_letter_oversized(
        self,
        conn: sqlite3.Connection,
        queue: str,
        lease: int,
        rows: list[tuple[int, int]],
        now: float,
    ) -> None:
        """Move messages over the size limit to `conveyor_dead` inside SQLite.

        Their bodies never reach Python: the claim returned only their sizes.
        """
        for rid, size in rows:
            reason = Why.TOO_LARGE(oversize(size, self.max_message_size))
            log.warning("dead-lettered a message on %s: %s", queue, reason)
            self.refused += 1
            conn.execute(
                "INSERT INTO conveyor_dead (queue, reason, deliveries, died_at, body, priority) "
                "SELECT queue, ?, deliveries, ?, body, priority FROM conveyor_messages "
                "WHERE id = ? AND lease = ?",
                (reason, now, rid, lease),
            )
            conn.execute("DELETE FROM conveyor_messages WHERE id = ?", (rid,))

    def batch(self) -> contextlib.AbstractContextManager[object]:
        """One transaction for a worker's round: results (same file), settlements and a claim."""
        return self._consumer_db.transaction()

    def extend(self, deliveries: Sequence[Delivery], seconds: float) -> None:
        """Push the leases of running messages further out."""
        if not deliveries:
            return
        until = time.time() + seconds
        with self._consumer_db.transaction() as conn:
            conn.executemany(
                "UPDATE conveyor_messages SET visible_at = ? WHERE id = ? AND lease = ?",
                [(until, *d.receipt) for d in deliveries],
            )

    def stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        """Ready, delayed, leased and dead counts per queue."""
        conn = self._producer_db.connection()
        now = time.time()
        counts: dict[str, list[int]] = {q: [0, 0, 0, 0] for q in queues or ()}

        def add(sql: str, *params: object, slot: int) -> None:
            for queue, n in conn.execute(sql, params):
                if queues is None or queue in counts:
                    counts.setdefault(queue, [0, 0, 0, 0])[slot] = n

        add(
            "SELECT queue, COUNT(*) FROM conveyor_messages WHERE visible_at <= ? GROUP BY queue",
            now,
            slot=0,
        )
        add("SELECT queue, COUNT(*) FROM conveyor_delayed GROUP BY queue", slot=1)
        add(
            "SELECT queue, COUNT(*) FROM conveyor_messages WHERE visible_at > ? GROUP BY queue",
            now,
            slot=2,
        )
        add("SELECT queue, COUNT(*) FROM conveyor_dead GROUP BY queue", slot=3)
        return [QueueStats(q, *counts[q]) for q in sorted(counts)]

    def purge(self, queue: str, *, dead: bool = False) -> int:
        """Delete a queue's ready and delayed messages (leased ones are left to their workers)."""
        with self._producer_db.transaction() as conn:
            if dead:
                return conn.execute("DELETE FROM conveyor_dead WHERE queue = ?", (queue,)).rowcount
            n = conn.execute(
                "DELETE FROM conveyor_messages WHERE queue = ? AND visible_at <= ?",
                (queue, time.time()),
            ).rowcount
            return (
                n + conn.execute("DELETE FROM conveyor_delayed WHERE queue = ?", (queue,)).rowcount
            )

    def dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        """The newest dead letters of a queue."""
        rows = (
            self._producer_db.connection()
            .execute(
                "SELECT queue, CAST(body AS BLOB), reason, deliveries, died_at, priority "
                "FROM conveyor_dead WHERE queue = ? ORDER BY id DESC LIMIT ?",
                (queue, limit),
            )
            .fetchall()
        )
        return [DeadLetter(*row) for row in rows]

    def requeue_dead(
        self,
        queue: str,
        select: Callable[[DeadLetter], bool] | None = None,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Move the selected dead letters back to the queue, oldest first, in one transaction:
        each becomes a new ready row (no deliveries, no lost runs) with its body and priority."""
        moved = 0
        last = 0
        with self._producer_db.transaction() as conn:
            while True:
                # In chunks, so a large dead-letter table never sits in memory at once.
                rows = conn.execute(
                    "SELECT id, queue, CAST(body AS BLOB), reason, deliveries, died_at, priority "
                    "FROM conveyor_dead WHERE queue = ? AND id > ? ORDER BY id LIMIT ?",
                    (queue, last, REQUEUE_CHUNK),
                ).fetchall()
                if not rows:
                    break
                last = rows[-1][0]
                letters = ((row[0], DeadLetter(*row[1:])) for row in rows)
                chosen = [(rid,) for rid, dead in letters if select is None or select(dead)]
                conn.executemany(
                    "INSERT INTO conveyor_messages (queue, priority, body) "
                    "SELECT queue, priority, body FROM conveyor_dead WHERE id = ?",
                    chosen,
                )
                conn.executemany("DELETE FROM conveyor_dead WHERE id = ?", chosen)
                moved += len(chosen)
                if progress is not None and chosen:
                    progress(len(chosen))
        return moved

    def exists(self, queue: str) -> bool:
        """True when any table holds a row of the queue: ready, leased, delayed or dead."""
        row = (
            self._producer_db.connection()
            .execute(
                "SELECT EXISTS (SELECT 1 FROM conveyor_messages WHERE queue = ?) "
                "OR EXISTS (SELECT 1 FROM conveyor_delayed WHERE queue = ?) "
                "OR EXISTS (SELECT 1 FROM conveyor_dead WHERE queue = ?)",
                (queue, queue, queue),
            )
            .fetchone()
        )
        return bool(row[0])

    def broadcast(self) -> SQLiteBroadcast:
        """Broadcast through tables of this file (`conveyor.brokers.sqlite_broadcast`)."""
        from conveyor.brokers.sqlite_broadcast import SQLiteBroadcast

        return SQLiteBroadcast(self.display_url)

    def close(self) -> None:
        """Close this process's connections (once; later calls do nothing)."""
        if not self._closed:
            self._closed = True
            self._producer_db.close()
            self._consumer_db.close()

    def _anything_due(self, conn: sqlite3.Connection, queues: Sequence[str], now: float) -> bool:
        """A read-only check, so idle workers never take the write lock."""
        marks = ",".join("?" * len(queues))
        row = conn.execute(
            f"SELECT EXISTS (SELECT 1 FROM conveyor_messages WHERE queue IN ({marks}) "
            "AND visible_at <= ?) OR EXISTS (SELECT 1 FROM conveyor_delayed WHERE due_at <= ? "
            f"AND queue IN ({marks}))",
            (*queues, now, now, *queues),
        ).fetchone()
        return bool(row[0])

    @staticmethod
    def _promote_due(conn: sqlite3.Connection, now: float) -> None:
        if conn.execute(
            "SELECT 1 FROM conveyor_delayed WHERE due_at <= ? LIMIT 1", (now,)
        ).fetchone():
            conn.execute(_PROMOTE, (now,))
            conn.execute("DELETE FROM conveyor_delayed WHERE due_at <= ?", (now,))


def _is_delayed(message: Outgoing, now: float) -> bool:
    return message.deliver_at is not None and message.deliver_at > now
