"""`GroupResult`: the handle on a group's results, in the order of its members."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

from conveyor.errors import MemberFailed, ResultTimeout, TaskFailed, TaskRevoked
from conveyor.results import State
from conveyor.results.handle import Result


class GroupResult:
    """The results of a group's members (a member that is itself a group has a GroupResult)."""

    def __init__(self, group_id: str, results: Sequence[Result[Any] | GroupResult]) -> None:
        self.id = group_id
        self.results = list(results)

    def __repr__(self) -> str:
        return f"<GroupResult {self.id} of {len(self.results)}>"

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> Iterator[Result[Any] | GroupResult]:
        return iter(self.results)

    def __getitem__(self, index: int) -> Result[Any] | GroupResult:
        return self.results[index]

    def ready(self) -> bool:
        """True once every member has succeeded or failed for good."""
        return all(r.ready() for r in self.results)

    def completed_count(self) -> int:
        """How many members have succeeded."""
        return sum(1 for r in self.results if _succeeded(r))

    def failed(self) -> bool:
        """True if some member has failed for good."""
        return any(_failed(r) for r in self.results)

    def successful(self) -> bool:
        """True once every member has succeeded."""
        return all(_succeeded(r) for r in self.results)

    def get(self, timeout: float | None = None) -> list[Any]:
        """Wait for every member; their results in order. A member that failed raises
        `MemberFailed` naming its index (the first in order that failed)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        values = []
        for index, result in enumerate(self.results):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                values.append(result.get(timeout=left))
            except TaskFailed as exc:
                raise MemberFailed(
                    index, exc.task_id, exc.type_name, exc.message, exc.traceback
                ) from None
            except TaskRevoked as exc:
                raise MemberFailed(index, result.id, TaskRevoked.__name__, str(exc), "") from None
            except ResultTimeout:
                raise ResultTimeout(
                    f"group {self.id}: member {index} of {len(self.results)} did not finish "
                    f"within {timeout}s ({self.completed_count()} completed)"
                ) from None
        return values

    def forget(self) -> None:
        """Delete the members' stored results."""
        for result in self.results:
            result.forget()

    def revoke(self, terminate: bool = False) -> None:
        """Revoke every member (see `Result.revoke`); those that finished are left alone."""
        for result in self.results:
            result.revoke(terminate)


def _succeeded(result: Result[Any] | GroupResult) -> bool:
    if isinstance(result, GroupResult):
        return result.successful()
    return result.state is State.SUCCESS


def _failed(result: Result[Any] | GroupResult) -> bool:
    if isinstance(result, GroupResult):
        return result.failed()
    return result.state in (State.FAILURE, State.REVOKED)
