"""Results in a PostgreSQL table, with LISTEN/NOTIFY so a waiting `get()` wakes at once.

`postgresql://user:pass@host:5432/db?table=conveyor_results` (other query parameters go to libpq).
The table and its expiry index are created on first use. Each record is stored as the bytes of
`encode_record` (not jsonb: jsonb rejects the NUL character a task's string may hold, and would
rewrite the value's JSON). A transaction that stores finished records notifies the table's
channel with their ids; one listening connection per process wakes the callers waiting on them.

Connections are resources: a pool (and the listener) per process, re-created in a forked child.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool, PoolTimeout

from conveyor.brokers.base import connects
from conveyor.errors import ConfigurationError, ResultError
from conveyor.redact import redact_text, redact_url
from conveyor.resources import Resource
from conveyor.results.base import (
    READY_STATES,
    ResultRecord,
    ResultStore,
    decode_record,
    encode_record,
)

T = TypeVar("T")
Connection = psycopg.Connection[TupleRow]

log = logging.getLogger("conveyor.results.postgres")

DEFAULT_TABLE = "conveyor_results"
# Short enough that "<table>_expires_at" and "<table>_ready" stay within PostgreSQL's 63 bytes.
_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,47}")
_FINISHED = sql.SQL(", ").join(sql.Literal(str(s)) for s in sorted(READY_STATES))
# NOTIFY payloads must stay under 8000 bytes; a longer id is announced as "" (everyone re-checks).
_MAX_PAYLOAD = 7999
# A waiter reads its row again this often even without a notification, in case one was missed.
RECHECK_S = 10.0


class PostgresResultStore(ResultStore):
    """Results with expiry in one table; writers delete expired rows as they go."""

    #: Seconds between the bounded deletes of expired rows that `put` does on the side.
    cleanup_interval = 60.0
    #: Rows one delete removes at most, so cleanup never holds locks on a big backlog for long.
    cleanup_batch = 1000
    #: Connections in each process's pool.
    pool_min, pool_max = 1, 4
    #: Seconds to wait for a pooled connection before giving up.
    pool_timeout = 10.0

    def __init__(self, url: str) -> None:
        self.display_url = redact_url(url)
        parts = urlsplit(url)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ConfigurationError(
                f"cannot read PostgreSQL URL {self.display_url!r}: "
                "write postgresql://user:pass@host:5432/database"
            )
        try:
            port = parts.port or 5432
        except ValueError:
            raise ConfigurationError(
                f"cannot read PostgreSQL URL {self.display_url!r}: the port must be a number "
                "from 1 to 65535"
            ) from None
        query = parse_qsl(parts.query, keep_blank_values=True)
        table = next((value for key, value in reversed(query) if key == "table"), DEFAULT_TABLE)
        if not _TABLE_NAME.fullmatch(table):
            raise ConfigurationError(
                f"PostgreSQL result table {table!r} in {self.display_url!r}: use letters, digits "
                "and underscores (not first), at most 48 characters"
            )
        libpq = [(key, value) for key, value in query if key != "table"]
        if not any(key == "connect_timeout" for key, _ in libpq):
            libpq.append(("connect_timeout", "10"))
        self._conninfo = urlunsplit(parts._replace(query=urlencode(libpq)))
        self._password = unquote(parts.password or "")
        try:
            conninfo_to_dict(self._conninfo)  # libpq's own check of the parameters, early
        except psycopg.Error as exc:
            raise ConfigurationError(
                f"cannot read PostgreSQL URL {self.display_url!r}: {self._reason(exc)} "
                "(query parameters other than table= go to libpq)"
            ) from None
        self.table = table
        self.channel = f"{table}_ready"
        # A host-less URL goes through a Unix socket, which has no (host, port) to name.
        self.endpoints = frozenset({(parts.hostname, port)}) if parts.hostname else frozenset()
        connects(self)
        self._sql = _Statements(table)
        self._pool = Resource(
            self._open_pool,
            f"results {self.display_url} pool",
            check=lambda pool: not pool.closed,
            close=lambda pool: pool.close(),
        )
        self._listener = Resource(
            lambda: _Listener(self._connect, self.channel, self.display_url),
            f"results {self.display_url} listener",
        )
        self._last_cleanup = -math.inf  # the first put cleans up

    def put(self, records: Sequence[ResultRecord]) -> None:
        """Upsert records and announce the finished ones, in one transaction."""
        if not records:
            return
        now = time.time()
        rows = [
            (r.id, r.state.value, r.expires_at, r.updated_at, encode_record(r), now)
            for r in records
        ]
        finished = sorted(
            {
                r.id if len(r.id.encode()) <= _MAX_PAYLOAD else ""
                for r in records
                if r.state in READY_STATES
            }
        )

        def upsert(conn: Connection) -> None:
            with conn.transaction(), conn.cursor() as cursor:
                cursor.executemany(self._sql.upsert, rows)
                if finished:
                    cursor.execute(
                        "SELECT pg_notify(%s, id) FROM unnest(%s::text[]) AS id",
                        (self.channel, finished),
                    )

        self._run("storing results", upsert)
        if time.monotonic() - self._last_cleanup >= self.cleanup_interval:
            try:
                self._delete_expired(once=True)
            except ResultError as exc:  # the records are stored; cleanup tries again later
                log.warning("%s", exc)

    def get(self, task_id: str) -> ResultRecord | None:
        """The live record for a task id; `ResultError` if what is stored is not ours."""
        row = self._run(
            "reading a result",
            lambda conn: conn.execute(self._sql.get, (task_id, time.time())).fetchone(),
        )
        if row is None:
            return None
        record = decode_record(bytes(row[0]))
        if record.id != task_id:
            raise ResultError(
                f"the stored result for task {task_id} names task {record.id}: the table "
                f"{self.table} holds rows conveyor did not write"
            )
        return record

    def wait(self, task_id: str, timeout: float | None) -> ResultRecord | None:
        """Wait for a notification that the task finished, then read it; no polling.

        The waiter registers and listens before it reads the row, so a notification sent in
        between is not lost. Every `RECHECK_S` the row is read once more, in case the listener
        missed one without noticing (a silent network partition).
        """
        if timeout is not None and timeout <= 0:  # a look, not worth a listening connection
            record = self.get(task_id)
            return record if record is not None and record.state in READY_STATES else None
        deadline = None if timeout is None else time.monotonic() + timeout
        listener = self._listener()
        with listener.waiting(task_id) as woken:
            while True:
                listener.listen()  # before the read: what finishes after it is announced
                record = self.get(task_id)
                if record is not None and record.state in READY_STATES:
                    return record
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                woken.wait(RECHECK_S if remaining is None else min(remaining, RECHECK_S))
                woken.clear()

    def forget(self, task_id: str) -> None:
        """Delete a record."""
        self._run("deleting a result", lambda conn: conn.execute(self._sql.forget, (task_id,)))

    def cleanup(self) -> int:
        """Delete every expired record, in bounded batches; returns how many."""
        return self._delete_expired(once=False)

    def count(self) -> int:
        """Live records."""
        row = self._run(
            "counting results",
            lambda conn: conn.execute(self._sql.count, (time.time(),)).fetchone(),
        )
        return 0 if row is None else int(row[0])

    def close(self) -> None:
        """Close this process's pool and listener; the next use opens new ones."""
        self._listener.close()
        self._pool.close()

    # connections

    def _connect(self) -> Connection:
        try:
            return psycopg.connect(self._conninfo, autocommit=True)
        except psycopg.Error as exc:
            raise self._error("connecting", exc) from None

    def _open_pool(self) -> ConnectionPool[Connection]:
        # One direct connection first: it creates the table, and a failure reports PostgreSQL's
        # own reason instead of a pool timeout.
        with self._connect() as conn:
            self._create_table(conn)
        pool: ConnectionPool[Connection] = ConnectionPool(
            self._conninfo,
            kwargs={"autocommit": True},
            min_size=self.pool_min,
            max_size=self.pool_max,
            timeout=self.pool_timeout,
            name=f"conveyor-results-{self.table}",
            num_workers=1,
            open=False,
        )
        pool.open(wait=False)
        return pool

    def _create_table(self, conn: Connection) -> None:
        for attempt in (1, 2, 3):
            try:
                with conn.transaction():
                    for statement in self._sql.schema:
                        conn.execute(statement)
                return
            except (
                psycopg.errors.UniqueViolation,
                psycopg.errors.DuplicateTable,
                psycopg.errors.DuplicateObject,
            ) as exc:
                # Another process created it at the same moment: IF NOT EXISTS does not cover
                # that race, but that one committed (or rolled back) by now: try again.
                if attempt == 3:
                    raise self._error("creating the table", exc) from None
            except psycopg.Error as exc:
                raise self._error("creating the table", exc) from None

    def _run(self, doing: str, work: Callable[[Connection], T]) -> T:
        """`work` on a pooled connection; one retry when the connection turns out broken (an
        idle connection dies when PostgreSQL restarts), `ResultError` for anything else."""
        pool = self._pool()
        for attempt in (1, 2):
            try:
                with pool.connection() as conn:
                    try:
                        return work(conn)
                    except psycopg.OperationalError:
                        if attempt == 1 and conn.broken:
                            log.info("%s: a pooled connection was broken; retrying", doing)
                            continue
                        raise
            except psycopg.Error as exc:
                raise self._error(doing, exc) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _delete_expired(self, *, once: bool) -> int:
        self._last_cleanup = time.monotonic()
        total = 0
        while True:
            deleted = self._run(
                "deleting expired results",
                lambda conn: (
                    conn.execute(self._sql.cleanup, (time.time(), self.cleanup_batch)).rowcount
                ),
            )
            total += max(deleted, 0)
            if once or deleted < self.cleanup_batch:
                return total

    def _reason(self, exc: BaseException) -> str:
        reason = " ".join(redact_text(str(exc)).split())
        if self._password:  # a last resort, for a message that echoes the password bare
            reason = reason.replace(self._password, "***")
        return reason

    def _error(self, doing: str, exc: BaseException) -> ResultError:
        reason = self._reason(exc)
        if isinstance(exc, PoolTimeout):
            hint = "is PostgreSQL running there, or are all pooled connections busy?"
        elif isinstance(exc, psycopg.OperationalError):
            hint = "is PostgreSQL running there, and does it accept this user and database?"
        else:
            hint = f"may this user create, read and write the table {self.table}?"
        return ResultError(
            f"PostgreSQL result store at {self.display_url}: {doing} failed "
            f"({type(exc).__name__}: {reason}); {hint}"
        )


