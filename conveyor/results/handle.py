"""`Result`: the handle a producer gets back for a task it sent."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from conveyor.errors import ConfigurationError, ResultTimeout, TaskFailed, TaskRevoked
from conveyor.results.base import READY_STATES, ResultRecord, ResultStore, State
from conveyor.values import decode_result

if TYPE_CHECKING:
    from conveyor.app import Conveyor
    from conveyor.revocations import Revoked

R = TypeVar("R")


class Result(Generic[R]):
    """A task's id and a way to read its state and outcome from the result store."""

    __slots__ = ("_app", "_returns", "_store", "_until", "id", "task")

    def __init__(
        self,
        task_id: str,
        store: ResultStore | None,
        task: str = "",
        returns: Any = None,
        *,
        app: Conveyor | None = None,
        until: float | None = None,
    ) -> None:
        self.id = task_id
        self.task = task
        self._store = store
        self._returns = returns  # the task's return annotation: `get()` converts to it
        self._app = app
        self._until = until  # when the message can no longer arrive, if the sender knows

    def __repr__(self) -> str:
        return f"<Result {self.task} {self.id}>"

    @property
    def state(self) -> State:
        """PENDING, STARTED, RETRY, SUCCESS, FAILURE or REVOKED (PENDING also when unknown or
        expired)."""
        record = self._record()
        return State.PENDING if record is None else record.state

    def ready(self) -> bool:
        """True once the task succeeded, failed for good or was revoked."""
        return self.state in READY_STATES

    def get(self, timeout: float | None = None) -> R:
        """Wait for the task and return its value; raise `TaskFailed` if it failed,
        `TaskRevoked` if it was revoked.

        Raises `ResultTimeout` if `timeout` seconds pass first.
        """
        record = self._require_store().wait(self.id, timeout)
        if record is None:
            raise ResultTimeout(
                f"task {self.task} {self.id} did not finish within {timeout}s "
                f"(state {self.state}); is a worker consuming its queue?"
            )
        return self._outcome(record)

    def revoke(self, terminate: bool = False) -> Revoked:
        """Revoke the task: every worker skips it, including those that start later; its state
        becomes REVOKED when a worker meets it. `terminate=True` also stops it if it is running
        (prefork pool: its child is killed). A task that finished is left alone. Returns what
        was known of the task (see `conveyor.revocations.Revoked`); raises
        `ConfigurationError` if the app has no store to keep revocations in."""
        from conveyor.revocations import revoke

        if self._app is None:
            raise ConfigurationError(
                f"this handle on task {self.id} was made without its app: use "
                "app.result(task_id).revoke()"
            )
        return revoke(self._app, [self.id], terminate=terminate, until=self._until)[0]

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
        if record.state == State.REVOKED:
            raise TaskRevoked(self.id, record.error_message or "revoked")
        if record.state == State.FAILURE:
            raise TaskFailed(
                self.id,
                record.error_type or "Exception",
                record.error_message or "",
                record.traceback or "",
            )
        value: Any = decode_result(record.value, self._returns)
        return cast(R, value)
