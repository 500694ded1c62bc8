"""The pool interface: where the consumer hands jobs to be run.

A pool runs at most `concurrency` jobs at once; the consumer never submits more than that, so a
pool never queues work behind a busy slot. A pool calls `done` from whichever thread ran the job;
the consumer makes that safe.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Sequence

from conveyor.worker.execution import Job, Outcome

Done = Callable[[Job, Outcome], None]
log = logging.getLogger("conveyor.worker")


class Pool(abc.ABC):
    """Runs jobs and reports their outcomes."""

    #: True when jobs run on the pool's own threads, which may then carry on with the consumer's
    #: next round themselves instead of handing it to the event loop.
    threaded: bool = False
    #: False when tasks can run on the worker's event-loop thread and hold it for as long as
    #: they run (solo; asyncio, for a coroutine that blocks): the broker's connection must then
    #: keep a thread of its own, or its heartbeats would stop.
    loop_free: bool = True
    #: True when each task runs in a process the worker watches (prefork): a task can kill only
    #: its own process, and the worker sees that run die and counts it (`Delivery.lost`). The
    #: worker's own death is then never a task's doing, and its redeliveries count no lost run.
    isolates_tasks: bool = False

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        #: Called when capacity frees up other than through a job's `done` (a child came up).
        self.on_ready: Callable[[], None] | None = None
        #: Called when `capacity` changed.
        self.on_capacity: Callable[[], None] | None = None
        #: Called with the reason when the pool can no longer run jobs (the prefork zygote
        #: died): the worker then shuts down, so that its supervisor starts a whole new one.
        self.on_broken: Callable[[str], None] | None = None

    @property
    def capacity(self) -> int:
        """The most jobs the pool takes on now: what a broker may hold unacknowledged."""
        return self.concurrency

    @property
    def most(self) -> int:
        """The most `capacity` ever gets."""
        return self.concurrency

    def free(self, running: int) -> int:
        """How many more jobs can start now, with `running` submitted and not yet done."""
        return self.concurrency - running

    def observe_round_trip(self, seconds: float) -> None:  # noqa: B027
        """Learn what a finished job's replacement takes to arrive from the broker (its ack's
        wait and a round trip), as the consumer measured it. Default: nothing to learn."""

    def placement(self) -> dict[Job, tuple[int, bool]] | None:
        """Where submitted jobs are, for `conveyor inspect`: per job, the pid of the process
        holding it and whether it runs now (a job not listed waits in the pool). None: every
        job submitted runs now, in the worker's own process. Called on the event loop."""
        return None

    @abc.abstractmethod
    async def start(self) -> None:
        """Get ready to run jobs (called on the consumer's event loop)."""

    @abc.abstractmethod
    def submit(self, job: Job, done: Done) -> None:
        """Start a job now; call `done(job, outcome)` on the event loop when it ends."""

    def revoke(self, jobs: Sequence[tuple[Job, bool]]) -> None:
        """Jobs submitted here (and not done) whose tasks were just revoked, each with whether
        to stop it if it runs (`terminate`). A job that has not started must not start: end it
        with `Outcome.revoked(...)`. This default, for pools that start every job at once and
        cannot stop one (threads, solo), only says that they run to the end."""
        for job, terminate in jobs:
            env = job.envelope
            if terminate:
                log.warning(
                    "task %s[%s] was revoked with terminate while running, but the %s pool cannot "
                    "stop a running task: it runs to the end (use the prefork pool, or the "
                    "asyncio pool for async tasks, to stop running tasks)",
                    env.task,
                    env.id,
                    self.name,
                )
            else:
                log.info(
                    "task %s[%s] was revoked while running: it runs to the end", env.task, env.id
                )

    #: The pool's name, for log lines.
    name = "this"

    def flush(self) -> None:  # noqa: B027
        """Hand over now what `submit` gathered (a pool that writes jobs in batches, prefork,
        otherwise does so at the end of the loop turn)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Release the pool's workers; running jobs have already finished or been abandoned."""
