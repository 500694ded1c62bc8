"""`Task[P, R]`: a registered function that can be sent to workers or called inline."""

from __future__ import annotations

import contextvars
import datetime as dt
import functools
import inspect
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Generic, ParamSpec, TypeVar

import msgspec

from conveyor.errors import ArgumentError, ConfigurationError, EncodeError, Retry
from conveyor.message import MAX_PRIORITY, Envelope, new_id
from conveyor.results.handle import Result
from conveyor.settings import unknown_name_message
from conveyor.values import Types, check_arguments

if TYPE_CHECKING:
    from conveyor.app import Conveyor
    from conveyor.workflows.canvas import Group, Signature

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
S = TypeVar("S", bound=msgspec.Struct)

# Longest delay a send may ask for; keeps envelope timestamps within their valid range.
MAX_DELAY_S = 100 * 365 * 86_400.0

PositiveSeconds = Annotated[float, msgspec.Meta(gt=0)]


class TaskOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Options accepted by `@app.task(...)`; unset ones fall back to the app's settings."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=255)] | None = None
    queue: Annotated[str, msgspec.Meta(min_length=1, max_length=255)] | None = None
    priority: Annotated[int, msgspec.Meta(ge=0, le=MAX_PRIORITY)] = 0
    max_retries: Annotated[int, msgspec.Meta(ge=0)] | None = None
    retry_backoff: bool | Annotated[float, msgspec.Meta(gt=0)] = False
    """True: exponential backoff from 1 s; a number: from that many seconds."""
    retry_backoff_max: PositiveSeconds | None = None
    retry_jitter: bool = True
    acks_late: bool = True
    time_limit: PositiveSeconds | None = None
    soft_time_limit: PositiveSeconds | None = None
    ignore_result: bool = False
    result_expires: PositiveSeconds | None = None
    """Seconds its results are kept; default: the app's `result_expires` (one day)."""
    bind: bool = False


TASK_OPTION_NAMES = (*TaskOptions.__struct_fields__, "autoretry_for")


#: A task's values of middleware's options, by options struct.
ExtraOptions = dict[type[msgspec.Struct], msgspec.Struct]


def parse_options(
    options: dict[str, Any], extra: Sequence[type[msgspec.Struct]] = ()
) -> tuple[TaskOptions, tuple[type[BaseException], ...], ExtraOptions]:
    """Validate `@app.task` keyword arguments; unknown or ill-typed ones fail right here.

    `extra` are the options structs middleware declared: their fields are task options too,
    validated the same way, and returned by struct (only those given a value).
    """
    options = dict(options)
    autoretry_for = options.pop("autoretry_for", ())
    given: dict[type[msgspec.Struct], dict[str, Any]] = {}
    owners = {field: struct for struct in extra for field in struct.__struct_fields__}
    for key in list(options):
        if key in TaskOptions.__struct_fields__:
            continue
        if key not in owners:
            known = (*TASK_OPTION_NAMES, *owners)
            raise ConfigurationError(unknown_name_message(key, known, "task option"))
        given.setdefault(owners[key], {})[key] = options.pop(key)
    try:
        parsed = msgspec.convert(options, TaskOptions)
        converted = {struct: msgspec.convert(values, struct) for struct, values in given.items()}
    except msgspec.ValidationError as exc:
        raise ConfigurationError(f"invalid task option: {exc}") from None
    if isinstance(autoretry_for, type):
        autoretry_for = (autoretry_for,)
    if not isinstance(autoretry_for, tuple) or not all(
        isinstance(e, type) and issubclass(e, BaseException) for e in autoretry_for
    ):
        raise ConfigurationError("autoretry_for takes an exception class or a tuple of them")
    soft, hard = parsed.soft_time_limit, parsed.time_limit
    if soft is not None and hard is not None and soft >= hard:
        raise ConfigurationError(
            f"soft_time_limit ({soft}s) must be lower than time_limit ({hard}s)"
        )
    return parsed, autoretry_for, converted


