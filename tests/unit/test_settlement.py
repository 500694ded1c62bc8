"""Settlement without a broker: what each outcome of a job means for its message, its record,
the counts and the log; and how the consumer's pending settlements take a verdict in."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import msgspec
import pytest

from conveyor import Conveyor, DeadLetterReason, State
from conveyor.brokers import Delivery, Outgoing
from conveyor.errors import EncodeError, Retry
from conveyor.message import Envelope, decode, new_id
from conveyor.testing import memory_app
from conveyor.worker.execution import Job, Kind, Outcome
from conveyor.worker.settlement import Records, SettlementPolicy
from conveyor.worker.verdict import Settlements, Verdict, WorkerStats

Q = "default"
STARTED = 1_700_000_000.0


@pytest.fixture
def app() -> Iterator[Conveyor]:
    application = memory_app(max_message_size=2048, poison_limit=3, default_max_retries=1)

    @application.task(name="late", retry_backoff=2, retry_jitter=False, retry_backoff_max=5)
    def late(x: str) -> None:
        pass

    @application.task(name="early", acks_late=False, max_retries=2)
    def early(x: str) -> None:
        pass

    yield application
    application.close()


def policy(app: Conveyor, *, keep: bool = True) -> SettlementPolicy:
    return SettlementPolicy.of(app, Records(app.tasks, keep, "host:1", 60.0))


def job(
    app: Conveyor, task: str = "late", *, retries: int = 0, lost: int = 0, **fields: object
) -> Job:
    env = Envelope(id=new_id(), task=task, queue=Q, args=("x",), retries=retries, **fields)  # type: ignore[arg-type]
    delivery = Delivery(Q, b"body", None, 1, reply_to="reply-here", lost=lost)
    return Job(delivery, env, app.tasks[task], started_at=STARTED)


def failure(exc: BaseException) -> Outcome:
    try:
        raise exc
    except BaseException as raised:
        return Outcome.failure(raised)


def retry(exc: BaseException, countdown: float | None = None, most: int | None = None) -> Outcome:
    outcome = failure(exc)
    outcome.kind, outcome.countdown, outcome.max_retries = Kind.RETRY, countdown, most
    return outcome


def success() -> Outcome:
    return Outcome(Kind.SUCCESS, msgspec.Raw(b"42"), finished_at=time.time(), took=0.01)


# success


@pytest.mark.parametrize(("task", "ack"), [("late", True), ("early", False)])
def test_a_success_is_recorded_and_acknowledged_with_late_acks(
    app: Conveyor, task: str, ack: bool
) -> None:
    verdict = policy(app).settle(job(app, task), success())
    assert (verdict.counts, verdict.finished, verdict.ack) == (("succeeded",), "succeeded", ack)
    assert (verdict.dead, verdict.release, verdict.publish, verdict.log) == (
        None,
        False,
        None,
        None,
    )
    record = verdict.record
    assert record is not None
    assert (record.state, record.value, record.worker) == (
        State.SUCCESS,
        msgspec.Raw(b"42"),
        "host:1",
    )
    assert (record.started_at, record.retries) == (STARTED, 0)
    assert record.finished_at is not None and record.expires_at - record.updated_at == 60.0


def test_a_success_with_nothing_to_record_is_one_shared_verdict(app: Conveyor) -> None:
    first = policy(app, keep=False).settle(job(app), success())
    assert first is policy(app, keep=False).settle(job(app), success())
    assert (first.ack, first.record) == (True, None)


# retries


def test_a_retry_publishes_the_next_try_after_its_countdown(app: Conveyor) -> None:
    j = job(app, retries=0)
    before = time.time()
    verdict = policy(app).settle(j, retry(ConnectionError("down"), countdown=30))
    assert (verdict.counts, verdict.finished, verdict.ack) == (("retried",), "retried", True)
    out = verdict.publish
    assert out is not None and out.deliver_at is not None
    assert before + 30 <= out.deliver_at <= time.time() + 30
    assert (out.queue, out.reply_to) == (Q, "reply-here")
    sent = decode(out.body)
    assert (sent.id, sent.retries, sent.eta) == (j.envelope.id, 1, out.deliver_at)
    assert verdict.record is not None and verdict.record.state is State.RETRY
    assert verdict.log == (
        logging.INFO,
        "task %s[%s] will retry in %.2fs (try %d): %s",
        ("late", j.envelope.id, 30, 2, "ConnectionError: down"),
    )


def test_a_retry_without_countdown_waits_the_tasks_backoff_up_to_its_ceiling(
    app: Conveyor,
) -> None:
    for retries, delay in [(0, 2.0), (1, 4.0), (2, 5.0)]:
        verdict = policy(app).settle(job(app, retries=retries, max_retries=9), retry(KeyError()))
        assert verdict.log is not None and verdict.log[2][2] == delay


def test_a_retry_due_now_is_published_without_a_due_time(app: Conveyor) -> None:
    verdict = policy(app).settle(job(app), retry(KeyError(), countdown=0))
    assert verdict.publish is not None and verdict.publish.deliver_at is None


@pytest.mark.parametrize(
    ("call", "message", "retried"),
    [
        (2, 0, True),  # the retry() call's limit wins over the message's
        (None, 2, True),  # then the message's, over the task's and the app's (1)
        (None, 1, False),
        (None, None, False),  # then the app's default_max_retries: 1
    ],
)
def test_max_retries_precedence(
    app: Conveyor, call: int | None, message: int | None, retried: bool
) -> None:
    verdict = policy(app).settle(
        job(app, retries=1, max_retries=message), retry(KeyError(), 0, call)
    )
    assert verdict.counts == (("retried",) if retried else ("failed", "dead_lettered"))


def test_the_tasks_max_retries_comes_before_the_apps(app: Conveyor) -> None:
    verdict = policy(app).settle(job(app, "early", retries=1), retry(KeyError(), 0))
    assert verdict.counts == ("retried",)
    verdict = policy(app).settle(job(app, "early", retries=2), retry(KeyError(), 0))
    assert verdict.counts == ("failed",)


def test_out_of_retries_with_late_acks_fails_and_dead_letters(app: Conveyor) -> None:
    j = job(app, retries=1)
    outcome = retry(ConnectionError("still down"))
    verdict = policy(app).settle(j, outcome)
    assert (verdict.counts, verdict.finished) == (("failed", "dead_lettered"), "failed")
    assert (verdict.ack, verdict.publish) == (False, None)
    assert verdict.dead == "retries exhausted: gave up after 1 retries: ConnectionError: still down"
    assert DeadLetterReason.of(verdict.dead) is DeadLetterReason.RETRIES_EXHAUSTED
    assert verdict.record is not None and verdict.record.state is State.FAILURE
    assert verdict.record.error_type == "ConnectionError"


def test_out_of_retries_from_a_bare_retry_says_so_not_retry(app: Conveyor) -> None:
    outcome = retry(Retry(0, None, None))
    verdict = policy(app).settle(job(app, retries=1), outcome)
    assert verdict.record is not None
    assert (verdict.record.error_type, verdict.record.error_message) == (
        "MaxRetriesExceeded",
        "still failing after 1 retries",
    )
    assert verdict.dead == (
        "retries exhausted: gave up after 1 retries: "
        "MaxRetriesExceeded: still failing after 1 retries"
    )
    assert outcome.error_type == "Retry"  # the outcome itself is left as it was


def test_out_of_retries_with_early_acks_leaves_the_message_alone(app: Conveyor) -> None:
    verdict = policy(app).settle(job(app, "early", retries=2), retry(KeyError()))
    assert verdict.counts == ("failed",)
    assert (verdict.ack, verdict.dead, verdict.release) == (False, None, False)
    assert verdict.record is not None and verdict.record.state is State.FAILURE


# failure, lost


@pytest.mark.parametrize(("task", "ack"), [("late", True), ("early", False)])
def test_a_failure_is_recorded_logged_and_acknowledged_with_late_acks(
    app: Conveyor, task: str, ack: bool
) -> None:
    j, outcome = job(app, task), failure(ValueError("bad"))
    verdict = policy(app).settle(j, outcome)
    assert (verdict.counts, verdict.finished, verdict.ack, verdict.dead) == (
        ("failed",),
        "failed",
        ack,
        None,
    )
    assert verdict.log == (
        logging.ERROR,
        "task %s[%s] failed: %s\n%s",
        (task, j.envelope.id, "ValueError: bad", outcome.traceback),
    )
    assert verdict.record is not None and verdict.record.traceback == outcome.traceback


def test_a_lost_run_with_late_acks_gives_the_message_back(app: Conveyor) -> None:
    j = job(app, lost=1)
    outcome = Outcome(Kind.LOST, None, "WorkerLost", "the child died (signal 9)")
    verdict = policy(app).settle(j, outcome)
    assert (verdict.counts, verdict.finished, verdict.release) == (("lost",), "lost", True)
    assert (verdict.ack, verdict.dead, verdict.record) == (False, None, None)
    assert verdict.log == (
        logging.WARNING,
        "task %s[%s] lost: %s; its message goes back (lost runs %d, poison limit %d)",
        ("late", j.envelope.id, "the child died (signal 9)", 2, 3),
    )


def test_a_lost_run_with_early_acks_is_recorded_as_failed(app: Conveyor) -> None:
    j = job(app, "early")
    outcome = Outcome(Kind.LOST, None, "WorkerLost", "the child died (signal 9)")
    verdict = policy(app).settle(j, outcome)
    assert (verdict.counts, verdict.finished, verdict.release, verdict.ack) == (
        ("lost",),
        "lost",
        False,
        False,
    )
    assert verdict.record is not None
    assert (verdict.record.state, verdict.record.error_type) == (State.FAILURE, "WorkerLost")
    assert verdict.log == (
        logging.ERROR,
        "task %s[%s] lost: %s",
        ("early", j.envelope.id, "the child died (signal 9)"),
    )


# an outcome that cannot be settled


@pytest.mark.parametrize("task", ["late", "early"])
def test_a_retry_too_large_to_send_is_rejected(app: Conveyor, task: str) -> None:
    rules = policy(app)
    j = job(app, task, headers={"pad": "x" * 2000})
    with pytest.raises(EncodeError) as raised:
        rules.settle(j, retry(KeyError(), 0, 5))
    verdict = rules.unsettled(j, raised.value)
    assert verdict.finished is None and verdict.ack is False
    assert verdict.record is not None and verdict.record.error_type == "EncodeError"
    reason = verdict.record.error_message
    assert reason is not None and reason.startswith("settlement failed: EncodeError: ")
    if task == "late":
        assert (verdict.counts, verdict.dead) == (("rejected", "dead_lettered"), reason)
    else:  # acknowledged before it ran: nothing left to dead-letter
        assert (verdict.counts, verdict.dead) == (("rejected",), None)
        assert verdict.log == (
            logging.ERROR,
            "task %s[%s] failed: %s",
            ("early", j.envelope.id, reason),
        )


# the consumer's side


def test_pending_settlements_take_each_verdict_where_it_belongs() -> None:
    pending, stats = Settlements(), WorkerStats()
    d = [Delivery(Q, b"", n) for n in range(5)]
    out = Outgoing(Q, b"next")
    verdicts = [
        Verdict(("succeeded",), ack=True),
        Verdict(("failed", "dead_lettered"), dead="retries exhausted: x"),
        Verdict(("lost",), release=True),
        Verdict(delay=2.5),
        Verdict(("retried",), ack=True, publish=out),
    ]
    for delivery, verdict in zip(d, verdicts, strict=True):
        pending.add(delivery, verdict)
        stats.count(verdict.counts)
    assert (pending.acks, pending.dead, pending.release, pending.delay, pending.publish) == (
        [d[0], d[4]],
        [(d[1], "retries exhausted: x")],
        [d[2]],
        [(d[3], 2.5)],
        [out],
    )
    assert (stats.succeeded, stats.failed, stats.dead_lettered, stats.lost, stats.retried) == (
        1,
        1,
        1,
        1,
        1,
    )
