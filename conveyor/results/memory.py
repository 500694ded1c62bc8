"""An in-process result store for unit tests. Records are kept encoded, as real stores keep them."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from conveyor.results.base import (
    ResultRecord,
    ResultStore,
    decode_record,
    encode_record,
    should_replace,
)


class MemoryResultStore(ResultStore):
    """Results in a dict, guarded by a lock."""

    display_url = "memory://"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, tuple[str, float, bytes]] = {}

    def put(self, records: Sequence[ResultRecord]) -> None:
        """Store encoded records."""
        with self._lock:
            for record in records:
                old = self._data.get(record.id)
                if should_replace(None if old is None else old[0], record.state):  # type: ignore[arg-type]
                    self._data[record.id] = (record.state, record.expires_at, encode_record(record))

    def get(self, task_id: str) -> ResultRecord | None:
        """The record, unless missing or expired."""
        with self._lock:
            item = self._data.get(task_id)
        if item is None or item[1] <= time.time():
            return None
        return decode_record(item[2])

    def forget(self, task_id: str) -> None:
        """Drop a record."""
        with self._lock:
            self._data.pop(task_id, None)

    def cleanup(self) -> int:
        """Drop expired records."""
        now = time.time()
        with self._lock:
            expired = [k for k, (_, exp, _) in self._data.items() if exp <= now]
            for key in expired:
                del self._data[key]
        return len(expired)

    def count(self) -> int:
        """Live records."""
        now = time.time()
        with self._lock:
            return sum(exp > now for _, exp, _ in self._data.values())
