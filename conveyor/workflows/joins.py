"""Where chords are joined and continuations claimed: atomic operations in the result store.

Three things are kept per chord, beside the task records, and share their expiry:

- its spec (the callback and the member count), written once when the chord is sent;
- its members: one slot per member index, filled with the member's outcome by an atomic
  insert-if-absent, so a redelivered or retried member fills its slot once and is counted once;
- whether it has fired: set after the callback was published (or the chord's failure recorded).

And per workflow-generated message, a run claim: the nonce of the copy allowed to run. Each store
does these atomically on its own terms: SQLite in one transaction, PostgreSQL with
`INSERT ... ON CONFLICT DO NOTHING`, Redis with a Lua script. They use the result store's own
connections (fork-safe resources already), so workflows open no connection of their own.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from conveyor.errors import ConfigurationError
from conveyor.results import ResultStore


@dataclass(frozen=True, slots=True)
class Joined:
    """A chord after a member's outcome was added: how many slots are filled, whether it has
    fired already, and its spec (None if the store has none: expired, or never sent)."""

    count: int
    fired: bool
    spec: bytes | None


#: A chord member to join: chord id, index, outcome, expiry (epoch seconds).
Member = tuple[str, int, bytes, float]


class Joins(Protocol):
    """The chord and claim operations a result store provides for workflows."""

    def start(self, chords: Sequence[tuple[str, bytes]], expires_at: float) -> None:
        """Keep each chord's spec (by chord id) unless one is kept already."""

    def join(self, members: Sequence[Member]) -> list[Joined]:
        """Fill each member's slot (index) of its chord with its outcome unless it is filled
        already, in order, in one round trip; each chord as it is after that member."""

    def members(self, chord: str) -> list[bytes]:
        """The filled slots' outcomes, by index."""

    def fired(self, chords: Sequence[str]) -> None:
        """Mark chords fired."""

    def claim_runs(self, runs: Sequence[tuple[str, str]], expires_at: float) -> list[bool]:
        """For each (task id, nonce), in one round trip: True if that copy may run (no other
        copy claimed the task first)."""


def joins_for(store: ResultStore | None) -> Joins:
    """The joins kept by `store`; `ConfigurationError` if it cannot keep them."""
    if store is None:
        raise ConfigurationError(
            "a chord needs a result store to join its members: pass results=... to Conveyor() "
            "(sqlite:///file.db, redis://... or postgresql://...)"
        )
    with _lock:
        joins = _by_store.get(store)
        if joins is None:
            joins = _by_store[store] = _make(store)
    return joins


_lock = threading.Lock()
_by_store: weakref.WeakKeyDictionary[ResultStore, Joins] = weakref.WeakKeyDictionary()


def _make(store: ResultStore) -> Joins:
    from conveyor.results.memory import MemoryResultStore

    if isinstance(store, MemoryResultStore):
        return MemoryJoins()
    kind = type(store).__name__
    if kind == "SQLiteResultStore":
        return SQLiteJoins(store)
    if kind == "RedisResultStore":
        return RedisJoins(store)
    if kind == "PostgresResultStore":
        return PostgresJoins(store)
    if kind == "RpcResultStore":
        raise ConfigurationError(
            "workflows cannot use rpc:// results: a chain's or chord's results are read by "
            "other processes than the sender; use sqlite:///file.db, redis://... or "
            "postgresql://... for results"
        )
    raise ConfigurationError(f"result store {store.display_url} cannot keep workflows")


