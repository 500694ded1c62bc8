"""`Result`: the handle a producer gets back for a task it sent."""

from __future__ import annotations

from typing import Any, Generic, TypeVar, cast

from conveyor.errors import ConfigurationError, ResultTimeout, TaskFailed
from conveyor.results.base import READY_STATES, ResultRecord, ResultStore, State
from conveyor.values import decode_result

R = TypeVar("R")


class Result(Generic[R]):
    """A task's id and a way to read its state and outcome from the result store."""

    __slots__ = ("_returns", "_store", "id", "task")

    def __init__(
        self, task_id: str, store: ResultStore | None, task: str = "", returns: Any = None
    ) -> None:
        self.id = task_id
        self.task = task
        self._store = store
        self._returns = returns  # the task's return annotation: `get()` converts to it

    def __repr__(self) -> str:
        return f"<Result {self.task} {self.id}>"

    @property
    def state(self) -> State:
        """PENDING, STARTED, RETRY, SUCCESS or FAILURE (PENDING also when unknown or expired)."""
        record = self._record()
        return State.PENDING if record is None else record.state

    def ready(self) -> bool:
        """True once the task succeeded or failed for good."""
        return self.state in READY_STATES

    def get(self, timeout: float | None = None) -> R:
        """Wait for the task and return its value; raise `TaskFailed` if it failed.

        Raises `ResultTimeout` if `timeout` seconds pass first.
        """
        record = self._require_store().wait(self.id, timeout)
        if record is None:
            raise ResultTimeout(
                f"task {self.task} {self.id} did not finish within {timeout}s "
                f"(state {self.state}); is a worker consuming its queue?"
            )
        return self._outcome(record)

    def forget(self) -> None:
        """Delete the stored result."""
        self._require_store().forget(self.id)

    def _record(self) -> ResultRecord | None:
        return self._require_store().get(self.id)

    def _require_store(self) -> ResultStore:
        if self._store is None:
            raise ConfigurationError(
                f"no result is stored for task {self.task or self.id}: the app has no result "
                "store or the task has ignore_result=True; pass results=... to Conveyor()"
            )
        return self._store

    def _outcome(self, record: ResultRecord) -> R:
        if record.state == State.FAILURE:
            raise TaskFailed(
                self.id,
                record.error_type or "Exception",
                record.error_message or "",
                record.traceback or "",
            )
        value: Any = decode_result(record.value, self._returns)
        return cast(R, value)
