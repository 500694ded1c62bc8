"""Result stores keep task outcomes with an expiry. `from_url` picks one by URL scheme."""

from __future__ import annotations

from urllib.parse import urlsplit

from conveyor.errors import ConfigurationError
from conveyor.redact import redact_url
from conveyor.results.base import READY_STATES, ResultRecord, ResultStore, State

__all__ = ["READY_STATES", "ResultRecord", "ResultStore", "State", "from_url"]


def from_url(url: str) -> ResultStore:
    """The store for a URL: `sqlite:///file.db` or `memory://`."""
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        from conveyor.results.sqlite import SQLiteResultStore

        return SQLiteResultStore(url)
    if scheme == "memory":
        from conveyor.results.memory import MemoryResultStore

        return MemoryResultStore()
    raise ConfigurationError(
        f"unsupported result store URL {redact_url(url)!r}: use sqlite:///path.db or memory://"
    )
