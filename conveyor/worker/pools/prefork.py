"""The prefork pool: tasks run in child processes, fed through pipes by the worker's event loop.

The worker process keeps the broker connection and every acknowledgement; children never touch
the broker. Each child has its own pair of non-blocking pipes, tasks in and outcomes out, watched
by the worker's event loop, and runs one task at a time. Work is written only to a child that
reported WORKER_UP and is idle, so no task waits behind a busy child, and the consumer fetches
no more than there are idle children.

Children are forked by a zygote (see `_children`), so none inherits a broker socket. A child
that does not report WORKER_UP within `start_timeout` is killed and replaced (nothing was sent
to it). `max_tasks` and `max_memory` make a child hand over to a fresh one after its current
task. A task past its hard time limit has its child killed and replaced; the task fails (or
retries, per its options). A child that dies otherwise (a crash, `os._exit`, the OOM killer)
loses its task: the outcome says so and the consumer gives the message back, counted, so the
poison limit ends a task that keeps killing children.

All bookkeeping hangs off `_Child` objects with a generation number, never off descriptor
numbers, and a pipe leaves the event loop before it is closed, so a number the kernel hands out
again can never be mistaken for an old child's.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import itertools
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from conveyor.errors import TimeLimitExceeded
from conveyor.worker.execution import Job, Kind, Outcome
from conveyor.worker.pools import _children
from conveyor.worker.pools._children import ChildOptions, Done, Frames, Run, Up
from conveyor.worker.pools.base import Done as DoneCallback
from conveyor.worker.pools.base import Pool

if TYPE_CHECKING:
    from conveyor.app import Conveyor

log = logging.getLogger("conveyor.worker")

START_TIMEOUT_S = 30.0
RESTART_BACKOFF_MAX_S = 10.0


class State(enum.Enum):
    """Where a child is in its life."""

    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    RETIRING = "retiring"  # finished its last task; its pipe's end is on the way
    GONE = "gone"


class _Child:
    """One child process, as the worker sees it."""

    def __init__(self, generation: int, tasks: int, results: int) -> None:
        self.generation = generation
        self.pid = 0
        self.state = State.STARTING
        self.tasks = tasks  # write end of the task pipe (the worker's)
        self.results = results  # read end of the outcome pipe (the worker's)
        self.frames = Frames()
        self.outbox = bytearray()
        self.job: tuple[int, Job, DoneCallback] | None = None
        self.timer: asyncio.TimerHandle | None = None  # start-up timeout or hard time limit
        self.overran = False  # killed for running past its hard limit

    def __repr__(self) -> str:
        return f"<child {self.generation} pid={self.pid or '?'} {self.state.value}>"


class PreforkPool(Pool):
    """`concurrency` child processes, one task at a time each."""

    def __init__(
        self,
        concurrency: int,
        app: Conveyor,
        *,
        max_tasks: int | None = None,
        max_memory: int | None = None,
        start_timeout: float = START_TIMEOUT_S,
        before_up: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(concurrency)
        self.app = app
        self.start_timeout = start_timeout
        self._options = ChildOptions(
            max_tasks=max_tasks,
            max_memory=max_memory,
            max_message_size=app.settings.max_message_size,
            before_up=before_up,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._zygote_pid = 0
        self._control: socket.socket | None = None
        self._children: set[_Child] = set()
        self._idle: list[_Child] = []
        # Jobs submitted when no child was idle after all (one died between the consumer's
        # count and its submit): each goes to the next child that is ready, never queued in one.
        self._backlog: collections.deque[tuple[Job, DoneCallback]] = collections.deque()
        self._generations = itertools.count(1)
        self._jobs = itertools.count(1)
        self._failed_starts = 0
        self._killed: set[int] = set()  # generations killed on purpose
        self._stopping = False
        self._gone = asyncio.Event()

    def free(self, running: int) -> int:
        """Children ready and idle: never more work than the pool can start now."""
        return len(self._idle) - len(self._backlog)

    # lifecycle

    async def start(self) -> None:
        """Fork the zygote, then ask it for the children."""
        self._loop = asyncio.get_running_loop()
        self._warn_inherited()
        self._zygote_pid, self._control = _children.start_zygote(self.app, self._options)
        self._control.setblocking(False)
        self._loop.add_reader(self._control, self._on_control)
        for _ in range(self.concurrency):
            self._spawn()

    def _warn_inherited(self) -> None:
        """Say so when the user's code holds connections the children would inherit."""
        ours = set(self.app.broker.endpoints)
        if self.app.results is not None:
            ours |= self.app.results.endpoints
        found = _children.inherited_connections(ours)
        if found:
            log.warning(
                "%d connection%s opened before the worker forked its children (%s): every "
                "child gets a copy of the same socket, which it must not use (its messages "
                "would go nowhere, or garble the parent's). Open connections in the process "
                "that uses them: declare them with @app.resource, which creates one per process "
                "after the fork",
                len(found),
                "" if len(found) == 1 else "s",
                "; ".join(found),
            )

    async def stop(self) -> None:
        """Let idle children exit, kill busy ones (their jobs were abandoned), stop the zygote."""
        self._stopping = True
        for child in list(self._children):
            if child.state is State.BUSY or child.state is State.STARTING:
                self._kill(child)
            else:
                self._close_tasks(child)
        if self._children:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await self._gone.wait()
        for child in list(self._children):  # did not exit in time
            self._kill(child)
            self._forget(child)
        if self._control is not None:
            assert self._loop is not None
            self._loop.remove_reader(self._control)
            self._control.close()
            self._control = None
        if self._zygote_pid:
            await asyncio.to_thread(_wait_for, self._zygote_pid)
            self._zygote_pid = 0

    # dispatch

    def submit(self, job: Job, done: DoneCallback) -> None:
        """Write a job to an idle child (the consumer never submits more than `free`)."""
        if not self._idle:
            self._backlog.append((job, done))
            return
        self._give(self._idle.pop(), job, done)

    def _ready(self, child: _Child) -> None:
        """A child is free: give it a job that waits for one, or mark it idle."""
        if self._backlog:
            self._give(child, *self._backlog.popleft())
            return
        child.state = State.IDLE
        self._idle.append(child)
        if self.on_ready is not None:
            self.on_ready()

    def _give(self, child: _Child, job: Job, done: DoneCallback) -> None:
        job_id = next(self._jobs)
        child.state = State.BUSY
        child.job = (job_id, job, done)
        delivery = job.delivery
        run = Run(job_id, delivery.queue, delivery.body, delivery.delivery_count)
        limit = job.task.options.time_limit
        if limit is not None:
            assert self._loop is not None
            child.timer = self._loop.call_later(limit, self._overrun, child, job_id)
        self._send(child, _children.frame(run))

    def _send(self, child: _Child, data: bytes) -> None:
        if child.outbox:
            child.outbox += data
            return
        try:
            written = os.write(child.tasks, data)
        except BlockingIOError:
            written = 0
        except OSError:
            return  # it died (or is being dropped): its outcome pipe's end says so
        if written < len(data):
            child.outbox += data[written:]
            assert self._loop is not None
            self._loop.add_writer(child.tasks, self._flush, child)

    def _flush(self, child: _Child) -> None:
        assert self._loop is not None
        try:
            written = os.write(child.tasks, child.outbox)
        except BlockingIOError:
            return
        except OSError:
            written = len(child.outbox)
        del child.outbox[:written]
        if not child.outbox:
            self._loop.remove_writer(child.tasks)

    # children

    def _spawn(self) -> None:
        assert self._loop is not None and self._control is not None
        task_r, task_w = os.pipe2(os.O_CLOEXEC)
        result_r, result_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(task_w, False)
        os.set_blocking(result_r, False)
        child = _Child(next(self._generations), task_w, result_r)
        try:
            _children.spawn(self._control, child.generation, [task_r, result_w])
        finally:
            os.close(task_r)
            os.close(result_w)
        self._children.add(child)
        self._gone.clear()
        self._loop.add_reader(result_r, self._on_results, child)
        child.timer = self._loop.call_later(self.start_timeout, self._late, child)

    def _on_results(self, child: _Child) -> None:
        try:
            data = os.read(child.results, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._ended(child)
            return
        for message in child.frames.feed(data):
            if isinstance(message, Done):
                self._finished(child, message)
            elif isinstance(message, Up):
                self._up(child, message.pid)

    def _up(self, child: _Child, pid: int) -> None:
        child.pid = pid
        if child.state is not State.STARTING:
            return
        self._cancel_timer(child)
        self._failed_starts = 0
        if self._stopping and not self._backlog:
            self._close_tasks(child)
            return
        self._ready(child)

    def _finished(self, child: _Child, message: Done) -> None:
        if child.job is None or child.job[0] != message.job:
            return
        _, job, done = child.job
        child.job = None
        self._cancel_timer(child)
        if message.retire is not None:
            log.debug(
                "child %d (pid %d) %s: replacing it", child.generation, child.pid, message.retire
            )
            child.state = State.RETIRING
            self._close_tasks(child)
            if not self._stopping:
                self._spawn()
        elif self._stopping and not self._backlog:
            child.state = State.RETIRING
            self._close_tasks(child)
        else:
            self._ready(child)
        done(job, message.outcome())

    def _ended(self, child: _Child) -> None:
        """The child's outcome pipe reached its end: the child exited or died."""
        state, job = child.state, child.job
        self._forget(child)
        if state is State.STARTING and not self._stopping:
            self._failed_starts += 1
        if job is not None:
            _, lost, done = job
            done(lost, self._lost(child, lost))
        if not self._stopping and state is not State.RETIRING:
            self._respawn()

    def _respawn(self) -> None:
        """Replace a child that ended; back off while children keep failing to start."""
        assert self._loop is not None
        if self._failed_starts == 0:
            self._spawn()
            return
        delay = min(RESTART_BACKOFF_MAX_S, 0.1 * 2 ** (self._failed_starts - 1))
        self._loop.call_later(delay, lambda: None if self._stopping else self._spawn())

    def _lost(self, child: _Child, job: Job) -> Outcome:
        if child.overran:
            limit = job.task.options.time_limit
            error = TimeLimitExceeded(
                f"task {job.task.name} ran past its {limit}s limit: its process was killed"
            )
            outcome = Outcome.failure(error, with_traceback=False)
            if isinstance(error, job.task.autoretry_for):
                outcome.kind = Kind.RETRY
            return outcome
        return Outcome(
            Kind.LOST,
            None,
            "WorkerLost",
            f"the process running it (pid {child.pid}) died",
            "",
            finished_at=time.time(),
        )

    def _late(self, child: _Child) -> None:
        child.timer = None
        if child.state is State.STARTING:
            log.warning(
                "child %d did not report WORKER_UP within %gs: replacing it",
                child.generation,
                self.start_timeout,
            )
            self._kill(child)

    def _overrun(self, child: _Child, job_id: int) -> None:
        child.timer = None
        if child.job is not None and child.job[0] == job_id:
            child.overran = True
            self._kill(child)

    def _kill(self, child: _Child) -> None:
        if self._control is not None and child.state is not State.GONE:
            self._killed.add(child.generation)
            with contextlib.suppress(OSError):
                _children.kill(self._control, child.generation)

    def _close_tasks(self, child: _Child) -> None:
        """Close the child's task pipe: it exits when it has read everything."""
        if child.tasks >= 0:
            assert self._loop is not None
            if child.outbox:
                self._loop.remove_writer(child.tasks)
                child.outbox.clear()
            os.close(child.tasks)
            child.tasks = -1

    def _forget(self, child: _Child) -> None:
        """Drop a child: its pipes leave the event loop first, then they are closed."""
        assert self._loop is not None
        self._cancel_timer(child)
        if child in self._idle:
            self._idle.remove(child)
        self._loop.remove_reader(child.results)
        os.close(child.results)
        self._close_tasks(child)
        child.state = State.GONE
        child.job = None
        self._children.discard(child)
        if not self._children:
            self._gone.set()

    def _cancel_timer(self, child: _Child) -> None:
        if child.timer is not None:
            child.timer.cancel()
            child.timer = None

    def _on_control(self) -> None:
        assert self._control is not None
        while True:
            try:
                packet = self._control.recv(64)
            except BlockingIOError:
                return
            except OSError:
                packet = b""
            if not packet:
                assert self._loop is not None
                self._loop.remove_reader(self._control)
                if not self._stopping:
                    log.error("the prefork zygote exited: no new children can start")
                return
            report = _children.read_exit(packet)
            if report is not None:
                self._log_exit(*report)

    def _log_exit(self, generation: int, pid: int, status: int) -> None:
        if generation in self._killed:
            self._killed.discard(generation)
            return
        if os.WIFSIGNALED(status):
            number = os.WTERMSIG(status)
            name = signal.Signals(number).name if number in signal.valid_signals() else number
            log.warning("child %d (pid %d) was killed by %s", generation, pid, name)
        elif os.WEXITSTATUS(status) != 0:
            code = os.WEXITSTATUS(status)
            log.warning("child %d (pid %d) exited with status %d", generation, pid, code)


def _wait_for(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
