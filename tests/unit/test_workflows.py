"""Workflows on the memory broker: signatures, chains, groups, chords, error callbacks, nesting,
and the redeliveries a chord must survive without hanging or firing twice."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from conveyor import (
    ConfigurationError,
    Conveyor,
    GroupResult,
    MemberFailed,
    Result,
    State,
    TaskFailed,
    UnknownTaskError,
    chain,
    chord,
    group,
)
from conveyor.brokers import Outgoing
from conveyor.errors import ArgumentError
from conveyor.message import Envelope, decode, encode
from conveyor.testing import memory_app, run_until_empty
from conveyor.workflows import wire
from conveyor.workflows.canvas import _Compiler
from conveyor.workflows.joins import joins_for
from conveyor.workflows.plan import NO_VALUE, Continuations, Follow, Sends, start

Q = "default"


@pytest.fixture
def app() -> Iterator[Conveyor]:
    application = memory_app()
    yield application
    application.close()


class Tasks:
    """The tasks every test uses, registered on one app, with a log of the callbacks' runs."""

    def __init__(self, app: Conveyor) -> None:
        self.calls: list[tuple[str, Any]] = []
        lock = threading.Lock()

        def note(name: str, value: Any) -> None:
            with lock:
                self.calls.append((name, value))

        @app.task
        def add(x: int, y: int) -> int:
            return x + y

        @app.task
        def total(values: list[int], bonus: int = 0) -> int:
            note("total", values)
            return sum(values) + bonus

        @app.task
        def boom(x: int) -> int:
            raise ValueError(f"boom {x}")

        @app.task
        def on_error(task_id: str) -> None:
            note("on_error", task_id)

        @app.task
        def echo(value: Any) -> Any:
            note("echo", value)
            return value

        @app.task(bind=True)
        def flaky(self: Any, x: int) -> int:
            if self.request.retries < 2:
                raise self.retry(countdown=0)
            return x

        self.add, self.total, self.boom, self.on_error = add, total, boom, on_error
        self.echo, self.flaky = echo, flaky

    def runs(self, name: str) -> list[Any]:
        return [value for n, value in self.calls if n == name]


@pytest.fixture
def tasks(app: Conveyor) -> Tasks:
    return Tasks(app)


def run(app: Conveyor) -> Any:
    return run_until_empty(app, pool="threads", concurrency=2)


# signatures


def test_signature_partial_immutable_and_set(app: Conveyor, tasks: Tasks) -> None:
    sig = tasks.add.s(2)
    assert repr(sig) == "test_workflows.add(2)" or repr(sig).endswith("add(2)")
    r1 = sig.delay(3)
    r2 = tasks.add.si(4, 4).set(queue="other", priority=3).apply_async()
    assert isinstance(r1, Result)
    run_until_empty(app, queues=[Q, "other"])
    assert (r1.get(1), r2.get(1)) == (5, 8)
    with pytest.raises(ConfigurationError, match="did you mean 'countdown'"):
        sig.set(countdwn=3)
    with pytest.raises(ConfigurationError, match="priority must be an integer"):
        sig.set(priority=12).delay(1)
    with pytest.raises(ArgumentError):
        tasks.add.si(1).delay()  # immutable: its arguments are all it gets


def test_signature_task_id_is_the_results_id(app: Conveyor, tasks: Tasks) -> None:
    result = tasks.add.s(1, 1).set(task_id="mine").apply_async()
    assert result.id == "mine"
    run(app)
    assert app.result("mine").get(1) == 2


# chains


def test_chain_passes_each_result_on_and_returns_the_last(app: Conveyor, tasks: Tasks) -> None:
    piped = (tasks.add.s(1, 2) | tasks.add.s(10) | tasks.add.s(100)).apply_async()
    called = chain(tasks.add.s(1, 1), tasks.add.si(5, 5), tasks.add.s(1)).apply_async()
    listed = chain([tasks.add.s(0, 1), tasks.add.s(1)]).apply_async()
    run(app)
    assert (piped.get(1), called.get(1), listed.get(1)) == (113, 11, 2)