class MemoryJoins:
    """Joins in this process (the memory store's, for tests)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._specs: dict[str, bytes] = {}
        self._slots: dict[str, dict[int, bytes]] = {}
        self._fired: set[str] = set()
        self._runs: dict[str, str] = {}

    def start(self, chords: Sequence[tuple[str, bytes]], expires_at: float) -> None:
        """See `Joins`."""
        with self._lock:
            for chord, spec in chords:
                self._specs.setdefault(chord, spec)

    def join(self, members: Sequence[Member]) -> list[Joined]:
        """See `Joins`."""
        joined = []
        with self._lock:
            for chord, index, outcome, _ in members:
                slots = self._slots.setdefault(chord, {})
                slots.setdefault(index, outcome)
                joined.append(Joined(len(slots), chord in self._fired, self._specs.get(chord)))
        return joined

    def members(self, chord: str) -> list[bytes]:
        """See `Joins`."""
        with self._lock:
            slots = self._slots.get(chord, {})
            return [slots[i] for i in sorted(slots)]

    def fired(self, chords: Sequence[str]) -> None:
        """See `Joins`."""
        with self._lock:
            self._fired.update(chords)

    def claim_runs(self, runs: Sequence[tuple[str, str]], expires_at: float) -> list[bool]:
        """See `Joins`."""
        with self._lock:
            return [self._runs.setdefault(task_id, nonce) == nonce for task_id, nonce in runs]


_SQL_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS {t}_chords (id TEXT PRIMARY KEY, spec {blob} NOT NULL, "
    "joined INTEGER NOT NULL DEFAULT 0, fired BOOLEAN NOT NULL DEFAULT FALSE, "
    "expires_at DOUBLE PRECISION NOT NULL)",
    "CREATE TABLE IF NOT EXISTS {t}_chord_members (chord TEXT NOT NULL, idx INTEGER NOT NULL, "
    "outcome {blob} NOT NULL, expires_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (chord, idx))",
    "CREATE TABLE IF NOT EXISTS {t}_runs (id TEXT PRIMARY KEY, nonce TEXT NOT NULL, "
    "expires_at DOUBLE PRECISION NOT NULL)",
)


class _SQL:
    """The statements, for a table prefix and a parameter marker."""

    def __init__(self, prefix: str, p: str, blob: str) -> None:
        self.schema = [s.format(t=prefix, blob=blob) for s in _SQL_SCHEMA]
        t = prefix
        self.start = (
            f"INSERT INTO {t}_chords (id, spec, expires_at) VALUES ({p}, {p}, {p}) "
            "ON CONFLICT (id) DO NOTHING"
        )
        self.add = (
            f"INSERT INTO {t}_chord_members (chord, idx, outcome, expires_at) "
            f"VALUES ({p}, {p}, {p}, {p}) ON CONFLICT (chord, idx) DO NOTHING"
        )
        # A count kept beside the spec, raised by each new member, rather than a COUNT(*) of
        # the members: that would read the whole chord at every join.
        self.count = f"UPDATE {t}_chords SET joined = joined + 1 WHERE id = {p}"
        self.spec = f"SELECT joined, spec, fired FROM {t}_chords WHERE id = {p}"
        self.members = f"SELECT outcome FROM {t}_chord_members WHERE chord = {p} ORDER BY idx"
        self.fired = f"UPDATE {t}_chords SET fired = TRUE WHERE id = {p}"
        self.claim = (
            f"INSERT INTO {t}_runs (id, nonce, expires_at) VALUES ({p}, {p}, {p}) "
            "ON CONFLICT (id) DO NOTHING"
        )
        self.run = f"SELECT nonce FROM {t}_runs WHERE id = {p}"
        self.prune = [
            f"DELETE FROM {t}_chords WHERE expires_at < {p}",
            f"DELETE FROM {t}_chord_members WHERE expires_at < {p}",
            f"DELETE FROM {t}_runs WHERE expires_at < {p}",
        ]


PRUNE_INTERVAL_S = 60.0


def _claim_one(conn: Any, sql: _SQL, run: tuple[str, str], expires_at: float) -> bool:
    """One run claim, inside the caller's transaction (SQLite's or PostgreSQL's)."""
    task_id, nonce = run
    conn.execute(sql.claim, (task_id, nonce, expires_at))
    (held,) = conn.execute(sql.run, (task_id,)).fetchone()
    return bool(held == nonce)


