"""The worker's side of the broadcast: roster, heartbeats, task events and control requests.

A `Beacon` runs on a thread of its own in the worker's process (children never see it: it starts
after the pool, whose zygote forks them). Every `HEARTBEAT_S` it renews the worker's entry in
the app's roster (a lease of `LEASE_S`, so `conveyor inspect` knows a worker that stops
answering) and, while events are on, publishes a heartbeat. Events are on with the `events`
setting, or for as long as readers keep asking (`EventsOn`, renewed while `conveyor events`
runs). While on, it drains the consumer's bounded buffer every `DRAIN_S` and publishes it in
batches of at most `BATCH` events.

A malformed control message is dropped with one log line. A broker that fails is retried with
backoff, logged once per outage; none of it touches the worker's rounds, and a shutdown waits for
the beacon at most `STOP_TIMEOUT_S`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict
from typing import TYPE_CHECKING

from conveyor.brokers.broadcast import Broadcast, Listener
from conveyor.control.events import TaskEvents, WorkerEvent, encode_batch
from conveyor.control.protocol import (
    ActiveTask,
    EventsOn,
    Inspect,
    ReservedTask,
    WorkerReport,
    control_channel,
    decode_request,
    encode,
    events_channel,
)
from conveyor.errors import ConfigurationError
from conveyor.message import decode
from conveyor.redact import redact_text, redact_url
from conveyor.workflows.bulk import BUILTINS

if TYPE_CHECKING:
    from conveyor.brokers import Delivery
    from conveyor.worker.consumer import Consumer
    from conveyor.worker.execution import Job
    from conveyor.worker.pools.base import Pool
    from conveyor.worker.worker import Worker

log = logging.getLogger("conveyor.events")

HEARTBEAT_S = 2.0
LEASE_S = 10.0
DRAIN_S = 0.1
BATCH = 500
#: How long an inspect waits for the worker's event loop to list its jobs.
SNAPSHOT_TIMEOUT_S = 1.0
STOP_TIMEOUT_S = 5.0
RETRY_MAX_S = 30.0
_workers = itertools.count(1)


class Beacon:
    """A worker's roster entry, heartbeats, events and answers (see the module's docstring)."""

    def __init__(self, worker: Worker, consumer: Consumer, pool: Pool, *, always: bool) -> None:
        self.worker, self.consumer, self.pool = worker, consumer, pool
        self.app = worker.app
        self.events: TaskEvents = consumer.events
        self.always = always
        # `hostname:pid`, as result records name the worker; a second worker in the same
        # process (tests, embedded use) gets a suffix, or the roster would take it for the first.
        number = next(_workers)
        self.id = consumer.worker_id if number == 1 else f"{consumer.worker_id}/{number}"
        self.events.worker = self.id
        self.started = time.time()
        self._on_until = 0.0  # monotonic: events asked for by readers until then
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._broadcast: Broadcast | None = None
        self._listener: Listener | None = None
        self._failures = 0

    def start(self) -> None:
        """Start the beacon's thread; a broker without broadcast channels has none."""
        try:
            self._broadcast = self.app.broker.broadcast()
        except ConfigurationError as exc:
            log.debug("no events or inspection: %s", exc)
            return
        except Exception as exc:
            log.warning("events and inspection are off: %s", redact_text(str(exc)))
            return
        self.events.on = self.always
        self._thread = threading.Thread(target=self._run, name="conveyor-beacon", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Publish what is left and the worker's going offline, then let go (bounded)."""
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        listener = self._listener
        if listener is not None:
            listener.close()  # wakes a waiting read
        thread.join(STOP_TIMEOUT_S)
        if thread.is_alive():
            log.warning("the event beacon did not stop within %.0fs", STOP_TIMEOUT_S)

    # the thread

    def _run(self) -> None:
        broadcast = self._broadcast
        assert broadcast is not None
        next_heartbeat = 0.0
        try:
            while not self._stop.is_set():
                try:
                    if self._listener is None:
                        self._listener = broadcast.listen(control_channel(self.app.name))
                        self._announce("worker-online")
                    now = time.monotonic()
                    was_on = self.events.on
                    self.events.on = on = self.always or now < self._on_until
                    if on and not was_on:
                        next_heartbeat = now  # readers learn at once that events flow
                    if now >= next_heartbeat:
                        self._heartbeat()
                        next_heartbeat = now + HEARTBEAT_S
                    wait = max(next_heartbeat - time.monotonic(), 0.0)
                    if on:
                        wait = min(wait, DRAIN_S)
                    for body in self._listener.read(wait):
                        self._handle(body)
                    if len(self.events):
                        self._drain()
                    if self._failures:
                        log.warning("events and inspection work again")
                        self._failures = 0
                except Exception as exc:
                    if self._stop.is_set():
                        break
                    self._failed(exc)
        finally:
            self._finish()

    def _failed(self, exc: Exception) -> None:
        self._failures += 1
        if self._failures == 1:
            log.warning(
                "events and inspection failed: %s; retrying (tasks are not affected)",
                redact_text(str(exc)),
            )
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        self._stop.wait(min(RETRY_MAX_S, 0.5 * 2 ** min(self._failures, 8)))

    def _finish(self) -> None:
        broadcast = self._broadcast
        assert broadcast is not None
        try:
            self._drain()
            self._announce("worker-offline")
            broadcast.unregister(self.app.name, self.id)
        except Exception as exc:
            log.debug("could not say the worker goes offline: %s", exc)
        finally:
            if self._listener is not None:
                self._listener.close()
            self.events.on = False
            broadcast.close()

    def _handle(self, body: bytes) -> None:
        try:
            request = decode_request(body)
        except ValueError as exc:
            log.warning("dropped a malformed control message (%d bytes): %s", len(body), exc)
            return
        if isinstance(request, EventsOn):
            self._on_until = max(self._on_until, time.monotonic() + request.seconds)
        elif isinstance(request, Inspect):
            assert self._broadcast is not None
            self._broadcast.send(request.reply_to, encode(self._report(request.id)))

    def _drain(self) -> None:
        assert self._broadcast is not None
        channel = events_channel(self.app.name)
        while len(self.events):
            batch = self.events.take(BATCH)
            self._broadcast.publish(channel, [encode_batch(batch)])

    def _worker_event(self, kind: str) -> WorkerEvent:
        return WorkerEvent(
            type=kind,
            time=time.time(),
            worker=self.id,
            hostname=socket.gethostname(),
            pid=os.getpid(),
            app=self.app.name,
            pool=self.worker.pool_name,
            concurrency=self.pool.concurrency,
            running=self.consumer.running,
            processed=_processed(self.worker),
            load=_load(),
            interval=HEARTBEAT_S,
            events=self.events.on,
            dropped=self.events.dropped,
        )

    def _heartbeat(self) -> None:
        assert self._broadcast is not None
        beat = self._worker_event("worker-heartbeat")
        self._broadcast.register(self.app.name, self.id, encode(beat), LEASE_S)
        if self.events.on:
            self.events.put(beat)

    def _announce(self, kind: str) -> None:
        if self.events.on:
            assert self._broadcast is not None
            event = self._worker_event(kind)
            self._broadcast.publish(events_channel(self.app.name), [encode_batch([event])])

    # inspection

    def _report(self, request: str) -> WorkerReport:
        active, reserved, busy = self._jobs()
        worker = self.worker
        return WorkerReport(
            request=request,
            worker=self.id,
            hostname=socket.gethostname(),
            pid=os.getpid(),
            app=self.app.name,
            pool=worker.pool_name,
            concurrency=self.pool.concurrency,
            loop=worker.loop_name,
            broker=redact_url(self.app.broker.display_url),
            queues=list(worker.queues),
            started=self.started,
            uptime=time.time() - self.started,
            stats=asdict(worker.stats),
            active=active,
            reserved=reserved,
            registered=sorted(n for n in self.app.tasks if n not in BUILTINS),
            events=self.events.on,
            dropped=self.events.dropped,
            load=_load(),
            busy=busy,
        )

    def _jobs(self) -> tuple[list[ActiveTask], list[ReservedTask], bool]:
        """The worker's jobs, read on its event loop where the pool keeps them; if the loop
        does not answer in time, what the consumer alone knows."""
        loop = self.worker.event_loop
        if loop is not None and not loop.is_closed():
            future = asyncio.run_coroutine_threadsafe(self._snapshot(), loop)
            try:
                return (*future.result(SNAPSHOT_TIMEOUT_S), False)
            except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
                future.cancel()
        own = os.getpid()
        active = [_active(job, own) for job in self.consumer.jobs()]
        return active, [], True

    async def _snapshot(self) -> tuple[list[ActiveTask], list[ReservedTask]]:
        own = os.getpid()
        placement = self.pool.placement()
        active: list[ActiveTask] = []
        reserved: list[ReservedTask] = []
        for job in self.consumer.jobs():
            if placement is None:
                active.append(_active(job, own))
                continue
            pid, running = placement.get(job, (None, False))
            if running:
                active.append(_active(job, pid))
            else:
                env = job.envelope
                where = "pool" if pid is None else f"child {pid}"
                reserved.append(
                    ReservedTask(id=env.id, task=env.task, queue=job.delivery.queue, where=where)
                )
        reserved += [self._prefetched(d) for d in self.app.broker.held()]
        return active, reserved

    def _prefetched(self, delivery: Delivery) -> ReservedTask:
        settings, signer = self.app.settings, self.app.signer
        try:
            env = decode(delivery.body, max_size=settings.max_message_size, signer=signer)
        except Exception:  # a worker dead-letters it when it gets to it
            return ReservedTask(id=None, task=None, queue=delivery.queue, where="prefetched")
        return ReservedTask(id=env.id, task=env.task, queue=delivery.queue, where="prefetched")


def _active(job: Job, pid: int | None) -> ActiveTask:
    env = job.envelope
    return ActiveTask(
        id=env.id,
        task=env.task,
        queue=job.delivery.queue,
        since=job.started_at,
        pid=pid,
        retries=env.retries,
    )


def _processed(worker: Worker) -> int:
    s = worker.stats
    return s.finished + s.retried + s.lost


def _load() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:  # not on every platform
        return (0.0, 0.0, 0.0)


def new_request_id() -> str:
    """An id for a request, to tell its replies from others'."""
    return uuid.uuid4().hex