def test_chain_ids_are_assigned_before_anything_is_sent(app: Conveyor, tasks: Tasks) -> None:
    result = (tasks.add.s(1, 2) | tasks.add.s(3).set(task_id="last")).apply_async()
    assert result.id == "last"
    [message] = app.broker.fetch([Q], 10)
    envelope = decode(message.body)
    assert isinstance(envelope.workflow, wire.Workflow)
    [then] = envelope.workflow.then
    assert isinstance(then, wire.Call) and then.id == "last"


def test_a_failure_stops_the_chain_and_its_result_raises_it(app: Conveyor, tasks: Tasks) -> None:
    result = (tasks.add.s(1, 1) | tasks.boom.s() | tasks.add.s(5) | tasks.add.s(6)).apply_async()
    run(app)
    with pytest.raises(TaskFailed, match="ValueError: boom 2") as failed:
        result.get(1)
    assert "not run" in failed.value.traceback
    assert tasks.runs("total") == []


def test_link_error_runs_with_the_failed_task_id(app: Conveyor, tasks: Tasks) -> None:
    failing = tasks.boom.s(1)
    failing.link_error(tasks.on_error.s())
    result = (tasks.add.s(1, 1) | failing).apply_async()
    whole = (tasks.add.s(2, 2) | tasks.boom.s()).link_error(tasks.on_error.s()).apply_async()
    run(app)
    with pytest.raises(TaskFailed):
        result.get(1)
    with pytest.raises(TaskFailed):
        whole.get(1)
    assert sorted(tasks.runs("on_error")) == sorted([result.id, whole.id])


def test_a_plain_message_has_no_workflow_field(app: Conveyor, tasks: Tasks) -> None:
    tasks.add.delay(1, 2)
    [message] = app.broker.fetch([Q], 1)
    assert b'"workflow"' not in message.body
    assert isinstance(decode(message.body).workflow, msgspec.UnsetType)


# groups


def test_group_results_in_order_ready_and_completed_count(app: Conveyor, tasks: Tasks) -> None:
    result = group(tasks.add.s(i, i) for i in range(10)).apply_async()
    assert isinstance(result, GroupResult) and len(result) == 10
    assert not result.ready() and result.completed_count() == 0
    run(app)
    assert result.ready() and result.completed_count() == 10
    assert result.get(timeout=1) == [2 * i for i in range(10)]


def test_a_failed_group_member_is_reported_by_index(app: Conveyor, tasks: Tasks) -> None:
    result = group(tasks.add.s(1, 1), tasks.add.s(2, 2), tasks.boom.s(7)).apply_async()
    run(app)
    assert result.ready() and result.completed_count() == 2 and result.failed()
    with pytest.raises(MemberFailed, match="group member 2") as failed:
        result.get(1)
    assert failed.value.index == 2 and failed.value.type_name == "ValueError"


# chords


def test_chord_callback_gets_results_in_order_once(app: Conveyor, tasks: Tasks) -> None:
    first = chord([tasks.add.s(i, 1) for i in range(20)], tasks.total.s(bonus=1)).apply_async()
    second = (group(tasks.add.s(i, 0) for i in range(3)) | tasks.total.s()).apply_async()
    called = chord(group(tasks.add.s(1, 1), tasks.add.s(2, 2)))(tasks.total.s())
    run(app)
    assert first.get(1) == sum(range(1, 21)) + 1
    assert (second.get(1), called.get(1)) == (3, 6)
    assert sorted(map(len, tasks.runs("total"))) == [2, 3, 20]
    assert [i + 1 for i in range(20)] in tasks.runs("total")


def test_empty_chord_calls_back_with_nothing(app: Conveyor, tasks: Tasks) -> None:
    result = chord([], tasks.total.s()).apply_async()
    run(app)
    assert result.get(1) == 0


def test_a_failed_member_fails_the_chord_naming_its_index(app: Conveyor, tasks: Tasks) -> None:
    callback = tasks.total.s()
    callback.link_error(tasks.on_error.s())
    result = chord([tasks.add.s(1, 1), tasks.boom.s(3), tasks.add.s(2, 2)], callback).apply_async()
    run(app)
    with pytest.raises(TaskFailed, match=r"chord member 1 .*ValueError: boom 3"):
        result.get(1)
    assert result.state is State.FAILURE
    assert tasks.runs("total") == []
    assert len(tasks.runs("on_error")) == 1


