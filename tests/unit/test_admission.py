"""Admission without a broker: each check a delivery passes before it runs, and the verdict on
one that fails it (dead-lettered by category, expired, delayed for its ETA)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from conveyor import Conveyor, DeadLetterReason, State
from conveyor.brokers import Delivery
from conveyor.message import Envelope, encode
from conveyor.settings import Secret
from conveyor.signing import Signer
from conveyor.testing import memory_app
from conveyor.worker.admission import EARLY_TOLERANCE_S, AdmissionPolicy
from conveyor.worker.execution import Job
from conveyor.worker.settlement import Records
from conveyor.worker.verdict import Verdict

Q = "default"
NOW = 1_700_000_000.0
MAX_SIZE = 2048
KEY = "signing-key-Kq3v-Zt7w-0a9f-Xe5m"
OTHER_KEY = "someone-else-Mz4q-Ty1h-7k3e-Vu0a"


@pytest.fixture
def app() -> Iterator[Conveyor]:
    application = memory_app(max_message_size=MAX_SIZE, poison_limit=3)

    @application.task(name="add")
    def add(x: int, y: int) -> int:
        return x + y

    @application.task(name="quiet", ignore_result=True)
    def quiet() -> None:
        pass

    yield application
    application.close()


def policy(app: Conveyor, *, isolates_tasks: bool = False, keep: bool = True) -> AdmissionPolicy:
    records = Records(app.tasks, keep, "host:1", app.settings.result_expires)
    return AdmissionPolicy.of(app, records, isolates_tasks=isolates_tasks)


def envelope(task: str = "add", **fields: object) -> Envelope:
    fields.setdefault("args", (1, 2))
    return Envelope(id="a" * 32, task=task, queue=Q, **fields)  # type: ignore[arg-type]


def delivery(body: bytes, count: int = 1, lost: int = 0) -> Delivery:
    return Delivery(Q, body, None, count, lost=lost)


def refusal(app: Conveyor, body: bytes, **options: bool) -> Verdict:
    verdict = policy(app, **options).admit(delivery(body), NOW)
    assert isinstance(verdict, Verdict)
    assert verdict.dead is not None
    assert verdict.counts == ("rejected", "dead_lettered")
    assert not (verdict.ack or verdict.release) and verdict.delay is None
    return verdict


# a delivery that passes


def test_a_delivery_that_passes_every_check_is_the_job_to_start(app: Conveyor) -> None:
    d = delivery(encode(envelope()))
    job = policy(app).admit(d, NOW)
    assert isinstance(job, Job)
    assert (job.delivery, job.task, job.started_at) == (d, app.tasks["add"], NOW)
    assert job.converted == ([1, 2], {})  # converted here, where a misfit is dead-lettered


def test_a_job_to_start_gets_a_started_record_unless_none_is_kept(app: Conveyor) -> None:
    job = policy(app).admit(delivery(encode(envelope())), NOW)
    assert isinstance(job, Job)
    record = policy(app).started(job)
    assert record is not None
    assert (record.id, record.state, record.task) == ("a" * 32, State.STARTED, "add")
    assert (record.worker, record.started_at, record.finished_at) == ("host:1", NOW, None)
    assert record.expires_at - record.updated_at == pytest.approx(app.settings.result_expires)
    assert policy(app, keep=False).started(job) is None
    quiet = policy(app).admit(delivery(encode(envelope("quiet", args=()))), NOW)
    assert isinstance(quiet, Job)
    assert policy(app).started(quiet) is None


# dead-lettered, by category


SIGNER = Signer(Secret(KEY), [])
OTHER = Signer(Secret(OTHER_KEY), [])
UNDECODABLE = [
    (b"x" * (MAX_SIZE + 1), False, DeadLetterReason.TOO_LARGE),
    (b"\x89PNG\r\n\x1a\n", False, DeadLetterReason.UNDECODABLE),
    (b'{"v": 1, "id": ', False, DeadLetterReason.MALFORMED_JSON),
    (b'{"v":1,"id":"a","id":"b","task":"t","queue":"q"}', False, DeadLetterReason.DUPLICATE_KEY),
    (b"[1, 2]", False, DeadLetterReason.NOT_AN_ENVELOPE),
    (b'{"v":2,"id":"a","task":"t","queue":"q"}', False, DeadLetterReason.UNKNOWN_VERSION),
    (b'{"v":1,"id":"a","task":"t"}', False, DeadLetterReason.INVALID_ENVELOPE),
    (encode(envelope()), True, DeadLetterReason.UNSIGNED),
    (encode(envelope(), signer=OTHER), True, DeadLetterReason.BAD_SIGNATURE),
    (encode(envelope(), signer=SIGNER), False, DeadLetterReason.UNEXPECTED_SIGNATURE),
]


@pytest.mark.parametrize(
    ("body", "signing", "category"), UNDECODABLE, ids=[c.name for _, _, c in UNDECODABLE]
)
def test_a_body_that_does_not_decode_is_dead_lettered_with_the_decoders_category(
    body: bytes, signing: bool, category: DeadLetterReason
) -> None:
    app = memory_app(max_message_size=MAX_SIZE, signing_key=KEY if signing else None)
    verdict = refusal(app, body)
    assert verdict.dead is not None and DeadLetterReason.of(verdict.dead) is category
    # Nothing to record (no task id) and nobody to route records to.
    assert verdict.record is None and verdict.envelope is None
    assert verdict.log == (
        logging.WARNING,
        "dead-lettered %s: %s",
        (f"a message on {Q}", verdict.dead),
    )
    app.close()


def test_an_unknown_task_is_dead_lettered_and_recorded_as_failed(app: Conveyor) -> None:
    env = envelope("nope")
    verdict = refusal(app, encode(env))
    assert verdict.dead == "unknown task: 'nope' is not registered on app 'test'"
    assert verdict.envelope == env
    assert verdict.record is not None
    assert (verdict.record.state, verdict.record.error_type) == (State.FAILURE, "UnknownTaskError")
    assert verdict.record.error_message == verdict.dead
    assert verdict.log == (
        logging.WARNING,
        "dead-lettered %s: %s",
        (f"task nope[{env.id}]", verdict.dead),
    )


def test_arguments_that_do_not_fit_are_dead_lettered(app: Conveyor) -> None:
    verdict = refusal(app, encode(envelope(args=("one", 2))))
    assert verdict.dead is not None
    assert DeadLetterReason.of(verdict.dead) is DeadLetterReason.BAD_ARGUMENTS
    assert verdict.dead.startswith("bad arguments: they do not fit task add: ")
    assert verdict.record is not None and verdict.record.error_type == "ArgumentError"


def test_a_task_that_ignores_results_is_dead_lettered_without_a_record(app: Conveyor) -> None:
    verdict = refusal(app, encode(envelope("quiet", args=(1,))))
    assert verdict.dead is not None and verdict.dead.startswith("bad arguments: ")
    assert verdict.record is None and verdict.envelope is not None


# poison


def test_in_process_pools_count_every_delivery_toward_the_poison_limit(app: Conveyor) -> None:
    body = encode(envelope())
    assert isinstance(policy(app).admit(delivery(body, count=3), NOW), Job)
    verdict = policy(app).admit(delivery(body, count=4), NOW)
    assert isinstance(verdict, Verdict)
    assert verdict.dead == (
        "poison message: delivered 4 times without finishing (poison limit 3): the process "
        "running it probably died"
    )
    assert verdict.counts == ("rejected", "dead_lettered")
    assert verdict.record is not None and verdict.record.error_type == "WorkerLost"


def test_a_pool_that_sees_runs_die_counts_those_runs_not_deliveries(app: Conveyor) -> None:
    """Prefork: deliveries after the worker's own death count no lost run, so a message only
    held through crashes runs; the runs seen to die, or ten times the limit of deliveries,
    dead-letter it. Pools that run tasks in the worker's process count every delivery."""
    prefork_like = policy(app, isolates_tasks=True)
    in_process = policy(app)
    assert prefork_like.poisoned(delivery(b"", 4, 0)) is None  # held through three worker deaths
    assert prefork_like.poisoned(delivery(b"", 30, 2)) is None
    died = prefork_like.poisoned(delivery(b"", 4, 3))
    assert died == "poison message: the process running it died in 3 runs (poison limit 3)"
    unseen = prefork_like.poisoned(delivery(b"", 31, 0))
    assert unseen is not None and unseen.startswith(
        "poison message: delivered 31 times without finishing (delivery limit 30, "
    )
    assert in_process.poisoned(delivery(b"", 3, 0)) is None
    counted = in_process.poisoned(delivery(b"", 4, 0))
    assert counted is not None and counted.startswith("poison message: delivered 4 times")
    body = encode(envelope())
    assert isinstance(prefork_like.admit(delivery(body, 4, 0), NOW), Job)
    assert isinstance(prefork_like.admit(delivery(body, 4, 3), NOW), Verdict)


