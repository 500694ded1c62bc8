"""The revocation stores: SQLite (one machine), PostgreSQL and Redis (many), and memory (tests).

Each keeps revocations in write order with a cursor, so a worker's poll is one indexed read of
what came after the last one it saw:

- SQL: a table `conveyor_revocations` (PostgreSQL: `<table>_revocations` when the URL names a
  `?table=`) whose `seq` is the cursor. Writers serialize on the table (PostgreSQL: a lock that
  readers never wait for), so a row with a higher `seq` is never visible before a lower one: a
  poll cannot step over a row still being written. Writers delete expired rows as they go.
- Redis: a stream `{prefix}:revocations` (the URL's `?prefix=`, default `conveyor`); its entry
  ids, assigned by Redis in order, are the cursor. Trimmed to `MAX_ENTRIES`, and the key expires
  with its last live entry.

A record that is not one of ours (a row written by hand, a stream entry with missing fields) is
skipped with one log line: it never stops a worker.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from conveyor.brokers.base import connects
from conveyor.errors import ConfigurationError
from conveyor.redact import redact_url
from conveyor.revocations import Cursor, Revocation, RevocationStore

log = logging.getLogger("conveyor.revocations")

#: The most revocations one poll reads.
BATCH = 1000
#: The most entries a Redis stream keeps (the oldest go first).
MAX_ENTRIES = 100_000
_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,47}")


def from_url(url: str) -> RevocationStore:
    """See `conveyor.revocations.from_url`."""
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        return SQLiteRevocations(url)
    if scheme in ("postgresql", "postgres"):
        return PostgresRevocations(url)
    if scheme in ("redis", "rediss"):
        return RedisRevocations(url)
    if scheme == "memory":
        return MemoryRevocations()
    raise ConfigurationError(
        f"cannot keep revocations at {redact_url(url)!r}: use sqlite:///file.db (one machine), "
        "postgresql://... or redis://... (workers on several machines)"
    )


def checked(fields: tuple[Any, Any, Any], where: str) -> Revocation | None:
    """A revocation from a stored id, expiry and terminate flag, or None (logged) if they are
    not one."""
    task_id, expires_at, terminate = fields
    if isinstance(expires_at, bytes | str):
        with contextlib.suppress(ValueError):
            expires_at = float(expires_at)
    if isinstance(task_id, bytes):
        task_id = task_id.decode(errors="replace")
    ok = (
        isinstance(task_id, str)
        and 0 < len(task_id) <= 128
        and isinstance(expires_at, int | float)
        and not isinstance(expires_at, bool)
        and math.isfinite(expires_at)
    )
    if not ok:
        log.warning("skipped a malformed revocation record in %s: %.200r", where, fields)
        return None
    return Revocation(task_id, float(expires_at), terminate in (1, True, "1", b"1"))


class MemoryRevocations:
    """Revocations in this process only: for apps on the memory broker (tests)."""

    display_url = "memory://"
    local = True

    def __init__(self) -> None:
        self._log: list[Revocation] = []
        self._lock = threading.Lock()

    def add(self, revocations: Sequence[Revocation]) -> None:
        """See `RevocationStore`."""
        with self._lock:
            self._log.extend(revocations)

    def load(self, now: float) -> tuple[list[Revocation], Cursor]:
        """See `RevocationStore`."""
        with self._lock:
            return [r for r in self._log if r.expires_at > now], len(self._log)

    def since(self, cursor: Cursor) -> tuple[list[Revocation], Cursor]:
        """See `RevocationStore`."""
        start = int(cursor)
        with self._lock:
            batch = self._log[start : start + BATCH]
        return batch, start + len(batch)

    def close(self) -> None:
        """Nothing to let go."""


class _SQLRevocations:
    """Revocations in a SQL table; subclasses connect and say how to lock."""

    display_url: str
    local = False
    table = "conveyor_revocations"
    marker = "?"

    def _schema(self, serial: str) -> list[str]:
        return [
            f"CREATE TABLE IF NOT EXISTS {self.table} (seq {serial}, "
            "id TEXT NOT NULL, terminate BOOLEAN NOT NULL, revoked_at DOUBLE PRECISION NOT NULL, "
            "expires_at DOUBLE PRECISION NOT NULL)",
            f"CREATE INDEX IF NOT EXISTS {self.table}_expires ON {self.table} (expires_at)",
        ]

    @contextmanager
    def _writing(self) -> Iterator[Any]:
        raise NotImplementedError
        yield

    @contextmanager
    def _reading(self) -> Iterator[Any]:
        raise NotImplementedError
        yield

    def add(self, revocations: Sequence[Revocation]) -> None:
        """See `RevocationStore`."""
        if not revocations:
            return
        now = time.time()
        p = self.marker
        insert = (
            f"INSERT INTO {self.table} (id, terminate, revoked_at, expires_at) "
            f"VALUES ({p}, {p}, {p}, {p})"
        )
        rows = [(r.id, r.terminate, now, r.expires_at) for r in revocations]
        with self._writing() as conn:
            conn.execute(f"DELETE FROM {self.table} WHERE expires_at < {p}", (now,))
            conn.cursor().executemany(insert, rows)

    def load(self, now: float) -> tuple[list[Revocation], Cursor]:
        """See `RevocationStore`: the highest row number first, then the live rows up to it
        (a row written meanwhile comes with the next poll)."""
        p = self.marker
        with self._reading() as conn:
            # fetchall, not fetchone: a SQLite statement left unfinished keeps its snapshot.
            [(top,)] = conn.execute(f"SELECT MAX(seq) FROM {self.table}").fetchall()
            cursor = int(top) if top is not None else 0
            rows = conn.execute(
                f"SELECT id, expires_at, terminate FROM {self.table} "
                f"WHERE expires_at > {p} AND seq <= {p} ORDER BY seq",
                (now, cursor),
            ).fetchall()
        return self._checked(rows), cursor

    def since(self, cursor: Cursor) -> tuple[list[Revocation], Cursor]:
        """See `RevocationStore`: one read of the primary key's index."""
        p = self.marker
        with self._reading() as conn:
            rows = conn.execute(
                f"SELECT seq, id, expires_at, terminate FROM {self.table} "
                f"WHERE seq > {p} ORDER BY seq LIMIT {BATCH}",
                (int(cursor),),
            ).fetchall()
        if not rows:
            return [], cursor
        return self._checked([row[1:] for row in rows]), int(rows[-1][0])

    def _checked(self, rows: Sequence[Any]) -> list[Revocation]:
        found = (checked((r[0], r[1], r[2]), self.display_url) for r in rows)
        return [r for r in found if r is not None]