def test_pass_errors_gives_the_callback_the_failure(app: Conveyor, tasks: Tasks) -> None:
    result = chord([tasks.add.s(1, 1), tasks.boom.s(3)], tasks.echo.s(), pass_errors=True).delay()
    run(app)
    ok, failed = result.get(1)
    assert ok == 2
    assert failed["error_type"] == "ValueError" and failed["error_message"] == "boom 3"


def test_chord_members_that_retry_still_call_back_once(app: Conveyor, tasks: Tasks) -> None:
    result = chord([tasks.flaky.s(i) for i in range(5)], tasks.total.s()).apply_async()
    stats = run(app)
    assert result.get(1) == 10
    assert stats.retried == 10
    assert tasks.runs("total") == [[0, 1, 2, 3, 4]]


# nesting


def test_nested_workflows(app: Conveyor, tasks: Tasks) -> None:
    # a chain of groups: the first group's results go to each member of the second
    groups = (
        tasks.add.s(1, 1) | group(tasks.add.s(1), tasks.add.s(2)) | group(tasks.echo.s())
    ).apply_async()
    # a chord in a chain, followed by a task
    inner = (
        tasks.add.s(1, 1)
        | chord([tasks.add.s(1), tasks.add.s(2)], tasks.total.s())
        | tasks.add.s(1)
    ).apply_async()
    # chains and chords as members of a chord
    deep = chord(
        [
            tasks.add.s(1, 1) | tasks.add.s(1),
            chord([tasks.add.s(1, 1), tasks.add.s(2, 2)], tasks.total.s()),
            tasks.add.s(5, 5),
        ],
        tasks.total.s(),
    ).apply_async()
    # chains as members of a group
    members = group(tasks.add.s(1, 1) | tasks.add.s(1), tasks.add.s(0, 0)).apply_async()
    run(app)
    assert isinstance(groups, GroupResult)
    assert groups.get(1) == [[3, 4]]
    assert inner.get(1) == (3 + 4) + 1
    assert deep.get(1) == 3 + 6 + 10
    assert isinstance(members, GroupResult) and members.get(1) == [3, 0]


# bad input


def test_an_unregistered_task_is_refused_at_send_by_name(app: Conveyor, tasks: Tasks) -> None:
    other = memory_app("other")

    @other.task
    def stranger(x: int) -> int:
        return x

    with pytest.raises(UnknownTaskError, match="stranger"):
        (tasks.add.s(1, 1) | stranger.s()).apply_async()
    with pytest.raises(UnknownTaskError, match="stranger"):
        chord([tasks.add.s(1, 1)], stranger.s()).apply_async()
    assert app.broker.stats([Q])[0].ready == 0
    other.close()


def test_a_chord_without_a_result_store_is_refused_before_sending() -> None:
    app = Conveyor("bare", broker="memory://", results=None)

    @app.task
    def one() -> int:
        return 1

    @app.task
    def many(values: list[int]) -> int:
        return len(values)

    with pytest.raises(ConfigurationError, match="chord needs a result store"):
        chord([one.si()], many.s()).apply_async()
    assert app.broker.stats([Q])[0].ready == 0
    app.close()


def test_rpc_results_are_refused_with_a_reason() -> None:
    app = Conveyor("rpc", broker="memory://", results="rpc://")

    @app.task
    def one() -> int:
        return 1

    with pytest.raises(ConfigurationError, match=r"rpc://"):
        (one.si() | one.si()).apply_async()
    app.close()


def test_a_group_as_a_chord_member_gives_its_list(app: Conveyor, tasks: Tasks) -> None:
    nested = chord(
        [group(tasks.add.s(1, 1), tasks.add.s(2, 2)), tasks.add.s(0, 5)], tasks.echo.s()
    ).apply_async()
    # A chord whose callback is a group followed by a task: the task gets the group's list.
    body = (
        chord([tasks.add.s(1, 0), tasks.add.s(2, 0)], group(tasks.total.s(), tasks.total.s()))
        | tasks.echo.s()
    ).apply_async()
    run(app)
    assert nested.get(1) == [[2, 4], 5]
    assert body.get(1) == [3, 3]


