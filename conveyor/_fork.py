"""What a forked child must forget of its parent, in one place.

A forked child inherits its parent's memory but none of its threads: event loops, connections
and the bookkeeping of threads that do not exist in it are unusable there. Every module that
keeps such state registers a callback with `forget_in_child`; the one `os.register_at_fork`
hook below runs them in the child, in the order they were registered (module import order).

A prefork zygote forked from the worker ran them when it was forked, and creates no such state
of its own: the children it forks have nothing to forget, and it forks them inside
`nothing_to_forget()`. Running the callbacks anyway would cost each child a copy of every page
they touch (half a megabyte); their own children, if a task forks, run them as ever.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

_callbacks: list[Callable[[], None]] = []
_skip = False


def forget_in_child(callback: Callable[[], None]) -> Callable[[], None]:
    """Run `callback` in every child forked from now on, before anything else runs there."""
    _callbacks.append(callback)
    return callback


@contextlib.contextmanager
def nothing_to_forget() -> Iterator[None]:
    """A child forked in the body runs no callback: this process holds nothing to forget."""
    global _skip
    _skip = True
    try:
        yield
    finally:
        _skip = False


def _after_fork_in_child() -> None:
    if _skip:
        return
    for callback in _callbacks:
        callback()


os.register_at_fork(after_in_child=_after_fork_in_child)
