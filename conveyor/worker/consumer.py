"""The consumer: fetch deliveries, hand them to the pool, and settle what comes back.

This is the I/O loop. What a delivery or an outcome means is decided without I/O elsewhere:
admission (`conveyor.worker.admission`) says whether a delivery starts, settlement
(`conveyor.worker.settlement`) what a job's outcome does to its message; the consumer carries
out their verdicts.

Everything here runs on the worker's event loop. Calls to a remote broker and its result store
run on one I/O thread; an embedded broker's (SQLite, memory) are made on the loop itself, as they
take microseconds. Each I/O round first settles what finished (results stored, retries published,
then acks and dead letters: a message is only removed once its outcome is safe) and then fetches
no more messages than the pool has free slots.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from msgspec import UNSET

from conveyor.app import Conveyor
from conveyor.brokers import Delivery
from conveyor.control.events import TaskEvents
from conveyor.errors import ConfigurationError
from conveyor.middleware.base import Settled
from conveyor.middleware.hooks import admit as admit_hooks
from conveyor.middleware.hooks import call
from conveyor.revocations import Revocation
from conveyor.revocations.watch import KnownRevocations
from conveyor.worker.admission import AdmissionPolicy
from conveyor.worker.execution import Job, Outcome, request_for
from conveyor.worker.pools.base import Pool
from conveyor.worker.rounds import settle_and_fetch, settle_and_fetch_async
from conveyor.worker.settlement import UNSTARTED, Records, SettlementPolicy
from conveyor.worker.tasklog import TaskLog
from conveyor.worker.verdict import Settlements, Verdict, WorkerStats
from conveyor.workflows.plan import Continuations

log = logging.getLogger("conveyor.worker")

T = TypeVar("T")
MIN_POLL_S = 0.001
MAX_POLL_S = 0.05
# STARTED records alone wait this long for company before a round of their own writes them.
LAZY_FLUSH_S = 0.05
RETRY_BASE_S = 0.25
RETRY_MAX_S = 30.0
LOOP_TURN_S = 0.005
# Acks of tasks finished while others run wait this long to go out together.
ACK_DELAY_S = 0.001
# STARTED records of tasks just handed to the pool wait this long for their round: a round at
# once (a result-store write through the I/O thread) competes with the tasks' start for the CPU.
STARTED_DELAY_S = 0.002
DRAIN_CONFIRM_S = 0.1
DRAIN_CHECK_POLL_S = 0.008
# How often, while tasks run, the broker's round trip is timed for the pool.
ROUND_TRIP_PROBE_S = 1.0


class Consumer:
    """Moves messages from a broker through a pool until told to stop (or drained)."""

    def __init__(
        self,
        app: Conveyor,
        pool: Pool,
        queues: Sequence[str],
        stats: WorkerStats,
        *,
        until_empty: bool = False,
        task_log: TaskLog | None = None,
    ) -> None:
        self.app = app
        self.pool = pool
        pool.on_ready = self._on_ready
        self.queues = list(queues)
        self.stats = stats
        self.until_empty = until_empty
        self.task_log = task_log or TaskLog()
        self.broker = app.broker
        self.store = app.results
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        #: Task events, reported only while `events.on` (see `conveyor.control`).
        self.events = TaskEvents(self.worker_id)
        self._settings = app.settings
        records = Records(
            app.tasks, self.store is not None, self.worker_id, app.settings.result_expires
        )
        #: The revoked task ids this worker skips (`revoke` adds to them).
        self.revoked = KnownRevocations()
        self._admission = AdmissionPolicy.of(
            app, records, isolates_tasks=pool.isolates_tasks, revoked=self.revoked.ids
        )
        self._settlement = SettlementPolicy.of(app, records)
        self._before_admit = app.hooks.before_admit
        self._after_settle = app.hooks.after_settle
        self._io = ThreadPoolExecutor(1, thread_name_prefix="conveyor-io")
        self._pending = Settlements()
        self._follow = Continuations(app)
        self._refused = self.broker.refused
        self._running: set[Job] = set()
        self._abandoned: set[Job] = set()
        self._woken = False
        self._waiter: asyncio.Future[None] | None = None
        self._stopping = False
        # Guards the consumer's state: pool threads settle their own jobs (and, on a local
        # broker, run the next round) while the loop polls, renews leases and shuts down.
        self._lock = threading.RLock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._native = False
        self._started_on_arrival = 0
        #: Called with the reason when the broker refuses the configuration (a queue declared
        #: with other arguments): no retry can mend that, so the worker stops.
        self.on_fatal: Callable[[str], None] | None = None
        self._taking = False
        self._acking = False
        self._recording = False
        self._direct = pool.threaded and self.broker.local

    # lifecycle

    async def run(self) -> None:
        """Consume until `stop()` and every running job is settled, or until drained."""
        self._loop, self._loop_thread = asyncio.get_running_loop(), threading.get_ident()
        # A broker that can run on this loop (RabbitMQ) does: no thread hand-off per round.
        native = not self.broker.local and self.pool.loop_free
        self._native = native and self.broker.attach(self._loop)
        self.broker.on_arrival(self._pushed)
        self.pool.on_capacity = self._reserve
        self._reserve()
        renewer = asyncio.create_task(self._renew_leases())
        reporter = asyncio.create_task(self._report())
        prober = asyncio.create_task(self._time_round_trips())
        try:
            await self._consume()
        finally:
            renewer.cancel()
            reporter.cancel()
            prober.cancel()
            with self._lock:
                self.task_log.flush()
            if self._native:
                await self.broker.detach()
            self._io.shutdown(wait=True)
            self._count_refused()

    def _reserve(self) -> None:
        """Tell the broker how much the pool can take on now (its prefetch)."""
        self.broker.reserve(self.pool.capacity, most=self.pool.most)

    async def _consume(self) -> None:
        """The rounds: settle, fetch, start; wait when there is nothing to do."""
        poll = MIN_POLL_S
        next_turn = 0.0
        failures = 0
        empty_since = math.inf
        while True:
            with self._lock:
                free = self._free()
                idle = free <= 0 and not self._pending.urgent
                if idle and self._stopping and not self._running and not self._pending:
                    return
            if idle:
                woken = await self._wait(LAZY_FLUSH_S if self._pending else None)
                if woken or not self._pending:
                    continue
            flowing = False
            if self.broker.local:
                dispatched = self._cycle(free)
            else:
                dispatched = await self._dispatch(await self._round(free))
                # Work flowing through `_take_arrivals` needs no rounds: the queue is not
                # quiet (no drain check), and nothing is polled for until it stops.
                flowing, self._started_on_arrival = self._started_on_arrival > 0, 0
            if failures and dispatched >= 0:
                log.warning("the broker answers again after %d failed rounds", failures)
                failures = 0
            if dispatched > 0:
                poll = MIN_POLL_S
                empty_since = math.inf
                if time.monotonic() >= next_turn:
                    # A local broker's calls never suspend: give signals and timers a turn,
                    # every few milliseconds rather than every round (a turn costs a poll).
                    await asyncio.sleep(0)
                    next_turn = time.monotonic() + LOOP_TURN_S
            elif dispatched < 0:
                failures += 1
                # Exponential backoff with full jitter: workers that lost the broker together
                # do not all come back at the same instant.
                delay = random.uniform(0, min(RETRY_MAX_S, RETRY_BASE_S * 2**failures))
                log.error("retrying the broker in %.1fs (failure %d in a row)", delay, failures)
                await asyncio.sleep(delay)
                continue
            elif flowing:
                empty_since = math.inf
                await self._wait(MAX_POLL_S)
            elif free > 0:
                # Only once fetches kept coming back empty: asking a broker for its queue
                # depths can cost milliseconds (RabbitMQ: a round trip per queue).
                settled = poll >= DRAIN_CHECK_POLL_S and not self._running
                if self.until_empty and settled and await self._drained():
                    # A remote broker's counts can miss messages in transit (RabbitMQ moving
                    # one out of a delay queue): "empty" must hold twice, a moment apart.
                    now = time.monotonic()
                    if self.broker.local or now - empty_since >= DRAIN_CONFIRM_S:
                        return
                    empty_since = min(empty_since, now)
                await self._wait(poll)
                poll = min(poll * 2, MAX_POLL_S)

    def stop(self) -> None:
        """Warm shutdown: fetch nothing more; `run` returns once running jobs are settled."""
        with self._lock:
            self._stopping = True
        self._wake()

    def abandon(self) -> None:
        """Give every running job's message back now (cold shutdown, or the grace ran out)."""
        with self._lock:
            self._stopping = True
            # acks_late=False messages were acknowledged before they ran: nothing to give back.
            running, self._running = self._running, set()
            self._abandoned |= running
            for job in running:
                self._apply(job.delivery, self._settlement.abandoned(job), job)
        self._wake()

    @property
    def running(self) -> int:
        """Jobs running now."""
        return len(self._running)

    def in_flight(self) -> dict[str, int]:
        """Jobs running or waiting in the pool, by task name; from any thread."""
        with self._lock:
            jobs = list(self._running)
        counts: dict[str, int] = {}
        for job in jobs:
            name = job.task.name
            counts[name] = counts.get(name, 0) + 1
        return counts

    def jobs(self) -> list[Job]:
        """The jobs submitted to the pool and not yet settled, from any thread."""
        with self._lock:
            return list(self._running)

    # I/O

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self.broker.local:
            # An embedded broker's calls take tens of microseconds; a thread hand-off would
            # cost as much again and split rounds (measured: 3.6k against 2.5k no-op tasks/s).
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    def _free(self) -> int:
        return 0 if self._stopping else self.pool.free(len(self._running))

    def _cycle(self, free: int) -> int:
        """A whole round on a local broker, in the calling thread: settle, fetch, start jobs.

        Returns how many deliveries were fetched, or -1 if the broker failed (the settlements
        are kept for the next round).
        """
        with self._lock:
            batch, self._pending = self._pending, Settlements()
            try:
                deliveries, stale = settle_and_fetch(
                    self.broker, self.store, self.queues, batch, free, self._follow
                )
            except Exception as exc:
                self._failed(exc)
                self._pending = batch.merge(self._pending)
                return -1
            self._count_stale(stale)
            jobs, early = self._admit_all(deliveries)
            if early:
                try:
                    self.broker.ack(early)
                except Exception as exc:
                    self._start(self._without_early(jobs, exc))
                    return -1
            self._start(jobs)
            return len(deliveries)

    async def _round(self, free: int) -> list[Delivery] | None:
        """One trip to the I/O thread: settle, then fetch. None if the broker failed.

        The I/O thread gets the pending settlements as its own object, so outcomes arriving
        meanwhile go into a fresh one; if the round fails, the batch is put back whole (its
        transaction, where the broker has one, was rolled back).
        """
        with self._lock:
            batch, self._pending = self._pending, Settlements()
        broker, store, queues, follow = self.broker, self.store, self.queues, self._follow
        try:
            if self._native:
                fetched = await settle_and_fetch_async(
                    broker, store, queues, batch, free, self._io, follow
                )
            else:
                fetched = await self._call(
                    settle_and_fetch, broker, store, queues, batch, free, follow
                )
        except Exception as exc:
            self._failed(exc)
            with self._lock:
                self._pending = batch.merge(self._pending)
            return None
        deliveries, stale = fetched
        self._count_stale(stale)
        return deliveries

    def _failed(self, exc: Exception) -> None:
        """A round failed: the next one retries, unless the broker refused the configuration."""
        if isinstance(exc, ConfigurationError) and self.on_fatal is not None:
            self.on_fatal(str(exc))
        else:
            log.error("broker or result store failed: %s", exc)

    def _count_stale(self, lost: int) -> None:
        if lost:
            self.stats.stale += lost
            log.warning(
                "%d tasks finished after their delivery had ended (lease expired or channel "
                "closed): they will run again",
                lost,
            )

    async def _drained(self) -> bool:
        try:
            if self._native:
                stats = await self.broker.stats_async(self.queues)
            else:
                stats = await self._call(self.broker.stats, self.queues)
        except Exception as exc:
            log.error("could not read queue depths: %s", exc)
            return False
        with self._lock:
            idle = not self._pending and not self._running
        return idle and all(s.ready + s.delayed + s.in_flight == 0 for s in stats)

    def _wake(self) -> None:
        """Wake the loop; from another thread, by scheduling this on the loop."""
        if threading.get_ident() != self._loop_thread:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._wake)
            return
        self._woken = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, timeout: float | None) -> bool:
        """Sleep until woken or `timeout`; True if woken. Cheaper than an Event per wait."""
        if not self._woken:
            loop = asyncio.get_running_loop()
            self._waiter = waiter = loop.create_future()
            timer = None if timeout is None else loop.call_later(timeout, _resolve, waiter)
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
        woken, self._woken = self._woken, False
        return woken

    async def _renew_leases(self) -> None:
        """Keep leases of long-running jobs from expiring while they run."""
        timeout = self._settings.visibility_timeout
        while True:
            await asyncio.sleep(timeout / 3)
            with self._lock:
                running = [job.delivery for job in self._running]
            if running:
                try:
                    await self._call(self.broker.extend, running, timeout)
                except Exception as exc:
                    log.error("could not renew %d leases: %s", len(running), exc)

    async def _report(self) -> None:
        """Let the task log put out a summary that is due even when no task finishes."""
        while True:
            await asyncio.sleep(1.0)
            with self._lock:
                self.task_log.tick()

    async def _time_round_trips(self) -> None:
        """Tell the pool what a finished task's replacement takes to arrive: its ack waits up to
        `ACK_DELAY_S` for company, then the broker is a round trip away (timed every
        `ROUND_TRIP_PROBE_S` while tasks run, and as soon as it can be at the start)."""
        if not self._native:
            return  # an embedded broker's fetch is a call in this process: nothing to time
        measured = False
        while True:
            await asyncio.sleep(ROUND_TRIP_PROBE_S if measured else MIN_POLL_S * 10)
            if measured and not self._running:
                continue
            try:
                seconds = await self.broker.round_trip_async()
            except Exception as exc:  # the rounds report a broker that fails
                log.debug("could not time the broker's round trip: %s", exc)
                continue
            if seconds is not None:
                with self._lock:
                    self.pool.observe_round_trip(ACK_DELAY_S + seconds)
                measured = True

    # dispatch

    async def _dispatch(self, deliveries: list[Delivery] | None) -> int:
        """Admit and start what a remote broker's round fetched; the count, -1 on failure."""
        if deliveries is None:
            return -1
        with self._lock:
            jobs, early = self._admit_all(deliveries)
        if early:
            try:
                if self._native:
                    await self.broker.ack_async(early)
                else:
                    await self._call(self.broker.ack, early)
            except Exception as exc:
                with self._lock:
                    self._start(self._without_early(jobs, exc))
                return -1
        with self._lock:
            self._start(jobs)
        return len(deliveries)

    def _admit_all(self, deliveries: list[Delivery]) -> tuple[list[Job], list[Delivery]]:
        """Jobs to start, and the deliveries to ack before starting them (acks_late=False: at
        most once, so the ack must be stored before the task runs). Deliveries that may not
        start are settled as admission says."""
        self._count_refused()
        self.stats.received += len(deliveries)
        now = time.time()
        admit, started, store = self._admission.admit, self._admission.started, self.store
        before_admit = self._before_admit
        events = self.events
        jobs: list[Job] = []
        claiming: list[Job] = []
        for delivery in deliveries:
            admitted = admit(delivery, now)
            if events.on:
                events.received(delivery, admitted, now)
            envelope = admitted.envelope
            if delivery.reply_to is not None and store is not None and envelope is not None:
                store.route(envelope.id, delivery.reply_to)  # the sender takes its records
            if not isinstance(admitted, Job):
                self._apply(delivery, admitted)
                continue
            if before_admit:
                skip = admit_hooks(before_admit, admitted.task, request_for(admitted))
                if skip is not None:
                    verdict = self._admission.skipped(admitted, skip)
                    self._apply(
                        delivery, verdict, admitted, Outcome.failure(skip, with_traceback=False)
                    )
                    continue
            if admitted.envelope.workflow is not UNSET:
                claiming.append(admitted)  # claimed below, all in one round trip
                continue
            jobs.append(admitted)
        if claiming:
            jobs += self._claimed(claiming)
        for job in jobs:
            if events.on:
                events.started(job)
            if store is not None and (record := started(job)) is not None:
                self._pending.records[record.id] = record
        return jobs, [job.delivery for job in jobs if not job.task.options.acks_late]

    def _claimed(self, jobs: list[Job]) -> list[Job]:
        """The workflow jobs whose copy holds its run claim. Another copy (sent again by a
        redelivered workflow task) is acknowledged unrun; without an answer from the store, the
        messages come back later."""
        expires_at = time.time() + self._settings.result_expires
        try:
            claimed = self._follow.claim([job.envelope for job in jobs], expires_at)
        except Exception as exc:
            log.error("could not claim the runs of %d workflow tasks: %s", len(jobs), exc)
            for job in jobs:
                self._apply(job.delivery, Verdict(delay=1.0))
            return []
        running = []
        for job, ours in zip(jobs, claimed, strict=True):
            if ours:
                running.append(job)
                continue
            env = job.envelope
            verdict = Verdict(
                ("skipped",),
                ack=True,
                log=(
                    logging.INFO,
                    "task %s[%s] not run: another copy of it holds the run (sent again by a "
                    "redelivered workflow task)",
                    (env.task, env.id),
                ),
                envelope=env,
            )
            self._apply(job.delivery, verdict)
        return running

    def _count_refused(self) -> None:
        """Count what the broker dead-lettered on arrival as received and rejected here."""
        refused = self.broker.refused
        new, self._refused = refused - self._refused, refused
        if new > 0:
            self.stats.received += new
            self.stats.rejected += new
            self.stats.dead_lettered += new

    def revoke(self, revocations: Sequence[Revocation]) -> None:
        """Skip these task ids from now on, and tell the pool about the jobs it holds of them
        (queued, or running: see `Pool.revoke`). Called on the worker's event loop."""
        with self._lock:
            live = self.revoked.add(revocations)
            held = [(job, live[j]) for job in self._running if (j := job.envelope.id) in live]
            if held:
                self.pool.revoke(held)

    def _without_early(self, jobs: list[Job], exc: Exception) -> list[Job]:
        """The acks_late=False jobs whose ack failed are not started: they come back later."""
        late = [job for job in jobs if job.task.options.acks_late]
        log.error(
            "could not acknowledge %d tasks before running them: %s", len(jobs) - len(late), exc
        )
        for job in jobs:
            if not job.task.options.acks_late:
                self._apply(job.delivery, UNSTARTED, job)
        return late

    def _start(self, jobs: list[Job]) -> None:
        for job in jobs:
            self._running.add(job)
            self.pool.submit(job, self._done)

    # settlement

    def _done(self, job: Job, outcome: Outcome) -> None:
        """A job ended: queue its settlement for the next round. Safe from any thread.

        A pool thread on a local broker runs that round itself and takes its next job from it,
        so in steady state work flows without a hand-off through the event loop.
        """
        with self._lock:
            if job in self._abandoned:
                self._abandoned.discard(job)
                return
            self._running.discard(job)
            try:
                verdict = self._settlement.settle(job, outcome)
            except Exception as exc:
                verdict = self._settlement.unsettled(job, exc)
            self._apply(job.delivery, verdict, job, outcome)
            if verdict.finished is not None:
                env = job.envelope
                self.task_log.finished(env.task, env.id, verdict.finished, outcome.took)
            started = self._direct and not self._stopping and self._cycle(self._free()) > 0
            if started and self._running:
                # A job started: its end runs the next round. Deliveries that did not start
                # (expired, revoked, refused) leave settlements only the loop would carry out.
                return
            # The loop must still run a round once nothing runs (a drain check, a shutdown).
            if self._native and self._running and self._ack_at_once():
                return
        self._wake()

    def _apply(
        self,
        delivery: Delivery,
        verdict: Verdict,
        job: Job | None = None,
        outcome: Outcome | None = None,
    ) -> None:
        """Carry out a verdict: its log line, its counts, and its settlement in the next round;
        then tell middleware (`after_settle`), once the message cannot be stranded by them."""
        if verdict.log is not None:
            level, message, args = verdict.log
            log.log(level, message, *args)
        self.stats.count(verdict.counts)
        self._pending.add(delivery, verdict)
        if self.events.on and verdict.counts:
            self.events.settled(delivery, verdict, job, outcome)
        if self._after_settle and verdict.counts:
            call(self._after_settle, "after_settle", self._settled(delivery, verdict, job, outcome))

    def _settled(
        self, delivery: Delivery, verdict: Verdict, job: Job | None, outcome: Outcome | None
    ) -> Settled:
        """What `after_settle` is told about a verdict (one with counts: not a mere delay)."""
        envelope = job.envelope if job is not None else verdict.envelope
        task = job.task if job is not None else None
        if task is None and envelope is not None:
            task = self.app.tasks.get(envelope.task)
        record = verdict.record
        ran = outcome if verdict.finished is not None else None
        error_type = outcome.error_type if outcome is not None else None
        error_message = outcome.error_message if outcome is not None else None
        if error_type is None and record is not None:
            error_type, error_message = record.error_type, record.error_message
        return Settled(
            outcome=verdict.finished or verdict.counts[0],  # type: ignore[arg-type]
            queue=delivery.queue,
            envelope=envelope,
            task=task,
            error_type=error_type,
            error_message=error_message if error_message is not None else verdict.dead,
            dead_letter=verdict.dead,
            took=None if ran is None else ran.took,
            started_at=None if ran is None else ran.finished_at - ran.took,
        )

    # with a broker attached to the loop (RabbitMQ): a finished task's ack, and a pushed
    # message's start, happen as they arrive, not a loop turn later in the next round

    def _on_loop(self) -> bool:
        return self._native and threading.get_ident() == self._loop_thread

    def _ack_at_once(self) -> bool:
        """Send acks within `ACK_DELAY_S`, those of every task that ends meanwhile in the same
        frame, when they are all there is to settle; True if nothing else waits."""
        pending = self._pending
        if not self._on_loop() or not pending.acks or self._stopping:
            return False
        if (
            pending.records
            or pending.publish
            or pending.dead
            or pending.release
            or pending.delay
            or pending.follow
        ):
            return False  # results are stored before acks: the round keeps that order
        if not self._acking:
            self._acking = True
            assert self._loop is not None
            self._loop.call_later(ACK_DELAY_S, self._send_acks)
        return True

    def _send_acks(self) -> None:
        with self._lock:
            self._acking = False
            pending = self._pending
            if (
                pending.records
                or pending.publish
                or pending.dead
                or pending.release
                or pending.follow
            ):
                self._wake()  # something came since that the round must settle first
                return
            acks, pending.acks = pending.acks, []
            try:
                self._count_stale(len(acks) - self.broker.ack_nowait(acks))
            except Exception:  # the next round sends them, or reports why it cannot
                pending.acks = acks + pending.acks
                self._wake()
                return
            if pending.delay or (self._stopping and not self._running):
                self._wake()

    def _pushed(self) -> None:
        """The broker pushed a message. On an idle worker it starts now, not a loop turn later
        (about 0.04 ms on the benchmark machine): nothing runs that its start could wait on, and
        there is nothing to batch it with."""
        if not self._running and not self._taking and self._on_loop():
            self._take_arrivals()
        else:
            self._arrived()

    def _arrived(self) -> None:
        """The broker pushed a message: take what arrived in this loop turn at its end."""
        if not self._on_loop():
            self._wake()
        elif not self._taking:
            self._taking = True
            assert self._loop is not None
            self._loop.call_soon(self._take_arrivals)

    def _on_ready(self) -> None:
        """A child has room: take what waits in the broker's inbox, without a round."""
        if self._on_loop():
            self._arrived()
        else:
            self._wake()

    def _take_arrivals(self) -> None:
        """Start what the broker pushed, as far as slots are free; the rest waits there for
        the next slot. Wakes the loop when something besides acks waits to be settled."""
        with self._lock:
            self._taking = False
            free = self._free()
            deliveries = self.broker.take_nowait(free) if free > 0 else []
            if deliveries is None:  # not consuming: a round starts it (again)
                self._wake()
                return
            if deliveries:
                jobs, early = self._admit_all(deliveries)
                if early:
                    self._count_stale(len(early) - self.broker.ack_nowait(early))
                self._start(jobs)
                self.pool.flush()  # into the children now, not a loop turn later
                self._started_on_arrival += len(deliveries)
            pending = self._pending
            settled_by_acks = not (
                pending.publish or pending.dead or pending.delay or pending.follow
            )
            # A worker that stops once its queues are empty must check them when a slot frees
            # and nothing waits for it: the round loop may sleep for want of a free slot.
            drain = self.until_empty and not deliveries and free > 0
            if settled_by_acks and not pending.release and not self._stopping and not drain:
                # Records here are the STARTED ones just made (a finished task's record woke
                # the loop when it came): the tasks start first, their records follow.
                if pending.records and not self._recording:
                    self._recording = True
                    assert self._loop is not None
                    self._loop.call_later(STARTED_DELAY_S, self._record_started)
                return
        self._wake()

    def _record_started(self) -> None:
        self._recording = False
        self._wake()


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
