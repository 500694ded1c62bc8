"""The `Middleware` base class: the typed hooks, where each one runs, and what it is given.

A hook is a method a middleware overrides; the ones it leaves alone cost nothing, as the app
keeps per hook only the middleware that override it (`conveyor.middleware.hooks`). Where they run:

    hook            process                         when
    before_send     the sender's                    an envelope is about to be encoded and sent
    process_start   each process that runs tasks    before its first task (a prefork child)
    worker_start    the worker's                    the pool is up, before the first fetch
    before_admit    the worker's                    a delivery passed admission, before the pool
    before_run      the one that runs the task      the task is about to run (a prefork child)
    after_run       the one that runs the task      the task returned or raised
    after_settle    the worker's (it acks)          the message's fate is decided
    worker_stop     the worker's                    the pool has stopped

Every hook but `before_send` is isolated: what it raises is logged with the middleware's name and
the hook, and the worker goes on as if the middleware were not there. `before_send` runs before
anything is sent, so its exception reaches the caller of `delay()` and nothing is lost. The one
exception a hook raises on purpose is `TaskSkipped`, from `before_admit`: the delivery does not
run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import msgspec

if TYPE_CHECKING:
    from conveyor.message import Envelope
    from conveyor.task import Request, Task
    from conveyor.worker.worker import Worker

#: The hooks a middleware may implement, in the order a task meets them.
HOOK_NAMES = (
    "before_send",
    "process_start",
    "worker_start",
    "before_admit",
    "before_run",
    "after_run",
    "after_settle",
    "worker_stop",
)


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """How a run ended, as `after_run` sees it in the process that ran the task."""

    state: Literal["success", "failure", "retry"]
    """"retry" only when the task will run again; a retry past its limit is a "failure"."""
    result: Any = None
    """What the task returned, on success."""
    exception: BaseException | None = None
    """What it raised (for a retry, the cause given to `self.retry(exc=...)`, if any)."""
    took: float = 0.0
    """Seconds the task ran."""


Outcome = Literal[
    "succeeded", "failed", "retried", "lost", "rejected", "expired", "skipped", "revoked"
]


@dataclass(frozen=True, slots=True)
class Settled:
    """What became of a delivery, as `after_settle` sees it in the worker's process.

    `succeeded`, `failed` and `retried` runs are acknowledged (a failure out of retries is
    dead-lettered); `lost` ones (the prefork child died) go back to the broker; `rejected`
    messages (undecodable, unknown task, bad arguments, poison) are dead-lettered without running;
    `expired` and `skipped` ones (`TaskSkipped` from `before_admit`) are acknowledged without
    running; `revoked` ones (`conveyor revoke`) are acknowledged without running, or after their
    run was stopped (`--terminate`; then `took` is set).
    """

    outcome: Outcome
    queue: str
    envelope: Envelope | None
    """The decoded message; None when it could not be decoded."""
    task: Task[Any, Any] | None
    """The registered task; None when the message names no task registered here."""
    error_type: str | None = None
    error_message: str | None = None
    dead_letter: str | None = None
    """The reason the message was dead-lettered, if it was."""
    took: float | None = None
    """Seconds the task ran, measured where it ran; None when it did not run."""


class Middleware:
    """Subclass and override the hooks you need; see the module's docstring for where each runs.

    `options` names a frozen `msgspec.Struct` of the task options this middleware adds: once the
    middleware is added, `@app.task(**its fields)` is accepted and validated like the built-in
    options, and `task.options_for(TheStruct)` gives a task's values (its defaults when unset).
    """

    options: ClassVar[type[msgspec.Struct] | None] = None

    @property
    def name(self) -> str:
        """How logs name this middleware."""
        return type(self).__qualname__

    def before_send(self, envelope: Envelope, headers: dict[str, str]) -> None:
        """Add to `headers`: they replace the envelope's free-form headers on the way out.

        Runs in the sender's thread (its context variables, an active trace span, are there).
        Not isolated: an exception propagates to the caller of `delay()` and nothing is sent.
        """

    def process_start(self) -> None:
        """Set up per-process state in a process about to run tasks (after the fork)."""

    def worker_start(self, worker: Worker) -> None:
        """The worker's pool is up and it is about to fetch its first message."""

    def before_admit(self, task: Task[Any, Any], request: Request) -> None:
        """A delivery passed admission and is about to go to the pool (the worker's process).

        Raise `conveyor.errors.TaskSkipped(reason)` to not run it: its message is acknowledged
        and the task recorded as failed with that reason. Any other exception is isolated.
        """

    def before_run(self, task: Task[Any, Any], request: Request) -> None:
        """The task is about to run, in the process, thread and context that run it."""

    def after_run(self, task: Task[Any, Any], request: Request, outcome: RunOutcome) -> None:
        """The task returned or raised, in the process, thread and context that ran it."""

    def after_settle(self, settled: Settled) -> None:
        """What becomes of a delivery is decided (the worker's process, under its lock: keep
        it short). The broker's ack or dead-lettering follows in the worker's next I/O round."""

    def worker_stop(self, worker: Worker) -> None:
        """The worker's pool has stopped; nothing runs any more."""