def test_a_malformed_workflow_field_is_dead_lettered_with_its_reason(
    app: Conveyor, tasks: Tasks
) -> None:
    good = (tasks.add.s(1, 1) | tasks.add.s(1)).apply_async()
    body = (
        b'{"v":1,"id":"bad","task":"' + tasks.add.name.encode() + b'","queue":"default",'
        b'"args":[1,2],"workflow":{"v":1,"then":[{"kind":"call","id":"x"}]}}'
    )
    app.broker.publish([Outgoing(Q, body)])
    stats = run(app)
    [letter] = app.broker.dead_letters(Q)
    assert "invalid envelope" in letter.reason and "$.workflow.then[0]" in letter.reason
    assert letter.body == body  # kept whole, to be mended and requeued
    assert stats.dead_lettered == 1
    assert good.get(1) == 3  # the rest goes on


def test_a_dead_lettered_member_fails_its_chord(app: Conveyor, tasks: Tasks) -> None:
    with pytest.raises(ArgumentError):  # the first tasks' arguments are checked at send
        chord([tasks.add.s(1, 1), tasks.add.s("x", 1)], tasks.total.s()).apply_async()
    # Members started by a worker get their first argument there: one that does not fit is
    # dead-lettered, and its chord fails instead of waiting for it.
    late = tasks.add.s(1, 1) | chord([tasks.add.s(1), tasks.add.s("x")], tasks.total.s())
    result = late.apply_async()
    stats = run(app)
    assert stats.dead_lettered == 1
    with pytest.raises(TaskFailed, match="chord member 1"):
        result.get(1)
    assert tasks.runs("total") == []


# redeliveries


def _chord_follows(app: Conveyor, tasks: Tasks, size: int) -> tuple[str, list[Follow]]:
    """A chord kept in the store, and the follow-ups of its members as if each succeeded."""
    node, handle = _Compiler(app).compile(
        chord([tasks.add.s(i, 0) for i in range(size)], tasks.total.s())
    )
    sends = Sends()
    start(node, NO_VALUE, sends, root_id=None, parent_id=None, nonce=False, now=time.time())
    joins_for(app.results).start(sends.chords, time.time() + 60)
    follows = [
        Follow(env, True, msgspec.Raw(str(i).encode()), None, None, time.time() + 60)
        for i, env in enumerate(sends.envelopes)
    ]
    return handle.id, follows


def test_a_redelivered_member_calls_back_again_but_the_copy_does_not_run(
    app: Conveyor, tasks: Tasks
) -> None:
    callback_id, follows = _chord_follows(app, tasks, 3)
    continuations = Continuations(app)
    assert continuations.plan(follows[:2]).publish == []
    first = continuations.plan(follows[2:])
    # The worker died before marking the chord fired: the last member comes back, settles again.
    again = continuations.plan(follows[2:])
    assert len(first.publish) == len(again.publish) == 1
    copies = [decode(o.body) for o in first.publish + again.publish]
    assert {c.id for c in copies} == {callback_id}
    assert copies[0].workflow != copies[1].workflow  # another nonce
    app.broker.publish(first.publish + again.publish)
    stats = run(app)
    assert tasks.runs("total") == [[0, 1, 2]]
    assert stats.skipped == 1 and stats.succeeded == 1
    assert app.result(callback_id).get(1) == 3
    continuations.fired(first.fired)
    assert continuations.plan(follows).publish == []  # fired: nothing goes out again


def test_a_member_counted_twice_still_counts_once(app: Conveyor, tasks: Tasks) -> None:
    _, follows = _chord_follows(app, tasks, 3)
    continuations = Continuations(app)
    assert continuations.plan([follows[0], follows[0], follows[1], follows[1]]).publish == []
    assert len(continuations.plan([follows[2]]).publish) == 1


def test_an_old_envelope_without_the_field_decodes_unchanged() -> None:
    envelope = Envelope(id="a", task="t", queue="q", args=(1,))
    body = encode(envelope)
    assert b'"workflow"' not in body and decode(body) == envelope


def test_a_skipped_member_fails_its_chord_and_a_skipped_link_its_chain() -> None:
    from conveyor.errors import TaskSkipped
    from conveyor.middleware import Middleware

    class SkipSevens(Middleware):
        def before_admit(self, task: Any, request: Any) -> None:
            if request.args and request.args[0] == 7:
                raise TaskSkipped("sevens are revoked")

    app = memory_app(middleware=[SkipSevens()])
    tasks = Tasks(app)
    joined = chord([tasks.add.s(1, 1), tasks.add.s(7, 0)], tasks.total.s()).apply_async()
    chained = (tasks.add.s(3, 4) | tasks.add.s(1) | tasks.add.s(1)).apply_async()
    run(app)
    with pytest.raises(TaskFailed, match=r"chord member 1 .*sevens are revoked"):
        joined.get(1)
    with pytest.raises(TaskFailed, match="sevens are revoked"):
        chained.get(1)
    assert tasks.runs("total") == []
    app.close()


