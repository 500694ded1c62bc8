"""The consumer: fetch deliveries, hand them to the pool, and settle what comes back.

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
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec

from conveyor.app import Conveyor
from conveyor.brokers import Delivery, Outgoing
from conveyor.errors import (
    ArgumentError,
    DecodeError,
    MaxRetriesExceeded,
    Retry,
    TaskExpired,
    UnknownTaskError,
)
from conveyor.message import Envelope, decode, encode
from conveyor.reasons import DeadLetterReason as Why
from conveyor.results import ResultRecord, State
from conveyor.task import resolve
from conveyor.worker.execution import Job, Kind, Outcome
from conveyor.worker.pools.base import Pool
from conveyor.worker.tasklog import TaskLog

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
DRAIN_CONFIRM_S = 0.1
DRAIN_CHECK_POLL_S = 0.008
# A task may start this much before its ETA; earlier deliveries are delayed again.
EARLY_TOLERANCE_S = 0.01
# How often, while tasks run, the broker's round trip is timed for the pool.
ROUND_TRIP_PROBE_S = 1.0


@dataclass
class WorkerStats:
    """Counts of what a worker did."""

    received: int = 0
    succeeded: int = 0
    failed: int = 0
    """Tasks that raised and will not be tried again (including those out of retries)."""
    retried: int = 0
    rejected: int = 0
    """Messages the worker refused: undecodable, unknown task, bad arguments, poison, or an
    outcome that could not be settled (a retry grown past the size limit). Dead-lettered, unless
    the task had acks_late=False and its message was acknowledged before it ran."""
    dead_lettered: int = 0
    """Every message dead-lettered: the rejected ones and the tasks out of retries."""
    expired: int = 0
    released: int = 0
    """Messages given back unfinished at shutdown."""
    lost: int = 0
    """Tasks whose process died while running them (prefork): their messages went back, counted
    toward the poison limit, unless acks_late=False had acknowledged them before they ran."""
    stale: int = 0
    """Settlements too late to count: the message's lease had expired or its channel had closed
    while the task ran, so the broker delivers it again."""

    @property
    def finished(self) -> int:
        """Tasks that reached their end: succeeded, failed for good, rejected or expired."""
        return self.succeeded + self.failed + self.rejected + self.expired


@dataclass
class Settlements:
    """Outcomes waiting for the next I/O round. Each part is cleared once it went through."""

    records: dict[str, ResultRecord] = field(default_factory=dict)
    """By task id: a task that finished before its STARTED record went out is written once."""
    publish: list[Outgoing] = field(default_factory=list)
    acks: list[Delivery] = field(default_factory=list)
    dead: list[tuple[Delivery, str]] = field(default_factory=list)
    release: list[Delivery] = field(default_factory=list)
    delay: list[tuple[Delivery, float]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(
            self.records or self.publish or self.acks or self.dead or self.release or self.delay
        )

    @property
    def urgent(self) -> bool:
        """True when something besides STARTED records waits: those can ride along later."""
        return bool(
            self.publish
            or self.acks
            or self.dead
            or self.release
            or self.delay
            or any(r.state is not State.STARTED for r in self.records.values())
        )

    def merge(self, later: Settlements) -> Settlements:
        """These settlements followed by `later` ones, in order."""
        return Settlements(
            self.records | later.records,
            self.publish + later.publish,
            self.acks + later.acks,
            self.dead + later.dead,
            self.release + later.release,
            self.delay + later.delay,
        )


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
        self._settings = app.settings
        self._io = ThreadPoolExecutor(1, thread_name_prefix="conveyor-io")
        self._pending = Settlements()
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
        self._taking = False
        self._acking = False
        self._direct = pool.threaded and self.broker.local

    # lifecycle

    async def run(self) -> None:
        """Consume until `stop()` and every running job is settled, or until drained."""
        self._loop, self._loop_thread = asyncio.get_running_loop(), threading.get_ident()
        # A broker that can run on this loop (RabbitMQ) does: no thread hand-off per round.
        native = not self.broker.local and self.pool.loop_free
        self._native = native and self.broker.attach(self._loop)
        self.broker.on_arrival(self._arrived)
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
            released = [job.delivery for job in self._running if job.task.options.acks_late]
            self._pending.release += released
            self.stats.released += len(released)
            self._abandoned |= self._running
            self._running = set()
        self._wake()

    @property
    def running(self) -> int:
        """Jobs running now."""
        return len(self._running)

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
                deliveries = self._settle_and_fetch(batch, free)
            except Exception as exc:
                log.error("broker or result store failed: %s", exc)
                self._pending = batch.merge(self._pending)
                return -1
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
        try:
            if self._native:
                return await self._settle_and_fetch_native(batch, free)
            return await self._call(self._settle_and_fetch, batch, free)
        except Exception as exc:
            log.error("broker or result store failed: %s", exc)
            with self._lock:
                self._pending = batch.merge(self._pending)
            return None

    def _settle_and_fetch(self, batch: Settlements, free: int) -> list[Delivery]:
        broker = self.broker
        if not batch:
            return broker.fetch(self.queues, free) if free > 0 else []
        with broker.batch():
            # Outcomes are stored before their messages are removed: a crash in between means a
            # redelivery, never a lost result.
            if batch.records and self.store is not None:
                self.store.put(list(batch.records.values()))
            broker.publish(batch.publish)
            lost = len(batch.acks) - broker.ack(batch.acks)
            broker.dead_letter(batch.dead)
            broker.requeue(batch.release)
            for delivery, seconds in batch.delay:
                broker.requeue([delivery], delay=seconds, count_delivery=False)
            deliveries = broker.fetch(self.queues, free) if free > 0 else []
        self._count_stale(lost)
        return deliveries

    async def _settle_and_fetch_native(self, batch: Settlements, free: int) -> list[Delivery]:
        """`_settle_and_fetch` for a broker attached to this loop (the result store, which
        blocks, still goes through the I/O thread)."""
        broker = self.broker
        if batch.records and self.store is not None:
            await self._call(self.store.put, list(batch.records.values()))
        if batch.publish:
            await broker.publish_async(batch.publish)
        lost = len(batch.acks) - await broker.ack_async(batch.acks)
        await broker.dead_letter_async(batch.dead)
        await broker.requeue_async(batch.release)
        for delivery, seconds in batch.delay:
            await broker.requeue_async([delivery], delay=seconds, count_delivery=False)
        deliveries = await broker.fetch_async(self.queues, free) if free > 0 else []
        self._count_stale(lost)
        return deliveries

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
        most once, so the ack must be stored before the task runs)."""
        self._count_refused()
        now = time.time()
        jobs = [job for d in deliveries if (job := self._admit(d, now)) is not None]
        return jobs, [job.delivery for job in jobs if not job.task.options.acks_late]

    def _count_refused(self) -> None:
        """Count what the broker dead-lettered on arrival as received and rejected here."""
        refused = self.broker.refused
        new, self._refused = refused - self._refused, refused
        if new > 0:
            self.stats.received += new
            self.stats.rejected += new
            self.stats.dead_lettered += new

    def _without_early(self, jobs: list[Job], exc: Exception) -> list[Job]:
        """The acks_late=False jobs whose ack failed are not started: they come back later."""
        late = [job for job in jobs if job.task.options.acks_late]
        log.error(
            "could not acknowledge %d tasks before running them: %s", len(jobs) - len(late), exc
        )
        return late

    def _start(self, jobs: list[Job]) -> None:
        for job in jobs:
            self._running.add(job)
            self.pool.submit(job, self._done)

    def _admit(self, delivery: Delivery, now: float) -> Job | None:
        """Decode and check a delivery; a job to run, or None if it was settled right away."""
        self.stats.received += 1
        try:
            envelope = decode(
                delivery.body, max_size=self._settings.max_message_size, signer=self.app.signer
            )
        except DecodeError as exc:
            self._reject(delivery, exc.reason, None, "DecodeError")
            return None
        if delivery.reply_to is not None and self.store is not None:
            self.store.route(envelope.id, delivery.reply_to)  # the sender takes its records
        reason = self._poisoned(delivery)
        if reason is not None:
            self._reject(delivery, reason, envelope, "WorkerLost")
            return None
        task = self.app.tasks.get(envelope.task)
        if task is None:
            reason = Why.UNKNOWN_TASK(
                f"{envelope.task!r} is not registered on app {self.app.name!r}"
            )
            self._reject(delivery, reason, envelope, UnknownTaskError.__name__)
            return None
        job = Job(delivery, envelope, task, started_at=now)
        try:
            # Converted here, where a misfit can still be dead-lettered; a pool on this
            # process's threads runs with these, a prefork child converts its own.
            job.arguments()
        except ArgumentError as exc:
            reason = Why.BAD_ARGUMENTS(f"they do not fit task {task.name}: {exc}")
            self._reject(delivery, reason, envelope, ArgumentError.__name__)
            return None
        if envelope.expires is not None and now > envelope.expires:
            self.stats.expired += 1
            log.info("task %s[%s] expired before it started", envelope.task, envelope.id)
            outcome = Outcome.failure(TaskExpired("expired before it started"))
            self._record(envelope, State.FAILURE, outcome=outcome)
            self._pending.acks.append(delivery)
            return None
        if envelope.eta is not None and envelope.eta > now + EARLY_TOLERANCE_S:
            # Delivered early (a broker's delay buckets are coarse): delay it again for the rest.
            self._pending.delay.append((delivery, envelope.eta - now))
            return None
        if not task.options.ignore_result:
            self._record(envelope, State.STARTED, started_at=now)
        return job

    def _poisoned(self, delivery: Delivery) -> str | None:
        """Why a delivery must not run again, if the runs of it so far say so.

        A prefork worker sees each run that dies and counts it (`Delivery.lost`); a message a
        dead worker only held, or ran in a child killed with it, counts nothing. Other pools run
        tasks in the worker's own process, so any redelivery may be a task's doing: there every
        delivery counts.
        """
        limit = self._settings.poison_limit
        count = delivery.delivery_count
        if not self.pool.isolates_tasks:
            if count <= limit:
                return None
            return Why.POISON(
                f"delivered {count} times without finishing (poison limit {limit}): the process "
                "running it probably died"
            )
        if delivery.lost >= limit:
            return Why.POISON(
                f"the process running it died in {delivery.lost} runs (poison limit {limit})"
            )
        most = self._settings.delivery_limit
        if count > most:
            return Why.POISON(
                f"delivered {count} times without finishing (delivery limit {most}, ten times "
                "poison_limit): the whole worker keeps dying while it runs"
            )
        return None

    def _reject(
        self, delivery: Delivery, reason: str, envelope: Envelope | None, error_type: str
    ) -> None:
        """Dead-letter a message that cannot run; logged once, and the worker goes on."""
        self.stats.rejected += 1
        self.stats.dead_lettered += 1
        where = (
            f"task {envelope.task}[{envelope.id}]" if envelope else f"a message on {delivery.queue}"
        )
        log.warning("dead-lettered %s: %s", where, reason)
        self._pending.dead.append((delivery, reason))
        if envelope is not None:
            outcome = Outcome(Kind.FAILURE, None, error_type, reason, "", finished_at=time.time())
            self._record(envelope, State.FAILURE, outcome=outcome)

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
                self._settle(job, outcome)
            except Exception as exc:
                # Settling must not fail silently: that would strand the message.
                reason = Why.SETTLEMENT_FAILED(f"{type(exc).__name__}: {exc}")
                if job.task.options.acks_late:
                    self._reject(job.delivery, reason, job.envelope, type(exc).__name__)
                else:  # acknowledged before it ran: there is no message left to dead-letter
                    self.stats.rejected += 1
                    log.error("task %s[%s] failed: %s", job.envelope.task, job.envelope.id, reason)
                    failure = Outcome(Kind.FAILURE, None, type(exc).__name__, reason, "")
                    self._record(job.envelope, State.FAILURE, outcome=failure)
            if self._direct and not self._stopping and self._cycle(self._free()) > 0:
                return
            # The loop must still run a round once nothing runs (a drain check, a shutdown).
            if self._native and self._running and self._ack_at_once():
                return
        self._wake()

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
        if pending.records or pending.publish or pending.dead or pending.release or pending.delay:
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
            if pending.records or pending.publish or pending.dead or pending.release:
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
                pending.records or pending.publish or pending.dead or pending.delay
            )
            if settled_by_acks and not pending.release and not self._stopping:
                return
        self._wake()

    def _settle(self, job: Job, outcome: Outcome) -> None:
        env, task, pending = job.envelope, job.task, self._pending
        ack = [job.delivery] if task.options.acks_late else []
        if outcome.kind is Kind.LOST:
            self.stats.lost += 1
            if task.options.acks_late:
                limit = self._settings.poison_limit
                log.warning(
                    "task %s[%s] lost: %s; its message goes back (lost runs %d, poison limit %d)",
                    env.task, env.id, outcome.error_message, job.delivery.lost + 1, limit,
                )  # fmt: skip
                pending.release.append(job.delivery)
            else:  # acknowledged before it ran (at most once): nothing to give back
                log.error("task %s[%s] lost: %s", env.task, env.id, outcome.error_message)
                self._record(env, State.FAILURE, outcome=outcome, started_at=job.started_at)
            self.task_log.finished(env.task, env.id, "lost", outcome.took)
        elif outcome.kind is Kind.SUCCESS:
            self.stats.succeeded += 1
            self._record(env, State.SUCCESS, outcome=outcome, started_at=job.started_at)
            pending.acks += ack
            self.task_log.finished(env.task, env.id, "succeeded", outcome.took)
        elif outcome.kind is Kind.RETRY and env.retries < self._max_retries(job, outcome):
            delay = task.retry_delay(env.retries, outcome.countdown)
            retry = env.retried(time.time() + delay if delay > 0 else None)
            body = encode(retry, max_size=self._settings.max_message_size, signer=self.app.signer)
            log.info(
                "task %s[%s] will retry in %.2fs (try %d): %s",
                env.task, env.id, delay, retry.retries + 1, _error(outcome),
            )  # fmt: skip
            self.stats.retried += 1
            reply_to = job.delivery.reply_to
            pending.publish.append(Outgoing(retry.queue, body, retry.priority, retry.eta, reply_to))
            self._record(env, State.RETRY, outcome=outcome, started_at=job.started_at)
            pending.acks += ack
            self.task_log.finished(env.task, env.id, "retried", outcome.took)
        else:
            self.stats.failed += 1
            gave_up = outcome.kind is Kind.RETRY
            if gave_up and outcome.error_type == Retry.__name__:
                # `raise self.retry()` without exc=: say what happened, not "Retry".
                outcome.error_type = MaxRetriesExceeded.__name__
                outcome.error_message = f"still failing after {env.retries} retries"
            log.error(
                "task %s[%s] failed: %s\n%s",
                env.task, env.id, _error(outcome), outcome.traceback,
            )  # fmt: skip
            self._record(env, State.FAILURE, outcome=outcome, started_at=job.started_at)
            self.task_log.finished(env.task, env.id, "failed", outcome.took)
            if not gave_up:
                pending.acks += ack
            elif task.options.acks_late:
                self.stats.dead_lettered += 1
                reason = Why.RETRIES_EXHAUSTED(
                    f"gave up after {env.retries} retries: {_error(outcome)}"
                )
                pending.dead.append((job.delivery, reason))

    def _max_retries(self, job: Job, outcome: Outcome) -> int:
        # The retry() call, then the send, then the task and app (Task.max_retries).
        return resolve(outcome.max_retries, job.envelope.max_retries, default=job.task.max_retries)

    def _record(
        self,
        env: Envelope,
        state: State,
        *,
        outcome: Outcome | None = None,
        started_at: float | None = None,
    ) -> None:
        task = self.app.tasks.get(env.task)
        if self.store is None or (task is not None and task.options.ignore_result):
            return
        now = time.time()
        keep = task.options.result_expires if task is not None else None
        record = ResultRecord(
            id=env.id,
            state=state,
            task=env.task,
            retries=env.retries,
            worker=self.worker_id,
            started_at=started_at,
            updated_at=now,
            expires_at=now + (keep or self._settings.result_expires),
        )
        if outcome is not None:
            record = _with_outcome(record, outcome)
        self._pending.records[record.id] = record


def _with_outcome(record: ResultRecord, outcome: Outcome) -> ResultRecord:
    return msgspec.structs.replace(
        record,
        value=outcome.value if outcome.value is not None else record.value,
        error_type=outcome.error_type,
        error_message=outcome.error_message,
        traceback=outcome.traceback,
        finished_at=outcome.finished_at or None,
    )


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _error(outcome: Outcome) -> str:
    return f"{outcome.error_type}: {outcome.error_message}"