def test_poison_is_checked_before_the_task_is_looked_up(app: Conveyor) -> None:
    verdict = refusal(app, encode(envelope("nope")), isolates_tasks=False)
    assert verdict.dead is not None and verdict.dead.startswith("unknown task: ")
    verdict = policy(app).admit(delivery(encode(envelope("nope")), count=4), NOW)
    assert isinstance(verdict, Verdict)
    assert verdict.dead is not None and verdict.dead.startswith("poison message: ")


# expired, early


def test_an_expired_message_is_acknowledged_and_recorded_as_failed(app: Conveyor) -> None:
    env = envelope(expires=NOW - 1)
    verdict = policy(app).admit(delivery(encode(env)), NOW)
    assert isinstance(verdict, Verdict)
    assert (verdict.counts, verdict.ack, verdict.dead, verdict.finished) == (
        ("expired",),
        True,
        None,
        None,
    )
    assert verdict.log == (
        logging.INFO,
        "task %s[%s] expired before it started",
        ("add", env.id),
    )
    record = verdict.record
    assert record is not None
    assert (record.state, record.error_type, record.error_message) == (
        State.FAILURE,
        "TaskExpired",
        "expired before it started",
    )
    assert isinstance(policy(app).admit(delivery(encode(envelope(expires=NOW + 1))), NOW), Job)


def test_a_message_delivered_before_its_eta_is_delayed_for_the_rest(app: Conveyor) -> None:
    verdict = policy(app).admit(delivery(encode(envelope(eta=NOW + 2.5))), NOW)
    assert isinstance(verdict, Verdict)
    assert verdict.delay == pytest.approx(2.5)
    assert (verdict.counts, verdict.ack, verdict.dead, verdict.record, verdict.log) == (
        (),
        False,
        None,
        None,
        None,
    )
    assert verdict.envelope is not None
    on_time = envelope(eta=NOW + EARLY_TOLERANCE_S / 2)
    assert isinstance(policy(app).admit(delivery(encode(on_time)), NOW), Job)


def test_expiry_is_checked_before_the_eta(app: Conveyor) -> None:
    verdict = policy(app).admit(delivery(encode(envelope(eta=NOW + 5, expires=NOW - 1))), NOW)
    assert isinstance(verdict, Verdict) and verdict.counts == ("expired",)