# bulk


def test_starmap_is_one_message_for_many_calls(app: Conveyor, tasks: Tasks) -> None:
    result = tasks.add.starmap([(i, i) for i in range(100)]).apply_async()
    assert app.broker.stats([Q])[0].ready == 1
    stats = run(app)
    assert stats.succeeded == 1
    assert result.get(1) == [2 * i for i in range(100)]
    with pytest.raises(ArgumentError, match="item 1"):
        tasks.add.starmap([(1, 2), (1,)])


def test_chunks_are_a_group_of_bulk_messages(app: Conveyor, tasks: Tasks) -> None:
    result = tasks.add.chunks([(i, 0) for i in range(10)], 4).apply_async()
    assert isinstance(result, GroupResult) and len(result) == 3
    summed = (tasks.add.chunks([(i, 0) for i in range(10)], 4) | tasks.echo.s()).apply_async()
    run(app)
    assert result.get(1) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert summed.get(1) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(ConfigurationError, match="positive number"):
        tasks.add.chunks([(1, 1)], 0)


def test_map_still_sends_one_message_per_call(app: Conveyor, tasks: Tasks) -> None:
    results = tasks.add.map([(1, 1), (2, 2)])
    assert app.broker.stats([Q])[0].ready == 2
    run(app)
    assert [r.get(1) for r in results] == [2, 4]


def test_a_worker_without_a_store_says_so_and_goes_on(
    app: Conveyor, tasks: Tasks, caplog: pytest.LogCaptureFixture
) -> None:
    _, follows = _chord_follows(app, tasks, 1)
    bare = Conveyor("bare", broker="memory://", results=None)
    plan = Continuations(bare).plan(follows)
    assert plan.publish == [] and plan.fired == []
    assert "cannot keep workflows" in caplog.text and "cannot be joined" in caplog.text
    assert Continuations(bare).claim([follows[0].envelope], time.time() + 60) == [True]
    bare.close()


@pytest.mark.parametrize("pool", ["threads", "solo", "asyncio"])
def test_every_in_process_pool_runs_workflows(pool: str) -> None:
    app = memory_app()
    tasks = Tasks(app)

    @app.task
    async def double(x: int) -> int:
        return 2 * x

    chained = (tasks.add.s(1, 2) | double.s() | tasks.add.s(1)).apply_async()
    joined = chord([double.s(i) for i in range(5)], tasks.total.s()).apply_async()
    run_until_empty(app, pool=pool, concurrency=2)
    assert (chained.get(1), joined.get(1)) == (7, 20)
    app.close()


def test_asyncio_producers_send_workflows(app: Conveyor, tasks: Tasks) -> None:
    import asyncio

    async def produce() -> tuple[Any, Any]:
        joined = await chord([tasks.add.s(i, 1) for i in range(3)], tasks.total.s()).delay_async()
        single = await tasks.add.s(1).delay_async(2)
        return joined, single

    joined, single = asyncio.run(produce())
    run(app)
    assert (joined.get(1), single.get(1)) == (6, 3)


def test_members_that_keep_no_result_still_join(app: Conveyor, tasks: Tasks) -> None:
    # In Celery, a chord whose members ignore their results never calls back.
    @app.task(ignore_result=True)
    def quiet(x: int) -> int:
        return x * 10

    joined = chord([quiet.s(i) for i in range(4)], tasks.total.s()).apply_async()
    grouped = group(chord([quiet.s(1), quiet.s(2)], tasks.total.s()), tasks.add.s(1, 1)).delay()
    run(app)
    assert joined.get(1) == 60
    assert isinstance(grouped, GroupResult) and grouped.get(1) == [30, 2]


