"""The asyncio pool: many tasks at once as coroutines on the worker's event loop.

For `async def` tasks that wait on the network: `concurrency` of them run concurrently in one
process, within the same time limits (the soft one cancels the coroutine and fails the task
with `SoftTimeLimitExceeded`, else the hard one with `TimeLimitExceeded`) and with the same
late acknowledgements as any pool. A plain `def` task runs in a thread so it does not stall the
loop. A cold shutdown cancels what is still running; its messages were already given back.
"""

from __future__ import annotations

import asyncio

from conveyor.worker.execution import Job, execute, execute_async
from conveyor.worker.pools.base import Done, Pool


class AsyncioPool(Pool):
    """Runs up to `concurrency` jobs as tasks on the running event loop."""

    loop_free = False

    def __init__(self, concurrency: int) -> None:
        super().__init__(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Nothing to start: jobs run on the worker's own loop."""

    def submit(self, job: Job, done: Done) -> None:
        """Start the job as a task on the loop."""
        task = asyncio.get_running_loop().create_task(self._run(job, done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Cancel jobs still running (a cold shutdown) and wait until they are gone."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))

    @staticmethod
    async def _run(job: Job, done: Done) -> None:
        if job.task.is_async:
            outcome = await execute_async(job)
        else:
            outcome = await asyncio.to_thread(execute, job)
        done(job, outcome)
