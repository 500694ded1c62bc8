"""Revocations on the memory broker: skipped before they start, on a worker running at the
revoke and on one started after it; REVOKED results; the outcome middleware and signals see;
what the pools do with a job they already hold; the stores' bad input; the command line."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from click.testing import CliRunner
from conftest import run_bounded, start_worker

from conveyor import Conveyor, State, TaskRevoked, Worker, signals
from conveyor.cli import main
from conveyor.errors import ConfigurationError
from conveyor.middleware import Middleware, Settled
from conveyor.revocations import Revocation, from_url, revoke
from conveyor.revocations.watch import KnownRevocations
from conveyor.testing import memory_app
from conveyor.worker.execution import Kind, Outcome
from conveyor.worker.pools import _children
from conveyor.worker.pools.prefork import PreforkPool

Poll = Callable[..., Any]


class Outcomes(Middleware):
    """Every `after_settle`, by task id."""

    def __init__(self) -> None:
        self.seen: dict[str, Settled] = {}

    def after_settle(self, settled: Settled) -> None:
        if settled.envelope is not None:
            self.seen[settled.envelope.id] = settled


def test_a_task_revoked_before_a_worker_starts_never_runs(app: Conveyor) -> None:
    outcomes = Outcomes()
    app.add_middleware(outcomes)
    ran: list[int] = []

    @app.task
    def work(x: int) -> int:
        ran.append(x)
        return x

    kept, revoked = work.delay(1), work.delay(2)
    report = revoked.revoke()
    assert (report.id, report.known, report.recorded) == (revoked.id, "unknown", True)
    got: list[dict[str, Any]] = []
    with signals.task_revoked.connected_to(lambda **kw: got.append(kw)):
        stats = run_bounded(app)
    assert ran == [1]
    assert (stats.succeeded, stats.revoked, stats.dead_lettered, stats.lost) == (1, 1, 0, 0)
    assert revoked.state is State.REVOKED and revoked.ready()
    with pytest.raises(TaskRevoked, match="skipped before it started"):
        revoked.get(timeout=1)
    assert kept.get(timeout=1) == 1
    settled = outcomes.seen[revoked.id]
    assert (settled.outcome, settled.took, settled.dead_letter) == ("revoked", None, None)
    assert settled.error_type == "TaskRevoked"
    assert [(g["task_id"], g["terminated"]) for g in got] == [(revoked.id, False)]
    assert app.broker.stats(["default"])[0].dead == 0


def test_a_task_revoked_while_the_worker_runs_is_skipped_when_it_comes(
    app: Conveyor, poll: Poll
) -> None:
    gate = threading.Event()
    ran: list[str] = []

    @app.task
    def blocker() -> None:
        gate.wait(10)

    @app.task
    def work(x: int) -> int:
        ran.append(str(x))
        return x

    worker = Worker(app, pool="threads", concurrency=1, until_empty=True, shutdown_grace=0)
    thread, errors = start_worker(worker)
    assert worker.started.wait(5)
    blocker.delay()
    victim = work.delay(1)  # waits in the broker behind the blocker
    other = work.delay(2)
    victim.revoke()
    consumer = worker._consumer
    assert consumer is not None
    poll(lambda: victim.id in consumer.revoked, timeout=2, what="the worker to learn it")
    gate.set()
    thread.join(10)
    assert not thread.is_alive() and not errors
    assert ran == ["2"] and other.get(timeout=1) == 2
    assert victim.state is State.REVOKED and worker.stats.revoked == 1


def test_revoking_unknown_finished_and_malformed_ids(app: Conveyor) -> None:
    @app.task
    def work() -> str:
        return "done"

    finished = work.delay()
    run_bounded(app)
    reports = revoke(app, ["no-such-task", finished.id, "no-such-task"])
    assert [(r.id, r.known, r.recorded) for r in reports] == [
        ("no-such-task", "unknown", True),
        (finished.id, "finished", False),
    ]
    assert "nothing to revoke" in reports[1].describe()
    assert finished.get(timeout=1) == "done"  # left alone
    store = app.revocations
    assert store is not None
    loaded, _ = store.load(time.time())
    assert [r.id for r in loaded] == ["no-such-task"]
    for bad in ("", "x" * 129):
        with pytest.raises(ConfigurationError, match="nothing was revoked"):
            revoke(app, ["fine", bad])
    assert len(store.load(time.time())[0]) == 1, "a bad id stops the whole revoke"


def test_no_store_is_a_clear_error() -> None:
    app = Conveyor("x", broker="amqp://guest:secret@127.0.0.1:5672/", results=None)
    with pytest.raises(ConfigurationError, match=r"set store \(CONVEYOR_STORE\)") as caught:
        app.result("some-id").revoke()
    assert "secret" not in str(caught.value)


def test_revoke_expires_with_the_message_when_the_sender_knows(app: Conveyor) -> None:
    @app.task
    def work() -> None: ...

    now = time.time()
    work.apply_async(expires=60).revoke()
    work.apply_async(countdown=3600).revoke()
    work.delay().revoke()
    store = app.revocations
    assert store is not None
    loaded, _ = store.load(now)
    day = app.settings.result_expires
    expected = [now + 60, now + 3600 + day, now + day]
    assert [r.expires_at for r in loaded] == pytest.approx(expected, abs=5)


def test_known_revocations_expire_and_stay_bounded(caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    known = KnownRevocations(most=3, clock=lambda: now[0])
    live = known.add([Revocation("a", 1010), Revocation("b", 1020, True), Revocation("x", 999)])
    assert live == {"a": False, "b": True} and "x" not in known
    now[0] = 1015.0
    known.add([Revocation("c", 1030)])
    assert set(known.ids) == {"b", "c"}, "a expired"
    with caplog.at_level(logging.WARNING, logger="conveyor.revocations"):
        known.add([Revocation("d", 1040), Revocation("e", 1050)])
    assert set(known.ids) == {"c", "d", "e"}, "the one that expires soonest went"
    assert "forgot the 1 that expire soonest" in caplog.text


def test_a_malformed_revocation_record_is_skipped_and_the_worker_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path}/q.db"
    app = Conveyor("bad", broker=url)
    ran: list[int] = []

    @app.task
    def work(x: int) -> None:
        ran.append(x)

    revoked = work.delay(1)
    kept = work.delay(2)
    revoked.revoke()
    with sqlite3.connect(tmp_path / "q.db") as conn:
        conn.execute(
            "INSERT INTO conveyor_revocations (id, terminate, revoked_at, expires_at) "
            "VALUES (?, 0, 0, 'never'), (?, 0, 0, ?)",
            (kept.id, "y" * 500, time.time() + 60),
        )
    conn.close()
    with caplog.at_level(logging.WARNING, logger="conveyor.revocations"):
        stats = run_bounded(app, timeout=10)
    assert ran == [2] and stats.revoked == 1
    assert caplog.text.count("skipped a malformed revocation record") == 2
    app.close()


def test_terminate_on_the_threads_pool_says_it_cannot_stop_the_task(
    app: Conveyor, poll: Poll, caplog: pytest.LogCaptureFixture
) -> None:
    started, gate = threading.Event(), threading.Event()

    @app.task
    def long() -> str:
        started.set()
        gate.wait(10)
        return "finished"

    worker = Worker(app, pool="threads", concurrency=1, until_empty=True, shutdown_grace=0)
    result = long.delay()
    with caplog.at_level(logging.WARNING, logger="conveyor.worker"):
        thread, errors = start_worker(worker)
        assert started.wait(5)
        result.revoke(terminate=True)
        poll(lambda: "cannot stop a running task" in caplog.text, timeout=3, what="the warning")
    gate.set()
    thread.join(10)
    assert not errors and result.get(timeout=1) == "finished"


def test_terminate_on_the_asyncio_pool_cancels_an_async_task(app: Conveyor, poll: Poll) -> None:
    started = threading.Event()
    cancelled: list[bool] = []

    @app.task
    async def long() -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    result = long.delay()
    worker = Worker(app, pool="asyncio", concurrency=2, until_empty=True, shutdown_grace=0)
    thread, errors = start_worker(worker)
    assert started.wait(5)
    began = time.monotonic()
    result.revoke(terminate=True)
    with pytest.raises(TaskRevoked, match="cancelled"):
        result.get(timeout=5)
    assert time.monotonic() - began < 1.0
    thread.join(10)
    assert not errors and cancelled == [True] and worker.stats.revoked == 1


# the prefork pool's part, without processes


def _pool(app: Conveyor) -> tuple[PreforkPool, list[int]]:
    from conveyor.worker.pools.prefork import State, _Child

    pool = PreforkPool(1, app)
    pool._loop = asyncio.new_event_loop()
    read, write = os.pipe2(os.O_NONBLOCK)
    child = _Child(1, write, read)
    child.state = State.READY
    pool._children.add(child)
    pool._ready_children.append(child)
    return pool, [read, write]


def test_prefork_ends_revoked_jobs_waiting_for_a_child_and_tells_a_child_holding_one(
    app: Conveyor,
) -> None:
    from test_prefork_dispatch import learn, make_job, recorder

    pool, fds = _pool(app)
    try:
        learn(pool, app, "quick", took=0.00005)  # short: they queue in the child
        finished: list[tuple[Any, Outcome]] = []
        jobs = [make_job(app, "quick") for _ in range(3)]
        for job in jobs:
            pool.submit(job, recorder(finished))
        (child,) = pool._children
        held = list(child.jobs)
        assert len(held) >= 2
        waiting = make_job(app, "quick")
        pool._backlog.append((waiting, recorder(finished)))
        pool.revoke([(jobs[1], False), (waiting, False)])
        assert [(j, o.kind) for j, o in finished] == [(waiting, Kind.REVOKED)]
        frames = _children.Frames().feed(os.read(fds[0], 1 << 16))
        assert frames[-1] == _children.Revoke([held[1]]), "named after the Run it follows"
        # The child dies before reading it: the revoked job does not go to another child.
        pool._spawn = lambda: None  # type: ignore[method-assign]
        pool._ended(child)
        kinds = {id(j): o.kind for j, o in finished}
        assert kinds[id(jobs[1])] is Kind.REVOKED and kinds[id(jobs[0])] is Kind.LOST
        assert jobs[1] not in [j for j, _ in pool._backlog]
    finally:
        assert pool._loop is not None
        pool._loop.close()
        for fd in fds:
            with contextlib.suppress(OSError):  # the child's end closed its pipes
                os.close(fd)


def test_a_child_does_not_start_a_job_revoked_while_it_waited_in_its_pipe(
    tmp_path: Path,
) -> None:
    """The child's loop, in this process: job 1's task plays the worker revoking job 2 (which
    the child has read already) and bumping the shared counter."""
    app = memory_app()
    ran: list[int] = []
    tasks_r, tasks_w = os.pipe()
    results_r, results_w = os.pipe()
    fd = os.memfd_create("test-revocations")
    os.ftruncate(fd, 4096)
    import mmap

    shared = mmap.mmap(fd, 4096)

    @app.task
    def first() -> None:
        ran.append(1)
        os.write(tasks_w, _children.frame(_children.Revoke([2])))
        os.close(tasks_w)
        counter = memoryview(shared).cast("Q")
        counter[0] += 1
        counter.release()

    @app.task
    def second() -> None:
        ran.append(2)

    from conveyor.message import encode

    frames = b"".join(
        _children.frame(_children.Run(n, "default", encode(task.envelope()), 1))
        for n, task in ((1, first), (2, second))
    )
    os.write(tasks_w, frames)
    code = _children._serve(app, _children.ChildOptions(revocations=fd), tasks_r, results_w)
    os.close(results_w)
    out = b""
    while chunk := os.read(results_r, 1 << 16):
        out += chunk
    done = [m for m in _children.Frames().feed(out) if isinstance(m, _children.Done)]
    assert code == 0 and ran == [1]
    assert [(d.job, d.kind) for d in done] == [(1, "success"), (2, "revoked")]
    for f in (tasks_r, results_r, fd):
        os.close(f)
    shared.close()


# the command line


def test_the_revoke_command_says_what_it_knows_of_each_id(tmp_path: Path) -> None:
    (tmp_path / "revoke_cli_app.py").write_text(
        f"from conveyor import Conveyor\n"
        f"app = Conveyor('c', broker='sqlite:///{tmp_path}/q.db')\n"
        "@app.task\ndef work():\n    return 1\n"
    )
    app = Conveyor("c", broker=f"sqlite:///{tmp_path}/q.db")
    store = app.results
    assert store is not None
    from conveyor.results import ResultRecord

    now = time.time()
    store.put(
        [
            ResultRecord(id="running-1", state=State.STARTED, expires_at=now + 60),
            ResultRecord(id="retry-1", state=State.RETRY, expires_at=now + 60),
            ResultRecord(id="done-1", state=State.SUCCESS, expires_at=now + 60),
        ]
    )
    runner = CliRunner()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = runner.invoke(
            main, ["revoke", "revoke_cli_app:app", "running-1", "retry-1", "done-1", "nope"]
        )
        missing = runner.invoke(main, ["revoke", "revoke_cli_app:app"])
        bad = runner.invoke(main, ["revoke", "revoke_cli_app:app", "x" * 200])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("running-1: running: revoked; it runs to the end")
    assert lines[1] == "retry-1: queued (RETRY): revoked, workers skip it"
    assert lines[2] == "done-1: finished (SUCCESS): nothing to revoke, nothing recorded"
    assert lines[3].startswith("nope: unknown to the result store")
    assert lines[4] == f"3 revocations recorded in sqlite:///{tmp_path}/q.db"
    assert missing.exit_code == 2 and "Missing argument" in missing.output
    assert bad.exit_code == 1 and "nothing was revoked" in bad.output
    loaded, _ = from_url(f"sqlite:///{tmp_path}/q.db").load(time.time())
    assert sorted(r.id for r in loaded) == ["nope", "retry-1", "running-1"]
    app.close()


def test_revocation_records_round_trip_as_msgspec() -> None:
    record = Revocation("a", 12.5, True)
    assert msgspec.json.decode(msgspec.json.encode(record), type=Revocation) == record


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"broker": "sqlite:///q.db"}, "sqlite:///q.db"),
        ({"broker": "amqp://h/", "results": "redis://r:6379/0"}, "redis://r:6379/0"),
        ({"broker": "amqp://h/", "results": "postgresql://p/db"}, "postgresql://p/db"),
        ({"broker": "amqp://h/", "results": "rpc://"}, None),
        ({"broker": "amqp://h/", "results": "rpc://", "store": "redis://s/1"}, "redis://s/1"),
        ({"broker": "sqlite:///q.db", "store": "sqlite:///state.db"}, "sqlite:///state.db"),
    ],
)
def test_the_fleet_store_is_set_or_found(settings: dict[str, str], expected: str | None) -> None:
    from conveyor import fleet
    from conveyor.scheduler.runner import store_url as scheduler_store
    from conveyor.settings import Settings

    loaded = Settings.load(env={}, **settings)
    assert fleet.store_url(loaded) == expected
    claims = Conveyor("s", **settings, scheduler_store="sqlite:///claims.db")
    assert scheduler_store(claims) == "sqlite:///claims.db", "scheduler_store still wins"
    if expected is None:
        with pytest.raises(ConfigurationError, match="CONVEYOR_STORE"):
            scheduler_store(Conveyor("s", **settings))