class SQLiteRevocations(_SQLRevocations):
    """Revocations in a SQLite file (by default the SQLite broker's): one machine."""

    local = True

    def __init__(self, url: str) -> None:
        from conveyor._sqlite import Database, path_from_url

        self.display_url = redact_url(url)
        # AUTOINCREMENT: a seq is never handed out again, even after its row was deleted.
        schema = self._schema("INTEGER PRIMARY KEY AUTOINCREMENT")
        path = path_from_url(url)
        # The SQLite broker's own connections to the file, when it is the broker's: a write
        # is durable as a publish is (FULL), and a worker polls on its loop's connection.
        self._db = Database.shared(path, schema, synchronous="FULL")
        self._reads = Database.shared(path, schema, synchronous="NORMAL")

    @contextmanager
    def _writing(self) -> Iterator[Any]:
        with self._db.transaction() as conn:  # SQLite has one writer at a time
            yield conn

    @contextmanager
    def _reading(self) -> Iterator[Any]:
        # Plain reads in WAL mode: they never wait for a writer, nor hold one up.
        yield self._reads.connection()

    def close(self) -> None:
        """See `RevocationStore`."""
        self._db.close()
        self._reads.close()


class PostgresRevocations(_SQLRevocations):
    """Revocations in PostgreSQL: workers on several machines."""

    marker = "%s"

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError:
            raise ConfigurationError(
                "revocations in PostgreSQL need psycopg: pip install 'conveyor[postgresql]'"
            ) from None
        self.display_url = redact_url(url)
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        table = next((value for key, value in reversed(query) if key == "table"), None)
        if table is not None:
            if not _TABLE_NAME.fullmatch(table):
                raise ConfigurationError(
                    f"PostgreSQL table {table!r} in {self.display_url!r}: use letters, digits "
                    "and underscores (not first), at most 48 characters"
                )
            self.table = f"{table}_revocations"
        libpq = [(key, value) for key, value in query if key not in ("table", "prefix")]
        if not any(key == "connect_timeout" for key, _ in libpq):
            libpq.append(("connect_timeout", "10"))
        self._url = urlunsplit(parts._replace(query=urlencode(libpq)))
        self.endpoints = _endpoints(parts)
        connects(self)
        self._psycopg = psycopg
        self._conn: Any = None
        self._pid = 0
        self._lock = threading.Lock()
        self._ready = False

    @contextmanager
    def _connected(self) -> Iterator[Any]:
        with self._lock:
            conn = self._conn
            if conn is None or conn.closed or self._pid != os.getpid():
                # A connection made before a fork belongs to the parent: never used here.
                conn = self._conn = self._psycopg.connect(self._url, autocommit=True)
                self._pid = os.getpid()
            try:
                if not self._ready:
                    with conn.transaction():
                        for statement in self._schema("BIGSERIAL PRIMARY KEY"):
                            conn.execute(statement)
                    self._ready = True
                yield conn
            except self._psycopg.OperationalError:
                conn.close()
                raise

    @contextmanager
    def _writing(self) -> Iterator[Any]:
        with self._connected() as conn, conn.transaction():
            # Writers take turns (readers never wait): a row's seq is drawn and committed
            # before the next writer draws one, so no poll can see seq 6 before seq 5.
            conn.execute(f"LOCK TABLE {self.table} IN EXCLUSIVE MODE")
            yield conn

    @contextmanager
    def _reading(self) -> Iterator[Any]:
        with self._connected() as conn, conn.transaction():
            yield conn

    def close(self) -> None:
        """See `RevocationStore`."""
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None


