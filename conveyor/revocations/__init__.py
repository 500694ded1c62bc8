"""Revocations: task ids every worker skips, kept in the fleet store until they expire.

`revoke(app, ids)` (behind `conveyor revoke` and `Result.revoke()`) writes one `Revocation` per
id to the app's fleet store (`conveyor.fleet`): SQLite on one machine, PostgreSQL or Redis for
workers on many. A revocation lasts until its task can no longer arrive: the message's `expires`
when the sender knows it, else `result_expires` (one day by default) from now, or from the
task's ETA. Workers load the live ones when they start and then poll the store with a cursor
(`conveyor.revocations.watch`), so one that starts after the revoke skips the task too.

A revoked task that reached a worker is settled without running: its message is acknowledged
(neither given back nor dead-lettered), its result state becomes REVOKED, and `after_settle`
sees the outcome "revoked". With `terminate=True`, a prefork worker also kills the child that
runs it; the threads and solo pools cannot stop a running task and say so in their log.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import msgspec

from conveyor.errors import ConfigurationError, ConveyorError
from conveyor.results.base import READY_STATES, State

if TYPE_CHECKING:
    from conveyor.app import Conveyor

#: The longest task id conveyor sends (`apply_async(task_id=...)` allows up to this).
MAX_ID = 128

#: Where a store's reading left off: a row number (SQL) or a stream entry id (Redis).
Cursor = int | str


class Revocation(msgspec.Struct, frozen=True):
    """One revoked task id, and until when workers skip it."""

    id: str
    expires_at: float
    """Epoch seconds after which the revocation is forgotten (the task cannot arrive any more)."""
    terminate: bool = False
    """Also stop the task if it is running (prefork: its child is killed)."""


class RevocationStore(Protocol):
    """Where revocations are kept, with a cursor to read the new ones cheaply."""

    display_url: str
    local: bool
    """Reads take microseconds in this process (SQLite, memory): a worker polls on its loop,
    as it calls an embedded broker, rather than on a thread of its own."""

    def add(self, revocations: Sequence[Revocation]) -> None:
        """Record revocations, atomically, and forget the expired ones."""

    def load(self, now: float) -> tuple[list[Revocation], Cursor]:
        """The live revocations, and the cursor after the last one written so far."""

    def since(self, cursor: Cursor) -> tuple[list[Revocation], Cursor]:
        """Revocations written after `cursor` (some may have expired), and the cursor after
        them. A bounded batch: call again while it comes back non-empty."""

    def close(self) -> None:
        """Let the store's connections go."""


def from_url(url: str) -> RevocationStore:
    """The revocation store at `url`: `sqlite:///file.db`, `postgresql://...`, `redis://...`,
    or `memory://` (this process only, for tests)."""
    from conveyor.revocations import stores

    return stores.from_url(url)


def no_store() -> ConfigurationError:
    """The error for an app with no store to keep revocations in."""
    from conveyor.fleet import HOW_TO_SET

    return ConfigurationError("revoking tasks needs a store that every worker reads: " + HOW_TO_SET)


Known = Literal["queued", "running", "finished", "unknown"]


@dataclass(frozen=True)
class Revoked:
    """What `revoke` did about one task id, as far as the result store knows the task."""

    id: str
    known: Known
    """queued (waiting to retry), running (STARTED), finished, or unknown: no record (not started
    yet, its record expired, no such task, or no result store)."""
    state: State | None
    """Its state in the result store, if it has a record there."""
    recorded: bool
    """A revocation was written (always, unless the task had finished)."""
    terminate: bool = False

    def describe(self) -> str:
        """One line for the command line."""
        if self.known == "finished":
            return f"finished ({self.state}): nothing to revoke, nothing recorded"
        if self.known == "running":
            if self.terminate:
                return "running: revoked; a prefork worker kills it (see docs/revoke.md)"
            return "running: revoked; it runs to the end (--terminate stops it on prefork)"
        if self.known == "queued":
            return f"queued ({self.state}): revoked, workers skip it"
        return (
            "unknown to the result store (not started yet, or no such task): revoked anyway, "
            "workers skip it if it comes"
        )


def revoke(
    app: Conveyor,
    ids: Iterable[str],
    *,
    terminate: bool = False,
    until: float | None = None,
) -> list[Revoked]:
    """Revoke task ids: every worker of `app`, including those that start later, skips them.

    `until` (epoch seconds) is when the revocation may be forgotten; default `result_expires`
    from now. An id that already finished is only reported; every other id is recorded, in one
    write. A malformed id raises `ConfigurationError` before anything is written.
    """
    wanted = list(dict.fromkeys(ids))
    for task_id in wanted:
        if not isinstance(task_id, str) or not 0 < len(task_id) <= MAX_ID:
            raise ConfigurationError(
                f"cannot revoke {task_id!r}: a task id is a string of 1 to {MAX_ID} characters; "
                "nothing was revoked"
            )
    store = app.revocations
    if store is None:
        raise no_store()
    now = time.time()
    expires_at = until if until is not None else now + app.settings.result_expires
    reports = [_known(app, task_id, terminate) for task_id in wanted]
    store.add([Revocation(r.id, expires_at, terminate) for r in reports if r.known != "finished"])
    return reports


def _known(app: Conveyor, task_id: str, terminate: bool) -> Revoked:
    results = app.results
    try:
        record = None if results is None else results.get(task_id)
    except ConveyorError:  # a record that cannot be read tells nothing about the task
        record = None
    if record is None:
        return Revoked(task_id, "unknown", None, True, terminate)
    state = record.state
    if state in READY_STATES:
        return Revoked(task_id, "finished", state, False, terminate)
    known: Known = "running" if state is State.STARTED else "queued"
    return Revoked(task_id, known, state, True, terminate)
