"""Many small calls of one task in one message: `task.starmap(...)` and `task.chunks(...)`;
and `conveyor.collect`, which returns what it is given: the callback of the chord a group
becomes where a group must deliver one result (a group as a chord's member).

A bulk message is a call of the built-in task `conveyor.starmap` with the target task's name and
its argument tuples; the worker runs the target once per tuple, in order, in the same process,
and stores the list of results as one result. It goes to the target's queue with its priority.
Every tuple is checked against the target's signature when the signature is made, as `delay`
checks its arguments. Workers register the built-in task when they start; so does a sender the
first time it makes a bulk signature.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from conveyor.errors import ArgumentError, ConfigurationError, EncodeError
from conveyor.values import check_arguments, convert_arguments

if TYPE_CHECKING:
    from conveyor.app import Conveyor
    from conveyor.task import Task
    from conveyor.workflows.canvas import Group, Signature

STARMAP = "conveyor.starmap"
COLLECT = "conveyor.collect"
#: Tasks every worker registers itself: left out where a worker lists the tasks it was given.
BUILTINS = frozenset({STARMAP, COLLECT})


def register(app: Conveyor) -> Task[Any, Any]:
    """The built-in tasks of `app`, registered on first use; the bulk one."""
    task = app.tasks.get(STARMAP)
    if task is not None:
        return task

    def collect(values: list[Any]) -> list[Any]:
        return values

    collect.__module__, collect.__qualname__ = "conveyor.workflows.bulk", "collect"
    app.task(name=COLLECT)(collect)

    def starmap(name: str, arguments: list[list[Any]]) -> list[Any]:
        target = app.get_task(name)
        results = []
        for args in arguments:
            call_args, call_kwargs = convert_arguments(target.types, args, {})
            results.append(target.run(call_args, call_kwargs))
        return results

    starmap.__module__, starmap.__qualname__ = "conveyor.workflows.bulk", "starmap"
    return app.task(name=STARMAP)(starmap)


def collector(app: Conveyor) -> Task[Any, Any]:
    """The built-in task that returns the list it is given."""
    register(app)
    return app.tasks[COLLECT]


def starmap(task: Task[Any, Any], arguments: Iterable[Sequence[Any]]) -> Signature[list[Any]]:
    """One message calling `task` once per argument tuple; its result is the list of results."""
    from conveyor.workflows.canvas import Signature

    if task.is_async:
        raise ConfigurationError(
            f"task {task.name} is async: bulk calls run plain functions; send a group instead"
        )
    calls = []
    for n, args in enumerate(arguments):
        if not isinstance(args, list | tuple):
            raise ArgumentError(
                f"task {task.name}: item {n} of a bulk call must be a tuple of arguments, "
                f"not {type(args).__name__}"
            )
        try:
            check_arguments(task.types, args, {})
        except ArgumentError as exc:
            raise ArgumentError(f"task {task.name}: item {n}: {exc}") from None
        except EncodeError as exc:
            raise EncodeError(f"task {task.name}: item {n}: {exc}") from None
        calls.append(list(args))
    bulk = register(task.app)
    sig: Signature[list[Any]] = Signature(bulk, (task.name, calls), immutable=True)
    return sig.set(queue=task.queue, priority=task.options.priority)


def chunks(task: Task[Any, Any], arguments: Iterable[Sequence[Any]], size: int) -> Group:
    """A group of bulk messages of at most `size` calls each; its results are lists."""
    from conveyor.workflows.canvas import Group

    if type(size) is not int or size < 1:
        raise ConfigurationError(f"chunks of {size!r}: give a positive number of calls per chunk")
    items = list(arguments)
    return Group([starmap(task, items[i : i + size]) for i in range(0, len(items), size)])
