"""Admission: whether a delivery may start, checked before it reaches a pool.

`AdmissionPolicy.admit` returns the `Job` to start, or the `Verdict` on a delivery that must not
start now; it makes no call to a broker or store and keeps no state. In order:

1. the body decodes (size, signature, JSON, envelope): else dead-lettered with the decoder's reason;
   its id is not revoked (`revoked`): else acknowledged and recorded as REVOKED;
2. its runs so far do not make it poison (`poisoned`): else dead-lettered;
3. its task is registered here, and 4. its arguments fit the task's signature: else dead-lettered;
5. it has not expired: else acknowledged and recorded as failed (TaskExpired);
6. it is not early for its ETA (a broker's delay buckets are coarse): else delayed again for the
   rest, counted as no delivery.

A job that starts gets a STARTED record (`started`) unless its task ignores results. A job that
a middleware's `before_admit` skips gets the verdict `skipped` says instead.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from conveyor.app import Conveyor
from conveyor.brokers import Delivery
from conveyor.errors import ArgumentError, DecodeError, TaskExpired, TaskSkipped, UnknownTaskError
from conveyor.message import Envelope, decode
from conveyor.reasons import DeadLetterReason as Why
from conveyor.results import ResultRecord, State
from conveyor.signing import Signer
from conveyor.task import Task
from conveyor.worker.execution import Job, Outcome
from conveyor.worker.settlement import Records, refused
from conveyor.worker.verdict import Verdict
from conveyor.workflows.plan import failed

# A task may start this much before its ETA; earlier deliveries are delayed again.
EARLY_TOLERANCE_S = 0.01


@dataclass(frozen=True, slots=True)
class AdmissionPolicy:
    """The checks a delivery passes before it runs (see the module's docstring)."""

    tasks: Mapping[str, Task[Any, Any]]
    app_name: str
    records: Records
    max_message_size: int
    signer: Signer | None
    poison_limit: int
    delivery_limit: int
    isolates_tasks: bool
    """The pool runs each task in a process the worker watches (prefork): see `poisoned`."""
    revoked: Mapping[str, object] = field(default_factory=dict)
    """Revoked task ids (`KnownRevocations.ids`: the worker keeps it up to date)."""

    @classmethod
    def of(
        cls,
        app: Conveyor,
        records: Records,
        *,
        isolates_tasks: bool,
        revoked: Mapping[str, object] | None = None,
    ) -> AdmissionPolicy:
        """The policy of `app`'s tasks and settings, for a pool that isolates tasks or not."""
        s = app.settings
        return cls(
            app.tasks,
            app.name,
            records,
            s.max_message_size,
            app.signer,
            s.poison_limit,
            s.delivery_limit,
            isolates_tasks,
            {} if revoked is None else revoked,
        )

    def admit(self, delivery: Delivery, now: float) -> Job | Verdict:
        """The job to start for `delivery` at `now` (epoch seconds), or what to do instead."""
        try:
            envelope = decode(delivery.body, max_size=self.max_message_size, signer=self.signer)
        except DecodeError as exc:
            return refused(self.records, delivery, exc.reason, None, "DecodeError")
        if envelope.id in self.revoked:
            return self.revoked_verdict(envelope, Outcome.revoked("skipped before it started"))
        reason = self.poisoned(delivery)
        if reason is not None:
            return refused(self.records, delivery, reason, envelope, "WorkerLost")
        task = self.tasks.get(envelope.task)
        if task is None:
            reason = Why.UNKNOWN_TASK(
                f"{envelope.task!r} is not registered on app {self.app_name!r}"
            )
            return refused(self.records, delivery, reason, envelope, UnknownTaskError.__name__)
        job = Job(delivery, envelope, task, started_at=now)
        try:
            # Converted here, where a misfit can still be dead-lettered; a pool on this
            # process's threads runs with these, a prefork child converts its own.
            job.arguments()
        except ArgumentError as exc:
            reason = Why.BAD_ARGUMENTS(f"they do not fit task {task.name}: {exc}")
            return refused(self.records, delivery, reason, envelope, ArgumentError.__name__)
        if envelope.expires is not None and now > envelope.expires:
            return self._expired(envelope)
        if envelope.eta is not None and envelope.eta > now + EARLY_TOLERANCE_S:
            # Delivered early (a broker's delay buckets are coarse): delay it again for the rest.
            return Verdict(delay=envelope.eta - now, envelope=envelope)
        return job

    def started(self, job: Job) -> ResultRecord | None:
        """The STARTED record of a job admitted to run, or None if none is kept."""
        return self.records.of(job.envelope, State.STARTED, started_at=job.started_at)

    def skipped(self, job: Job, skip: TaskSkipped) -> Verdict:
        """A job that a middleware said not to run: acknowledged, recorded as failed."""
        envelope = job.envelope
        record = self.records.of(
            envelope, State.FAILURE, outcome=Outcome.failure(skip, with_traceback=False)
        )
        return Verdict(
            ("skipped",),
            ack=True,
            record=record,
            follow=failed(
                envelope, type(skip).__name__, str(skip), self.records.expires_at(record)
            ),
            log=(
                logging.INFO,
                "task %s[%s] skipped: %s",
                (envelope.task, envelope.id, skip),
            ),
            envelope=envelope,
        )

    def revoked_verdict(self, envelope: Envelope, outcome: Outcome) -> Verdict:
        """A revoked task that is not run: acknowledged, recorded as REVOKED."""
        record = self.records.of(envelope, State.REVOKED, outcome=outcome)
        return Verdict(
            ("revoked",),
            ack=True,
            record=record,
            follow=failed(
                envelope,
                outcome.error_type or "TaskRevoked",
                outcome.error_message or "revoked",
                self.records.expires_at(record),
            ),
            log=(
                logging.INFO,
                "task %s[%s] revoked: %s",
                (envelope.task, envelope.id, outcome.error_message),
            ),
            envelope=envelope,
        )

    def poisoned(self, delivery: Delivery) -> str | None:
        """Why a delivery must not run again, if the runs of it so far say so.

        A prefork worker sees each run that dies and counts it (`Delivery.lost`); a message a
        dead worker only held, or ran in a child killed with it, counts nothing. Other pools run
        tasks in the worker's own process, so any redelivery may be a task's doing: there every
        delivery counts.
        """
        limit = self.poison_limit
        count = delivery.delivery_count
        if not self.isolates_tasks:
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
        most = self.delivery_limit
        if count > most:
            return Why.POISON(
                f"delivered {count} times without finishing (delivery limit {most}, ten times "
                "poison_limit): the whole worker keeps dying while it runs"
            )
        return None

    def _expired(self, envelope: Envelope) -> Verdict:
        outcome = Outcome.failure(TaskExpired("expired before it started"))
        record = self.records.of(envelope, State.FAILURE, outcome=outcome)
        return Verdict(
            ("expired",),
            ack=True,
            record=record,
            follow=failed(
                envelope,
                TaskExpired.__name__,
                "expired before it started",
                self.records.expires_at(record),
            ),
            log=(
                logging.INFO,
                "task %s[%s] expired before it started",
                (envelope.task, envelope.id),
            ),
            envelope=envelope,
        )
