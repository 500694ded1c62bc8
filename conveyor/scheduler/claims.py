"""Where schedulers claim ticks, so that each tick is sent once however many run.

A tick is claimed before it is sent and marked sent after the broker confirmed it. A claim is a
lease: if its scheduler dies between the claim and the send, the claim runs out and any scheduler
takes the tick over and sends it, late. The one window left is a scheduler killed after the
broker's confirm and before the store's record of it (one write): the tick is sent again then,
with the same task id (`tick_task_id`).

Three stores, each claiming atomically: SQLite (`INSERT ... ON CONFLICT DO NOTHING`, one machine),
PostgreSQL (the same statement) and Redis (a Lua script around `SET NX PX`), for schedulers on
several machines.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from conveyor.errors import ConfigurationError
from conveyor.redact import redact_url
from conveyor.scheduler.schedules import UTC

RETENTION = dt.timedelta(days=7)
"""How long a sent tick's record is kept (the latest of each schedule is always kept)."""


@dataclass(frozen=True)
class Last:
    """The latest tick of a schedule that a scheduler claimed."""

    tick: dt.datetime
    owner: str
    sent: bool


class Claims(Protocol):
    """A store of tick claims."""

    display_url: str

    def claim(
        self, schedule: str, tick: dt.datetime, owner: str, lease: float, now: dt.datetime
    ) -> bool:
        """Claim `tick` for `owner` for `lease` seconds from `now`, or take over a claim that
        ran out unsent; False if another scheduler holds or sent it."""

    def sent(self, schedule: str, tick: dt.datetime, owner: str) -> None:
        """Record that `owner` sent `tick`."""

    def stranded(self, schedule: str, now: dt.datetime) -> list[dt.datetime]:
        """Ticks claimed but never sent whose claim has run out."""

    def last(self, schedule: str) -> Last | None:
        """The latest tick claimed for `schedule`."""

    def atomic(self) -> contextlib.AbstractContextManager[object]:
        """A transaction around a claim, its send and its record, where the store and the broker
        can share one (a SQLite broker's own file): then a tick is sent exactly once."""

    def close(self) -> None:
        """Let the store's connections go."""


def stamp(tick: dt.datetime) -> str:
    """A tick as the text the stores keep: fixed width, so it sorts as time does."""
    return tick.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def unstamp(text: str) -> dt.datetime:
    """`stamp`'s inverse."""
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def from_url(url: str) -> Claims:
    """The claim store at `url`: `sqlite:///file.db`, `postgresql://...` or `redis://...`."""
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        return SQLiteClaims(url)
    if scheme in ("postgresql", "postgres"):
        return PostgresClaims(url)
    if scheme in ("redis", "rediss"):
        return RedisClaims(url)
    raise ConfigurationError(
        f"cannot keep schedule claims at {redact_url(url)!r}: use sqlite:///file.db (one "
        "machine), postgresql://... or redis://... (schedulers on several machines)"
    )


_TABLE = (
    "CREATE TABLE IF NOT EXISTS conveyor_ticks ("
    "schedule TEXT NOT NULL, tick TEXT NOT NULL, owner TEXT NOT NULL, "
    "sent BOOLEAN NOT NULL DEFAULT FALSE, lease_until DOUBLE PRECISION NOT NULL, "
    "PRIMARY KEY (schedule, tick))"
)
_CLAIM = (
    "INSERT INTO conveyor_ticks (schedule, tick, owner, lease_until) VALUES ({p}, {p}, {p}, {p}) "
    "ON CONFLICT (schedule, tick) DO UPDATE SET owner = excluded.owner, "
    "lease_until = excluded.lease_until "
    "WHERE NOT conveyor_ticks.sent AND conveyor_ticks.lease_until < {p}"
)
_SENT = "UPDATE conveyor_ticks SET sent = TRUE WHERE schedule = {p} AND tick = {p} AND owner = {p}"
_STRANDED = (
    "SELECT tick FROM conveyor_ticks WHERE schedule = {p} AND NOT sent AND lease_until < {p} "
    "ORDER BY tick"
)
_LAST = (
    "SELECT tick, owner, sent FROM conveyor_ticks WHERE schedule = {p} ORDER BY tick DESC LIMIT 1"
)
_PRUNE = (
    "DELETE FROM conveyor_ticks WHERE schedule = {p} AND sent AND tick < {p} AND tick < "
    "(SELECT MAX(tick) FROM conveyor_ticks WHERE schedule = {p})"
)


class _SQLClaims:
    """The claims on a SQL database; subclasses say how to run a statement."""

    display_url: str
    marker = "?"

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        raise NotImplementedError
        yield

    def atomic(self) -> contextlib.AbstractContextManager[object]:
        """See `Claims`: nothing to share here."""
        return contextlib.nullcontext()

    def _sql(self, statement: str) -> str:
        return statement.format(p=self.marker)

    def claim(
        self, schedule: str, tick: dt.datetime, owner: str, lease: float, now: dt.datetime
    ) -> bool:
        """See `Claims`."""
        at = now.timestamp()
        with self._transaction() as conn:
            cursor = conn.execute(self._sql(_CLAIM), (schedule, stamp(tick), owner, at + lease, at))
            claimed: bool = cursor.rowcount == 1
            if claimed:
                old = stamp(now - RETENTION)
                conn.execute(self._sql(_PRUNE), (schedule, old, schedule))
        return claimed

    def sent(self, schedule: str, tick: dt.datetime, owner: str) -> None:
        with self._transaction() as conn:
            conn.execute(self._sql(_SENT), (schedule, stamp(tick), owner))

    def stranded(self, schedule: str, now: dt.datetime) -> list[dt.datetime]:
        with self._transaction() as conn:
            rows = conn.execute(self._sql(_STRANDED), (schedule, now.timestamp())).fetchall()
        return [unstamp(row[0]) for row in rows]

    def last(self, schedule: str) -> Last | None:
        with self._transaction() as conn:
            row = conn.execute(self._sql(_LAST), (schedule,)).fetchone()
        return None if row is None else Last(unstamp(row[0]), row[1], bool(row[2]))