def resolve(*candidates: T | None, default: T) -> T:
    """Option precedence in one place: the first value that is set wins (message, task, app)."""
    for value in candidates:
        if value is not None:
            return value
    return default


@dataclass(frozen=True, slots=True)
class Request:
    """What a running task knows about its own invocation (`self.request` with bind=True)."""

    id: str
    task: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    queue: str = ""
    retries: int = 0
    max_retries: int | None = None
    redelivered: bool = False
    delivery_count: int = 1
    eta: float | None = None
    expires: float | None = None
    root_id: str | None = None
    """The id of the first task of the chain of sends: this task's own id for a top-level one."""
    parent_id: str | None = None
    idempotency_key: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    inline: bool = False
    """True when the task was called as a plain function, not by a worker."""
    time_limit: float | None = None
    """The task's hard time limit in seconds, if it has one."""
    soft_time_limit: float | None = None
    """The task's soft time limit in seconds, if it has one."""
    priority: int = 0

    @property
    def delivery_info(self) -> dict[str, Any]:
        """Where the message came from, as Celery's `delivery_info` has it: `queue` (also as
        `routing_key`), `priority` and `redelivered`."""
        return {
            "queue": self.queue,
            "routing_key": self.queue,
            "priority": self.priority,
            "redelivered": self.redelivered,
        }


current_request: contextvars.ContextVar[Request | None] = contextvars.ContextVar(
    "conveyor_request", default=None
)


