"""The result store interface and the record every store keeps.

A record holds a task's state and, once it finished, either its JSON-encoded return value or the
failure as three strings (exception type name, message, traceback). Exception classes are never
rebuilt from stored data, and nothing stored is ever executed.
"""

from __future__ import annotations

import abc
import enum
import time
from collections.abc import Sequence

import msgspec

from conveyor.errors import ResultError


class State(enum.StrEnum):
    """Where a task is in its life."""

    PENDING = "PENDING"
    """Not started yet, or unknown (also: result expired or never stored)."""
    STARTED = "STARTED"
    RETRY = "RETRY"
    """Failed this time; another try is scheduled."""
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    REVOKED = "REVOKED"
    """Revoked (`conveyor revoke`, `Result.revoke()`): a worker skipped it, or stopped it."""


READY_STATES = frozenset({State.SUCCESS, State.FAILURE, State.REVOKED})


class ResultRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What a store keeps for one task id."""

    id: str
    state: State
    task: str = ""
    value: msgspec.Raw = msgspec.Raw(b"null")
    """The return value, already JSON-encoded (encoding happens where the task ran)."""
    error_type: str | None = None
    error_message: str | None = None
    traceback: str | None = None
    retries: int = 0
    worker: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float = 0.0
    expires_at: float = 0.0


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(ResultRecord)


def encode_record(record: ResultRecord) -> bytes:
    """Bytes to store."""
    return _encoder.encode(record)


def decode_record(data: bytes) -> ResultRecord:
    """Bytes from a store to a record, or `ResultError` if they are not one of ours."""
    try:
        return _decoder.decode(data)
    except (msgspec.MsgspecError, TypeError, ValueError) as exc:
        raise ResultError(f"the stored result is corrupt or not conveyor's: {exc}") from None


class ResultStore(abc.ABC):
    """What every result store provides."""

    #: The URL with any password masked, safe to print.
    display_url: str = ""
    #: (host, port) pairs this store connects to (see `Broker.endpoints`).
    endpoints: frozenset[tuple[str, int]] = frozenset()

    @abc.abstractmethod
    def put(self, records: Sequence[ResultRecord]) -> None:
        """Store records; a finished state is never overwritten by an unfinished one."""

    @abc.abstractmethod
    def get(self, task_id: str) -> ResultRecord | None:
        """The live (unexpired) record for a task id, if there is one."""

    @abc.abstractmethod
    def forget(self, task_id: str) -> None:
        """Delete a task's record."""

    @abc.abstractmethod
    def cleanup(self) -> int:
        """Delete expired records; returns how many."""

    @abc.abstractmethod
    def count(self) -> int:
        """How many live records the store holds."""

    def wait(self, task_id: str, timeout: float | None) -> ResultRecord | None:
        """Wait until the task is finished; the record, or None if `timeout` ran out.

        This default polls with a growing interval; stores that can be told about changes
        override it.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = 0.001
        while True:
            record = self.get(task_id)
            if record is not None and record.state in READY_STATES:
                return record
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                interval = min(interval, remaining)
            time.sleep(interval)
            interval = min(interval * 2, 0.05)

    def reply_address(self) -> str | None:
        """Where workers send the records of tasks this process sends, for a store that lives
        in the sender (RPC); None for the others."""
        return None

    def route(self, task_id: str, reply_to: str) -> None:  # noqa: B027
        """A worker is about to run a task whose sender asked for its records at `reply_to`."""

    def close(self) -> None:  # noqa: B027
        """Release connections held by this process."""


def should_replace(old: State | None, new: State) -> bool:
    """A finished state wins over anything that is not (a late STARTED cannot undo SUCCESS)."""
    return old is None or old not in READY_STATES or new in READY_STATES