class _Statements:
    """The SQL for one table."""

    def __init__(self, name: str) -> None:
        table, index = sql.Identifier(name), sql.Identifier(f"{name}_expires_at")
        self.schema = (
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (id text PRIMARY KEY, state text NOT NULL, "
                "expires_at double precision NOT NULL, updated_at double precision NOT NULL, "
                "data bytea NOT NULL)"
            ).format(table),
            sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (expires_at)").format(index, table),
        )
        # should_replace in SQL: a finished state wins over anything that is not; an expired
        # row counts as absent.
        self.upsert = sql.SQL(
            "INSERT INTO {t} AS old (id, state, expires_at, updated_at, data) "
            "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET state = excluded.state, "
            "expires_at = excluded.expires_at, updated_at = excluded.updated_at, "
            "data = excluded.data WHERE old.state NOT IN ({f}) OR excluded.state IN ({f}) "
            "OR old.expires_at <= %s"
        ).format(t=table, f=_FINISHED)
        self.get = sql.SQL("SELECT data FROM {} WHERE id = %s AND expires_at > %s").format(table)
        self.forget = sql.SQL("DELETE FROM {} WHERE id = %s").format(table)
        self.count = sql.SQL("SELECT count(*) FROM {} WHERE expires_at > %s").format(table)
        # Bounded, and SKIP LOCKED so cleaners in many workers never queue behind each other.
        self.cleanup = sql.SQL(
            "DELETE FROM {t} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {t} WHERE expires_at <= %s "
            "LIMIT %s FOR UPDATE SKIP LOCKED))"
        ).format(t=table)


