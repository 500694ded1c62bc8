"""Running one task and turning whatever happens into an `Outcome`.

This is the code every pool shares, wherever it runs the task (a thread, the main thread, a child
process). It never raises: a task that fails, asks to retry, or returns something that cannot be
encoded produces an outcome the consumer settles. Middleware's `before_run` and `after_run` hooks
run here, around the task, with its request set; with no middleware they cost a check each.
"""

from __future__ import annotations

import asyncio
import enum
import threading
import time
import traceback
from collections.abc import Awaitable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import msgspec

from conveyor._fork import forget_in_child
from conveyor.brokers import Delivery
from conveyor.errors import EncodeError, Retry, SoftTimeLimitExceeded, TimeLimitExceeded
from conveyor.message import Envelope
from conveyor.middleware.base import RunOutcome
from conveyor.middleware.hooks import call
from conveyor.task import Request, Task, current_request, resolve
from conveyor.values import Types, convert_arguments, encode_result
from conveyor.worker.limits import Watchdog

_local = threading.local()
_watchdog = Watchdog()
_LIMITS = (SoftTimeLimitExceeded.__name__, TimeLimitExceeded.__name__)


def _after_fork() -> None:
    # A forked child (a prefork pool's) must not reuse an event loop of its parent's thread.
    _local.__dict__.clear()


forget_in_child(_after_fork)


class Kind(enum.Enum):
    """How a run ended."""

    SUCCESS = "success"
    FAILURE = "failure"
    RETRY = "retry"
    LOST = "lost"  # the process running it died: the message goes back, counted
    REVOKED = "revoked"  # skipped or stopped by a revocation: acknowledged, not counted


@dataclass(slots=True, eq=False)
class Job:
    """A decoded delivery on its way through a pool."""

    delivery: Delivery
    envelope: Envelope
    task: Task[Any, Any]
    started_at: float = 0.0
    #: The arguments converted to the task's annotations, once converted (see `arguments`).
    converted: tuple[Sequence[Any], Mapping[str, Any]] | None = None

    def arguments(self) -> tuple[Sequence[Any], Mapping[str, Any]]:
        """The arguments to call the task with: as received, converted by its annotations."""
        if self.converted is None:
            env = self.envelope
            self.converted = convert_arguments(self.task.types, env.args, env.kwargs)
        return self.converted


@dataclass(slots=True)
class Outcome:
    """What a run produced."""

    kind: Kind
    value: msgspec.Raw | None = None
    error_type: str | None = None
    error_message: str | None = None
    traceback: str | None = None
    countdown: float | None = None
    max_retries: int | None = None
    finished_at: float = 0.0
    took: float = 0.0
    """Seconds the task ran, measured where it ran."""

    @classmethod
    def failure(cls, exc: BaseException, *, with_traceback: bool = True) -> Outcome:
        """An outcome for an exception, kept as three strings."""
        text = "".join(traceback.format_exception(exc)) if with_traceback else ""
        return cls(Kind.FAILURE, None, type(exc).__name__, str(exc), text, finished_at=time.time())

    @classmethod
    def revoked(cls, how: str) -> Outcome:
        """The outcome of a job a revocation skipped or stopped; `how` says which."""
        return cls(Kind.REVOKED, None, "TaskRevoked", how, "", finished_at=time.time())


def request_for(job: Job) -> Request:
    """The `self.request` a task sees."""
    env, delivery, options = job.envelope, job.delivery, job.task.options
    return Request(
        id=env.id,
        task=env.task,
        args=env.args,
        kwargs=env.kwargs,
        queue=env.queue,
        retries=env.retries,
        max_retries=env.max_retries,
        redelivered=delivery.redelivered,
        delivery_count=delivery.delivery_count,
        eta=env.eta,
        expires=env.expires,
        root_id=env.root_id or env.id,
        parent_id=env.parent_id,
        idempotency_key=env.idempotency_key,
        headers=env.headers,
        time_limit=options.time_limit,
        soft_time_limit=options.soft_time_limit,
        priority=env.priority,
    )


class _Run:
    """Collects the outcome of one run; `capture` turns exceptions into outcomes."""

    outcome: Outcome
    value: Any = None
    error: BaseException | None = None

    def __init__(self, types: Types) -> None:
        self.types = types

    def succeed(self, value: Any) -> None:
        try:
            raw = msgspec.Raw(encode_result(value, self.types))
        except EncodeError as error:
            self.outcome = Outcome.failure(error, with_traceback=False)
            self.error = error
            return
        self.value = value
        self.outcome = Outcome(Kind.SUCCESS, raw, finished_at=time.time())


