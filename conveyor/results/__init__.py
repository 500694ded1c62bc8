"""Result stores keep task outcomes with an expiry. `from_url` picks one by URL scheme."""

from __future__ import annotations

from urllib.parse import urlsplit

from conveyor.errors import ConfigurationError
from conveyor.redact import redact_url
from conveyor.results.base import READY_STATES, ResultRecord, ResultStore, State

__all__ = ["READY_STATES", "ResultRecord", "ResultStore", "State", "from_url"]


def from_url(url: str) -> ResultStore:
    """The store for a URL: `sqlite:///file.db`, `redis://host:port/db` (`rediss://`: TLS),
    `postgresql://host/db` or `memory://`."""
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        from conveyor.results.sqlite import SQLiteResultStore

        return SQLiteResultStore(url)
    if scheme in ("postgresql", "postgres"):
        try:
            from conveyor.results.postgres import PostgresResultStore
        except ModuleNotFoundError as exc:
            if exc.name not in ("psycopg", "psycopg_pool"):
                raise
            raise ConfigurationError(
                "the PostgreSQL result store needs psycopg: pip install 'conveyor[postgresql]'"
            ) from None
        return PostgresResultStore(url)
    if scheme in ("redis", "rediss"):
        try:
            from conveyor.results.redis import RedisResultStore
        except ModuleNotFoundError as exc:
            if exc.name != "redis":
                raise
            raise ConfigurationError(
                "the Redis result store needs redis-py: pip install 'conveyor[redis]'"
            ) from None
        return RedisResultStore(url)
    if scheme == "memory":
        from conveyor.results.memory import MemoryResultStore

        return MemoryResultStore()
    raise ConfigurationError(
        f"unsupported result store URL {redact_url(url)!r}: use sqlite:///path.db, "
        "redis://host:6379/0, rediss://host:6380/0 (TLS), postgresql://host/db or memory://"
    )
