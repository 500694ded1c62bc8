"""Task events and heartbeats: their schema, and the bounded buffer a worker keeps them in.

The consumer calls `TaskEvents` where a delivery is admitted (received, started) and where its
fate is decided (the outcome), only while `on` is true: off, each costs the consumer one
attribute check. On, an event is a tuple appended to a bounded deque; the worker's `Beacon`
drains it on its own thread, encodes the events and publishes them in batches. When the deque is
full (the broker or the beacon cannot keep up) new events are dropped and counted, so a slow
broker or reader never grows the worker's memory past `limit` events.

On the wire, each broadcast message is a JSON array of event objects (`encode_batch`); every
field is described in docs/events.md.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from conveyor.brokers import Delivery
    from conveyor.worker.execution import Job, Outcome
    from conveyor.worker.verdict import Verdict

log = logging.getLogger("conveyor.events")

#: Events a worker holds before it drops new ones.
BUFFER_LIMIT = 10_000
#: The task event types, in the order a task meets them.
TASK_EVENTS = (
    "task-received",
    "task-started",
    "task-succeeded",
    "task-failed",
    "task-retried",
    "task-dead-lettered",
    "task-revoked",
    "task-lost",
    "task-expired",
    "task-skipped",
    "task-rejected",
)
WORKER_EVENTS = ("worker-online", "worker-heartbeat", "worker-offline")


class TaskEvent(msgspec.Struct, omit_defaults=True):
    """Something that happened to a task in a worker (docs/events.md)."""

    type: str
    """One of `TASK_EVENTS`."""
    time: float
    """When it happened, in seconds since the epoch (the worker's clock)."""
    worker: str
    """The worker's id, `hostname:pid`."""
    id: str | None
    """The task id; None for a message that could not be decoded."""
    task: str | None
    """The task's name; None for a message that could not be decoded."""
    queue: str
    retries: int = 0
    """Retries before this run (0 on the first)."""
    runtime: float | None = None
    """Seconds the task ran, on the events of a run that ended."""
    error_type: str | None = None
    error_message: str | None = None
    reason: str | None = None
    """Why the message was dead-lettered, on `task-dead-lettered`."""


class WorkerEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A worker's heartbeat, or its coming online or going offline (docs/events.md)."""

    type: str
    """One of `WORKER_EVENTS`."""
    time: float
    worker: str
    hostname: str
    pid: int
    app: str
    pool: str
    concurrency: int
    running: int = 0
    """Tasks running or held in the pool now."""
    processed: int = 0
    """Deliveries settled since the worker started."""
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """The machine's load average over 1, 5 and 15 minutes."""
    interval: float = 0.0
    """Seconds until the next heartbeat."""
    events: bool = False
    """True while the worker publishes task events."""
    dropped: int = 0
    """Events the worker dropped since it started because its buffer was full."""


Event = TaskEvent | WorkerEvent


class _Head(msgspec.Struct):
    type: str


_encoder = msgspec.json.Encoder()
_raws = msgspec.json.Decoder(list[msgspec.Raw])
_head = msgspec.json.Decoder(_Head)
_task = msgspec.json.Decoder(TaskEvent)
_worker = msgspec.json.Decoder(WorkerEvent)

# An event in the buffer: a tuple of TaskEvent's fields in order (those left out keep their
# defaults), or a WorkerEvent.
Pending = tuple[Any, ...] | WorkerEvent


def encode_batch(events: Sequence[Pending]) -> bytes:
    """One broadcast message: the events as a JSON array."""
    # Positional: a fraction of a microsecond an event (by keyword it was 2.3 µs, measured).
    return _encoder.encode([TaskEvent(*e) if isinstance(e, tuple) else e for e in events])


def decode_batch(body: bytes) -> list[Event]:
    """The events of one broadcast message; ValueError (with why) if it is not one."""
    try:
        raws = _raws.decode(body)
        events: list[Event] = []
        for raw in raws:
            kind = _head.decode(raw).type
            decoder = _worker if kind.startswith("worker-") else _task
            events.append(decoder.decode(raw))
        return events
    except msgspec.MsgspecError as exc:
        raise ValueError(f"not a batch of events: {exc}") from None


class TaskEvents:
    """The worker's events buffer: bounded, filled by the consumer, drained by the beacon."""

    __slots__ = ("_buffer", "dropped", "limit", "on", "worker")

    def __init__(self, worker: str, limit: int | None = None) -> None:
        #: Whether the consumer reports events now (the beacon sets it).
        self.on = False
        self.worker = worker
        self.limit = BUFFER_LIMIT if limit is None else limit
        #: Events dropped because the buffer was full.
        self.dropped = 0
        self._buffer: collections.deque[Pending] = collections.deque()

    def put(self, event: Pending) -> None:
        """Keep an event for the beacon, or count it dropped when the buffer is full."""
        if len(self._buffer) < self.limit:
            self._buffer.append(event)
        else:
            self.dropped += 1

    def take(self, most: int) -> list[Pending]:
        """Up to `most` of the oldest events (from the beacon's thread)."""
        buffer, taken = self._buffer, list[Pending]()
        while buffer and len(taken) < most:
            taken.append(buffer.popleft())
        return taken

    def __len__(self) -> int:
        return len(self._buffer)

    def received(self, delivery: Delivery, admitted: Job | Verdict, now: float) -> None:
        """A delivery reached admission."""
        env = admitted.envelope
        if env is None:
            self.put(("task-received", now, self.worker, None, None, delivery.queue))
        else:
            self.put(
                ("task-received", now, self.worker, env.id, env.task, delivery.queue, env.retries)
            )

    def started(self, job: Job) -> None:
        """A job goes to the pool to run (when its STARTED record is made)."""
        env = job.envelope
        self.put(
            (
                "task-started",
                job.started_at,
                self.worker,
                env.id,
                env.task,
                job.delivery.queue,
                env.retries,
            )
        )

    def settled(
        self, delivery: Delivery, verdict: Verdict, job: Job | None, outcome: Outcome | None
    ) -> None:
        """A delivery's fate is decided (a verdict with counts: not a mere delay)."""
        env = job.envelope if job is not None else verdict.envelope
        word = verdict.finished or verdict.counts[0]
        kind = "task-dead-lettered" if verdict.dead is not None else f"task-{word}"
        error_type = error_message = None
        if outcome is not None:
            error_type, error_message = outcome.error_type, outcome.error_message
        elif verdict.record is not None:
            error_type, error_message = verdict.record.error_type, verdict.record.error_message
        runtime = outcome.took if outcome is not None and verdict.finished is not None else None
        self.put(
            (
                kind,
                time.time(),
                self.worker,
                None if env is None else env.id,
                None if env is None else env.task,
                delivery.queue,
                0 if env is None else env.retries,
                runtime,
                error_type,
                error_message,
                verdict.dead,
            )
        )
