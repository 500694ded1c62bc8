"""Time limits for tasks that run in a thread: solo and threads pools, and prefork children.

A thread cannot be killed, so past its soft limit a task gets `SoftTimeLimitExceeded` raised inside
it, and past its hard limit `TimeLimitExceeded`. The exception arrives at the task's next Python
instruction: a task blocked inside a C call (a socket read, `time.sleep`) sees it only when the
call returns. Only a process pool can stop a task that never returns to Python.

Async tasks are limited with `asyncio.timeout` around the coroutine instead (see execution.py).
"""

from __future__ import annotations

import ctypes
import heapq
import threading
import time
from dataclasses import dataclass, field

from conveyor._fork import forget_in_child
from conveyor.errors import SoftTimeLimitExceeded, TimeLimitExceeded

_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc.argtypes = (ctypes.c_ulong, ctypes.py_object)


def _raise_in(ident: int, exc: type[BaseException] | None) -> None:
    # NULL clears an exception that was set but has not been raised yet.
    _set_async_exc(ident, ctypes.py_object(exc) if exc is not None else ctypes.py_object())


@dataclass(order=True)
class _Deadline:
    at: float
    ident: int = field(compare=False)
    generation: int = field(compare=False)
    exc: type[BaseException] = field(compare=False)


class Watchdog:
    """One daemon thread that raises time-limit exceptions in threads running tasks too long."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._deadlines: list[_Deadline] = []
        self._watched: dict[int, int] = {}  # thread ident -> generation of its current job
        self._generation = 0
        self._thread: threading.Thread | None = None
        forget_in_child(self._after_fork)

    def _after_fork(self) -> None:
        """A forked child (a prefork pool's) has no watchdog thread yet, and nothing to watch."""
        self._cond = threading.Condition()
        self._deadlines = []
        self._watched = {}
        self._thread = None

    def watch(self, soft: float | None, hard: float | None) -> None:
        """Start limiting the calling thread's current job."""
        ident, now = threading.get_ident(), time.monotonic()
        with self._cond:
            self._generation += 1
            self._watched[ident] = self._generation
            for limit, exc in ((soft, SoftTimeLimitExceeded), (hard, TimeLimitExceeded)):
                if limit is not None:
                    deadline = _Deadline(now + limit, ident, self._generation, exc)
                    heapq.heappush(self._deadlines, deadline)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="conveyor-time-limits", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def unwatch(self) -> None:
        """The calling thread's job is over: nothing more will be raised in it."""
        ident = threading.get_ident()
        with self._cond:
            if self._watched.pop(ident, None) is not None:
                _raise_in(ident, None)

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                while self._deadlines and self._deadlines[0].at <= now:
                    due = heapq.heappop(self._deadlines)
                    if self._watched.get(due.ident) == due.generation:
                        _raise_in(due.ident, due.exc)
                timeout = self._deadlines[0].at - now if self._deadlines else None
                self._cond.wait(timeout)
