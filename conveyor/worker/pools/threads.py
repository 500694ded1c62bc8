"""The threads pool: N daemon threads, each running one job at a time.

Good for I/O-bound tasks. Threads cannot be killed, so a cold shutdown abandons running jobs (their
messages go back to the broker) and the process exits around them.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading

from conveyor.worker.execution import Job, Outcome, close_thread_loop, execute
from conveyor.worker.pools.base import Done, Pool

_STOP = None


class ThreadPool(Pool):
    """Jobs run on a fixed set of threads fed by one queue.

    Finished jobs are collected in a deque; the loop is woken once per batch of them rather than
    once per job, since each wake-up is a system call.
    """

    def __init__(self, concurrency: int) -> None:
        super().__init__(concurrency)
        self._jobs: queue.SimpleQueue[tuple[Job, Done] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._finished: collections.deque[tuple[Job, Done, Outcome]] = collections.deque()
        self._drain_scheduled = False
        self._drain_lock = threading.Lock()

    async def start(self) -> None:
        """Start the threads."""
        self._loop = asyncio.get_running_loop()
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
        loop = self._loop
        assert loop is not None
        while (item := self._jobs.get()) is not _STOP:
            job, done = item
            self._finished.append((job, done, execute(job)))
            with self._drain_lock:
                if self._drain_scheduled:
                    continue
                self._drain_scheduled = True
            try:
                loop.call_soon_threadsafe(self._drain)
            except RuntimeError:
                break  # the loop is closed: the worker is gone and the message goes back
        close_thread_loop()

    def _drain(self) -> None:
        """On the loop: report every finished job."""
        with self._drain_lock:
            self._drain_scheduled = False
        finished = self._finished
        while finished:
            job, done, outcome = finished.popleft()
            done(job, outcome)
