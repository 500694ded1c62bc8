"""Settlement: what a job's outcome means for its message, its record and the counts.

`SettlementPolicy.settle` sees a job and how it ended and returns a `Verdict`; it makes no call to
a broker or store and keeps no state, so each rule can be tested on its own. The rules:

- success: record it, acknowledge (late acks);
- a retry within `max_retries` (the retry() call's, then the message's, then the task's): publish
  the next try, due after the countdown or the task's backoff, record RETRY, acknowledge;
- a retry past that: the task fails, and with late acks its message is dead-lettered
  (RETRIES_EXHAUSTED); with early acks the message is already gone;
- a failure: record it, acknowledge;
- lost (the process running it died): with late acks the message goes back, as a lost run that
  counts toward the poison limit; with early acks nothing is left to give back, so the failure
  is recorded;
- revoked (a revocation skipped it in the pool, or stopped it running): record REVOKED,
  acknowledge; never given back, never counted toward the poison limit.

`refused` is the verdict on a message that cannot run at all (admission's, or an outcome that
could not be settled): dead-lettered with its reason, and recorded as a failure when decoded.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from conveyor.app import Conveyor
from conveyor.brokers import Delivery, Outgoing
from conveyor.errors import MaxRetriesExceeded, Retry
from conveyor.message import Envelope, encode
from conveyor.reasons import DeadLetterReason as Why
from conveyor.results import ResultRecord, State
from conveyor.signing import Signer
from conveyor.task import Task
from conveyor.worker.execution import Job, Kind, Outcome, max_retries
from conveyor.worker.verdict import LogLine, Verdict
from conveyor.workflows.plan import Follow, failed

_NULL = msgspec.Raw(b"null")
# The verdicts of a success when nothing is recorded: the same every time, so shared.
_SUCCEEDED = Verdict(("succeeded",), "succeeded")
_SUCCEEDED_ACK = Verdict(("succeeded",), "succeeded", ack=True)
#: A job given up at shutdown: its message goes back, or, acknowledged before it ran, is gone.
_RELEASED = Verdict(("released",), release=True)
_ABANDONED = Verdict(("abandoned",))
#: A job admitted but never started, whose message the broker still holds (the acknowledgement
#: it needed first failed): nothing to do, the broker delivers it again.
UNSTARTED = Verdict(("released",))
_FINAL = ("succeeded", "failed")


@dataclass(frozen=True, slots=True)
class Records:
    """How this worker writes result records: whether at all, and what each one carries."""

    tasks: Mapping[str, Task[Any, Any]]
    keep: bool
    """False without a result store: nothing is recorded."""
    worker: str
    expires: float
    """Seconds a record is kept for a task that sets no `result_expires` of its own."""

    def expires_at(self, record: ResultRecord | None) -> float:
        """When what a workflow keeps about a task expires: with its record."""
        return record.expires_at if record is not None else time.time() + self.expires

    def of(
        self,
        env: Envelope,
        state: State,
        *,
        outcome: Outcome | None = None,
        started_at: float | None = None,
    ) -> ResultRecord | None:
        """The record of `env` in `state`, or None if none is kept (no store, ignore_result)."""
        if not self.keep:
            return None
        task = self.tasks.get(env.task)
        if task is not None and task.options.ignore_result:
            return None
        now = time.time()
        keep = task.options.result_expires if task is not None else None
        expires_at = now + (keep or self.expires)
        if outcome is None:
            return ResultRecord(
                id=env.id,
                state=state,
                task=env.task,
                retries=env.retries,
                worker=self.worker,
                started_at=started_at,
                updated_at=now,
                expires_at=expires_at,
            )
        return ResultRecord(
            id=env.id,
            state=state,
            task=env.task,
            value=_NULL if outcome.value is None else outcome.value,
            error_type=outcome.error_type,
            error_message=outcome.error_message,
            traceback=outcome.traceback,
            retries=env.retries,
            worker=self.worker,
            started_at=started_at,
            finished_at=outcome.finished_at or None,
            updated_at=now,
            expires_at=expires_at,
        )


def refused(
    records: Records,
    delivery: Delivery,
    reason: str,
    envelope: Envelope | None,
    error_type: str,
) -> Verdict:
    """Dead-letter a message that cannot run; logged once, and the worker goes on."""
    where = f"task {envelope.task}[{envelope.id}]" if envelope else f"a message on {delivery.queue}"
    record = follow = None
    if envelope is not None:
        outcome = Outcome(Kind.FAILURE, None, error_type, reason, "", finished_at=time.time())
        record = records.of(envelope, State.FAILURE, outcome=outcome)
        follow = failed(envelope, error_type, reason, records.expires_at(record))
    return Verdict(
        ("rejected", "dead_lettered"),
        dead=reason,
        record=record,
        log=(logging.WARNING, "dead-lettered %s: %s", (where, reason)),
        envelope=envelope,
        follow=follow,
    )


@dataclass(frozen=True, slots=True)
class SettlementPolicy:
    """The rules that turn a job's outcome into a verdict (see the module's docstring)."""

    records: Records
    max_message_size: int
    signer: Signer | None
    poison_limit: int

    @classmethod
    def of(cls, app: Conveyor, records: Records) -> SettlementPolicy:
        """The policy of `app`'s settings."""
        settings = app.settings
        return cls(records, settings.max_message_size, app.signer, settings.poison_limit)

    def settle(self, job: Job, outcome: Outcome) -> Verdict:
        """What to do now that `job` ended with `outcome`. May raise (a retry that cannot be
        encoded): `unsettled` then says what to do instead."""
        verdict = self._settle(job, outcome)
        if job.envelope.workflow is msgspec.UNSET or verdict.finished not in _FINAL:
            return verdict
        # A workflow's task that finished for good: what follows it goes out before its ack.
        ok = verdict.finished == "succeeded"
        follow = Follow(
            job.envelope,
            ok,
            outcome.value if ok else None,
            None if ok else outcome.error_type,
            None if ok else outcome.error_message,
            self.records.expires_at(verdict.record),
        )
        return msgspec.structs.replace(verdict, follow=follow)

    def _settle(self, job: Job, outcome: Outcome) -> Verdict:
        kind = outcome.kind
        if kind is Kind.SUCCESS:
            acks_late = job.task.options.acks_late
            if self.records.keep:
                record = self.records.of(
                    job.envelope, State.SUCCESS, outcome=outcome, started_at=job.started_at
                )
                if record is not None:
                    return Verdict(("succeeded",), "succeeded", ack=acks_late, record=record)
            return _SUCCEEDED_ACK if acks_late else _SUCCEEDED
        if kind is Kind.LOST:
            return self._lost(job, outcome)
        if kind is Kind.REVOKED:
            return self._revoked(job, outcome)
        if kind is Kind.RETRY and job.envelope.retries < max_retries(job, outcome):
            return self._retry(job, outcome)
        return self._failed(job, outcome)

    def unsettled(self, job: Job, exc: Exception) -> Verdict:
        """What to do when `settle` raised: settling must not fail silently, or the message
        would be stranded."""
        env, error_type = job.envelope, type(exc).__name__
        reason = Why.SETTLEMENT_FAILED(f"{error_type}: {exc}")
        if job.task.options.acks_late:
            return refused(self.records, job.delivery, reason, env, error_type)
        # Acknowledged before it ran: there is no message left to dead-letter.
        failure = Outcome(Kind.FAILURE, None, error_type, reason, "")
        record = self.records.of(env, State.FAILURE, outcome=failure)
        return Verdict(
            ("rejected",),
            record=record,
            follow=failed(env, error_type, reason, self.records.expires_at(record)),
            log=(logging.ERROR, "task %s[%s] failed: %s", (env.task, env.id, reason)),
        )

    def abandoned(self, job: Job) -> Verdict:
        """A job still running (or waiting in the pool) when a shutdown gives up on it.

        With acks_late its message goes back. Without, nothing does: a task outside any
        workflow just ends unknown, but one in a workflow is recorded as failed, and what follows
        it fails too (its chord with it), since nothing would ever finish it.
        """
        if job.task.options.acks_late:
            return _RELEASED
        env = job.envelope
        if env.workflow is msgspec.UNSET:
            return _ABANDONED
        message = "given up at a worker's shutdown (acknowledged before it ran, acks_late=False)"
        outcome = Outcome(Kind.FAILURE, None, "TaskAbandoned", message, "")
        record = self.records.of(env, State.FAILURE, outcome=outcome, started_at=job.started_at)
        return Verdict(
            ("abandoned",),
            record=record,
            follow=failed(env, "TaskAbandoned", message, self.records.expires_at(record)),
            envelope=env,
        )

    def _lost(self, job: Job, outcome: Outcome) -> Verdict:
        env = job.envelope
        if job.task.options.acks_late:
            runs = job.delivery.lost + 1
            return Verdict(
                ("lost",),
                "lost",
                release=True,
                log=(
                    logging.WARNING,
                    "task %s[%s] lost: %s; its message goes back (lost runs %d, poison limit %d)",
                    (env.task, env.id, outcome.error_message, runs, self.poison_limit),
                ),
            )
        # Acknowledged before it ran (at most once): nothing to give back, and what follows it
        # in a workflow fails with it rather than wait for a run that will not come.
        record = self.records.of(env, State.FAILURE, outcome=outcome, started_at=job.started_at)
        return Verdict(
            ("lost",),
            "lost",
            record=record,
            follow=failed(
                env,
                outcome.error_type or "WorkerLost",
                outcome.error_message or "the process running it died",
                self.records.expires_at(record),
            ),
            log=(logging.ERROR, "task %s[%s] lost: %s", (env.task, env.id, outcome.error_message)),
        )

    def _revoked(self, job: Job, outcome: Outcome) -> Verdict:
        env = job.envelope
        record = self.records.of(env, State.REVOKED, outcome=outcome, started_at=job.started_at)
        return Verdict(
            ("revoked",),
            "revoked" if outcome.took else None,  # stopped while it ran, or skipped unrun
            ack=job.task.options.acks_late,
            record=record,
            # What follows a revoked workflow task fails with it, its chord too.
            follow=failed(
                env,
                outcome.error_type or "TaskRevoked",
                outcome.error_message or "revoked",
                self.records.expires_at(record),
            ),
            log=(
                logging.INFO,
                "task %s[%s] revoked: %s",
                (env.task, env.id, outcome.error_message),
            ),
        )

    def _retry(self, job: Job, outcome: Outcome) -> Verdict:
        env = job.envelope
        delay = job.task.retry_delay(env.retries, outcome.countdown)
        retry = env.retried(time.time() + delay if delay > 0 else None)
        body = encode(retry, max_size=self.max_message_size, signer=self.signer)
        publish = Outgoing(retry.queue, body, retry.priority, retry.eta, job.delivery.reply_to)
        return Verdict(
            ("retried",),
            "retried",
            ack=job.task.options.acks_late,
            publish=publish,
            record=self.records.of(env, State.RETRY, outcome=outcome, started_at=job.started_at),
            log=(
                logging.INFO,
                "task %s[%s] will retry in %.2fs (try %d): %s",
                (env.task, env.id, delay, retry.retries + 1, _error(outcome)),
            ),
        )

    def _failed(self, job: Job, outcome: Outcome) -> Verdict:
        env, acks_late = job.envelope, job.task.options.acks_late
        gave_up = outcome.kind is Kind.RETRY
        if gave_up and outcome.error_type == Retry.__name__:
            # `raise self.retry()` without exc=: say what happened, not "Retry".
            outcome = dataclasses.replace(
                outcome,
                error_type=MaxRetriesExceeded.__name__,
                error_message=f"still failing after {env.retries} retries",
            )
        record = self.records.of(env, State.FAILURE, outcome=outcome, started_at=job.started_at)
        log: LogLine = (
            logging.ERROR,
            "task %s[%s] failed: %s\n%s",
            (env.task, env.id, _error(outcome), outcome.traceback),
        )
        if gave_up and acks_late:
            reason = Why.RETRIES_EXHAUSTED(
                f"gave up after {env.retries} retries: {_error(outcome)}"
            )
            return Verdict(
                ("failed", "dead_lettered"), "failed", dead=reason, record=record, log=log
            )
        # Out of retries with early acks, the message is gone already: nothing to acknowledge.
        return Verdict(("failed",), "failed", ack=acks_late and not gave_up, record=record, log=log)


def _error(outcome: Outcome) -> str:
    return f"{outcome.error_type}: {outcome.error_message}"