class _Listener:
    """One LISTENing connection per process, on a thread that wakes the callers waiting on ids.

    The connection is opened by the first wait, re-opened by the next one after it broke, and
    closed after `idle_s` without waiters. Waiters stay registered across those reconnections.
    """

    #: Seconds between wake-ups of the thread, to notice close() and idleness without a query.
    wake_s = 0.5
    #: Seconds between `SELECT 1`s that tell a dead connection from a quiet one.
    health_s = 30.0
    #: Seconds without a waiter after which the connection is closed.
    idle_s = 30.0

    def __init__(self, connect: Callable[[], Connection], channel: str, display_url: str) -> None:
        self._connect = connect
        self._listen = sql.SQL("LISTEN {}").format(sql.Identifier(channel))
        self._channel = channel
        self._display_url = display_url
        self._lock = threading.Lock()
        self._waiters: dict[str, set[threading.Event]] = {}
        self._conn: Connection | None = None  # the current connection; its thread owns it

    @contextlib.contextmanager
    def waiting(self, task_id: str) -> Iterator[threading.Event]:
        """An event set when a notification names `task_id` (or the connection is lost)."""
        event = threading.Event()
        with self._lock:
            self._waiters.setdefault(task_id, set()).add(event)
        try:
            yield event
        finally:
            with self._lock:
                events = self._waiters.get(task_id)
                if events is not None:
                    events.discard(event)
                    if not events:
                        del self._waiters[task_id]

    def listen(self) -> None:
        """Make sure notifications are being received (from now on); connects if needed."""
        with self._lock:  # held while connecting: concurrent waiters need the same connection
            if self._conn is not None:
                return
            conn = self._connect()
            try:
                conn.execute(self._listen)
            except psycopg.Error as exc:
                conn.close()
                raise ResultError(
                    f"PostgreSQL result store at {self._display_url}: LISTEN failed "
                    f"({type(exc).__name__}: {' '.join(redact_text(str(exc)).split())})"
                ) from None
            self._conn = conn
            threading.Thread(
                target=self._receive,
                args=(conn,),
                name=f"conveyor-results-listen-{self._channel}",
                daemon=True,
            ).start()

    def close(self) -> None:
        """Let go of the connection; its thread closes it on its next wake-up."""
        with self._lock:
            self._conn = None

    def _receive(self, conn: Connection) -> None:
        now = time.monotonic()
        next_check, busy_at = now + self.health_s, now
        try:
            while True:
                for notify in conn.notifies(timeout=self.wake_s):
                    self._wake(notify.payload)
                now = time.monotonic()
                with self._lock:  # so that no waiter registers between the look and the stop
                    if self._conn is not conn:  # closed
                        return
                    if self._waiters:
                        busy_at = now
                    elif now - busy_at >= self.idle_s:
                        self._conn = None
                        return
                if now >= next_check:
                    # Notifications that arrive meanwhile are kept by psycopg for notifies().
                    conn.execute("SELECT 1")
                    next_check = time.monotonic() + self.health_s
        except psycopg.Error as exc:
            log.warning(
                "PostgreSQL result store at %s: the listening connection failed (%s); "
                "waiting callers reconnect",
                self._display_url,
                type(exc).__name__,
            )
            with self._lock:
                if self._conn is conn:
                    self._conn = None
            self._wake("")  # every waiter reads its record again, after listening again
        finally:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    def _wake(self, task_id: str) -> None:
        with self._lock:
            if task_id:
                events = list(self._waiters.get(task_id, ()))
            else:
                events = [event for events in self._waiters.values() for event in events]
        for event in events:
            event.set()
