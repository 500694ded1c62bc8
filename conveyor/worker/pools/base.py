"""The pool interface: where the consumer hands jobs to be run.

A pool runs at most `concurrency` jobs at once; the consumer never submits more than that, so a
pool never queues work behind a busy slot. `done` is always called on the consumer's event loop.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

from conveyor.worker.execution import Job, Outcome

Done = Callable[[Job, Outcome], None]


class Pool(abc.ABC):
    """Runs jobs and reports their outcomes."""

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency

    @abc.abstractmethod
    async def start(self) -> None:
        """Get ready to run jobs (called on the consumer's event loop)."""

    @abc.abstractmethod
    def submit(self, job: Job, done: Done) -> None:
        """Start a job now; call `done(job, outcome)` on the event loop when it ends."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Release the pool's workers; running jobs have already finished or been abandoned."""
