"""The built-in middleware behind `conveyor.signals`: each hook sends its signals.

A worker adds it (`worker_hooks`) only when some signal has a receiver, so signals nobody
listens to cost nothing per task; `task_revoked`, sent from `after_settle`, has a middleware of
its own, added only when it has receivers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from conveyor import signals
from conveyor.middleware.base import Middleware, RunOutcome, Settled
from conveyor.middleware.hooks import Hooks
from conveyor.results import State

if TYPE_CHECKING:
    from conveyor.task import Request, Task
    from conveyor.worker.worker import Worker

_STATES = {"success": State.SUCCESS, "failure": State.FAILURE, "retry": State.RETRY}


class SignalDispatch(Middleware):
    """Sends `conveyor.signals` from the hooks."""

    def process_start(self) -> None:
        """`worker_process_init`."""
        signals.worker_process_init.send(None)

    def worker_start(self, worker: Worker) -> None:
        """`worker_ready`."""
        signals.worker_ready.send(worker)

    def before_admit(self, task: Task[Any, Any], request: Request) -> None:
        """`task_received`."""
        signals.task_received.send(task, request=request)

    def before_run(self, task: Task[Any, Any], request: Request) -> None:
        """`task_prerun`."""
        signals.task_prerun.send(
            task,
            task_id=request.id,
            task=task,
            args=request.args,
            kwargs=request.kwargs,
            request=request,
        )

    def after_run(self, task: Task[Any, Any], request: Request, outcome: RunOutcome) -> None:
        """`task_success`, `task_failure` or `task_retry`, then `task_postrun`."""
        exc = outcome.exception
        if outcome.state == "success":
            signals.task_success.send(task, result=outcome.result, request=request)
        elif outcome.state == "retry":
            signals.task_retry.send(task, request=request, reason=exc)
        else:
            signals.task_failure.send(
                task,
                task_id=request.id,
                exception=exc,
                args=request.args,
                kwargs=request.kwargs,
                traceback=None if exc is None else exc.__traceback__,
                request=request,
            )
        signals.task_postrun.send(
            task,
            task_id=request.id,
            task=task,
            args=request.args,
            kwargs=request.kwargs,
            retval=outcome.result if outcome.state == "success" else exc,
            state=_STATES[outcome.state],
            request=request,
        )

    def worker_stop(self, worker: Worker) -> None:
        """`worker_shutdown`."""
        signals.worker_shutdown.send(worker)


class RevokedSignal(Middleware):
    """Sends `task_revoked` when a revoked delivery is settled."""

    def after_settle(self, settled: Settled) -> None:
        """`task_revoked`."""
        if settled.outcome == "revoked":
            envelope = settled.envelope
            signals.task_revoked.send(
                settled.task,
                task_id=None if envelope is None else envelope.id,
                terminated=settled.took is not None,
                expired=False,
                envelope=envelope,
            )


def worker_hooks(middleware: Sequence[object]) -> Hooks:
    """The hooks a worker runs: the app's middleware, then the signals' if any are connected."""
    if signals.connected():
        extra: list[Middleware] = [SignalDispatch()]
        if signals.task_revoked.receivers:
            extra.append(RevokedSignal())
        return Hooks([*middleware, *extra])
    return Hooks(middleware)
