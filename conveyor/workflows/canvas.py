"""Signatures and the workflows built from them: chain, group, chord.

A signature is a task with some of its arguments and send options, not sent yet. Workflows
combine signatures; sending one (`apply_async`) first compiles it: every call gets its task id
then, before anything is sent, so the handle returned names the final result at once (a chain's
is its last task's, a chord's its callback's, a group's its members'). Then the first tasks are
sent, each carrying its continuation (`conveyor.workflows.wire`), and the rest is sent by the
workers that settle them (`conveyor.workflows.plan`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from conveyor.errors import ArgumentError, ConfigurationError, EncodeError
from conveyor.message import MAX_PRIORITY, new_id
from conveyor.results.handle import Result
from conveyor.settings import unknown_name_message
from conveyor.task import MAX_DELAY_S, Task, current_request, resolve
from conveyor.values import check_arguments
from conveyor.workflows import wire
from conveyor.workflows.bulk import collector
from conveyor.workflows.joins import joins_for
from conveyor.workflows.plan import NO_VALUE, Sends, start
from conveyor.workflows.results import GroupResult

if TYPE_CHECKING:
    from conveyor.app import Conveyor

R = TypeVar("R")

#: What `Signature.set` accepts.
SIGNATURE_OPTIONS = ("queue", "priority", "countdown", "expires", "task_id")

#: A handle on a workflow's outcome: a `Result`, or a `GroupResult` for a group.
AnyResult = Result[Any] | GroupResult


class Canvas:
    """What signatures and workflows share: `|`, `link_error`, sending."""

    _errbacks: list[Signature[Any]]

    def __or__(self, other: Canvas) -> Canvas:
        if not isinstance(other, Canvas):
            return NotImplemented
        return Chain(self, other)

    def link_error(self, errback: Signature[Any]) -> Canvas:
        """Send `errback` with the failed task's id (prepended to its arguments, unless it is
        immutable) if a task of this workflow fails for good. Returns this workflow."""
        if not isinstance(errback, Signature):
            raise ConfigurationError(
                f"link_error takes a signature (task.s(...)), not {type(errback).__name__}"
            )
        self._errbacks.append(errback)
        return self

    def apply_async(self, *, app: Conveyor | None = None) -> AnyResult:
        """Send the workflow; returns once the broker stored its first messages."""
        return send(self, app)

    def delay(self) -> AnyResult:
        """`apply_async()`."""
        return self.apply_async()

    async def delay_async(self) -> AnyResult:
        """`delay` for asyncio producers."""
        return await send_async(self)

    def _app(self) -> Conveyor | None:
        raise NotImplementedError


class Signature(Canvas, Generic[R]):
    """A task with arguments and options, to be sent later or as part of a workflow.

    Made with `task.s(...)` (partial: the previous task's result is prepended to the arguments)
    or `task.si(...)` (immutable: its arguments are all it gets).
    """

    def __init__(
        self,
        task: Task[Any, R],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        immutable: bool = False,
        options: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(task, Task):
            raise ConfigurationError(
                f"a signature is made from a task (task.s(...)), not {type(task).__name__}"
            )
        self.task = task
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.immutable = immutable
        self.options: dict[str, Any] = dict(options or {})
        self._errbacks = []

    def __repr__(self) -> str:
        shown = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.task.name}{'!' if self.immutable else ''}({', '.join(shown)})"

    def set(self, **options: Any) -> Signature[R]:
        """A copy with send options set: queue, priority, countdown, expires (seconds), task_id."""
        for key in options:
            if key not in SIGNATURE_OPTIONS:
                raise ConfigurationError(
                    unknown_name_message(key, SIGNATURE_OPTIONS, "signature option")
                )
        copy = self.clone()
        copy.options.update(options)
        return copy

    def clone(self, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None) -> Signature[R]:
        """A copy with `args` appended and `kwargs` merged."""
        copy = Signature(
            self.task,
            (*self.args, *args),
            {**self.kwargs, **(kwargs or {})},
            immutable=self.immutable,
            options=self.options,
        )
        copy._errbacks = list(self._errbacks)
        return copy

    def apply_async(
        self,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        app: Conveyor | None = None,
        **options: Any,
    ) -> Result[R]:
        """Send this signature (with `args` appended, `kwargs` merged, `options` set)."""
        sig = self.clone(args, kwargs).set(**options) if args or kwargs or options else self
        result = send(sig, app)
        assert isinstance(result, Result)
        return result

    def delay(self, *args: Any, **kwargs: Any) -> Result[R]:
        """`apply_async(args, kwargs)`."""
        return self.apply_async(args, kwargs)

    async def delay_async(self, *args: Any, **kwargs: Any) -> Result[R]:
        """`delay` for asyncio producers."""
        result = await send_async(self.clone(args, kwargs) if args or kwargs else self)
        assert isinstance(result, Result)
        return result

    def _app(self) -> Conveyor | None:
        return self.task.app


class Chain(Canvas):
    """Tasks run one after another, each given the previous one's result."""

    def __init__(self, *links: Canvas | Iterable[Canvas]) -> None:
        if len(links) == 1 and not isinstance(links[0], Canvas):
            links = tuple(links[0])
        self.links: list[Canvas] = []
        for link in links:
            if not isinstance(link, Canvas):
                raise ConfigurationError(
                    f"a chain links signatures and workflows, not {type(link).__name__}"
                )
            if isinstance(link, Chain) and not link._errbacks:
                self.links += link.links
            else:
                self.links.append(link)
        self._errbacks = []

    def __repr__(self) -> str:
        return " | ".join(repr(link) for link in self.links)

    def __or__(self, other: Canvas) -> Canvas:
        if not isinstance(other, Canvas):
            return NotImplemented
        joined = Chain(*self.links, other)
        joined._errbacks = list(self._errbacks)
        return joined

    def _app(self) -> Conveyor | None:
        return next((a for link in self.links if (a := link._app()) is not None), None)


class Group(Canvas):
    """Tasks run in parallel; their results come back in order."""

    def __init__(self, *members: Canvas | Iterable[Canvas]) -> None:
        if len(members) == 1 and not isinstance(members[0], Canvas):
            members = tuple(members[0])
        for member in members:
            if not isinstance(member, Canvas):
                raise ConfigurationError(
                    f"a group holds signatures and workflows, not {type(member).__name__}"
                )
        self.members: list[Canvas] = list(members)  # type: ignore[arg-type]
        self._errbacks = []

    def __repr__(self) -> str:
        return f"group({', '.join(repr(m) for m in self.members)})"

    def __or__(self, other: Canvas) -> Canvas:
        if not isinstance(other, Canvas):
            return NotImplemented
        return Chord(self, other)

    def _app(self) -> Conveyor | None:
        return next((a for m in self.members if (a := m._app()) is not None), None)


class Chord(Canvas):
    """A group whose results, in order, are passed to a callback once all have finished.

    A member that fails makes the chord fail: the callback does not run and its result is a
    `ChordFailed` naming the member's index. With `pass_errors=True` the callback runs anyway,
    a failed member's place holding a dict (`error_type`, `error_message`, `task_id`).
    """

    def __init__(
        self,
        header: Group | Iterable[Canvas],
        body: Canvas | None = None,
        *,
        pass_errors: bool = False,
    ) -> None:
        self.header = header if isinstance(header, Group) else Group(header)
        self.body = body
        self.pass_errors = pass_errors
        self._errbacks = []

    def __repr__(self) -> str:
        return f"chord({self.header!r}, {self.body!r})"

    def __call__(self, body: Canvas) -> AnyResult:
        """Celery's `chord(header)(callback)`: send with this callback."""
        return Chord(self.header, body, pass_errors=self.pass_errors).apply_async()

    def _app(self) -> Conveyor | None:
        return self.header._app() or (self.body._app() if self.body is not None else None)


def chain(*links: Canvas | Iterable[Canvas]) -> Chain:
    """`chain(a.s(), b.s(), c.s())` is `a.s() | b.s() | c.s()`."""
    return Chain(*links)


def group(*members: Canvas | Iterable[Canvas]) -> Group:
    """`group(a.s(1), a.s(2))` or `group(a.s(i) for i in range(10))`."""
    return Group(*members)


def chord(
    header: Group | Iterable[Canvas], body: Canvas | None = None, *, pass_errors: bool = False
) -> Chord:
    """`chord(group(...), callback.s())`, which is also `group(...) | callback.s()`."""
    return Chord(header, body, pass_errors=pass_errors)


# compiling


class _Compiler:
    def __init__(self, app: Conveyor) -> None:
        self.app = app
        self.store = app.results

    def compile(
        self,
        canvas: Canvas,
        then: tuple[wire.Node, ...] = (),
        ref: wire.ChordRef | None = None,
        errbacks: tuple[wire.Call, ...] = (),
    ) -> tuple[wire.Node, AnyResult]:
        own = tuple(self.call(e) for e in canvas._errbacks)
        if isinstance(canvas, Signature):
            call = self.call(canvas, then, ref, errbacks + own)
            task = canvas.task
            store = None if task.options.ignore_result else self.store
            return call, Result(call.id, store, task.name, task.types.returns, app=self.app)
        if isinstance(canvas, Chain):
            links = _fold(canvas.links)
            if not links:
                raise ConfigurationError("an empty chain has nothing to send")
            node, handle = self.compile(links[-1], then, ref, errbacks + own)
            for link in reversed(links[:-1]):
                node, _ = self.compile(link, (node,), None, errbacks + own)
            return node, handle
        if isinstance(canvas, Group):
            if then or ref is not None:
                # Where a group must deliver one result (followed by a task, or a chord's
                # member), it becomes a chord whose callback returns the list of results.
                collect = Signature(collector(self.app), ())
                whole = Chord(canvas, collect)
                whole._errbacks = list(canvas._errbacks)
                return self.compile(whole, then, ref, errbacks)
            members = [self.compile(m, (), None, errbacks + own) for m in canvas.members]
            group_id = new_id()
            handles = [h for _, h in members]
            return wire.Group(id=group_id, members=tuple(n for n, _ in members)), GroupResult(
                group_id, handles
            )
        if isinstance(canvas, Chord):
            if canvas.body is None:
                raise ConfigurationError(
                    "a chord needs a callback: chord(header, callback.s()) or "
                    "chord(header)(callback.s())"
                )
            chord_id = new_id()
            body, handle = self.compile(canvas.body, then, ref, errbacks + own)
            size = len(canvas.header.members)
            header = tuple(
                self.compile(m, (), wire.ChordRef(id=chord_id, index=i, size=size))[0]
                for i, m in enumerate(canvas.header.members)
            )
            node = wire.Chord(id=chord_id, header=header, body=body, pass_errors=canvas.pass_errors)
            return node, handle
        raise ConfigurationError(f"cannot send {type(canvas).__name__}")

    def call(
        self,
        sig: Signature[Any],
        then: tuple[wire.Node, ...] = (),
        ref: wire.ChordRef | None = None,
        errbacks: tuple[wire.Call, ...] = (),
    ) -> wire.Call:
        task, options = sig.task, sig.options
        name = task.name
        self.app.get_task(name)  # unregistered: refused here, by name, before anything is sent
        task_id, queue = options.get("task_id"), options.get("queue")
        priority = options.get("priority")
        problems = _option_problems(options)
        if problems:
            raise ConfigurationError(f"signature {sig!r}: " + "; ".join(problems))
        if sig.immutable:
            _check(task, sig.args, sig.kwargs)
        return wire.Call(
            id=task_id or new_id(),
            task=name,
            queue=resolve(queue, default=task.queue),
            args=sig.args,
            kwargs=sig.kwargs,
            immutable=sig.immutable,
            priority=resolve(priority, default=task.options.priority),
            countdown=None if options.get("countdown") is None else max(0.0, options["countdown"]),
            expires=options.get("expires"),
            then=then,
            errbacks=errbacks,
            chord=ref,
        )


def _fold(links: list[Canvas]) -> list[Canvas]:
    """A group followed by something is a chord: fold from the right, so that
    `g1 | g2 | c` is `chord(g1, chord(g2, c))`."""
    folded = list(links)
    i = len(folded) - 2
    while i >= 0:
        if isinstance(folded[i], Group):
            folded[i : i + 2] = [Chord(folded[i], folded[i + 1])]  # type: ignore[arg-type]
        i -= 1
    return folded


def _option_problems(options: dict[str, Any]) -> list[str]:
    problems = []
    priority, queue, task_id = options.get("priority"), options.get("queue"), options.get("task_id")
    if priority is not None and (type(priority) is not int or not 0 <= priority <= MAX_PRIORITY):
        problems.append(f"priority must be an integer from 0 to {MAX_PRIORITY}, not {priority!r}")
    if queue is not None and (not isinstance(queue, str) or not 0 < len(queue) <= 255):
        problems.append(f"queue must be a name of 1 to 255 characters, not {queue!r}")
    if task_id is not None and (not isinstance(task_id, str) or not 0 < len(task_id) <= 128):
        problems.append(f"task_id must be a string of 1 to 128 characters, not {task_id!r}")
    for key in ("countdown", "expires"):
        value = options.get(key)
        if value is not None and not (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and (key == "countdown" or value > 0)
            and value <= MAX_DELAY_S
        ):
            problems.append(f"{key} must be a number of seconds up to {MAX_DELAY_S:.0f}")
    return problems


def _check(task: Task[Any, Any], args: Sequence[Any], kwargs: dict[str, Any]) -> None:
    try:
        check_arguments(task.types, args, kwargs)
    except ArgumentError as exc:
        raise ArgumentError(f"task {task.name}: {exc}") from None
    except EncodeError as exc:
        raise EncodeError(f"task {task.name}: {exc}") from None


def _prepare(canvas: Canvas, app: Conveyor | None) -> tuple[Conveyor, AnyResult, Sends]:
    """Compile `canvas` and check what its first sends take, before anything is sent."""
    app = app or canvas._app()
    if app is None:
        raise ConfigurationError("this workflow names no task: pass app=...")
    node, handle = _Compiler(app).compile(canvas)
    store = app.results
    if store is not None:
        joins_for(store)  # a store that cannot keep workflows (rpc://) refuses here
    sends = Sends()
    parent = current_request.get()
    root = None if parent is None or parent.inline else (parent.root_id or parent.id)
    start(
        node,
        NO_VALUE,
        sends,
        root_id=root,
        parent_id=None if root is None or parent is None else parent.id,
        nonce=False,
        now=time.time(),
    )
    for envelope in sends.envelopes:
        _check(app.get_task(envelope.task), envelope.args, envelope.kwargs)
    if sends.chords:
        joins_for(store)  # a chord without a store is refused here, before anything is sent
    return app, handle, sends


def _keep_chords(app: Conveyor, sends: Sends) -> None:
    if sends.chords:
        expires_at = time.time() + app.settings.result_expires
        joins_for(app.results).start(sends.chords, expires_at)


def send(canvas: Canvas, app: Conveyor | None = None) -> AnyResult:
    """Compile `canvas`, keep its chords' specs, send its first tasks; the handle."""
    app, handle, sends = _prepare(canvas, app)
    _keep_chords(app, sends)
    app.send(sends.envelopes)
    return handle


async def send_async(canvas: Canvas, app: Conveyor | None = None) -> AnyResult:
    """`send` for asyncio producers (the store's calls go through a thread)."""
    app, handle, sends = _prepare(canvas, app)
    await asyncio.to_thread(_keep_chords, app, sends)
    await app.send_async(sends.envelopes)
    return handle


__all__ = ["AnyResult", "Chain", "Chord", "Group", "Signature", "chain", "chord", "group"]