def test_a_revoked_member_fails_its_chord_and_is_named_in_its_group(
    app: Conveyor, tasks: Tasks
) -> None:
    members = group(tasks.add.s(1, 1), tasks.add.s(2, 2)).apply_async()
    assert isinstance(members, GroupResult)
    member = tasks.add.s(2, 2).set(task_id="revoked-member")
    joined = chord([tasks.add.s(1, 1), member], tasks.total.s()).apply_async()
    chained = (tasks.add.s(1, 1).set(task_id="revoked-link") | tasks.add.s(1)).apply_async()
    members[1].revoke()
    app.result("revoked-member").revoke()
    app.result("revoked-link").revoke()
    run(app)
    with pytest.raises(MemberFailed) as failed:
        members.get(1)
    assert failed.value.index == 1 and failed.value.type_name == "TaskRevoked"
    with pytest.raises(TaskFailed, match=r"chord member 1 .*TaskRevoked"):
        joined.get(1)
    with pytest.raises(TaskFailed, match="TaskRevoked"):
        chained.get(1)
    assert tasks.runs("total") == []


# a workflow's task acknowledged before it ran, that never finishes


def _early_first_link(app: Conveyor) -> tuple[Any, Any, Result[Any]]:
    """A chain whose first link acks early, sent but not run: (policy, its job, the chain's
    result)."""
    from conveyor.worker.execution import Job
    from conveyor.worker.settlement import Records, SettlementPolicy

    @app.task(name="wf.early", acks_late=False)
    def early(x: int) -> int:
        return x

    @app.task(name="wf.then")
    def then(x: int) -> int:
        return x + 1

    result = chain(early.s(1), then.s()).apply_async()
    (delivery,) = app.broker.fetch([app.settings.default_queue], 1)
    envelope = decode(delivery.body)
    assert envelope.workflow is not msgspec.UNSET
    policy = SettlementPolicy.of(app, Records(app.tasks, True, "host:1", 60.0))
    return policy, Job(delivery, envelope, early, started_at=time.time()), result


def test_an_early_acked_link_whose_child_died_fails_what_follows(app: Conveyor) -> None:
    from conveyor.worker.execution import Kind, Outcome

    policy, job, _ = _early_first_link(app)
    lost = Outcome(Kind.LOST, None, "WorkerLost", "the child died (signal 9)")
    verdict = policy.settle(job, lost)
    assert verdict.release is False and verdict.follow is not None
    assert (verdict.follow.ok, verdict.follow.error_type) == (False, "WorkerLost")


def test_an_early_acked_link_given_up_at_shutdown_fails_what_follows(app: Conveyor) -> None:
    policy, job, _ = _early_first_link(app)
    verdict = policy.abandoned(job)
    assert verdict.counts == ("abandoned",) and verdict.release is False
    assert verdict.record is not None and verdict.record.state == State.FAILURE
    assert verdict.follow is not None and verdict.follow.error_type == "TaskAbandoned"


def test_a_plain_early_acked_task_given_up_at_shutdown_ends_unknown(app: Conveyor) -> None:
    from conveyor.worker.execution import Job
    from conveyor.worker.settlement import Records, SettlementPolicy

    @app.task(name="plain.early", acks_late=False)
    def early(x: int) -> int:
        return x

    early.delay(1)
    (delivery,) = app.broker.fetch([app.settings.default_queue], 1)
    job = Job(delivery, decode(delivery.body), early, started_at=time.time())
    verdict = SettlementPolicy.of(app, Records(app.tasks, True, "h:1", 60.0)).abandoned(job)
    assert (verdict.counts, verdict.record, verdict.follow) == (("abandoned",), None, None)


def test_a_chain_given_up_at_shutdown_fails_instead_of_waiting() -> None:
    """Threads cannot be killed: a cold shutdown abandons the running first link (acks_late
    False); the chain's result is a failure at once, not a wait for ever."""
    app = memory_app()
    started, release = threading.Event(), threading.Event()

    @app.task(name="wf.slow", acks_late=False)
    def slow(x: int) -> int:
        started.set()
        release.wait(30)
        return x

    @app.task(name="wf.next")
    def after(x: int) -> int:
        return x + 1

    result = chain(slow.s(1), after.s()).apply_async()
    from conveyor import Worker

    worker = Worker(app, pool="threads", concurrency=1, shutdown_grace=0)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        assert started.wait(30)
        worker.stop()
        worker.stop()  # cold
        thread.join(30)
        assert not thread.is_alive()
    finally:
        release.set()
    with pytest.raises(TaskFailed, match="given up at a worker's shutdown"):
        result.get(timeout=5)
    app.close()
