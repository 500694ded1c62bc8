"""The asyncio pool: many tasks at once as coroutines on the worker's event loop.

For `async def` tasks that wait on the network: `concurrency` of them run concurrently in one
process, within the same time limits (the soft one cancels the coroutine and fails the task
with `SoftTimeLimitExceeded`, else the hard one with `TimeLimitExceeded`) and with the same
late acknowledgements as any pool. A plain `def` task runs in a thread so it does not stall the
loop. A cold shutdown cancels what is still running; its messages were already given back. A
revocation with `terminate` cancels a running `async def` task (a `def` one runs to the end).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from conveyor.worker.execution import Job, Outcome, execute, execute_async
from conveyor.worker.pools.base import Done, Pool


class AsyncioPool(Pool):
    """Runs up to `concurrency` jobs as tasks on the running event loop."""

    loop_free = False
    name = "asyncio"

    def __init__(self, concurrency: int) -> None:
        super().__init__(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._running: dict[Job, asyncio.Task[None]] = {}  # async tasks, which can be cancelled
        self._revoked: set[Job] = set()

    async def start(self) -> None:
        """Nothing to start: jobs run on the worker's own loop."""

    def submit(self, job: Job, done: Done) -> None:
        """Start the job as a task on the loop."""
        task = asyncio.get_running_loop().create_task(self._run(job, done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if job.task.is_async:
            self._running[job] = task

    def revoke(self, jobs: Sequence[tuple[Job, bool]]) -> None:
        """Cancel the async tasks revoked with terminate; the rest run to the end."""
        others = []
        for job, terminate in jobs:
            task = self._running.get(job)
            if terminate and task is not None:
                self._revoked.add(job)
                task.cancel()
            else:
                others.append((job, terminate))
        super().revoke(others)

    async def stop(self) -> None:
        """Cancel jobs still running (a cold shutdown) and wait until they are gone."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))

    async def _run(self, job: Job, done: Done) -> None:
        try:
            if job.task.is_async:
                outcome = await execute_async(job)
            else:
                outcome = await asyncio.to_thread(execute, job)
        finally:
            self._running.pop(job, None)
        if job in self._revoked:  # cancelled by a revocation: the task saw CancelledError
            self._revoked.discard(job)
            took = outcome.took
            outcome = Outcome.revoked("stopped while running: cancelled (--terminate)")
            outcome.took = took or 1e-9
        done(job, outcome)
