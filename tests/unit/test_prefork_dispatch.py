"""The prefork pool's dispatch rules, without processes: which child a job goes to, and when.

Children here are bookkeeping objects only (their pipes lead nowhere anyone reads): the tests
drive the pool the way its event loop would, with run times the children would report.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from typing import Any

import pytest

from conveyor import Conveyor
from conveyor.brokers import Delivery
from conveyor.message import decode
from conveyor.worker.execution import Job, Kind, Outcome
from conveyor.worker.pools import _children
from conveyor.worker.pools.prefork import (
    MAX_BUDGET_S,
    MAX_DEPTH,
    MIN_BUDGET_S,
    ROUND_TRIPS,
    PreforkPool,
    State,
    _Child,
)

Finished = list[tuple[Job, Outcome]]


@pytest.fixture
def pool(app: Conveyor) -> Iterator[PreforkPool]:
    """A pool of 2 ready children, on a loop that never runs (writes are left in outboxes)."""
    prefork = PreforkPool(2, app)
    prefork._clock = lambda: 1000.0  # time stands still unless a test moves it
    loop = asyncio.new_event_loop()
    prefork._loop = loop
    descriptors: list[int] = []
    for generation in (1, 2):
        read, write = os.pipe2(os.O_NONBLOCK)
        descriptors += [read, write]
        child = _Child(generation, write, read)
        child.state = State.READY
        prefork._children.add(child)
        prefork._ready_children.append(child)
    yield prefork
    loop.close()
    for fd in descriptors:
        with contextlib.suppress(OSError):  # a test's child may have been dropped, pipes and all
            os.close(fd)


def children(pool: PreforkPool) -> list[_Child]:
    return sorted(pool._children, key=lambda c: c.generation)


def make_job(app: Conveyor, name: str) -> Job:
    """A job of task `name` (registered on first use)."""
    if name not in app.tasks:
        app.task(name=name)(lambda: None)
    task = app.tasks[name]
    sent = task.delay()
    (delivery,) = app.broker.fetch([app.settings.default_queue], 1)
    assert decode(delivery.body).id == sent.id
    return Job(Delivery(delivery.queue, delivery.body, None, 1), decode(delivery.body), task)


def finish(pool: PreforkPool, child: _Child, took: float, finished: Finished) -> Job:
    """The child reports its running job done after `took` seconds."""
    job_id = next(iter(child.jobs))
    job = child.jobs[job_id][0]
    done = _children.Done(job_id, "success", None, None, None, None, None, None, 0.0, None, took)
    pool._finished(child, done)
    return job


def settle_capacity(pool: PreforkPool) -> None:
    """What the loop would do `SHRINK_AFTER_S` after the capacity fell: tell the lower one."""
    timer = pool._shrink
    if timer is not None:
        timer.cancel()
        pool._shrink_now()


def learn(pool: PreforkPool, app: Conveyor, name: str, took: float, times: int = 200) -> None:
    """Let the pool see `times` runs of `name` taking `took` seconds each."""
    finished: Finished = []
    child = children(pool)[0]
    for _ in range(times):
        pool.submit(make_job(app, name), lambda j, o: finished.append((j, o)))
        finish(pool, child, took, finished)
    assert len(finished) == times
    forget_writes(pool)


def forget_writes(pool: PreforkPool) -> None:
    """Drop what the pool would write: the next loop turn starts clean."""
    for child in pool._children:
        child.outbox.clear()
    pool._unflushed.clear()
    pool._flushing = False


def recorder(finished: Finished) -> Any:
    return lambda job, outcome: finished.append((job, outcome))


def test_a_task_not_known_to_be_short_goes_only_to_an_idle_child(
    pool: PreforkPool, app: Conveyor
) -> None:
    assert pool.free(0) == 2, "one job per idle child while nothing is known"
    finished: Finished = []
    for _ in range(3):
        pool.submit(make_job(app, "new"), recorder(finished))
    first, second = children(pool)
    assert (len(first.jobs), len(second.jobs)) == (1, 1)
    assert len(pool._backlog) == 1, "the third waits in the worker for an idle child"
    assert pool.free(2) < 0 or pool.free(2) == 0
    finish(pool, first, 0.0001, finished)
    assert len(first.jobs) == 1 and not pool._backlog, "the freed child takes the waiting job"


def test_short_tasks_raise_the_depth_and_the_prefetch_with_it(
    pool: PreforkPool, app: Conveyor
) -> None:
    changes: list[int] = []
    pool.on_capacity = lambda: changes.append(pool.capacity)
    assert (pool.capacity, pool.most) == (2, 2 * MAX_DEPTH)
    learn(pool, app, "quick", took=0.00005)
    assert pool._depth == MAX_DEPTH
    assert pool.capacity == 2 * MAX_DEPTH and changes[-1] == pool.capacity
    assert all(n & (n - 1) == 0 for n in changes), "depths are powers of two"
    assert pool.free(0) == 2 * MAX_DEPTH


def test_short_tasks_queue_in_busy_children_up_to_the_depth(
    pool: PreforkPool, app: Conveyor
) -> None:
    learn(pool, app, "quick", took=0.00005)
    finished: Finished = []
    for _ in range(2 * MAX_DEPTH + 5):
        pool.submit(make_job(app, "quick"), recorder(finished))
    first, second = children(pool)
    assert len(first.jobs) == len(second.jobs) == MAX_DEPTH, "spread evenly, up to the depth"
    assert len(pool._backlog) == 5
    assert all(c.outbox.count(b"quick") == MAX_DEPTH for c in (first, second))


def test_a_busy_child_is_topped_up_once_half_its_jobs_are_done(
    pool: PreforkPool, app: Conveyor
) -> None:
    learn(pool, app, "quick", took=0.00005)
    finished: Finished = []
    first = children(pool)[0]
    for _ in range(2 * MAX_DEPTH):
        pool.submit(make_job(app, "quick"), recorder(finished))
    for _ in range(MAX_DEPTH // 2 - 1):
        finish(pool, first, 0.00005, finished)
    forget_writes(pool)  # the loop turn that gave them ends: they are written
    assert pool._room(first, first.head_since) == 0, "not yet half done: no top-up"
    finish(pool, first, 0.00005, finished)
    assert pool._room(first, first.head_since) == MAX_DEPTH // 2


def test_nothing_queues_behind_a_task_not_known_to_be_short(
    pool: PreforkPool, app: Conveyor
) -> None:
    learn(pool, app, "quick", took=0.00005)
    learn(pool, app, "slow", took=0.5, times=1)
    finished: Finished = []
    first, second = children(pool)
    pool.submit(make_job(app, "slow"), recorder(finished))
    pool.submit(make_job(app, "quick"), recorder(finished))
    busy = first if first.jobs else second
    assert len(busy.jobs) == 1, "no quick job behind the slow one"
    assert pool._room(busy, busy.head_since) == 0


def test_nothing_more_queues_behind_a_job_running_past_the_budget(
    pool: PreforkPool, app: Conveyor
) -> None:
    learn(pool, app, "quick", took=0.00005)
    finished: Finished = []
    pool.submit(make_job(app, "quick"), recorder(finished))
    busy = next(c for c in children(pool) if c.jobs)
    assert pool._room(busy, busy.head_since) > 0
    assert pool._room(busy, busy.head_since + MIN_BUDGET_S * 1.5) == 0


def test_a_slow_run_brings_the_depth_back_to_one(pool: PreforkPool, app: Conveyor) -> None:
    learn(pool, app, "quick", took=0.00005)
    learn(pool, app, "quick", took=0.2, times=1)
    assert pool._depth == 1 and pool.capacity == 2
    assert not pool._is_short(make_job(app, "quick"))


def test_a_child_never_gets_more_than_its_max_tasks(app: Conveyor) -> None:
    prefork = PreforkPool(1, app, max_tasks=5)
    prefork._clock = lambda: 1000.0
    prefork._loop = loop = asyncio.new_event_loop()
    read, write = os.pipe()
    try:
        child = _Child(1, write, read)
        child.state = State.READY
        prefork._children.add(child)
        prefork._ready_children.append(child)
        prefork._runtimes["quick"] = 0.00005
        prefork._depth = MAX_DEPTH
        finished: Finished = []
        for _ in range(8):
            prefork.submit(make_job(app, "quick"), recorder(finished))
        assert len(child.jobs) == 5 and len(prefork._backlog) == 3
    finally:
        loop.close()
        os.close(read)
        os.close(write)


def test_a_hard_limit_starts_when_a_queued_job_starts(pool: PreforkPool, app: Conveyor) -> None:
    learn(pool, app, "limited", took=0.00005)
    app.tasks["limited"].options = app.tasks["limited"].options.__class__(time_limit=5.0)
    finished: Finished = []
    for _ in range(4):
        pool.submit(make_job(app, "limited"), recorder(finished))
    busy = children(pool)[0]
    assert len(busy.jobs) == 2
    first_timer = busy.timer
    assert first_timer is not None
    finish(pool, busy, 0.00005, finished)
    assert busy.timer is not None and busy.timer is not first_timer, "re-armed for the next job"
    assert first_timer.cancelled()


def test_a_dead_childs_unstarted_jobs_go_to_another_child_uncounted(
    pool: PreforkPool, app: Conveyor
) -> None:
    learn(pool, app, "quick", took=0.00005)
    finished: Finished = []
    for _ in range(6):
        pool.submit(make_job(app, "quick"), recorder(finished))
    first, second = children(pool)
    assert len(first.jobs) == len(second.jobs) == 3
    pool._spawn = lambda: None  # type: ignore[method-assign]
    pool._ended(first)
    assert len(finished) == 1, "only the job it was running is reported"
    assert finished[0][1].kind is Kind.LOST
    assert len(second.jobs) + len(pool._backlog) == 5, "the other two were not run: kept"


def test_after_a_slow_run_an_idle_child_still_gets_work_while_others_hold_jobs(
    pool: PreforkPool, app: Conveyor
) -> None:
    """The depth drops to 1, but the jobs already queued behind the slow one still count
    against the broker's prefetch: the capacity covers them plus the idle child's slot."""
    learn(pool, app, "quick", took=0.00005)
    reported: list[int] = []
    pool.on_capacity = lambda: reported.append(pool.capacity)
    finished: Finished = []
    for _ in range(20):
        pool.submit(make_job(app, "quick"), recorder(finished))
    first, second = children(pool)
    assert len(first.jobs) == len(second.jobs) == 10
    while second.jobs:
        finish(pool, second, 0.00005, finished)
    finish(pool, first, 0.5, finished)  # a quick task that ran long this time
    assert pool._depth == 1
    assert pool.capacity == 9 + 1, "first's 9 queued jobs, and a job for the idle second"
    assert not reported or reported[-1] > 10, "a fall is told once it has held a while"
    settle_capacity(pool)
    assert reported[-1] == 10
    assert pool.free(9) == 1, "the idle child can start one now"
    while first.jobs:
        finish(pool, first, 0.00005, finished)
    settle_capacity(pool)
    assert reported[-1] == pool.capacity == 2, "back to one per child once they drained"


# The time budget: ROUND_TRIPS times what a finished job's replacement takes to arrive (the
# consumer measures it), within MIN_BUDGET_S and MAX_BUDGET_S. A task is short when its recent
# runs took no longer than that.


def test_nothing_is_prefetched_beyond_the_children_before_a_task_ran(pool: PreforkPool) -> None:
    pool.observe_round_trip(0.002)
    assert pool._depth == 1 and pool.capacity == 2 and pool.free(0) == 2


def test_the_depth_grows_over_runs_not_at_the_first_one(pool: PreforkPool, app: Conveyor) -> None:
    learn(pool, app, "quick", took=0.00005, times=1)
    assert pool._is_short(make_job(app, "quick")), "known short after one run"
    assert pool._depth == 2, "but only one job behind the running one yet"
    learn(pool, app, "quick", took=0.00005, times=100)
    assert pool._depth == MAX_DEPTH


def test_a_2ms_task_is_short_once_the_round_trip_makes_room_for_it(
    pool: PreforkPool, app: Conveyor
) -> None:
    """2 ms is over the floor of the budget: one such job per child until the consumer has
    timed the broker; then a few queue behind the running one, and the prefetch grows."""
    learn(pool, app, "two_ms", took=0.0021)
    assert not pool._is_short(make_job(app, "two_ms"))
    assert pool._depth == 1 and pool.capacity == 2
    reported: list[int] = []
    pool.on_capacity = lambda: reported.append(pool.capacity)
    pool.observe_round_trip(0.0012)  # a 1 ms ack delay, and 0.2 ms to the broker and back
    assert pool._budget == pytest.approx(ROUND_TRIPS * 0.0012)
    assert pool._is_short(make_job(app, "two_ms"))
    assert pool._depth == 4, "2 + 4.8 ms // 2.1 ms, a power of two"
    assert reported == [8]
    finished: Finished = []
    for _ in range(8):
        pool.submit(make_job(app, "two_ms"), recorder(finished))
    first, second = children(pool)
    assert len(first.jobs) == len(second.jobs) == 4, "the running job and 3 behind it"


@pytest.mark.parametrize("round_trip", [0.0003, 0.0005, 0.0012, 0.002, 0.0035, 0.005])
def test_the_work_queued_behind_a_running_task_covers_two_round_trips(
    app: Conveyor, round_trip: float
) -> None:
    """For every run time from 0.1 ms to 25 ms: a task over the budget gets nothing behind
    it; a shorter one gets enough that its child's next task is at hand for twice the time a
    replacement takes to come (unless the depth is at its most)."""
    job = make_job(app, "steady")
    for tenths in range(1, 250):
        took = tenths / 10_000
        prefork = PreforkPool(2, app)
        prefork.observe_round_trip(round_trip)
        for _ in range(200):
            prefork._observe(job, took)
        if took > prefork._budget:
            assert prefork._depth == 1 and not prefork._is_short(job), took
            continue
        assert prefork._is_short(job), took
        queued = prefork._depth - 1
        assert queued * took >= 2 * round_trip or prefork._depth == MAX_DEPTH, took
        assert queued * took <= prefork._budget + took, "a budget's worth, one task over at most"


def test_the_budget_keeps_to_its_floor_and_ceiling(pool: PreforkPool, app: Conveyor) -> None:
    pool.observe_round_trip(0.0001)
    assert pool._budget == MIN_BUDGET_S
    for _ in range(50):  # a broker far away, or a worker's loop starved of CPU
        pool.observe_round_trip(1.0)
    assert pool._budget == MAX_BUDGET_S
    learn(pool, app, "long", took=MAX_BUDGET_S * 1.5, times=1)
    assert not pool._is_short(make_job(app, "long"))
    assert pool._depth == 1 and pool.capacity == 2


def test_one_slow_round_trip_moves_the_budget_only_part_of_the_way(pool: PreforkPool) -> None:
    pool.observe_round_trip(0.001)
    pool.observe_round_trip(0.005)
    assert pool._round_trip == pytest.approx(0.002)
    assert pool._budget == pytest.approx(ROUND_TRIPS * 0.002)


def test_a_new_task_gets_nothing_behind_it_however_large_the_budget(
    pool: PreforkPool, app: Conveyor
) -> None:
    pool.observe_round_trip(MAX_BUDGET_S)
    learn(pool, app, "quick", took=0.00005)
    finished: Finished = []
    pool.submit(make_job(app, "new"), recorder(finished))
    busy = next(c for c in children(pool) if c.jobs)
    assert pool._room(busy, busy.head_since) == 0
    for _ in range(3):
        pool.submit(make_job(app, "quick"), recorder(finished))
    assert len(busy.jobs) == 1, "short jobs go to the idle child, not behind the new one"


def test_nothing_more_queues_behind_a_job_running_past_a_measured_budget(
    pool: PreforkPool, app: Conveyor
) -> None:
    pool.observe_round_trip(0.003)  # a budget of 12 ms
    learn(pool, app, "two_ms", took=0.002)
    finished: Finished = []
    pool.submit(make_job(app, "two_ms"), recorder(finished))
    busy = next(c for c in children(pool) if c.jobs)
    assert pool._room(busy, busy.head_since + 0.010) > 0, "within the budget"
    assert pool._room(busy, busy.head_since + 0.013) == 0, "it ran past any short task"


def test_a_child_running_a_slow_task_gives_its_share_of_the_prefetch_back(
    pool: PreforkPool, app: Conveyor
) -> None:
    """Short tasks raised the depth; a task not known to be short that starts takes its child's
    look-ahead out of the prefetch at once, so the broker keeps those messages for workers that
    can run them now, not for a child that will be busy for who knows how long."""
    learn(pool, app, "quick", took=0.00005)
    learn(pool, app, "report", took=0.5, times=1)
    learn(pool, app, "quick", took=0.00005)  # the depth is back up: "report" is still slow
    assert pool._depth == MAX_DEPTH and not pool._is_short(make_job(app, "report"))
    reported: list[int] = []
    pool.on_capacity = lambda: reported.append(pool.capacity)
    finished: Finished = []
    pool.submit(make_job(app, "report"), recorder(finished))
    assert pool.capacity == 1 + MAX_DEPTH, "the busy child holds its one job, the idle one a depth"
    settle_capacity(pool)
    assert reported == [1 + MAX_DEPTH]
    pool.submit(make_job(app, "report"), recorder(finished))
    settle_capacity(pool)
    assert reported == [1 + MAX_DEPTH, 2]
    assert pool.free(2) == 0
    first = children(pool)[0]
    finish(pool, first, 0.00005, finished)  # a quicker run than usual: still slow lately
    assert reported[-1] == pool.capacity == 1 + MAX_DEPTH, "a rise is told at once"


def test_a_job_waiting_for_a_child_not_up_yet_is_counted_once(
    pool: PreforkPool, app: Conveyor
) -> None:
    """The consumer can fetch a job just before the child it was meant for turns out not to
    be up: it waits in the pool for that child, and the prefetch counts it once, not as well as
    the child's own slot."""
    first, second = children(pool)
    pool._ready_children.remove(second)
    second.state = State.STARTING
    finished: Finished = []
    for _ in range(2):
        pool.submit(make_job(app, "new"), recorder(finished))
    assert len(first.jobs) == 1 and len(pool._backlog) == 1
    assert pool.capacity == 2
