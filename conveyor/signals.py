"""Signals, in the style Celery and Blinker users know, dispatched by a built-in middleware.

```python
from conveyor.signals import task_prerun

@task_prerun.connect
def announce(sender, request, **kwargs):
    print("starting", sender.name, request.id)
```

A receiver is called with keyword arguments: `sender` (the task, or the worker), `signal`, and
the signal's own (listed on each one below); take `**kwargs` for the rest. `connect(sender=x)`
limits a receiver to one sender (a task object, or its name). Receivers are held strongly
(a lambda stays connected) until `disconnect`. A receiver that raises is logged and the others
still run; like a middleware hook, it never affects the task or its message.

Where each is sent: `task_received` in the worker's process when a delivery is admitted;
`task_prerun`, `task_postrun`, `task_success`, `task_failure` and `task_retry` in the process
that runs the task (a prefork child); `worker_process_init` in each process that runs tasks;
`worker_ready`, `worker_shutdown` and `task_revoked` in the worker's process. Connect receivers
when your tasks' module is imported: a worker looks for receivers when it starts (and each
prefork child again after its start-up hooks), and with none connected the signals cost nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Final, TypeVar, overload

log = logging.getLogger("conveyor.signals")

F = TypeVar("F", bound=Callable[..., Any])


class _Any:
    def __repr__(self) -> str:
        return "ANY"


#: `connect(sender=ANY)`, the default: every sender.
ANY: Final = _Any()


class Signal:
    """Receivers to call when something happens; `send` calls them."""

    def __init__(self, name: str, doc: str = "") -> None:
        self.name = name
        self.__doc__ = doc
        # Replaced, never changed in place: `send` iterates a snapshot without a lock.
        self._receivers: tuple[tuple[Callable[..., Any], object], ...] = ()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Signal {self.name}>"

    @overload
    def connect(self, receiver: F, /, *, sender: object = ANY) -> F: ...

    @overload
    def connect(self, /, *, sender: object = ANY) -> Callable[[F], F]: ...

    def connect(
        self, receiver: F | None = None, /, *, sender: object = ANY
    ) -> F | Callable[[F], F]:
        """Call `receiver` at each `send` (from `sender` only, if given); usable as a
        decorator, bare or with `sender=`. Returns the receiver."""

        def add(fn: F) -> F:
            if not callable(fn):
                raise TypeError(f"signal {self.name}: a receiver must be callable, not {fn!r}")
            with self._lock:
                if (fn, sender) not in self._receivers:
                    self._receivers = (*self._receivers, (fn, sender))
            return fn

        return add if receiver is None else add(receiver)

    def disconnect(self, receiver: Callable[..., Any], /, *, sender: object = ANY) -> bool:
        """Stop calling `receiver` (as connected with `sender`); False if it was not."""
        with self._lock:
            kept = tuple(r for r in self._receivers if r != (receiver, sender))
            removed = len(kept) != len(self._receivers)
            self._receivers = kept
        return removed

    @contextmanager
    def connected_to(
        self, receiver: Callable[..., Any], /, *, sender: object = ANY
    ) -> Iterator[Callable[..., Any]]:
        """Connect `receiver` for the duration of a `with` block (handy in tests)."""
        self.connect(receiver, sender=sender)
        try:
            yield receiver
        finally:
            self.disconnect(receiver, sender=sender)

    @property
    def receivers(self) -> list[Callable[..., Any]]:
        """The connected receivers, in the order they were connected."""
        return [fn for fn, _ in self._receivers]

    def send(self, sender: object = None, /, **kwargs: Any) -> list[tuple[Callable[..., Any], Any]]:
        """Call every receiver for `sender`; return (receiver, what it returned) pairs. A
        receiver that raises is logged, left out of the list, and the others still run."""
        answers = []
        name = getattr(sender, "name", ANY)
        for fn, wanted in self._receivers:
            if wanted is not ANY and wanted is not sender and wanted != name:
                continue
            try:
                answers.append((fn, fn(sender=sender, signal=self, **kwargs)))
            except Exception:
                log.exception(
                    "receiver %s of signal %s raised; ignored",
                    getattr(fn, "__qualname__", fn),
                    self.name,
                )
        return answers


task_received = Signal(
    "task_received", "A delivery was admitted to run (worker's process). Sends: request."
)
task_prerun = Signal(
    "task_prerun", "A task is about to run. Sends: task_id, task, args, kwargs, request."
)
task_postrun = Signal(
    "task_postrun",
    "A task returned or raised. Sends: task_id, task, args, kwargs, retval, state, request.",
)
task_success = Signal("task_success", "A task returned. Sends: result, request.")
task_failure = Signal(
    "task_failure",
    "A task raised and will not be retried. Sends: task_id, exception, args, kwargs, "
    "traceback, request.",
)
task_retry = Signal("task_retry", "A task will be retried. Sends: request, reason.")
task_revoked = Signal(
    "task_revoked",
    "A revoked task was skipped, or stopped while running (worker's process). Sends: task_id, "
    "terminated (it was running and was stopped), expired (always False), envelope.",
)
worker_process_init = Signal(
    "worker_process_init", "A process that runs tasks is about to run its first (no sender)."
)
worker_ready = Signal("worker_ready", "The worker is about to fetch its first message.")
worker_shutdown = Signal("worker_shutdown", "The worker's pool has stopped.")

#: Every signal conveyor sends.
SIGNALS = (
    task_received,
    task_prerun,
    task_postrun,
    task_success,
    task_failure,
    task_retry,
    task_revoked,
    worker_process_init,
    worker_ready,
    worker_shutdown,
)


def connected() -> bool:
    """True when any conveyor signal has a receiver."""
    return any(signal._receivers for signal in SIGNALS)
