"""The threads pool: N daemon threads, each running one job at a time.

Good for I/O-bound tasks. Threads cannot be killed, so a cold shutdown abandons running jobs (their
messages go back to the broker) and the process exits around them.
"""

from __future__ import annotations

import logging
import queue
import threading

from conveyor.worker.execution import Job, close_thread_loop, execute
from conveyor.worker.pools.base import Done, Pool

_STOP = None
log = logging.getLogger("conveyor.worker")


class ThreadPool(Pool):
    """Jobs run on a fixed set of threads fed by one queue.

    Each thread reports its job's outcome itself; on a local broker the consumer's next round
    then runs on that thread, which usually takes the job that round started next.
    """

    threaded = True
    name = "threads"

    def __init__(self, concurrency: int) -> None:
        super().__init__(concurrency)
        self._jobs: queue.SimpleQueue[tuple[Job, Done] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    async def start(self) -> None:
        """Start the threads."""
        for n in range(self.concurrency):
            thread = threading.Thread(target=self._work, name=f"conveyor-task-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def submit(self, job: Job, done: Done) -> None:
        """Hand a job to the next free thread."""
        self._jobs.put((job, done))

    async def stop(self) -> None:
        """Tell the threads to exit once idle; a thread still running is left to the exit."""
        for _ in self._threads:
            self._jobs.put(_STOP)
        self._threads.clear()

    def _work(self) -> None:
        while (item := self._jobs.get()) is not _STOP:
            job, done = item
            try:
                done(job, execute(job))
            except Exception:
                log.exception("could not report the outcome of task %s", job.envelope.id)
        close_thread_loop()