class SQLiteClaims(_SQLClaims):
    """Claims in a SQLite file: schedulers on one machine (the embedded setup)."""

    def __init__(self, url: str) -> None:
        from conveyor._sqlite import Database, path_from_url

        self.display_url = redact_url(url)
        self._db = Database.shared(path_from_url(url), [_TABLE], synchronous="FULL")

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        with self._db.transaction() as conn:
            yield conn

    def atomic(self) -> contextlib.AbstractContextManager[object]:
        """See `Claims`: the SQLite broker's producers write to the same `Database` object for
        the same file, so its publish joins this transaction."""
        return self._db.transaction()

    def close(self) -> None:
        """See `Claims`."""
        self._db.close()


class PostgresClaims(_SQLClaims):
    """Claims in PostgreSQL: schedulers on several machines."""

    marker = "%s"

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError:
            raise ConfigurationError(
                "schedule claims in PostgreSQL need psycopg: pip install 'conveyor[postgresql]'"
            ) from None
        self.display_url = redact_url(url)
        self._url = url
        self._psycopg = psycopg
        self._conn: Any = None
        self._lock = threading.Lock()
        self._ready = False

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        with self._lock:
            if self._conn is None or self._conn.closed:
                self._conn = self._psycopg.connect(self._url, connect_timeout=10)
            conn = self._conn
            try:
                with conn.transaction():
                    if not self._ready:
                        conn.execute(_TABLE)
                        self._ready = True
                    yield conn
            except self._psycopg.OperationalError:
                conn.close()
                raise

    def close(self) -> None:
        """See `Claims`."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


# KEYS: the tick's key, the schedule's pending set, its last-tick key.
# ARGV: the tick's stamp, the owner, the lease in milliseconds.
_REDIS_CLAIM = """
if not redis.call('SET', KEYS[1], 'claimed|' .. ARGV[2], 'NX', 'PX', ARGV[3]) then
  return 0
end
redis.call('ZADD', KEYS[2], 0, ARGV[1])
local last = redis.call('GET', KEYS[3])
if not last or string.sub(last, 1, 27) <= ARGV[1] then
  redis.call('SET', KEYS[3], ARGV[1] .. '|' .. ARGV[2])
end
return 1
"""
# KEYS: the tick's key, the schedule's pending set. ARGV: the stamp, the owner, retention (s).
_REDIS_SENT = """
if redis.call('GET', KEYS[1]) == 'claimed|' .. ARGV[2] then
  redis.call('SET', KEYS[1], 'sent|' .. ARGV[2], 'EX', ARGV[3])
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 1
end
return 0
"""


class RedisClaims:
    """Claims in Redis: schedulers on several machines. A claim is a key that expires with its
    lease; a sent tick's key is kept for `RETENTION`."""

    def __init__(self, url: str) -> None:
        try:
            import redis
        except ImportError:
            raise ConfigurationError(
                "schedule claims in Redis need redis-py: pip install 'conveyor[redis]'"
            ) from None
        self.display_url = redact_url(url)
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        prefixes = [value for name, value in query if name == "prefix"]
        self.prefix = prefixes[-1] if prefixes else "conveyor"
        rest = urlencode([(name, value) for name, value in query if name != "prefix"])
        self._redis: Any = redis.Redis.from_url(
            urlunsplit(parts._replace(query=rest)), decode_responses=True
        )
        self._claim: Callable[..., Any] = self._redis.register_script(_REDIS_CLAIM)
        self._sent: Callable[..., Any] = self._redis.register_script(_REDIS_SENT)

    def atomic(self) -> contextlib.AbstractContextManager[object]:
        """See `Claims`: nothing to share here."""
        return contextlib.nullcontext()

    def _keys(self, schedule: str, tick: str) -> tuple[str, str, str]:
        base = f"{self.prefix}:schedule:{schedule}"
        return f"{base}:tick:{tick}", f"{base}:pending", f"{base}:last"

    def claim(
        self, schedule: str, tick: dt.datetime, owner: str, lease: float, now: dt.datetime
    ) -> bool:
        """See `Claims`: the lease is the key's expiry, on Redis's clock."""
        text = stamp(tick)
        keys = self._keys(schedule, text)
        return bool(self._claim(keys=keys, args=[text, owner, max(int(lease * 1000), 1)]))

    def sent(self, schedule: str, tick: dt.datetime, owner: str) -> None:
        """See `Claims`."""
        text = stamp(tick)
        keys = self._keys(schedule, text)[:2]
        self._sent(keys=keys, args=[text, owner, int(RETENTION.total_seconds())])

    def stranded(self, schedule: str, now: dt.datetime) -> list[dt.datetime]:
        """See `Claims`: a pending tick whose claim key has expired."""
        _, pending, _ = self._keys(schedule, "")
        ticks: list[str] = self._redis.zrange(pending, 0, -1)
        return [unstamp(t) for t in ticks if not self._redis.exists(self._keys(schedule, t)[0])]

    def last(self, schedule: str) -> Last | None:
        """See `Claims`."""
        found: str | None = self._redis.get(self._keys(schedule, "")[2])
        if found is None:
            return None
        text, owner = found.split("|", 1)
        state: str | None = self._redis.get(self._keys(schedule, text)[0])
        return Last(unstamp(text), owner, state is not None and state.startswith("sent|"))

    def close(self) -> None:
        """See `Claims`."""
        self._redis.close()