# KEYS: the stream. ARGV: the cap, then per revocation: id, terminate, expires_at (s).
# The key lives as long as its longest-lived entry.
_REDIS_ADD = """
local last = 0
for i = 2, #ARGV, 3 do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
    'id', ARGV[i], 't', ARGV[i + 1], 'x', ARGV[i + 2])
  local at = math.ceil(tonumber(ARGV[i + 2]) * 1000)
  if at > last then last = at end
end
local ttl = redis.call('PTTL', KEYS[1])
local now = redis.call('TIME')
local want = last - (tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000))
if want > 0 and ttl < want then
  redis.call('PEXPIRE', KEYS[1], want)
end
return 1
"""


class RedisRevocations:
    """Revocations in a Redis stream: workers on several machines."""

    local = False

    def __init__(self, url: str) -> None:
        try:
            import redis
        except ImportError:
            raise ConfigurationError(
                "revocations in Redis need redis-py: pip install 'conveyor[redis]'"
            ) from None
        self.display_url = redact_url(url)
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        prefixes = [value for name, value in query if name == "prefix"]
        prefix = prefixes[-1] if prefixes else "conveyor"
        rest = urlencode([(name, value) for name, value in query if name != "prefix"])
        self.key = f"{prefix}:revocations"
        self.endpoints = _endpoints(parts)
        connects(self)
        timeouts = {
            name: 10.0
            for name in ("socket_timeout", "socket_connect_timeout")
            if not any(key == name for key, _ in query)
        }
        self._redis: Any = redis.Redis.from_url(urlunsplit(parts._replace(query=rest)), **timeouts)
        self._add: Callable[..., Any] = self._redis.register_script(_REDIS_ADD)

    def add(self, revocations: Sequence[Revocation]) -> None:
        """See `RevocationStore`."""
        if not revocations:
            return
        args: list[Any] = [MAX_ENTRIES]
        for r in revocations:
            args += [r.id, int(r.terminate), repr(r.expires_at)]
        self._add(keys=[self.key], args=args)

    def load(self, now: float) -> tuple[list[Revocation], Cursor]:
        """See `RevocationStore`: the whole stream in one read (it holds `MAX_ENTRIES` at most)."""
        entries = self._redis.xrange(self.key, "-", "+", count=MAX_ENTRIES + BATCH)
        cursor = entries[-1][0].decode() if entries else "0-0"
        found = [r for r in self._checked(entries) if r.expires_at > now]
        return found, cursor

    def since(self, cursor: Cursor) -> tuple[list[Revocation], Cursor]:
        """See `RevocationStore`: one XREAD after the cursor, without blocking."""
        answer = self._redis.xread({self.key: str(cursor)}, count=BATCH)
        if not answer:
            return [], cursor
        entries = answer[0][1]
        return self._checked(entries), entries[-1][0].decode()

    def _checked(self, entries: Sequence[Any]) -> list[Revocation]:
        found = []
        for _, stored in entries:
            fields = stored or {}
            record = checked(
                (fields.get(b"id"), fields.get(b"x"), fields.get(b"t")), self.display_url
            )
            if record is not None:
                found.append(record)
        return found

    def close(self) -> None:
        """See `RevocationStore`."""
        self._redis.close()


def _endpoints(parts: Any) -> frozenset[tuple[str, int]]:
    """Where a store connects, for the worker's check of inherited connections."""
    try:
        port = parts.port
    except ValueError:
        raise ConfigurationError(
            f"cannot read store URL {redact_url(parts.geturl())!r}: the port must be a number"
        ) from None
    if not parts.hostname:
        return frozenset()
    default = 5432 if parts.scheme.startswith("postgres") else 6379
    return frozenset({(parts.hostname, port or default)})
