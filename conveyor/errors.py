"""Every exception conveyor raises, in one tree.

```
ConveyorError
├── ConfigurationError          a setting, URL, task option or app path is wrong
├── MessageError
│   ├── EncodeError             arguments or a result cannot be encoded
│   └── DecodeError             bytes are not a valid envelope (carries .reason, .category)
├── BrokerError
│   └── PublishError            the broker did not accept a message
├── UnknownTaskError            no task is registered under that name
├── ArgumentError               arguments do not fit the task's signature (also a TypeError)
├── TaskError
│   ├── TaskFailed              Result.get() of a task that failed
│   │   └── MemberFailed        GroupResult.get(): which member failed, by index
│   ├── TaskRevoked             Result.get() of a task that was revoked
│   ├── TaskExpired             the task's `expires` passed before it ran
│   ├── TaskSkipped             a middleware's before_admit said not to run it (raised there)
│   ├── MaxRetriesExceeded      a retry was asked for after the last try
│   ├── TimeLimitExceeded       the hard time limit passed
│   └── SoftTimeLimitExceeded   the soft time limit passed (raised inside the task)
├── ResultError
│   └── ResultTimeout           Result.get(timeout=...) ran out (also a TimeoutError)
├── ResourceError               no pooled resource instance came free within the lease timeout
└── Retry                       raised by a task, through `raise self.retry(...)`
```

Messages say what went wrong and what to do about it. They never contain credentials.
"""

from __future__ import annotations

from conveyor.reasons import DeadLetterReason


class ConveyorError(Exception):
    """The root of every conveyor exception."""


class ConfigurationError(ConveyorError):
    """A setting, broker URL, task option or application path is wrong."""


class MessageError(ConveyorError):
    """A message could not be encoded or decoded."""


class EncodeError(MessageError):
    """Task arguments or a task's return value cannot be encoded as JSON."""


class DecodeError(MessageError):
    """Bytes taken from a broker are not a valid envelope.

    `reason` is a short, log-friendly explanation that also goes into the dead-letter record:
    `category`, a fixed `DeadLetterReason`, then the detail.
    """

    def __init__(self, category: DeadLetterReason, detail: str) -> None:
        self.category = category
        self.detail = detail
        self.reason = category(detail)
        super().__init__(self.reason)

    def __reduce__(self) -> tuple[type[DecodeError], tuple[DeadLetterReason, str]]:
        return (type(self), (self.category, self.detail))


class BrokerError(ConveyorError):
    """The broker failed or refused an operation."""


class PublishError(BrokerError):
    """The broker did not confirm a message: the send may or may not have happened.

    A message whose confirmation was lost with the connection can still be stored; retrying the
    send can then deliver the task twice, which at-least-once delivery allows for.
    """


class UnknownTaskError(ConveyorError):
    """No task is registered under the given name."""


class ArgumentError(ConveyorError, TypeError):
    """Arguments do not fit the task's signature; raised at send time, before anything is sent."""


class TaskError(ConveyorError):
    """Something about running a task went wrong."""


class TaskFailed(TaskError):
    """The task raised. Carries the stored exception type name, message and traceback text.

    The original exception class is never rebuilt from stored data: only its name is kept.
    """

    def __init__(self, task_id: str, type_name: str, message: str, traceback: str) -> None:
        super().__init__(f"task {task_id} failed: {type_name}: {message}")
        self.task_id = task_id
        self.type_name = type_name
        self.message = message
        self.traceback = traceback


class TaskRevoked(TaskError):
    """`Result.get()` of a task that was revoked: a worker skipped it, or stopped it running
    (`revoke --terminate`)."""

    def __init__(self, task_id: str, message: str) -> None:
        super().__init__(f"task {task_id} was revoked: {message}")
        self.task_id = task_id
        self.message = message

    def __reduce__(self) -> tuple[type[TaskRevoked], tuple[str, str]]:
        return (type(self), (self.task_id, self.message))


class TaskExpired(TaskError):
    """The task reached a worker after its `expires` time and was not run."""


class TaskSkipped(TaskError):
    """Raised by a middleware's `before_admit` so that a delivery does not run.

    The worker acknowledges the message and records the task as failed with this error and its
    message as the reason; every other exception from a hook is logged and ignored instead.
    """


class MaxRetriesExceeded(TaskError):
    """A task asked to retry after using up its `max_retries`."""


class TimeLimitExceeded(TaskError):
    """A task ran past its hard `time_limit`."""


class SoftTimeLimitExceeded(TaskError):
    """A task ran past its `soft_time_limit`; raised inside the task so it can clean up."""


class ResultError(ConveyorError):
    """A result could not be read."""


class ResultTimeout(ResultError, TimeoutError):
    """`Result.get(timeout=...)` ran out before the task finished."""


class ResourceError(ConveyorError):
    """A resource could not be provided, such as a pooled one whose instances all stayed leased."""


class Retry(ConveyorError):
    """Raised from a task (via `raise self.retry(...)`) to run it again later.

    The worker re-publishes the message with a delay held by the broker and acknowledges the
    current delivery; the task's result state becomes RETRY.
    """

    def __init__(
        self,
        countdown: float | None = None,
        exc: BaseException | None = None,
        max_retries: int | None = None,
    ) -> None:
        super().__init__(f"retry in {countdown}s" if countdown is not None else "retry")
        self.countdown = countdown
        self.exc = exc
        self.max_retries = max_retries


class MemberFailed(TaskFailed):
    """A member of a group failed: `GroupResult.get()` says which one by `index`."""

    def __init__(
        self, index: int, task_id: str, type_name: str, message: str, traceback: str
    ) -> None:
        super().__init__(task_id, type_name, message, traceback)
        self.index = index
        self.args = (f"group member {index} (task {task_id}) failed: {type_name}: {message}",)

    def __reduce__(self) -> tuple[type[MemberFailed], tuple[int, str, str, str, str]]:
        return (
            type(self),
            (self.index, self.task_id, self.type_name, self.message, self.traceback),
        )
