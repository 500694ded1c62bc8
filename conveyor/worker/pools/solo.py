"""The solo pool: one job at a time on the worker's own event loop thread.

For debugging and for tasks that must run in the main thread. The loop is busy while a synchronous
task runs, so nothing else (lease renewal included) happens until it returns.
"""

from __future__ import annotations

import asyncio

from conveyor.worker.execution import Job, execute, execute_async
from conveyor.worker.pools.base import Done, Pool


class SoloPool(Pool):
    """Runs each job inline, one at a time."""

    loop_free = False
    name = "solo"

    def __init__(self, concurrency: int = 1) -> None:
        super().__init__(1)
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Nothing to start."""

    def submit(self, job: Job, done: Done) -> None:
        """Run a synchronous job right here; schedule an async one on the loop."""
        if not job.task.is_async:
            done(job, execute(job))
            return
        task = asyncio.get_running_loop().create_task(self._run(job, done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Cancel a job still running (a cold shutdown); its message was already released."""
        for task in list(self._tasks):
            task.cancel()

    @staticmethod
    async def _run(job: Job, done: Done) -> None:
        done(job, await execute_async(job))
