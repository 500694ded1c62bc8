"""What the consumer's policy decides, and what the consumer keeps of it.

Admission (`conveyor.worker.admission`) and settlement (`conveyor.worker.settlement`) look at a
delivery and return a `Verdict`: what to do with its message, what to record, what to count and
log. They do no I/O. The consumer logs the line, counts, and adds the rest to its pending
`Settlements`, which the next I/O round carries out (`conveyor.worker.rounds`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import msgspec

from conveyor.brokers import Delivery, Outgoing
from conveyor.message import Envelope
from conveyor.results import ResultRecord, State

if TYPE_CHECKING:
    from conveyor.workflows.plan import Follow

#: A `WorkerStats` counter a verdict adds one to.
Counter = Literal[
    "succeeded",
    "failed",
    "retried",
    "rejected",
    "dead_lettered",
    "expired",
    "skipped",
    "lost",
    "revoked",
    "released",
    "abandoned",
]
#: A log line to write: level, format, arguments (formatted by logging, as ever).
LogLine = tuple[int, str, tuple[object, ...]]


class Verdict(msgspec.Struct, frozen=True):
    """What to do with one delivery that will not (or no longer) run.

    At most one of `ack`, `dead`, `release` and `delay` says where its message goes; a verdict
    with none of them leaves the message alone (acknowledged before it ran, acks_late=False).
    """

    counts: tuple[Counter, ...] = ()
    """The `WorkerStats` counters to add one to."""
    finished: str | None = None
    """The task log's word for how the task ended ("succeeded", "retried"...), if it ran."""
    ack: bool = False
    dead: str | None = None
    """Dead-letter the message with this reason."""
    release: bool = False
    """Give the message back unfinished, counted as a lost run."""
    delay: float | None = None
    """Give the message back to be delivered again in this many seconds, counted as nothing."""
    publish: Outgoing | None = None
    record: ResultRecord | None = None
    log: LogLine | None = None
    envelope: Envelope | None = None
    """The decoded message, where admission got that far (its sender may want its records)."""
    follow: Follow | None = None
    """A workflow task's final outcome: what follows it is sent before its message is acked."""


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
    skipped: int = 0
    """Deliveries a middleware's `before_admit` skipped (`TaskSkipped`): acknowledged unrun."""
    revoked: int = 0
    """Tasks revoked (`conveyor revoke`): skipped, or stopped while running; acknowledged."""
    released: int = 0
    """Messages given back unfinished at a shutdown that gave up on them, or not started
    because acknowledging them before their run failed (the broker delivers them again)."""
    abandoned: int = 0
    """Tasks with acks_late=False still running when a shutdown gave up on them: acknowledged
    before they ran, so nothing went back, and how they ended is not known."""
    lost: int = 0
    """Tasks whose process died while running them (prefork): their messages went back, counted
    toward the poison limit, unless acks_late=False had acknowledged them before they ran."""
    stale: int = 0
    """Settlements too late to count: the message's lease had expired or its channel had closed
    while the task ran, so the broker delivers it again."""

    @property
    def finished(self) -> int:
        """Tasks that reached their end: succeeded, failed for good, rejected, expired,
        skipped or revoked."""
        return (
            self.succeeded
            + self.failed
            + self.rejected
            + self.expired
            + self.skipped
            + self.revoked
        )

    def count(self, counters: tuple[Counter, ...]) -> None:
        """Add one to each of `counters` (a verdict's)."""
        for name in counters:
            setattr(self, name, getattr(self, name) + 1)


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
    follow: list[Follow] = field(default_factory=list)
    """Finished workflow tasks whose continuations go out before their acks."""

    def __bool__(self) -> bool:
        return bool(
            self.records
            or self.publish
            or self.acks
            or self.dead
            or self.release
            or self.delay
            or self.follow
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
            or self.follow
            or any(r.state is not State.STARTED for r in self.records.values())
        )

    def add(self, delivery: Delivery, verdict: Verdict) -> None:
        """What `verdict` says to do with `delivery`, for the next round."""
        if verdict.record is not None:
            self.records[verdict.record.id] = verdict.record
        if verdict.publish is not None:
            self.publish.append(verdict.publish)
        if verdict.follow is not None:
            self.follow.append(verdict.follow)
        if verdict.ack:
            self.acks.append(delivery)
        elif verdict.dead is not None:
            self.dead.append((delivery, verdict.dead))
        elif verdict.release:
            self.release.append(delivery)
        elif verdict.delay is not None:
            self.delay.append((delivery, verdict.delay))

    def merge(self, later: Settlements) -> Settlements:
        """These settlements followed by `later` ones, in order."""
        return Settlements(
            self.records | later.records,
            self.publish + later.publish,
            self.acks + later.acks,
            self.dead + later.dead,
            self.release + later.release,
            self.delay + later.delay,
            self.follow + later.follow,
        )
