"""`Hooks`: per hook, the middleware that implement it, worked out once rather than per message.

With no middleware every tuple is empty, and the worker's hot path checks one of them for
truth per delivery and does nothing else. Calls are isolated here (`call`): a hook that raises is
logged once, with the middleware's name and the hook, and the next middleware runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from conveyor.errors import ConfigurationError, TaskSkipped
from conveyor.middleware.base import HOOK_NAMES, Middleware
from conveyor.settings import unknown_name_message

log = logging.getLogger("conveyor.middleware")

#: One middleware's implementation of one hook: its name for the log, and the bound method.
Hook = tuple[str, Callable[..., Any]]


class Hooks:
    """The hooks of a list of middleware, in the order they were added."""

    __slots__ = HOOK_NAMES

    before_send: tuple[Hook, ...]
    process_start: tuple[Hook, ...]
    worker_start: tuple[Hook, ...]
    before_admit: tuple[Hook, ...]
    before_run: tuple[Hook, ...]
    after_run: tuple[Hook, ...]
    after_settle: tuple[Hook, ...]
    process_stop: tuple[Hook, ...]
    worker_stop: tuple[Hook, ...]

    def __init__(self, middleware: Sequence[object] = ()) -> None:
        for hook in HOOK_NAMES:
            found = ((name_of(m), _hook(m, hook)) for m in middleware)
            setattr(self, hook, tuple((name, fn) for name, fn in found if fn is not None))


def call(hooks: tuple[Hook, ...], hook: str, *args: Any) -> None:
    """Call each middleware's `hook`; one that raises is logged and the rest still run."""
    for name, fn in hooks:
        try:
            fn(*args)
        except Exception:
            log.exception("middleware %s raised in %s; ignored", name, hook)


def admit(hooks: tuple[Hook, ...], *args: Any) -> TaskSkipped | None:
    """Call each `before_admit`; the `TaskSkipped` one raised, if any (the rest are not called
    then). Any other exception is logged and ignored, as in `call`."""
    for name, fn in hooks:
        try:
            fn(*args)
        except TaskSkipped as skip:
            return skip
        except Exception:
            log.exception("middleware %s raised in before_admit; ignored", name)
    return None


def name_of(middleware: object) -> str:
    """How logs name a middleware: its `name`, else its class."""
    name = getattr(middleware, "name", None)
    return name if isinstance(name, str) else type(middleware).__qualname__


def _hook(middleware: object, hook: str) -> Callable[..., Any] | None:
    """`middleware`'s own `hook`, or None where it has none or keeps the base class's no-op."""
    fn: Callable[..., Any] | None = getattr(middleware, hook, None)
    if not callable(fn):
        return None
    if getattr(type(middleware), hook, None) is getattr(Middleware, hook):
        return None
    return fn


def check_middleware(middleware: object, taken: dict[str, str]) -> type[msgspec.Struct] | None:
    """Refuse what is not a middleware; return the options struct it declares, if any.

    A middleware is an object with at least one hook (or options to declare). A method named
    like a hook but misspelled is refused too, as it would silently never run. `taken` maps
    the task options already known to who declared them; the new ones must not clash.
    """
    options = getattr(middleware, "options", None)
    if options is not None and not (
        isinstance(options, type) and issubclass(options, msgspec.Struct)
    ):
        raise ConfigurationError(
            f"middleware {name_of(middleware)}: `options` must be a msgspec.Struct class "
            f"naming the task options it adds, not {options!r}"
        )
    import difflib  # only when a middleware is added: workers without one never load it

    for attribute in dir(middleware):
        if attribute.startswith("_") or attribute in HOOK_NAMES:
            continue
        if difflib.get_close_matches(attribute, HOOK_NAMES, n=1, cutoff=0.85) and callable(
            getattr(middleware, attribute, None)
        ):
            raise ConfigurationError(
                f"middleware {name_of(middleware)}: "
                + unknown_name_message(attribute, HOOK_NAMES, "hook")
            )
    if options is None and not any(_hook(middleware, hook) for hook in HOOK_NAMES):
        raise ConfigurationError(
            f"{middleware!r} is not a middleware: it implements none of the hooks "
            f"({', '.join(HOOK_NAMES)}) and declares no task options; subclass "
            "conveyor.middleware.Middleware and override the hooks you need"
        )
    if options is not None:
        for field in options.__struct_fields__:
            if field in taken:
                raise ConfigurationError(
                    f"middleware {name_of(middleware)} declares task option {field!r}, "
                    f"which {taken[field]} declares already"
                )
    return options