def _join_one(conn: Any, sql: _SQL, member: Member) -> Joined:
    """One member's join, inside the caller's transaction (SQLite's or PostgreSQL's)."""
    chord, index, outcome, expires_at = member
    if conn.execute(sql.add, (chord, index, outcome, expires_at)).rowcount == 1:
        conn.execute(sql.count, (chord,))
    row = conn.execute(sql.spec, (chord,)).fetchone()
    if row is None:
        return Joined(0, False, None)
    return Joined(int(row[0]), bool(row[2]), bytes(row[1]))


class SQLiteJoins:
    """Joins in the SQLite result store's file, each operation one transaction."""

    def __init__(self, store: Any) -> None:
        self._db = store._db
        self._sql = _SQL("conveyor_workflow", "?", "BLOB")
        self._db.add_schema(self._sql.schema)
        self._next_prune = 0.0

    def start(self, chords: Sequence[tuple[str, bytes]], expires_at: float) -> None:
        """See `Joins`."""
        with self._db.transaction() as conn:
            conn.executemany(self._sql.start, [(c, s, expires_at) for c, s in chords])
            if time.monotonic() >= self._next_prune:
                self._next_prune = time.monotonic() + PRUNE_INTERVAL_S
                for statement in self._sql.prune:
                    conn.execute(statement, (time.time(),))

    def join(self, members: Sequence[Member]) -> list[Joined]:
        """See `Joins`."""
        with self._db.transaction() as conn:
            return [_join_one(conn, self._sql, member) for member in members]

    def members(self, chord: str) -> list[bytes]:
        """See `Joins`."""
        with self._db.transaction() as conn:
            rows = conn.execute(self._sql.members, (chord,)).fetchall()
        return [bytes(row[0]) for row in rows]

    def fired(self, chords: Sequence[str]) -> None:
        """See `Joins`."""
        with self._db.transaction() as conn:
            conn.executemany(self._sql.fired, [(c,) for c in chords])

    def claim_runs(self, runs: Sequence[tuple[str, str]], expires_at: float) -> list[bool]:
        """See `Joins`."""
        with self._db.transaction() as conn:
            return [_claim_one(conn, self._sql, run, expires_at) for run in runs]


class PostgresJoins:
    """Joins in tables beside the PostgreSQL store's (`<table>_chords` ...), through its pool."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self._sql = _SQL(store.table, "%s", "BYTEA")
        self._ready = False
        self._next_prune = 0.0

    def _work(self, doing: str, fn: Any) -> Any:
        def run(conn: Any) -> Any:
            if not self._ready:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self._sql.start,))
                    for statement in self._sql.schema:
                        conn.execute(statement)
                self._ready = True
            with conn.transaction():
                return fn(conn)

        return self._store._run(doing, run)

    def start(self, chords: Sequence[tuple[str, bytes]], expires_at: float) -> None:
        """See `Joins`."""
        prune = time.monotonic() >= self._next_prune

        def start(conn: Any) -> None:
            with conn.cursor() as cursor:
                cursor.executemany(self._sql.start, [(c, s, expires_at) for c, s in chords])
            if prune:
                for statement in self._sql.prune:
                    conn.execute(statement, (time.time(),))

        if prune:
            self._next_prune = time.monotonic() + PRUNE_INTERVAL_S
        self._work("keeping a chord", start)

    def join(self, members: Sequence[Member]) -> list[Joined]:
        """See `Joins`."""
        joined: list[Joined] = self._work(
            "joining chords", lambda conn: [_join_one(conn, self._sql, m) for m in members]
        )
        return joined

    def members(self, chord: str) -> list[bytes]:
        """See `Joins`."""
        rows = self._work(
            "reading a chord", lambda conn: conn.execute(self._sql.members, (chord,)).fetchall()
        )
        return [bytes(row[0]) for row in rows]

    def fired(self, chords: Sequence[str]) -> None:
        """See `Joins`."""

        def fired(conn: Any) -> None:
            with conn.cursor() as cursor:
                cursor.executemany(self._sql.fired, [(c,) for c in chords])

        self._work("marking a chord fired", fired)

    def claim_runs(self, runs: Sequence[tuple[str, str]], expires_at: float) -> list[bool]:
        """See `Joins`."""
        claimed: list[bool] = self._work(
            "claiming runs", lambda conn: [_claim_one(conn, self._sql, r, expires_at) for r in runs]
        )
        return claimed


# KEYS: the members hash, the spec key, the fired key. ARGV: index, outcome, expiry (ms epoch).
_REDIS_JOIN = """
redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIREAT', KEYS[1], ARGV[3])
return {redis.call('HLEN', KEYS[1]), redis.call('EXISTS', KEYS[3]), redis.call('GET', KEYS[2])}
"""
# KEYS: the spec key, the fired key.
_REDIS_FIRED = """
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then
  redis.call('SET', KEYS[2], '1', 'PX', ttl)
