"""What a forked child must forget of its parent, in one place.

A forked child inherits its parent's memory but none of its threads: event loops, connections
and the bookkeeping of threads that do not exist in it are unusable there. Every module that
keeps such state registers a callback with `forget_in_child`; the one `os.register_at_fork`
hook below runs them in the child, in the order they were registered (module import order).
"""

from __future__ import annotations

import os
from collections.abc import Callable

_callbacks: list[Callable[[], None]] = []


def forget_in_child(callback: Callable[[], None]) -> Callable[[], None]:
    """Run `callback` in every child forked from now on, before anything else runs there."""
    _callbacks.append(callback)
    return callback


def _after_fork_in_child() -> None:
    for callback in _callbacks:
        callback()


os.register_at_fork(after_in_child=_after_fork_in_child)
