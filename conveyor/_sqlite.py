"""SQLite connections shared by the embedded broker and the SQLite result store.

One connection per process and thread: a connection is never used across a fork or between
threads. The database runs in WAL mode so readers never block the single writer, and every write is
an immediate transaction, so concurrent workers and producers queue on the lock instead of failing.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from urllib.parse import unquote, urlsplit

from conveyor.errors import ConfigurationError

BUSY_TIMEOUT_S = 60.0


def path_from_url(url: str) -> str:
    """`sqlite:///relative.db` or `sqlite:////absolute/path.db` to a file path."""
    parts = urlsplit(url)
    if parts.scheme != "sqlite" or parts.netloc or not parts.path.startswith("/"):
        raise ConfigurationError(
            f"cannot read SQLite URL {url!r}: write sqlite:///relative/path.db "
            "or sqlite:////absolute/path.db"
        )
    path = unquote(parts.path[1:])
    if not path:
        raise ConfigurationError(f"SQLite URL {url!r} names no file: write sqlite:///conveyor.db")
    return path


class Database:
    """Connections to one SQLite file, created lazily per process and thread."""

    def __init__(self, path: str, schema: Sequence[str], *, synchronous: str = "FULL") -> None:
        self.path = path
        self._schema = schema
        self._synchronous = synchronous
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: list[sqlite3.Connection] = []
        self._pid = os.getpid()

    def connection(self) -> sqlite3.Connection:
        """This thread's connection, opened (and the schema ensured) on first use."""
        local = self._local
        conn: sqlite3.Connection | None = getattr(local, "conn", None)
        if conn is not None and local.pid == os.getpid():
            return conn
        conn = self._connect()
        local.conn, local.pid = conn, os.getpid()
        return conn

    @contextmanager
    def transaction(self, conn: sqlite3.Connection | None = None) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the lock up front (no deadlock on upgrade)."""
        conn = conn or self.connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        """Close every connection this process opened; others (a parent's) are left alone."""
        with self._lock:
            if self._pid != os.getpid():
                self._open.clear()
            for conn in self._open:
                conn.close()
            self._open.clear()
        self._local = threading.local()

    def _connect(self) -> sqlite3.Connection:
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        try:
            conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            with self.transaction(conn):
                for statement in self._schema:
                    conn.execute(statement)
        except sqlite3.Error as exc:
            raise ConfigurationError(f"cannot open SQLite database {self.path!r}: {exc}") from None
        with self._lock:
            if self._pid != os.getpid():
                # Connections listed before a fork belong to the parent: never close them here.
                self._pid, self._open = os.getpid(), []
            self._open.append(conn)
        return conn