@contextmanager
def _capture(job: Job) -> Iterator[_Run]:
    run = _Run(job.task.types)
    request = request_for(job)
    token = current_request.set(request)
    hooks = job.task.app.hooks
    if hooks.before_run:
        call(hooks.before_run, "before_run", job.task, request)
    began = time.perf_counter()
    try:
        yield run
    except Retry as retry:
        run.error = retry.exc or retry
        run.outcome = _retry_outcome(run.error, retry.countdown, retry.max_retries)
    except job.task.autoretry_for as exc:
        run.error = exc
        run.outcome = _retry_outcome(exc, None, None)
    except BaseException as exc:
        # Whatever a task raises (sys.exit(), CancelledError, KeyboardInterrupt) fails the task;
        # it never ends a pool thread or strands the message.
        run.error = exc
        run.outcome = Outcome.failure(exc)
    finally:
        run.outcome.took = time.perf_counter() - began
        if hooks.after_run:
            call(hooks.after_run, "after_run", job.task, request, _ran(job, run))
        current_request.reset(token)


def _ran(job: Job, run: _Run) -> RunOutcome:
    """How the run ended, for `after_run`: a retry past the task's limit is a failure."""
    outcome = run.outcome
    kind = outcome.kind
    if kind is Kind.SUCCESS:
        return RunOutcome("success", run.value, None, outcome.took)
    if kind is Kind.RETRY and job.envelope.retries < max_retries(job, outcome):
        return RunOutcome("retry", None, run.error, outcome.took)
    return RunOutcome("failure", None, run.error, outcome.took)


def max_retries(job: Job, outcome: Outcome) -> int:
    """How many retries `job` may have: the retry() call's limit, then the message's, then the
    task's (which falls back to the app's)."""
    return resolve(outcome.max_retries, job.envelope.max_retries, default=job.task.max_retries)


def _retry_outcome(exc: BaseException, countdown: float | None, max_retries: int | None) -> Outcome:
    outcome = Outcome.failure(exc)
    outcome.kind, outcome.countdown, outcome.max_retries = Kind.RETRY, countdown, max_retries
    return outcome


def execute(job: Job, *, hard_limit: bool = True, soft_limit: bool = True) -> Outcome:
    """Run a job in this thread, within its time limits; async tasks run on a thread-own loop.

    `hard_limit=False` and `soft_limit=False` leave a synchronous task's limits to someone
    else: a prefork child raises the soft one with a signal, and the worker kills the child at
    the hard one.
    """
    task = job.task
    if task.is_async:
        with _capture(job) as run:
            coroutine = _limited(job, task.run(*job.arguments()))
            run.succeed(_thread_loop().run_until_complete(coroutine))
        return run.outcome
    soft, hard = task.options.soft_time_limit, task.options.time_limit
    if not hard_limit:
        hard = None
    if not soft_limit:
        soft = None
    if soft is None and hard is None:
        with _capture(job) as run:
            run.succeed(task.run(*job.arguments()))
        return run.outcome
    outcome: Outcome | None = None
    try:
        _watchdog.watch(soft, hard)
        with _capture(job) as run:
            run.succeed(task.run(*job.arguments()))
        outcome = run.outcome
        _watchdog.unwatch()
    except (SoftTimeLimitExceeded, TimeLimitExceeded) as exc:
        # The limit passed just as the task returned: the exception landed out here.
        _watchdog.unwatch()
        if outcome is None:
            outcome = Outcome.failure(exc)
    if outcome.error_type in _LIMITS and not outcome.error_message:
        # Raised asynchronously as a bare class, so it carries no message of its own.
        limit = soft if outcome.error_type == SoftTimeLimitExceeded.__name__ else hard
        outcome.error_message = f"task {task.name} ran past its {limit}s limit"
    return outcome


async def execute_async(job: Job) -> Outcome:
    """Run a job on the running event loop (async tasks are awaited, sync ones called)."""
    if not job.task.is_async:
        return execute(job)
    with _capture(job) as run:
        run.succeed(await _limited(job, job.task.run(*job.arguments())))
    return run.outcome


async def _limited(job: Job, coroutine: Awaitable[Any]) -> Any:
    """Await an async task within its limit: the soft one if set (the coroutine is cancelled
    there and the task fails with SoftTimeLimitExceeded), else the hard one."""
    soft, hard = job.task.options.soft_time_limit, job.task.options.time_limit
    limit, error = (soft, SoftTimeLimitExceeded) if soft is not None else (hard, TimeLimitExceeded)
    if limit is None:
        return await coroutine
    timeout = asyncio.timeout(limit)
    try:
        async with timeout:
            return await coroutine
    except TimeoutError:
        if timeout.expired():
            raise error(f"task {job.task.name} ran past its {limit}s limit") from None
        raise


def _thread_loop() -> asyncio.AbstractEventLoop:
    loop: asyncio.AbstractEventLoop | None = getattr(_local, "loop", None)
    if loop is None or loop.is_closed():
        loop = _local.loop = asyncio.new_event_loop()
    return loop


def close_thread_loop() -> None:
    """Close the calling thread's event loop for async tasks, if it made one."""
    loop: asyncio.AbstractEventLoop | None = getattr(_local, "loop", None)
    if loop is not None and not loop.is_closed():
        loop.close()