class Task(Generic[P, R]):
    """A function registered with an app. Call it to run inline; `delay` to send it."""

    def __init__(
        self,
        app: Conveyor,
        fn: Callable[..., Any],
        name: str,
        options: TaskOptions,
        autoretry_for: tuple[type[BaseException], ...],
        extra_options: ExtraOptions | None = None,
    ) -> None:
        self.app = app
        self.fn = fn
        self.name = name
        self.options = options
        self.autoretry_for = autoretry_for
        self._extra_options = dict(extra_options or {})
        self.is_async = inspect.iscoroutinefunction(fn)
        signature = inspect.signature(fn)
        if options.bind:
            params = list(signature.parameters.values())
            if not params:
                raise ConfigurationError(f"task {name} has bind=True but takes no `self` argument")
            signature = signature.replace(parameters=params[1:])
        self.signature = signature
        #: The annotations its arguments and return value are converted by (conveyor.values).
        self.types = Types(fn, signature)
        functools.update_wrapper(self, fn)

    def __repr__(self) -> str:
        return f"<Task {self.name}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function here and now, as a plain call."""
        if current_request.get() is None:
            task_id = new_id()
            request = Request(task_id, self.name, args, kwargs, root_id=task_id, inline=True)
            token = current_request.set(request)
            try:
                return self.run(args, kwargs)  # type: ignore[no-any-return]
            finally:
                current_request.reset(token)
        return self.run(args, kwargs)  # type: ignore[no-any-return]

    def run(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        """Call the function (with the task first when bound)."""
        if self.options.bind:
            return self.fn(self, *args, **kwargs)
        return self.fn(*args, **kwargs)

    def options_for(self, options: type[S]) -> S:
        """This task's values of a middleware's options struct (its defaults where unset)."""
        value = self._extra_options.get(options)
        if value is None:
            value = self._extra_options[options] = options()
        return value  # type: ignore[return-value]

    @property
    def request(self) -> Request:
        """The invocation being run in this context."""
        request = current_request.get()
        if request is None:
            raise RuntimeError(f"task {self.name} is not running: `request` exists only inside it")
        return request

    @property
    def queue(self) -> str:
        """The queue this task is sent to unless a send says otherwise."""
        return resolve(self.options.queue, default=self.app.settings.default_queue)

    @property
    def max_retries(self) -> int:
        """How many retries this task gets unless a send or a `retry()` says otherwise."""
        return resolve(self.options.max_retries, default=self.app.settings.default_max_retries)

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> Result[R]:
        """Send with default options; returns once the broker has stored the message."""
        return self.apply_async(args, kwargs)

    async def delay_async(self, *args: P.args, **kwargs: P.kwargs) -> Result[R]:
        """`delay` for asyncio producers."""
        envelope = self.envelope(args, kwargs)
        await self.app.send_async([envelope])
        return self._result(envelope)

    def apply_async(
        self,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        countdown: float | None = None,
        eta: dt.datetime | None = None,
        expires: dt.datetime | float | None = None,
        priority: int | None = None,
        queue: str | None = None,
        task_id: str | None = None,
        idempotency_key: str | None = None,
        max_retries: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> Result[R]:
        """Send with options; returns once the broker has stored the message.

        `countdown` (seconds) or `eta` (a datetime) delays the task; the broker holds it until
        then. `expires` (seconds from now, or a datetime) drops it if it has not started by then.
        """
        envelope = self.envelope(
            args,
            kwargs,
            countdown=countdown,
            eta=eta,
            expires=expires,
            priority=priority,
            queue=queue,
            task_id=task_id,
            idempotency_key=idempotency_key,
            max_retries=max_retries,
            headers=headers,
        )
        self.app.send([envelope])
        return self._result(envelope)

    def map(self, arguments: Iterable[Sequence[Any]]) -> list[Result[R]]:
        """Send one task per argument tuple, all in one batch."""
        envelopes = [self.envelope(args) for args in arguments]
        self.app.send(envelopes)
        return [self._result(e) for e in envelopes]

    def s(self, *args: Any, **kwargs: Any) -> Signature[R]:
        """A signature of this task: in a chain, the previous result is prepended to `args`."""
        from conveyor.workflows.canvas import Signature

        return Signature(self, args, kwargs)

    def si(self, *args: P.args, **kwargs: P.kwargs) -> Signature[R]:
        """An immutable signature: it runs with these arguments only, whatever came before."""
        from conveyor.workflows.canvas import Signature

        return Signature(self, args, kwargs, immutable=True)

    def starmap(self, arguments: Iterable[Sequence[Any]]) -> Signature[list[R]]:
        """One message that calls this task once per argument tuple, in order, in one worker;
        its result is the list of results. (`map` sends one message per tuple instead.)"""
        from conveyor.workflows.bulk import starmap

        return starmap(self, arguments)

    def chunks(self, arguments: Iterable[Sequence[Any]], size: int) -> Group:
        """A group of `starmap` messages of at most `size` calls each."""
        from conveyor.workflows.bulk import chunks

        return chunks(self, arguments, size)

    def retry(
        self,
        *,
        countdown: float | None = None,
        exc: BaseException | None = None,
        max_retries: int | None = None,
    ) -> Retry:
        """The exception to raise (`raise self.retry(...)`) to run this task again later.

        Without `countdown`, the task's backoff policy picks the delay. Past `max_retries` the
        task fails and its message is dead-lettered.
        """
        return Retry(countdown, exc, max_retries)

    def envelope(
        self,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        countdown: float | None = None,
        eta: dt.datetime | None = None,
        expires: dt.datetime | float | None = None,
        priority: int | None = None,
        queue: str | None = None,
        task_id: str | None = None,
        idempotency_key: str | None = None,
        max_retries: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> Envelope:
        """Build (and check) the envelope for one invocation."""
        kwargs = kwargs or {}
        try:
            check_arguments(self.types, args, kwargs)
        except ArgumentError as exc:
            raise ArgumentError(f"task {self.name}: {exc}") from None
        except EncodeError as exc:
            raise EncodeError(f"task {self.name}: {exc}") from None
        now = time.time()
        if countdown is not None and eta is not None:
            raise ConfigurationError("pass countdown or eta, not both")
        if countdown is not None and not (
            isinstance(countdown, int | float)
            and not isinstance(countdown, bool)
            and -MAX_DELAY_S <= countdown <= MAX_DELAY_S
        ):  # NaN fails the comparison too; zero or less means "now"
            raise ConfigurationError(
                f"task {self.name}: countdown must be a number of seconds up to "
                f"{MAX_DELAY_S:.0f}, not {countdown!r}"
            )
        due = now + countdown if countdown is not None else _timestamp(eta, now)
        _check_send_options(self.name, priority, queue, task_id, max_retries, idempotency_key)
        parent = current_request.get()
        return Envelope(
            id=task_id or new_id(),
            task=self.name,
            queue=resolve(queue, default=self.queue),
            args=tuple(args),
            kwargs=kwargs,
            priority=resolve(priority, default=self.options.priority),
            eta=due if due is not None and due > now else None,
            expires=_timestamp(expires, now),
            max_retries=max_retries,
            root_id=None if parent is None else (parent.root_id or parent.id),
            parent_id=None if parent is None else parent.id,
            idempotency_key=idempotency_key,
            sent_at=now,
            headers=_checked_headers(self.name, headers),
        )

    def retry_delay(self, retries: int, countdown: float | None) -> float:
        """Seconds before try number `retries + 1`: the countdown given, else the backoff."""
        if countdown is not None:
            return max(countdown, 0.0)
        backoff = self.options.retry_backoff
        if backoff is False:
            return 0.0
        base = 1.0 if backoff is True else float(backoff)
        ceiling = resolve(
            self.options.retry_backoff_max, default=self.app.settings.default_retry_backoff_max
        )
        # The exponent is capped so a task on its thousandth retry cannot overflow a float.
        delay = min(ceiling, base * 2.0 ** min(retries, 64))
        # Full jitter spreads retries of tasks that failed together.
        return random.uniform(0, delay) if self.options.retry_jitter else delay

    def _result(self, envelope: Envelope) -> Result[R]:
        store = None if self.options.ignore_result else self.app.results
        # A revocation of this message need last no longer than it can arrive: until its
        # expiry, else as long as a result is kept from its ETA on (the default is from now).
        until = envelope.expires
        if until is None and envelope.eta is not None:
            until = envelope.eta + self.app.settings.result_expires
        return Result(envelope.id, store, self.name, self.types.returns, app=self.app, until=until)


def _check_send_options(
    task: str,
    priority: int | None,
    queue: str | None,
    task_id: str | None,
    max_retries: int | None,
    idempotency_key: str | None,
) -> None:
    """Refuse at send time what a worker would otherwise dead-letter as an invalid envelope."""
    problems = []
    if priority is not None and (type(priority) is not int or not 0 <= priority <= MAX_PRIORITY):
        problems.append(f"priority must be an integer from 0 to {MAX_PRIORITY}, not {priority!r}")
    if queue is not None and (not isinstance(queue, str) or not 0 < len(queue) <= 255):
        problems.append(f"queue must be a name of 1 to 255 characters, not {queue!r}")
    if task_id is not None and (not isinstance(task_id, str) or not 0 < len(task_id) <= 128):
        problems.append(f"task_id must be a string of 1 to 128 characters, not {task_id!r}")
    if max_retries is not None and (type(max_retries) is not int or max_retries < 0):
        problems.append(f"max_retries must be a non-negative integer, not {max_retries!r}")
    if idempotency_key is not None and (
        not isinstance(idempotency_key, str) or len(idempotency_key) > 255
    ):
        problems.append("idempotency_key must be a string of at most 255 characters")
    if problems:
        raise ConfigurationError(f"task {task}: " + "; ".join(problems))


def _checked_headers(task: str, headers: dict[str, str] | None) -> dict[str, str]:
    if not headers:
        return {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise ConfigurationError(f"task {task}: headers must map strings to strings")
    return headers


def _timestamp(value: dt.datetime | float | None, now: float) -> float | None:
    """Epoch seconds from a datetime (naive means local time) or a number of seconds from now."""
    if value is None:
        return None
    stamp = value.timestamp() if isinstance(value, dt.datetime) else now + float(value)
    if not 0 <= stamp <= now + MAX_DELAY_S:  # also false for NaN
        raise ConfigurationError(
            f"time {value!r} is out of range: use a datetime or seconds, at most "
            f"{MAX_DELAY_S / 86_400 / 365:.0f} years ahead"
        )
    return stamp