else
  redis.call('SET', KEYS[2], '1', 'EX', 86400)
end
return 1
"""
# KEYS: the run key. ARGV: nonce, expiry (ms epoch).
_REDIS_CLAIM = """
local held = redis.call('GET', KEYS[1])
if not held then
  redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[2])
  return 1
end
if held == ARGV[1] then return 1 end
return 0
"""


class RedisJoins:
    """Joins in the Redis store's database, under its prefix (`{prefix}:chord:{id}:...`)."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self._prefix = f"{store.prefix}:"

    def _redis(self) -> Any:
        return self._store._clients().redis

    def _keys(self, chord: str) -> tuple[str, str, str]:
        base = f"{self._prefix}chord:{chord}"
        return f"{base}:members", f"{base}:spec", f"{base}:fired"

    def start(self, chords: Sequence[tuple[str, bytes]], expires_at: float) -> None:
        """See `Joins`."""
        with self._store._errors("keep a chord"):
            pipe = self._redis().pipeline(transaction=False)
            for chord, spec in chords:
                pipe.set(self._keys(chord)[1], spec, nx=True, pxat=_ms(expires_at))
            pipe.execute()

    def join(self, members: Sequence[Member]) -> list[Joined]:
        """See `Joins`: one pipeline of scripts, each atomic."""
        with self._store._errors("join chords"):
            pipe = self._redis().pipeline(transaction=False)
            for chord, index, outcome, expires_at in members:
                pipe.eval(_REDIS_JOIN, 3, *self._keys(chord), index, outcome, _ms(expires_at))
            replies = pipe.execute()
        return [Joined(int(count), bool(fired), spec) for count, fired, spec in replies]

    def members(self, chord: str) -> list[bytes]:
        """See `Joins`."""
        with self._store._errors("read a chord"):
            slots = self._redis().hgetall(self._keys(chord)[0])
        return [slots[i] for i in sorted(slots, key=int)]

    def fired(self, chords: Sequence[str]) -> None:
        """See `Joins`: the mark expires with the chord's spec."""
        with self._store._errors("mark a chord fired"):
            pipe = self._redis().pipeline(transaction=False)
            for chord in chords:
                _, spec, fired = self._keys(chord)
                pipe.eval(_REDIS_FIRED, 2, spec, fired)
            pipe.execute()

    def claim_runs(self, runs: Sequence[tuple[str, str]], expires_at: float) -> list[bool]:
        """See `Joins`."""
        with self._store._errors("claim runs"):
            pipe = self._redis().pipeline(transaction=False)
            for task_id, nonce in runs:
                pipe.eval(_REDIS_CLAIM, 1, f"{self._prefix}run:{task_id}", nonce, _ms(expires_at))
            return [bool(claimed) for claimed in pipe.execute()]


def _ms(epoch: float) -> int:
    return int(epoch * 1000)
