"""`rpc://`: results sent back to the process that sent the task, over RabbitMQ's direct reply-to.

For a caller that only waits for its own results, a store is one more service to run. Here the
worker sends each result record (STARTED, RETRY, then SUCCESS or FAILURE) straight back to the
client that sent the task: the client's broker channel consumes RabbitMQ's `amq.rabbitmq.reply-to`
pseudo-queue, and every task it sends carries that address (RabbitMQ fills in the channel's own).
There is one reply consumer per client process and no queue per task; nothing is stored in
RabbitMQ.

What this costs: a result reaches only the process that sent the task, lives in that process's
memory (until it expires, is forgotten, or the process ends), and is lost if that process is gone
when the task ends. Another process's `app.result(id)` sees PENDING. A forked child starts with
no results and its own reply consumer.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import msgspec

from conveyor._fork import forget_in_child
from conveyor.errors import ConfigurationError, ResultError
from conveyor.results.base import (
    READY_STATES,
    ResultRecord,
    ResultStore,
    decode_record,
    encode_record,
    should_replace,
)

if TYPE_CHECKING:
    from conveyor.brokers import Broker

log = logging.getLogger("conveyor.results")

#: The most reply addresses a worker remembers for tasks not finished yet.
MAX_ROUTES = 100_000


class _Id(msgspec.Struct):
    id: str


class RpcResultStore(ResultStore):
    """Result records in the memory of the process that sent the tasks, sent there by workers."""

    display_url = "rpc://"

    def __init__(self, url: str, broker: Callable[[], Broker]) -> None:
        if url.rstrip("/") != "rpc:":
            raise ConfigurationError(
                f"the RPC result store takes no options: write rpc://, not {url!r}"
            )
        self._broker = broker
        self._reset()
        _live.add(self)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._records: dict[str, ResultRecord] = {}
        self._corrupt: dict[str, str] = {}  # task id -> why its reply could not be read
        self._address: str | None = None
        # A worker's side: where each running task's records go, oldest first.
        self._routes: collections.OrderedDict[str, str] = collections.OrderedDict()

    # the client's side

    def reply_address(self) -> str:
        """The `reply_to` for tasks this process sends (its reply consumer starts here)."""
        address = self._address
        if address is None:
            address = self._address = self._broker().on_reply(self._arrived)
        return address

    def _arrived(self, body: bytes) -> None:
        """A worker's reply: keep the record and wake whoever waits for it."""
        try:
            record = decode_record(body)
        except ResultError as exc:
            try:
                task_id = msgspec.json.decode(body, type=_Id).id
            except (msgspec.MsgspecError, TypeError, ValueError):
                log.warning("dropped a reply that is not a result record: %s", exc)
                return
            with self._changed:
                self._corrupt[task_id] = str(exc)
                self._changed.notify_all()
            return
        with self._changed:
            old = self._records.get(record.id)
            if should_replace(None if old is None else old.state, record.state):
                self._records[record.id] = record
                self._corrupt.pop(record.id, None)
            self._changed.notify_all()

    def get(self, task_id: str) -> ResultRecord | None:
        """The record a worker sent back for a task this process sent, if it is still live."""
        with self._lock:
            return self._live(task_id)

    def _live(self, task_id: str) -> ResultRecord | None:
        reason = self._corrupt.get(task_id)
        if reason is not None:
            raise ResultError(reason)
        record = self._records.get(task_id)
        if record is not None and record.expires_at and record.expires_at <= time.time():
            del self._records[task_id]
            return None
        return record

    def wait(self, task_id: str, timeout: float | None) -> ResultRecord | None:
        """Wait for the finished record to arrive: woken by the reply, never polling."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while True:
                record = self._live(task_id)
                if record is not None and record.state in READY_STATES:
                    return record
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._changed.wait(remaining)

    def forget(self, task_id: str) -> None:
        """Drop the record from this process's memory."""
        with self._lock:
            self._records.pop(task_id, None)
            self._corrupt.pop(task_id, None)

    def cleanup(self) -> int:
        """Drop expired records (reading one drops it too)."""
        now = time.time()
        with self._lock:
            expired = [i for i, r in self._records.items() if r.expires_at and r.expires_at <= now]
            for task_id in expired:
                del self._records[task_id]
        return len(expired)

    def count(self) -> int:
        """Live records this process holds."""
        self.cleanup()
        with self._lock:
            return len(self._records)

    # the worker's side

    def route(self, task_id: str, reply_to: str) -> None:
        """Where the records of a task the worker is about to run go."""
        with self._lock:
            self._routes[task_id] = reply_to
            self._routes.move_to_end(task_id)
            while len(self._routes) > MAX_ROUTES:
                self._routes.popitem(last=False)

    def put(self, records: Sequence[ResultRecord]) -> None:
        """Send each record to the client that sent its task (none known: nobody asked)."""
        replies = []
        with self._lock:
            for record in records:
                to = self._routes.get(record.id)
                if to is None:
                    continue
                if record.state in READY_STATES:
                    del self._routes[record.id]
                replies.append((to, encode_record(record)))
        if replies:
            self._broker().reply(replies)


_live: weakref.WeakSet[RpcResultStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The parent's records and reply consumer are the parent's.
    for store in list(_live):
        store._reset()


forget_in_child(_after_fork_in_child)
