"""The prefork pool: tasks run in child processes, fed through pipes by the worker's event loop.

The worker process keeps the broker connection and every acknowledgement; children never touch
the broker. Each child has its own pair of non-blocking pipes, tasks in and outcomes out, watched
by the worker's event loop, and runs one task at a time. Work is written only to a child that
reported WORKER_UP and is idle, so no task waits behind a busy child, and the consumer fetches
no more than the pool can start.

Short tasks are the exception that pays. A child that finishes a task and has nothing queued
waits for its next one: its ack goes out (the consumer holds acks up to a millisecond to send
them together), the broker pushes a replacement, the worker passes it down the pipe. For a task
that runs about as long as that trip, the child would stand idle a large share of its time.
So the pool keeps a time budget, `ROUND_TRIPS` times what that replacement takes (the consumer
measures it: `observe_round_trip`), and never less than `MIN_BUDGET_S` nor more than
`MAX_BUDGET_S`. A task is short when every recent run of it in the children took no longer
than the budget. A child running short tasks may hold a few more of them behind its running
task: up to 1 + budget / (the slowest recent run time of any task), the jobs in the child in
all rounded down to a power of two and at most `MAX_DEPTH`. The queued work then covers the
trip at least twice, so the child's next task is at hand when it finishes, and it is never
more than the budget and one task. A task not known to be short (new, or slow lately) only
ever goes to an idle child and nothing queues behind it, nor in the worker for its child (the
broker's prefetch, `capacity`, counts only what that child holds), and no more queues behind a
task once it has run past the budget: a slow task never holds messages that another child or
worker could run now. Frames written in one loop turn go down each pipe in one write, so a
stream of tiny tasks costs a system call per batch, not per task.

Children are forked by a zygote (see `_children`), so none inherits a broker socket. A zygote
that dies is replaced by one in a fresh interpreter: its children become orphans that finish
the work they were given, killed when needed through a pidfd opened while they were known to
be alive, and new children take their places once the new zygote is up. Only failing to start
one `ZYGOTE_ATTEMPTS` times in a row, with backoff, breaks the pool. A child
that does not report WORKER_UP within `start_timeout` is killed and replaced (nothing was sent
to it). `max_tasks` and `max_memory` make a child hand over to a fresh one after its current
task. A task past its hard time limit has its child killed and replaced; the task fails (or
retries, per its options). A child that dies otherwise (a crash, `os._exit`, the OOM killer)
loses its task: the outcome says so and the consumer gives the message back, counted, so the
poison limit ends a task that keeps killing children.

A revocation (`Pool.revoke`) of a job the pool holds takes effect at the last moment before it
would run. A job still waiting in the pool is ended at once. A job written to a child is named
in a `Revoke` frame down its pipe, and a counter in memory shared with every child (a memfd,
mapped before the zygote forks) is bumped once that frame is written whole: the child compares
the counter before each task, a memory read, and only when it moved reads what waits in its
pipe without blocking, so the job is reported as revoked instead of run. With `terminate`, the
child running the job is killed and replaced (not counted as a lost run: never poison).

All bookkeeping hangs off `_Child` objects with a generation number, never off descriptor
numbers, and a pipe leaves the event loop before it is closed, so a number the kernel hands out
again can never be mistaken for an old child's.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import itertools
import logging
import math
import mmap
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from conveyor.app import import_path_of
from conveyor.brokers.base import own_endpoints
from conveyor.errors import TimeLimitExceeded
from conveyor.worker.execution import Job, Kind, Outcome
from conveyor.worker.pools import _children
from conveyor.worker.pools._children import ChildOptions, Done, Frames, Revoke, Run, Up
from conveyor.worker.pools.base import Done as DoneCallback
from conveyor.worker.pools.base import Pool

if TYPE_CHECKING:
    from conveyor.app import Conveyor

log = logging.getLogger("conveyor.worker")

START_TIMEOUT_S = 30.0
RESTART_BACKOFF_MAX_S = 10.0
#: Tries at starting a new zygote before the pool gives up (waits of 0.5, 1, 2, 4 s between).
ZYGOTE_ATTEMPTS = 5
ZYGOTE_BACKOFF_S = 0.5
#: The time budget is this many times what a finished job's replacement takes to arrive: the
#: work queued in a child then covers that wait at least twice, and a task counts as short when
#: waiting for its replacement would idle its child a fifth of the time or more.
ROUND_TRIPS = 4
#: The budget's floor, and what it is until the consumer measured a round trip (an embedded
#: broker's fetch is a call in the worker's own process: the floor is all it needs).
MIN_BUDGET_S = 0.002
#: The budget's ceiling, however far away the broker or busy the worker: a child holds at most
#: this much queued work, and one task more.
MAX_BUDGET_S = 0.02
#: A lower capacity is told to the broker once it held this long (see `_capacity_changed`).
SHRINK_AFTER_S = 0.02
#: The most jobs written to one child at once.
MAX_DEPTH = 32
#: Each run of a task counts fully; older runs fade by this factor per run of the same task.
RUNTIME_DECAY = 0.95
#: Each measured round trip moves the pool's estimate this share of the way.
ROUND_TRIP_WEIGHT = 0.25


class State(enum.Enum):
    """Where a child is in its life."""

    STARTING = "starting"
    READY = "ready"  # reported WORKER_UP: idle, or running the first of `jobs`
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
        # Jobs written to it by job number, in order: the first is running, the rest wait.
        self.jobs: dict[int, tuple[Job, DoneCallback]] = {}
        self.short: set[int] = set()  # those of `jobs` that were of tasks known to be short
        self.head_since = 0.0  # when the first of `jobs` started (monotonic)
        self.sent = 0  # jobs written to it in its life
        self.timer: asyncio.TimerHandle | None = None  # start-up timeout or hard time limit
        self.overran = False  # killed for running past its hard limit
        self.revoked = False  # killed to stop a revoked task (terminate)
        self.revokes_owed = False  # a Revoke frame is in `outbox`: bump the counter once out
        # Its zygote died: it finishes what it was given and exits; a pidfd kills it if need be.
        self.orphan = False
        self.pidfd = -1

    def __repr__(self) -> str:
        busy = f" {len(self.jobs)} jobs" if self.jobs else ""
        return f"<child {self.generation} pid={self.pid or '?'} {self.state.value}{busy}>"


class PreforkPool(Pool):
    """`concurrency` child processes, one task at a time each."""

    isolates_tasks = True
    name = "prefork"

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
        self.max_tasks = max_tasks
        self._options = ChildOptions(
            max_tasks=max_tasks,
            max_memory=max_memory,
            max_message_size=app.settings.max_message_size,
            before_up=before_up,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._zygote_pid = 0
        self._zygote_process: subprocess.Popen[bytes] | None = None  # a fresh interpreter's
        self._control: socket.socket | None = None  # None while no zygote can take requests
        self._owed = 0  # children asked for while there was no zygote to fork them
        self._restart: asyncio.Task[None] | None = None
        self._children: set[_Child] = set()
        self._ready_children: list[_Child] = []
        # Jobs submitted when no child could take them (one died between the consumer's count
        # and its submit, or the task is not known to be short and every child is busy): each
        # goes to the next child that can start it.
        self._backlog: collections.deque[tuple[Job, DoneCallback]] = collections.deque()
        self._generations = itertools.count(1)
        self._jobs = itertools.count(1)
        self._failed_starts = 0
        self._killed: set[int] = set()  # generations killed on purpose
        self._stopping = False
        self._gone = asyncio.Event()
        self._runtimes: dict[str, float] = {}  # task name -> recent run time, in the child
        self._pace = 0.0  # recent run time of any task (0: none ran yet)
        self._round_trip = 0.0  # what a replacement takes to arrive (0: not measured yet)
        self._budget = MIN_BUDGET_S
        self._depth = 1
        self._reported = concurrency
        self._shrink: asyncio.TimerHandle | None = None
        self._unflushed: set[_Child] = set()
        self._flushing = False
        self._clock = time.monotonic
        self._revocations: mmap.mmap | None = None  # the counter children check (see above)
        self._revoked: set[Job] = set()  # revoked jobs written to children, until they end

    @property
    def most(self) -> int:
        """The capacity at the greatest depth."""
        return self.concurrency * MAX_DEPTH

    @property
    def capacity(self) -> int:
        """What the broker may hold out to this worker: a depth's worth of jobs for each child
        that is idle or runs only short tasks, and what it holds for a child running a task not
        known to be short, which takes nothing more: the broker keeps the rest for workers that
        can start them now. Jobs already queued count whatever the depth (it drops when a task
        runs long), so an idle child never waits for them to drain before it gets work. Jobs
        waiting in the pool go to the next child that can start them: a child not up yet, each
        counted a depth, takes them first."""
        depth = self._depth
        total = max(len(self._backlog), depth * (self.concurrency - len(self._ready_children)))
        for child in self._ready_children:
            held = len(child.jobs)
            total += held if len(child.short) < held else max(held, depth)
        return min(self.most, total)

    def _capacity_changed(self) -> None:
        """Tell the consumer (and through it the broker's prefetch) when the capacity moved.

        A rise is told at once (an idle child may be waiting for it); a fall, which comes one
        job at a time as held jobs drain, is told once it has settled for `SHRINK_AFTER_S`:
        one prefetch change instead of one per finished job.
        """
        capacity = self.capacity
        if capacity > self._reported:
            self._report(capacity)
        elif capacity < self._reported and self._shrink is None and self._loop is not None:
            self._shrink = self._loop.call_later(SHRINK_AFTER_S, self._shrink_now)

    def _shrink_now(self) -> None:
        self._shrink = None
        capacity = self.capacity
        if capacity < self._reported:
            self._report(capacity)

    def _report(self, capacity: int) -> None:
        self._reported = capacity
        if self.on_capacity is not None:
            self.on_capacity()

    def free(self, running: int) -> int:
        """What the children can start now: never more work than that.

        An idle child can take `depth` jobs of short tasks; a child running short tasks takes
        more up to that depth while its current one is within the budget; any other takes none.
        """
        now = self._clock()
        return sum(self._room(child, now) for child in self._ready_children) - len(self._backlog)

    def _room(self, child: _Child, now: float) -> int:
        queued = len(child.jobs)
        if queued and (len(child.short) < queued or now - child.head_since > self._budget):
            return 0
        if queued > self._depth // 2 and child not in self._unflushed:
            return 0  # topped up once half its work is done: one write per half a batch
        room = self._depth - queued
        if self.max_tasks is not None:
            room = min(room, self.max_tasks - child.sent)
        return max(room, 0)

    def _is_short(self, job: Job) -> bool:
        return self._runtimes.get(job.task.name, math.inf) <= self._budget

    def _observe(self, job: Job, took: float) -> None:
        """Learn from a finished job's run time; the depth follows the slowest recent task."""
        name = job.task.name
        self._runtimes[name] = max(took, self._runtimes.get(name, took) * RUNTIME_DECAY)
        # Before any run, the pace is taken to be the budget: the depth grows over a few dozen
        # short runs, not at the first one.
        self._pace = max(took, (self._pace or self._budget) * RUNTIME_DECAY)
        self._resize()

    def observe_round_trip(self, seconds: float) -> None:
        """Learn what a finished job's replacement takes to arrive; the budget follows it."""
        if self._round_trip:
            seconds = self._round_trip + ROUND_TRIP_WEIGHT * (seconds - self._round_trip)
        self._round_trip = seconds
        self._budget = min(MAX_BUDGET_S, max(MIN_BUDGET_S, ROUND_TRIPS * seconds))
        self._resize()
        self._capacity_changed()

    def _resize(self) -> None:
        """Jobs per child: the running one and up to `1 + budget / pace` behind it, in all a
        power of two (changes are rare); only the running one while a task ran long lately."""
        if not 0 < self._pace <= self._budget:
            self._depth = 1
            return
        depth = min(MAX_DEPTH, 2 + int(self._budget / max(self._pace, 1e-6)))
        self._depth = 1 << (depth.bit_length() - 1)

    def placement(self) -> dict[Job, tuple[int, bool]]:
        """Each job written to a child: the child's pid, and whether it is the one it runs."""
        return {
            job: (child.pid, n == 0)
            for child in self._children
            for n, (job, _) in enumerate(child.jobs.values())
        }

    # lifecycle

    async def start(self) -> None:
        """Fork the zygote, then ask it for the children."""
        self._loop = asyncio.get_running_loop()
        self._warn_inherited()
        fd = os.memfd_create("conveyor-revocations", os.MFD_CLOEXEC)
        os.ftruncate(fd, mmap.PAGESIZE)
        self._revocations = mmap.mmap(fd, mmap.PAGESIZE)
        self._options = dataclasses.replace(self._options, revocations=fd)
        pid, control = _children.start_zygote(self.app, self._options)
        self._adopt(pid, control, None)
        for _ in range(self.concurrency):
            self._spawn()

    def _adopt(
        self, pid: int, control: socket.socket, process: subprocess.Popen[bytes] | None
    ) -> None:
        """Take a zygote that is ready to fork, and ask it for the children owed."""
        assert self._loop is not None
        self._zygote_pid, self._control, self._zygote_process = pid, control, process
        control.setblocking(False)
        self._loop.add_reader(control, self._on_control)
        owed, self._owed = self._owed, 0
        for _ in range(owed):
            self._spawn()

    def _warn_inherited(self) -> None:
        """Say so when the user's code holds connections the children would inherit."""
        found = _children.inherited_connections(own_endpoints())
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
        self._backlog.clear()
        self._owed = 0
        if self._shrink is not None:
            self._shrink.cancel()
            self._shrink = None
        if self._restart is not None:
            self._restart.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._restart
            self._restart = None
        for child in list(self._children):
            if child.jobs or child.state is State.STARTING:
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
            await asyncio.to_thread(_reap, self._zygote_pid, self._zygote_process)
            self._zygote_pid, self._zygote_process = 0, None
        if self._revocations is not None:
            self._revocations.close()
            self._revocations = None
            os.close(self._options.revocations)

    # dispatch

    def submit(self, job: Job, done: DoneCallback) -> None:
        """Write a job to a child that can start it (the consumer never submits more than
        `free`); one that none can take now waits here for the next that can."""
        short = self._is_short(job)
        child = self._pick(short)
        if child is None:
            self._backlog.append((job, done))
            return
        self._give(child, job, done)
        if not short:
            self._capacity_changed()  # that child takes no more for now

    def revoke(self, jobs: Sequence[tuple[Job, bool]]) -> None:
        """End the revoked jobs that wait here; tell the children that hold some not to start
        them; kill the children running those revoked with terminate."""
        wanted = dict(jobs)
        if any(job in wanted for job, _ in self._backlog):
            waiting = [entry for entry in self._backlog if entry[0] in wanted]
            self._backlog = collections.deque(e for e in self._backlog if e[0] not in wanted)
            for job, done in waiting:
                done(job, Outcome.revoked("skipped before it started"))
        for child in list(self._children):
            held = [number for number, (job, _) in child.jobs.items() if job in wanted]
            if not held:
                continue
            head, (job, _) = next(iter(child.jobs.items()))
            if head in held and wanted[job] and not child.revoked:
                env = job.envelope
                log.info(
                    "task %s[%s] revoked with terminate: killing child %d (pid %d) that runs it",
                    env.task,
                    env.id,
                    child.generation,
                    child.pid,
                )
                child.revoked = True
                self._kill(child)
                held.remove(head)
            # Should the child end before it reads the word, they must not go to another.
            self._revoked.update(child.jobs[number][0] for number in held)
            if held and child.tasks >= 0 and not child.revoked:
                child.outbox += _children.frame(Revoke(held))
                child.revokes_owed = True
                self._flush(child)
        self._capacity_changed()

    def _pick(self, short: bool) -> _Child | None:
        """An idle child, or for a short task the least loaded child with room for it."""
        best: _Child | None = None
        now = self._clock()
        for child in self._ready_children:
            if not child.jobs and (self.max_tasks is None or child.sent < self.max_tasks):
                return child
            fewer = best is None or len(child.jobs) < len(best.jobs)
            if short and fewer and self._room(child, now) > 0:
                best = child
        return best

    def _ready(self, child: _Child) -> None:
        """A child has room: give it jobs that wait for one, else tell the consumer."""
        now = self._clock()
        while self._backlog and self._room(child, now) > 0:
            job, done = self._backlog[0]
            if child.jobs and not self._is_short(job):
                break
            self._backlog.popleft()
            self._give(child, job, done)
        if self.on_ready is not None and self._room(child, now) > 0:
            self.on_ready()

    def _give(self, child: _Child, job: Job, done: DoneCallback) -> None:
        job_id = next(self._jobs)
        if not child.jobs:
            child.head_since = self._clock()
            self._arm(child, job_id, job)
        child.jobs[job_id] = (job, done)
        if self._is_short(job):
            child.short.add(job_id)
        child.sent += 1
        delivery = job.delivery
        run = Run(job_id, delivery.queue, delivery.body, delivery.delivery_count)
        child.outbox += _children.frame(run)
        if child not in self._unflushed:
            self._unflushed.add(child)
            if not self._flushing:
                self._flushing = True
                assert self._loop is not None
                self._loop.call_soon(self._flush_all)

    def _arm(self, child: _Child, job_id: int, job: Job) -> None:
        """Start the hard time limit of the job a child is starting now."""
        limit = job.task.options.time_limit
        if limit is not None:
            assert self._loop is not None
            child.timer = self._loop.call_later(limit, self._overrun, child, job_id)

    def flush(self) -> None:
        """Write what was given so far, in one write per child (the consumer calls this after
        starting what one loop turn brought, a turn before `_flush_all` would run)."""
        self._flush_all()

    def _flush_all(self) -> None:
        """Write what this loop turn gave each child, in one write per pipe."""
        self._flushing = False
        children, self._unflushed = self._unflushed, set()
        for child in children:
            if child.tasks >= 0 and child.outbox:
                self._flush(child)

    def _flush(self, child: _Child) -> None:
        assert self._loop is not None
        try:
            written = os.write(child.tasks, child.outbox)
        except BlockingIOError:
            written = 0
        except OSError:
            written = len(child.outbox)  # it died: its outcome pipe's end says so
        del child.outbox[:written]
        if child.outbox:
            self._loop.add_writer(child.tasks, self._drain, child)
        elif child.revokes_owed and self._revocations is not None:
            # The Revoke frame is in the pipe whole: now the child may look for it.
            child.revokes_owed = False
            counter = memoryview(self._revocations).cast("Q")
            counter[0] = counter[0] + 1
            counter.release()

    def _drain(self, child: _Child) -> None:
        """The pipe has room again: write what did not fit."""
        assert self._loop is not None
        self._loop.remove_writer(child.tasks)
        self._flush(child)

    # children

    def _spawn(self) -> None:
        assert self._loop is not None
        if self._control is None:  # a new zygote is on its way: it forks this child
            self._owed += 1
            return
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
        messages = child.frames.feed(data)
        last = len(messages) - 1
        for n, message in enumerate(messages):
            if isinstance(message, Done):
                # What one read brought is settled together: the child gets new work, and the
                # capacity is checked, once, after its last outcome.
                self._finished(child, message, n == last)
            elif isinstance(message, Up):
                self._up(child, message.pid)

    def _up(self, child: _Child, pid: int) -> None:
        child.pid = pid
        if child.state is not State.STARTING:
            return
        self._cancel_timer(child)
        if child.orphan:  # forked by a zygote that died since: it has a replacement
            child.state = State.RETIRING
            self._close_tasks(child)
            return
        self._failed_starts = 0
        if self._stopping and not self._backlog:
            self._close_tasks(child)
            return
        child.state = State.READY
        self._ready_children.append(child)
        self._ready(child)

    def _finished(self, child: _Child, message: Done, last: bool = True) -> None:
        entry = child.jobs.pop(message.job, None)
        if entry is None:
            return
        job, done = entry
        if self._revoked:
            self._revoked.discard(job)
        self._cancel_timer(child)
        if message.kind != "revoked":  # skipped unrun: says nothing of its run time
            self._observe(job, message.took)
        child.short.discard(message.job)
        if child.jobs:  # the next one starts now
            child.head_since = self._clock()
            head = next(iter(child.jobs))
            self._arm(child, head, child.jobs[head][0])
        if child.orphan:
            if message.retire is not None or not child.jobs:
                self._retire(child)  # its replacement was asked for when it became an orphan
        elif message.retire is not None:
            log.debug(
                "child %d (pid %d) %s: replacing it", child.generation, child.pid, message.retire
            )
            self._retire(child)
            if not self._stopping or self._backlog:
                self._spawn()
        elif self._stopping and not self._backlog and not child.jobs:
            self._retire(child)
        elif last:
            self._ready(child)
        if last:
            self._capacity_changed()
        done(job, message.outcome())

    def _retire(self, child: _Child) -> None:
        """No more work for this child: it exits once it has read its pipe to the end. Jobs it
        was given and will not start go to the next child that can take them."""
        child.state = State.RETIRING
        self._unready(child)
        self._cancel_timer(child)
        self._close_tasks(child)
        self._requeue_unstarted(child, skip=0)

    def _requeue_unstarted(self, child: _Child, skip: int) -> None:
        jobs = list(child.jobs.values())[skip:]
        for key in list(child.jobs)[skip:]:
            del child.jobs[key]
            child.short.discard(key)
        if self._revoked:
            revoked = [entry for entry in jobs if entry[0] in self._revoked]
            jobs = [entry for entry in jobs if entry[0] not in self._revoked]
            for job, done in revoked:
                self._revoked.discard(job)
                done(job, Outcome.revoked("skipped before it started"))
        self._backlog.extendleft(reversed(jobs))
        if jobs:
            for other in list(self._ready_children):
                self._ready(other)

    def _unready(self, child: _Child) -> None:
        if child in self._ready_children:
            self._ready_children.remove(child)

    def _ended(self, child: _Child) -> None:
        """The child's outcome pipe reached its end: the child exited or died."""
        state = child.state
        lost = next(iter(child.jobs.values()), None)
        self._unready(child)
        if lost is not None:
            self._requeue_unstarted(child, skip=1)  # never started: not lost, just not run yet
        self._forget(child)
        if state is State.STARTING and not self._stopping and not child.orphan:
            self._failed_starts += 1
        if lost is not None:
            job, done = lost
            self._revoked.discard(job)
            done(job, self._lost(child, job))
        replaced = state is State.RETIRING or child.orphan
        if (not self._stopping or self._backlog) and not replaced:
            self._respawn()

    def _respawn(self) -> None:
        """Replace a child that ended; back off while children keep failing to start."""
        assert self._loop is not None
        if self._failed_starts == 0:
            self._spawn()
            return
        delay = min(RESTART_BACKOFF_MAX_S, 0.1 * 2 ** (self._failed_starts - 1))
        self._loop.call_later(
            delay, lambda: None if self._stopping and not self._backlog else self._spawn()
        )

    def _lost(self, child: _Child, job: Job) -> Outcome:
        if child.revoked:
            outcome = Outcome.revoked(
                f"stopped while running: its process (pid {child.pid}) was killed (--terminate)"
            )
            outcome.took = max(self._clock() - child.head_since, 1e-9)
            return outcome
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
        if next(iter(child.jobs), None) == job_id:
            child.overran = True
            self._kill(child)

    def _kill(self, child: _Child) -> None:
        if child.state is State.GONE:
            return
        if child.orphan:
            if child.pidfd >= 0:
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(child.pidfd, signal.SIGKILL)
        elif self._control is not None:
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
            self._unflushed.discard(child)
            os.close(child.tasks)
            child.tasks = -1

    def _forget(self, child: _Child) -> None:
        """Drop a child: its pipes leave the event loop first, then they are closed."""
        assert self._loop is not None
        self._cancel_timer(child)
        self._unready(child)
        self._loop.remove_reader(child.results)
        os.close(child.results)
        self._close_tasks(child)
        if child.pidfd >= 0:
            os.close(child.pidfd)
            child.pidfd = -1
        child.state = State.GONE
        child.jobs = {}
        child.short.clear()
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
                    self._zygote_died()
                return
            report = _children.read_exit(packet)
            if report is not None:
                self._log_exit(*report)

    # the zygote's death and its replacement

    def _zygote_died(self) -> None:
        """Orphan the children (they finish their work), ask for their replacements, and start
        a new zygote to fork them."""
        assert self._loop is not None and self._control is not None
        pid, process = self._zygote_pid, self._zygote_process
        self._control.close()
        self._control, self._zygote_pid, self._zygote_process = None, 0, None
        orphans = [child for child in self._children if not child.orphan]
        for child in orphans:
            self._orphan(child)
        self._restart = self._loop.create_task(self._replace_zygote(pid, process, len(orphans)))

    def _orphan(self, child: _Child) -> None:
        child.orphan = True
        if child.pid:
            # Its pipe is open, so it is alive: the pidfd pins this process, not a later one
            # that gets the same number.
            with contextlib.suppress(OSError):
                child.pidfd = os.pidfd_open(child.pid)
        self._unready(child)
        if child.state is State.READY and not child.jobs:
            self._retire(child)
        self._spawn()  # its replacement, owed until the new zygote is up
        self._capacity_changed()

    async def _replace_zygote(
        self, pid: int, process: subprocess.Popen[bytes] | None, orphans: int
    ) -> None:
        how = await asyncio.to_thread(_reap, pid, process)
        path = import_path_of(self.app)
        if path is None:
            self._broken(
                f"the prefork zygote (pid {pid}) {how}, and app {self.app.name!r} cannot be "
                "imported by a new process to start another: start the worker with "
                "`conveyor worker module:attribute`, or define the app at module level"
            )
            return
        log.error(
            "the prefork zygote (pid %d) %s: starting a new one; its %d children finish the "
            "tasks they have and are replaced",
            pid,
            how,
            orphans,
        )
        reason = ""
        for attempt in range(1, ZYGOTE_ATTEMPTS + 1):
            if attempt > 1:
                await asyncio.sleep(ZYGOTE_BACKOFF_S * 2 ** (attempt - 2))
            began = time.monotonic()
            try:
                process, control = await self._start_fresh_zygote(path)
            except _ZygoteStartError as exc:
                reason = str(exc)
                log.error(
                    "could not start a new prefork zygote (attempt %d of %d): %s",
                    attempt,
                    ZYGOTE_ATTEMPTS,
                    reason,
                )
                continue
            log.info(
                "new prefork zygote (pid %d) ready in %.2fs: starting %d children",
                process.pid,
                time.monotonic() - began,
                self._owed,
            )
            self._adopt(process.pid, control, process)
            return
        self._broken(
            f"could not start a new prefork zygote in {ZYGOTE_ATTEMPTS} attempts: {reason}"
        )

    async def _start_fresh_zygote(self, path: str) -> tuple[subprocess.Popen[bytes], socket.socket]:
        """A zygote in a new interpreter, once it reported ready; `_ZygoteStartError` if not."""
        assert self._loop is not None
        process, control = _children.start_fresh_zygote(path, self._options)
        control.setblocking(False)
        reason = None
        try:
            async with asyncio.timeout(self.start_timeout):
                packet = await self._loop.sock_recv(control, 4096)
        except TimeoutError:
            reason = f"it did not import the app within {self.start_timeout:g}s"
            packet = b""
        except OSError:
            packet = b""
        except BaseException:  # cancelled by a shutdown: leave nothing behind
            control.close()
            process.kill()
            await asyncio.to_thread(process.wait)
            raise
        if packet == b"R":
            return process, control
        control.close()
        if packet[:1] == b"E":
            reason = packet[1:].decode(errors="replace")
        process.kill()
        how = await asyncio.to_thread(_reap, process.pid, process)
        raise _ZygoteStartError(reason or f"it {how} before it was ready")

    def _broken(self, reason: str) -> None:
        if self.on_broken is not None:
            self.on_broken(reason)

    def _log_exit(self, generation: int, pid: int, status: int) -> None:
        if generation in self._killed:
            self._killed.discard(generation)
            return
        if os.WIFSIGNALED(status):
            name = _signal_name(os.WTERMSIG(status))
            log.warning("child %d (pid %d) was killed by %s", generation, pid, name)
        elif os.WEXITSTATUS(status) != 0:
            code = os.WEXITSTATUS(status)
            log.warning("child %d (pid %d) exited with status %d", generation, pid, code)


def _reap(pid: int, process: subprocess.Popen[bytes] | None) -> str:
    """Wait for a zygote to end; how it ended, in words."""
    if process is not None:
        code = process.wait()
        return f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with status {code}"
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return "ended"
    if os.WIFSIGNALED(status):
        return f"was killed by {_signal_name(os.WTERMSIG(status))}"
    return f"exited with status {os.WEXITSTATUS(status)}"


def _signal_name(number: int) -> str:
    return signal.Signals(number).name if number in signal.valid_signals() else str(number)


class _ZygoteStartError(Exception):
    """A fresh zygote did not come up; the message says why."""
