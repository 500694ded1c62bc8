"""The prefork pool on the SQLite broker and on RabbitMQ: children, pipes, limits, deaths, shutdown.

Tasks run in child processes, so nothing they do is seen in this process's memory: they report
through their results (their pids, above all), through files they write into `tmp_path`, and
through the worker's own counts, logs and dead letters. The worker runs in this process, so its
stats, logs and file descriptors are ours to read.

RabbitMQ is expected on 127.0.0.1:5672 (guest/guest); each test uses a queue of its own and
deletes it afterwards. Without a server the RabbitMQ cases skip locally and fail in CI.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import random
import signal
import socket
import sqlite3
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    delete_rabbitmq_queues,
    require_rabbitmq,
    run_bounded,
    start_worker,
    wait_for,
)
from values_cases import EVERYTHING, Everything, same

from conveyor import (
    Conveyor,
    DeadLetterReason,
    SoftTimeLimitExceeded,
    Task,
    Worker,
    WorkerStats,
    _fork,
)
from conveyor.errors import EncodeError, TaskFailed, TimeLimitExceeded
from conveyor.message import decode
from conveyor.results import ResultRecord, State
from conveyor.worker.consumer import ACK_DELAY_S
from conveyor.worker.pools.prefork import MIN_BUDGET_S, ROUND_TRIPS, PreforkPool

pytestmark = pytest.mark.integration

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
Poll = Callable[..., Any]
MakeApp = Callable[..., Conveyor]
BROKERS = ["sqlite", "rabbitmq"]


@pytest.fixture(params=BROKERS)
def broker_kind(request: pytest.FixtureRequest) -> str:
    """Which broker this case runs on; RabbitMQ cases skip (or fail in CI) without a server."""
    kind = str(request.param)
    if kind == "rabbitmq":
        require_rabbitmq()
    return kind


@pytest.fixture
def make_app(broker_kind: str, tmp_path: Path) -> Iterator[MakeApp]:
    """`make_app(**settings)`: an app on this case's broker, with a queue of its own.

    SQLite keeps results in the broker's own file; with RabbitMQ the worker (in this process)
    keeps them in memory, where the test reads them.
    """
    queue = f"prefork-{uuid.uuid4().hex[:10]}"
    if broker_kind == "rabbitmq":
        broker, results = AMQP_URL, "memory://"
    else:
        broker = results = f"sqlite:///{tmp_path / 'broker.db'}"
    apps: list[Conveyor] = []

    def make(**settings: Any) -> Conveyor:
        app = Conveyor("prefork", broker=broker, results=results, default_queue=queue, **settings)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()
    if broker_kind == "rabbitmq":
        delete_rabbitmq_queues(queue)


def run_until_empty(app: Conveyor, timeout: float = 60.0, **options: Any) -> WorkerStats:
    """A prefork worker (2 children unless told) run until its queue is empty, on a thread;
    a worker that does not drain in time is stopped cold and the test fails."""
    return run_bounded(app, pool="prefork", timeout=timeout, **options)


@contextlib.contextmanager
def running(
    worker: Worker, release: Path
) -> Iterator[tuple[threading.Thread, list[BaseException]]]:
    """A worker on a thread, for tests that stop it themselves. If the test fails first, the
    tasks are released and the worker is stopped cold, so it never outlives the test."""
    thread, errors = start_worker(worker)
    try:
        yield thread, errors
    finally:
        release.touch()
        if thread.is_alive():
            worker.stop()
            worker.stop()
            thread.join(15)


def record_of(app: Conveyor, task_id: str) -> ResultRecord:
    store = app.results
    assert store is not None
    record = store.get(task_id)
    assert record is not None, f"no result stored for {task_id}"
    return record


def queue_of(app: Conveyor) -> str:
    return app.settings.default_queue


def waiting(app: Conveyor) -> int:
    """Messages ready or delayed in the app's queue (not those leased to a worker)."""
    (stats,) = app.broker.stats([queue_of(app)])
    return stats.ready + stats.delayed


def exited(pid: int) -> bool:
    """True once `pid` has ended (a zombie counts: its reaper may be an init that never reaps)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def settle_descriptors(app: Conveyor) -> None:
    """Make the descriptors a process opens once and keeps, before they are counted.

    libuv (uvloop) opens a pipe for signals with its first loop and keeps it for the process's
    life. SQLite keeps the descriptor of a connection closed while another of the process holds
    a lock on the same file, and gives it to the next connection it opens to that file (the
    worker's event beacon opens and closes one to the broker's file).
    """
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.new_event_loop().close()
    url = app.settings.broker
    if url.startswith("sqlite:///"):
        connection = sqlite3.connect(url.removeprefix("sqlite:///").partition("?")[0])
        connection.execute("select 1").fetchall()
        connection.close()


def wait_for_file(path: Path, timeout: float = 30.0) -> None:
    """Inside a task: block until the test creates `path` (bounded, so a failing test ends)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.005)


def note_pid(folder: Path, name: object = None) -> None:
    """Inside a child: record its pid as `folder/name` (the pid, by default). Written beside
    the folder and renamed into it, so a test polling the folder never reads half a file."""
    pid = str(os.getpid())
    name = pid if name is None else str(name)
    scratch = folder.parent / f".{folder.name}-{name}"
    scratch.write_text(pid)
    os.replace(scratch, folder / name)


def blocking_task(app: Conveyor, started: Path, release: Path) -> Task[[int], int]:
    """A task `block(n)` that notes its pid in `started/n`, then waits for `release`."""

    @app.task
    def block(n: int) -> int:
        note_pid(started, n)
        wait_for_file(release)
        return n

    return block


def pids_in(folder: Path) -> set[int]:
    return {int(p.read_text()) for p in folder.iterdir()} if folder.exists() else set()


# 1. ownership: the parent holds the broker; children run tasks and nothing else


def test_tasks_run_in_children_that_hold_no_socket(make_app: MakeApp) -> None:
    app = make_app()

    @app.task
    def whoami() -> tuple[int, int]:
        sockets = 0
        for name in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):  # the listing's own descriptor is gone
                sockets += stat.S_ISSOCK(os.fstat(int(name)).st_mode)
        return os.getpid(), sockets

    results = whoami.map([() for _ in range(20)])
    stats = run_until_empty(app)
    answers = [r.get(timeout=5) for r in results]
    pids = {pid for pid, _ in answers}
    assert os.getpid() not in pids, "a task ran in the worker's own process"
    assert 1 <= len(pids) <= 2, "2 children, kept while they work"
    assert all(sockets == 0 for _, sockets in answers), "a child holds a socket (the broker's?)"
    assert (stats.received, stats.succeeded, stats.lost) == (20, 20, 0)
    assert waiting(app) == 0


def test_children_convert_annotated_arguments_and_results_exactly(make_app: MakeApp) -> None:
    """The child decodes the message itself: it converts the arguments to their annotations,
    and its result comes back as the return annotation says."""
    app = make_app()

    @app.task
    def keep(everything: Everything, when: dt.datetime) -> tuple[Everything, dt.datetime, int]:
        assert isinstance(everything, Everything) and isinstance(when, dt.datetime)
        return everything, when, os.getpid()

    result = keep.delay(EVERYTHING, EVERYTHING.when)
    stats = run_until_empty(app)
    everything, when, pid = result.get(timeout=5)
    assert pid != os.getpid(), "it ran in a child"
    assert same(everything, EVERYTHING) and same(when, EVERYTHING.when)
    assert stats.succeeded == 1


@pytest.mark.parametrize(
    "value",
    [{1, 2}, float("nan"), b"abc", dt.datetime(2026, 1, 1, tzinfo=dt.UTC)],
    ids=["set", "nan", "bytes", "datetime"],
)
def test_what_json_would_change_fails_the_task_instead_of_being_stored_changed(
    make_app: MakeApp, value: Any
) -> None:
    """Before: `{1, 2}` was stored as `[1, 2]`, NaN as null, bytes as base64 text, a datetime
    as a string, all as SUCCESS."""
    app = make_app()

    @app.task
    def give(kind):  # type: ignore[no-untyped-def]
        return value

    result = give.delay("x")
    run_until_empty(app)
    with pytest.raises(TaskFailed) as failed:
        result.get(timeout=5)
    assert failed.value.type_name == "EncodeError" and "the return value" in failed.value.message
    for argument in (b"abc", {1: "a"}):
        with pytest.raises(EncodeError, match="argument 'kind'"):
            give.delay(argument)
    assert waiting(app) == 0


def test_resources_are_made_in_each_child_and_closed_when_it_is_replaced_or_stops(
    make_app: MakeApp, tmp_path: Path
) -> None:
    app = make_app()
    log_file = tmp_path / "resource.log"

    def note(line: str) -> None:
        with open(log_file, "a") as f:
            f.write(line + "\n")

    class Client:
        def __init__(self) -> None:
            note(f"open {os.getpid()}")

        def close(self) -> None:
            note(f"close {os.getpid()}")

    @app.resource
    def client() -> Client:
        return Client()

    @app.task
    def use() -> int:
        client()
        return os.getpid()

    results = use.map([() for _ in range(12)])
    stats = run_until_empty(app, max_tasks_per_child=3)
    pids = {r.get(timeout=5) for r in results}
    assert stats.succeeded == 12 and len(pids) >= 4, "children were replaced"
    lines = log_file.read_text().split()
    opened = [int(pid) for verb, pid in zip(lines[::2], lines[1::2], strict=True) if verb == "open"]
    closed = [
        int(pid) for verb, pid in zip(lines[::2], lines[1::2], strict=True) if verb == "close"
    ]
    assert sorted(opened) == sorted(pids), "one per child that ran tasks, made there"
    assert sorted(closed) == sorted(pids), "each closed by its child, when replaced or stopped"


def test_a_user_connection_open_before_the_fork_is_warned_about(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()

    @app.task
    def noop() -> None:
        return None

    noop.delay()  # on RabbitMQ, the app's own connection is open now: never warned about
    server = socket.create_server(("127.0.0.1", 0))
    host, port = server.getsockname()
    user = socket.create_connection((host, port))  # a module-level client, say
    # A library's wake-up pair over loopback TCP, both ends in this process: not a connection.
    waker_server = socket.create_server(("127.0.0.1", 0))
    waker_address = waker_server.getsockname()
    waker = socket.create_connection(waker_address)
    woken, _ = waker_server.accept()
    try:
        with caplog.at_level(logging.WARNING, logger="conveyor.worker"):
            run_until_empty(app)
    finally:
        for sock in (user, server, waker, woken, waker_server):
            sock.close()
    warnings = [r.getMessage() for r in caplog.records if "@app.resource" in r.getMessage()]
    assert len(warnings) == 1, "one warning per worker start"
    assert f"tcp to {host}:{port}" in warnings[0]
    assert ":5672" not in warnings[0], "conveyor's own broker connection is not the user's"
    assert f"tcp to {waker_address[0]}:{waker_address[1]}" not in warnings[0], "a pair is not"


def test_no_fork_warning_without_user_connections(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()

    @app.task
    def noop() -> None:
        return None

    noop.delay()
    with caplog.at_level(logging.WARNING, logger="conveyor.worker"):
        run_until_empty(app)
    warnings = [r.getMessage() for r in caplog.records if "@app.resource" in r.getMessage()]
    # Connections other tests left open in this process could be listed; never the broker's.
    assert not any(":5672" in w for w in warnings)


# 2. dispatch: only idle children get work, and prefetch never exceeds what can start


def second_child_comes_up_late(app: Conveyor, tmp_path: Path) -> None:
    """The first child reports WORKER_UP at once, every later one 0.3s after its fork:
    children coming up at different times, as they do under load."""
    first = tmp_path / "first-child"

    @app.on_process_start
    def stagger() -> None:
        try:
            os.close(os.open(first, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            time.sleep(0.3)


def test_no_task_waits_behind_a_busy_child(make_app: MakeApp, tmp_path: Path, poll: Poll) -> None:
    app = make_app()
    second_child_comes_up_late(app, tmp_path)
    release = tmp_path / "release"

    @app.task
    def block() -> int:
        wait_for_file(release)
        return os.getpid()

    @app.task
    def quick(n: int) -> int:
        return os.getpid()

    blocked = block.delay()
    quick_ones = quick.map([(n,) for n in range(10)])
    worker = Worker(app, pool="prefork", concurrency=2)
    with running(worker, release) as (thread, errors):
        # One child is stuck; every quick task must still run, on the other one.
        poll(lambda: all(r.ready() for r in quick_ones), timeout=10, what="the quick tasks")
        assert blocked.state == State.STARTED
        pids = {r.get(timeout=1) for r in quick_ones}
        assert len(pids) == 1 and os.getpid() not in pids
        release.touch()
        assert blocked.get(timeout=30) not in pids
        worker.stop()
        thread.join(30)
        assert not thread.is_alive() and not errors
    assert worker.stats.succeeded == 11


def test_prefetch_never_exceeds_the_children_and_keeps_them_busy(
    make_app: MakeApp, tmp_path: Path, poll: Poll
) -> None:
    app = make_app()
    second_child_comes_up_late(app, tmp_path)
    started, release = tmp_path / "started", tmp_path / "release"
    started.mkdir()

    @app.task
    def slow(n: int) -> int:
        note_pid(started, n)
        wait_for_file(release)
        return n

    results = slow.map([(n,) for n in range(10)])
    worker = Worker(app, pool="prefork", concurrency=2)
    with running(worker, release) as (thread, errors):
        poll(lambda: len(list(started.iterdir())) == 2, timeout=10, what="two tasks to start")
        # Both children are busy: the other 8 stay in the broker, not in the worker's hands
        # (RabbitMQ would push them if the worker's prefetch allowed it).
        for _ in range(20):
            assert waiting(app) == 8
            assert len(list(started.iterdir())) == 2
            assert worker.stats.received == 2
        release.touch()
        poll(lambda: all(r.ready() for r in results), timeout=60, what="all ten tasks")
        worker.stop()
        thread.join(30)
        assert not thread.is_alive() and not errors
    assert [r.get(timeout=1) for r in results] == list(range(10))
    assert worker.stats.received == 10
    assert len(pids_in(started)) == 2


def test_2ms_tasks_queue_in_children_once_the_broker_round_trip_is_timed(
    make_app: MakeApp, broker_kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On RabbitMQ the worker times the broker's round trip: the budget grows past a 2 ms
    task, which then queues behind the running one. On SQLite the fetch is a call in the
    worker's process and the budget stays at its floor, under such a task."""
    depths: list[int] = []
    resize = PreforkPool._resize

    def noting(pool: PreforkPool) -> None:
        resize(pool)
        depths.append(pool._depth)

    monkeypatch.setattr(PreforkPool, "_resize", noting)
    app = make_app()

    @app.task
    def nap(n: int) -> int:
        time.sleep(0.002)
        return n

    results = nap.map([(n,) for n in range(600)])
    worker = Worker(app, pool="prefork", concurrency=2, until_empty=True)
    thread, errors = start_worker(worker)
    thread.join(60)
    assert not thread.is_alive() and not errors
    assert [r.get(timeout=1) for r in results] == list(range(600))
    assert worker._consumer is not None
    pool = worker._consumer.pool
    assert isinstance(pool, PreforkPool)
    if broker_kind == "rabbitmq":
        assert pool._round_trip > ACK_DELAY_S
        assert pool._budget >= ROUND_TRIPS * ACK_DELAY_S > 0.002
        assert max(depths) > 1, "2 ms tasks queued behind the running ones"
    else:
        assert pool._round_trip == 0 and pool._budget == MIN_BUDGET_S
        assert max(depths) == 1


# 3. start-up: WORKER_UP, and a child that never reports it is replaced


def test_start_hooks_run_in_each_child_after_the_fork(make_app: MakeApp, tmp_path: Path) -> None:
    app = make_app()
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    resource: dict[str, int] = {}

    @app.on_process_start
    def connect() -> None:
        resource["pid"] = os.getpid()  # a per-process resource, made after the fork
        note_pid(hooks)

    @app.task
    def use() -> tuple[int, int | None]:
        return os.getpid(), resource.get("pid")

    results = use.map([() for _ in range(6)])
    run_until_empty(app, max_tasks_per_child=1)
    answers = [r.get(timeout=5) for r in results]
    assert all(pid == made_in for pid, made_in in answers), "a resource crossed a fork"
    assert {pid for pid, _ in answers} <= pids_in(hooks)
    assert os.getpid() not in pids_in(hooks) and resource == {}, "a hook ran in the worker"


def test_the_zygote_forgets_the_worker_once_and_its_children_have_nothing_left_to_forget(
    make_app: MakeApp, tmp_path: Path
) -> None:
    # The `_fork` callbacks run in the zygote forked from the worker; each would copy pages
    # into every child (docs/worker-performance.md, Memory), where there is nothing to forget.
    app = make_app()
    ran = tmp_path / "forgot"

    def mark() -> None:
        with open(ran, "a") as f:
            f.write(f"{os.getpid()}\n")

    @app.task
    def family() -> tuple[int, int]:
        return os.getpid(), os.getppid()

    _fork.forget_in_child(mark)
    try:
        results = family.map([() for _ in range(4)])
        run_until_empty(app)
    finally:
        _fork._callbacks.remove(mark)
    answers = [r.get(timeout=5) for r in results]
    zygotes = {zygote for _, zygote in answers}
    assert ran.read_text().split() == [str(zygote) for zygote in zygotes]
    assert not {pid for pid, _ in answers} & set(ran.read_text().split())


def test_a_child_that_never_reports_up_is_killed_and_replaced(
    make_app: MakeApp, tmp_path: Path, poll: Poll, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(child_start_timeout=0.5)
    hung = tmp_path / "hung"

    @app.on_process_start
    def hang_in_the_first_child() -> None:
        try:
            fd = os.open(hung, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        time.sleep(60)  # never reports WORKER_UP

    @app.task
    def whoami() -> int:
        return os.getpid()

    results = whoami.map([() for _ in range(3)])
    with caplog.at_level(logging.WARNING, logger="conveyor"):
        stats = run_until_empty(app, concurrency=1)
    hung_pid = int(hung.read_text())
    pids = [r.get(timeout=5) for r in results]
    assert hung_pid not in pids, "work was sent to a child that never came up"
    assert (stats.received, stats.succeeded, stats.lost) == (3, 3, 0)
    messages = [r.getMessage() for r in caplog.records]
    assert any("did not report WORKER_UP" in m for m in messages), messages
    poll(lambda: exited(hung_pid), timeout=10, what="the hung child to be killed")


# 4. recycling


@pytest.mark.parametrize("max_tasks", [1, 3])
def test_max_tasks_per_child_replaces_children(make_app: MakeApp, max_tasks: int) -> None:
    app = make_app()

    @app.task
    def whoami() -> int:
        return os.getpid()

    results = whoami.map([() for _ in range(9)])
    stats = run_until_empty(app, concurrency=1, max_tasks_per_child=max_tasks)
    pids = [r.get(timeout=5) for r in results]
    assert os.getpid() not in pids
    assert sorted(pids.count(pid) for pid in set(pids)) == [max_tasks] * (9 // max_tasks)
    assert (stats.succeeded, stats.lost) == (9, 0)


def test_max_memory_per_child_replaces_children(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()

    @app.task
    def whoami() -> int:
        return os.getpid()

    results = whoami.map([() for _ in range(6)])
    with caplog.at_level(logging.DEBUG, logger="conveyor.worker"):
        stats = run_until_empty(app, max_memory_per_child=1)  # every child is over it
    pids = [r.get(timeout=5) for r in results]
    assert len(set(pids)) == 6 and os.getpid() not in pids
    assert stats.succeeded == 6
    retired = [r for r in caplog.records if "max-memory-per-child" in r.getMessage()]
    assert len(retired) == 6


def test_replacing_children_leaves_the_worker_no_open_descriptor(
    make_app: MakeApp, broker_kind: str
) -> None:
    app = make_app()

    @app.task
    def noop(n: int) -> int:
        return n

    @app.task
    def crash() -> None:
        os._exit(1)

    @app.task(time_limit=0.3)
    def stuck() -> None:
        time.sleep(60)

    # Every way a child ends: retired after its task, died, killed past its limit.
    results = noop.map([(n,) for n in range(300)])
    crash.delay()
    stuck.delay()
    if broker_kind == "rabbitmq":
        # The worker opens a connection of its own on its loop and closes it when it stops;
        # the one the tasks were sent through would be closed by it, and counted as a change.
        app.broker.close()
    else:
        # SQLite connections are per thread and kept open: open this thread's first.
        app.broker.stats([queue_of(app)])
        assert app.results is not None
        app.results.count()
    settle_descriptors(app)
    before = open_fds()
    worker = Worker(app, pool="prefork", concurrency=2, max_tasks_per_child=1, until_empty=True)
    stats = worker.run()  # on this thread, so no thread-local connection stays behind
    after = open_fds()
    assert [r.get(timeout=5) for r in results] == list(range(300))
    assert (stats.succeeded, stats.lost, stats.dead_lettered, stats.failed) == (300, 3, 1, 1)
    assert after == before, f"{after - before} descriptors leaked over 300 children"


def test_an_idle_child_that_dies_is_replaced(
    make_app: MakeApp, tmp_path: Path, poll: Poll, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()
    children, release = tmp_path / "children", tmp_path / "release"
    children.mkdir()

    @app.on_process_start
    def note() -> None:
        note_pid(children)

    @app.task
    def whoami() -> int:
        return os.getpid()

    worker = Worker(app, pool="prefork", concurrency=1)
    caplog.set_level(logging.WARNING, logger="conveyor")
    with running(worker, release) as (thread, errors):
        (first,) = poll(lambda: pids_in(children), timeout=30, what="the child")
        os.kill(first, signal.SIGKILL)  # as the OOM killer would, while it waits for work
        poll(lambda: len(pids_in(children)) == 2, timeout=30, what="a replacement")
        result = whoami.delay()
        assert result.get(timeout=30) == (pids_in(children) - {first}).pop()
        worker.stop()
        thread.join(30)
        assert not thread.is_alive() and not errors
    assert (worker.stats.succeeded, worker.stats.lost) == (1, 0)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert f"(pid {first}) was killed by SIGKILL" in warning


# 5. time limits


def test_soft_time_limit_is_raised_inside_the_task(make_app: MakeApp) -> None:
    app = make_app()

    @app.task(soft_time_limit=0.2)
    def slow() -> str:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(0.01)
        return "finished"

    @app.task(soft_time_limit=0.2, time_limit=10)
    def careful() -> str:
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                time.sleep(0.01)
        except SoftTimeLimitExceeded:
            return f"cleaned up in {os.getpid()}"
        return "finished"

    @app.task
    def after() -> int:
        return os.getpid()

    failed, cleaned, next_one = slow.delay(), careful.delay(), after.delay()
    stats = run_until_empty(app, concurrency=1)
    record = record_of(app, failed.id)
    assert (record.state, record.error_type) == (State.FAILURE, "SoftTimeLimitExceeded")
    assert cleaned.get(timeout=5).startswith("cleaned up in ")
    assert next_one.get(timeout=5) != os.getpid()
    assert (stats.failed, stats.succeeded, stats.lost) == (1, 2, 0)


def test_soft_time_limit_interrupts_a_blocking_call(make_app: MakeApp) -> None:
    app = make_app()

    @app.task(soft_time_limit=0.2, time_limit=3)
    def careful() -> str:
        try:
            time.sleep(30)  # a socket read or a subprocess wait would block the same way
        except SoftTimeLimitExceeded:
            return "cleaned up"
        return "finished"

    result = careful.delay()
    run_until_empty(app, concurrency=1)
    record = record_of(app, result.id)
    assert (record.state, record.error_type) == (State.SUCCESS, None), record.error_message
    assert result.get(timeout=1) == "cleaned up"


def test_hard_time_limit_kills_the_child_and_fails_the_task_once(
    make_app: MakeApp, tmp_path: Path, poll: Poll
) -> None:
    app = make_app()
    runs = tmp_path / "runs"
    runs.mkdir()

    @app.task(time_limit=0.5)
    def stuck() -> str:
        note_pid(runs)
        time.sleep(60)  # inside C: only killing the process stops it
        return "finished"

    @app.task
    def after(n: int) -> int:
        return os.getpid()

    killed = stuck.delay()
    later = after.map([(n,) for n in range(3)])
    started = time.monotonic()
    stats = run_until_empty(app, concurrency=1)
    assert time.monotonic() - started < 30
    record = record_of(app, killed.id)
    assert (record.state, record.error_type) == (State.FAILURE, "TimeLimitExceeded")
    assert "0.5s limit" in (record.error_message or "")
    (stuck_pid,) = pids_in(runs)
    assert all(r.get(timeout=5) != stuck_pid for r in later)
    assert (stats.received, stats.failed, stats.succeeded) == (4, 1, 3)
    assert (stats.lost, stats.retried, stats.dead_lettered) == (0, 0, 0)
    assert waiting(app) == 0 and app.broker.dead_letters(queue_of(app)) == []
    poll(lambda: exited(stuck_pid), timeout=10, what="the stuck child to be gone")


def test_hard_time_limit_retries_when_asked_then_gives_up(
    make_app: MakeApp, tmp_path: Path
) -> None:
    app = make_app()
    runs = tmp_path / "runs"
    runs.mkdir()

    @app.task(time_limit=0.3, autoretry_for=(TimeLimitExceeded,), max_retries=1)
    def stuck() -> None:
        note_pid(runs)
        time.sleep(60)

    result = stuck.delay()
    stats = run_until_empty(app, concurrency=1)
    assert len(pids_in(runs)) == 2, "one run and one retry, each in its own child"
    record = record_of(app, result.id)
    assert (record.state, record.error_type, record.retries) == (
        State.FAILURE,
        "TimeLimitExceeded",
        1,
    )
    assert (stats.retried, stats.failed, stats.lost) == (1, 1, 0)
    (dead,) = app.broker.dead_letters(queue_of(app))
    assert dead.category is DeadLetterReason.RETRIES_EXHAUSTED
    assert dead.reason.startswith("retries exhausted: gave up after 1 retries")
    assert "TimeLimitExceeded" in dead.reason
    assert waiting(app) == 0


# 6. a child that dies takes its task back to the broker, until the poison limit


def _exit(code: int) -> None:
    os._exit(code)


def _sigkill(code: int) -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would


@pytest.mark.parametrize("death", [_exit, _sigkill], ids=["os._exit", "SIGKILL"])
def test_a_task_that_kills_its_child_is_requeued_then_dead_lettered(
    make_app: MakeApp,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    death: Callable[[int], None],
) -> None:
    app = make_app()
    runs = tmp_path / "runs"
    runs.mkdir()

    @app.task
    def crash() -> None:
        note_pid(runs)
        death(1)

    @app.task
    def fine(n: int) -> int:
        return n

    poison = crash.delay()
    others = fine.map([(n,) for n in range(10)])
    with caplog.at_level(logging.WARNING, logger="conveyor"):
        stats = run_until_empty(app)
    assert [r.get(timeout=5) for r in others] == list(range(10))
    assert len(pids_in(runs)) == 3, "run three times, never a fourth"
    assert (stats.lost, stats.rejected, stats.dead_lettered, stats.succeeded) == (3, 1, 1, 10)
    (dead,) = app.broker.dead_letters(queue_of(app))
    assert dead.reason == "poison message: the process running it died in 3 runs (poison limit 3)"
    assert dead.delivery_count == 4
    record = record_of(app, poison.id)
    assert (record.state, record.error_type) == (State.FAILURE, "WorkerLost")
    assert waiting(app) == 0
    lost = [r.getMessage() for r in caplog.records if "lost" in r.getMessage()]
    assert [("lost runs 1" in m, "lost runs 2" in m, "lost runs 3" in m) for m in lost] == [
        (True, False, False),
        (False, True, False),
        (False, False, True),
    ]


def test_a_short_task_that_kills_its_child_loses_only_itself_not_the_jobs_queued_behind(
    make_app: MakeApp, tmp_path: Path
) -> None:
    """Short tasks queue in a child behind the one it runs: when that one kills the child,
    the jobs behind it never started, so they go to another child, run once and count nothing."""
    app = make_app()
    runs = tmp_path / "runs"
    runs.mkdir()

    @app.task
    def step(n: int) -> int:
        if n == -1:  # fast like every other step, until it is not
            note_pid(runs)
            os._exit(1)
        return n

    warm = step.map([(n,) for n in range(300)])  # the pool learns that steps are short
    later = step.map([(n,) for n in range(300, 350)] + [(-1,)] + [(n,) for n in range(350, 400)])
    stats = run_until_empty(app)
    assert [r.get(timeout=5) for r in warm + later[:50] + later[51:]] == list(range(400))
    assert len(pids_in(runs)) == 3, "the killer ran three times: the poison limit"
    assert (stats.lost, stats.dead_lettered, stats.succeeded) == (3, 1, 400)
    assert stats.received == 401 + 3, "only the killer was delivered again"
    assert waiting(app) == 0


def test_a_child_dying_under_an_at_most_once_task_fails_it_without_a_redelivery(
    make_app: MakeApp, tmp_path: Path
) -> None:
    app = make_app()
    runs = tmp_path / "runs"
    runs.mkdir()

    @app.task(acks_late=False)
    def once() -> None:
        note_pid(runs)
        os._exit(1)

    result = once.delay()
    stats = run_until_empty(app)
    assert len(pids_in(runs)) == 1, "acknowledged before it ran: never run again"
    assert (stats.lost, stats.dead_lettered) == (1, 0)
    record = record_of(app, result.id)
    assert (record.state, record.error_type) == (State.FAILURE, "WorkerLost")
    assert waiting(app) == 0


# bad input: the worker stays up, the message is settled with the reason, the next tasks run


def test_a_task_that_raises_or_returns_junk_fails_and_the_next_ones_run(
    make_app: MakeApp,
) -> None:
    app = make_app()

    @app.task
    def boom() -> None:
        raise ValueError("no such image")

    @app.task
    def odd() -> object:
        return object()  # nothing a result store can encode

    @app.task
    def fine(n: int) -> int:
        return n

    raised, unencodable = boom.delay(), odd.delay()
    good = fine.map([(n,) for n in range(5)])
    stats = run_until_empty(app)
    record = record_of(app, raised.id)
    assert (record.state, record.error_type, record.error_message) == (
        State.FAILURE,
        "ValueError",
        "no such image",
    )
    assert "raise ValueError" in (record.traceback or ""), "the child's traceback is kept"
    record = record_of(app, unencodable.id)
    assert (record.state, record.error_type) == (State.FAILURE, "EncodeError")
    assert "object" in (record.error_message or "")
    assert [r.get(timeout=5) for r in good] == list(range(5))
    assert (stats.failed, stats.succeeded, stats.lost, stats.dead_lettered) == (2, 5, 0, 0)
    assert waiting(app) == 0


# 7. shutdown


def test_warm_shutdown_stops_fetching_finishes_running_tasks_and_children_exit_cleanly(
    make_app: MakeApp, tmp_path: Path, poll: Poll, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()
    children, started, release = tmp_path / "children", tmp_path / "started", tmp_path / "release"
    children.mkdir()
    started.mkdir()

    @app.on_process_start
    def note() -> None:
        note_pid(children)

    block = blocking_task(app, started, release)

    first = block.delay(0)
    worker = Worker(app, pool="prefork", concurrency=2, shutdown_grace=30)
    caplog.set_level(logging.INFO, logger="conveyor")
    with running(worker, release) as (thread, errors):
        poll((started / "0").exists, timeout=30, what="the task to start")
        worker.stop()
        poll(lambda: any("warm shutdown" in r.getMessage() for r in caplog.records))
        later = block.map([(n,) for n in range(1, 4)])  # one child is idle: it must get none
        assert thread.is_alive(), "the worker left before its running task finished"
        release.touch()
        thread.join(30)
        assert not thread.is_alive() and not errors
    assert first.get(timeout=5) == 0
    assert all(r.state == State.PENDING for r in later)
    stats = worker.stats
    assert (stats.received, stats.succeeded, stats.released, stats.lost) == (1, 1, 0, 0)
    assert len(pids_in(children)) == 2
    for pid in pids_in(children):
        poll(lambda pid=pid: exited(pid), timeout=10, what=f"child {pid} to exit")
    complaints = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert complaints == [], "children must exit cleanly"
    assert waiting(app) == 3, "the tasks sent after the stop stay in the queue, once each"
    assert queue_contents(app, 3) == [(1, 1), (2, 1), (3, 1)], "never started: never counted"


def test_cold_shutdown_kills_the_child_and_gives_its_message_back(
    make_app: MakeApp, tmp_path: Path, poll: Poll
) -> None:
    app = make_app()
    started, release = tmp_path / "started", tmp_path / "release"
    started.mkdir()

    block = blocking_task(app, started, release)

    results = block.map([(n,) for n in range(4)])
    worker = Worker(app, pool="prefork", concurrency=1, shutdown_grace=30)
    with running(worker, release) as (thread, errors):
        poll((started / "0").exists, timeout=30, what="the first task to start")
        worker.stop()
        worker.stop()  # the second is cold
        thread.join(30)
        assert not thread.is_alive() and not errors
    assert results[0].state == State.STARTED, "the running task never finished"
    (pid,) = pids_in(started)
    poll(lambda: exited(pid), timeout=10, what="the child to be killed")
    stats = worker.stats
    assert (stats.received, stats.released, stats.succeeded, stats.lost) == (1, 1, 0, 0)
    assert waiting(app) == 4, "the running message went back, once"
    assert queue_contents(app, 4) == [(0, 2), (1, 1), (2, 1), (3, 1)], "counted once"


def test_what_outlives_the_shutdown_grace_is_given_back(
    make_app: MakeApp, tmp_path: Path, poll: Poll
) -> None:
    app = make_app()
    started, release = tmp_path / "started", tmp_path / "release"
    started.mkdir()

    block = blocking_task(app, started, release)

    results = block.map([(n,) for n in range(2)])
    worker = Worker(app, pool="prefork", concurrency=1, shutdown_grace=0.5)
    with running(worker, release) as (thread, errors):
        poll((started / "0").exists, timeout=30, what="the first task to start")
        worker.stop()  # warm, but the task never finishes
        thread.join(30)
        assert not thread.is_alive() and not errors
    assert results[0].state == State.STARTED
    (pid,) = pids_in(started)
    poll(lambda: exited(pid), timeout=10, what="the child to be killed")
    stats = worker.stats
    assert (stats.received, stats.released, stats.succeeded, stats.lost) == (1, 1, 0, 0)
    assert waiting(app) == 2, "the running message went back, once"
    assert queue_contents(app, 2) == [(0, 2), (1, 1)]


def queue_contents(app: Conveyor, n: int) -> list[tuple[int, int]]:
    """(first argument, delivery count) of the `n` messages in the app's queue, sorted, fetched
    through a connection of their own once the app's is closed."""
    app.close()
    fresh = Conveyor("prefork", broker=app.settings.broker, results=None)
    got: list[Any] = []

    def more() -> bool:
        got.extend(fresh.broker.fetch([queue_of(app)], n - len(got)))
        return len(got) >= n

    try:
        wait_for(more, timeout=10, what=f"{n} messages")
        return sorted((decode(d.body).args[0], d.delivery_count) for d in got)
    finally:
        fresh.close()


# the acceptance stress test


@pytest.mark.timeout(600)
@pytest.mark.parametrize("broker_kind", ["sqlite"], indirect=True)
def test_stress_one_task_per_child_with_random_start_delays(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    n = 20_000
    app = make_app()

    @app.on_process_start
    def late() -> None:
        time.sleep(random.uniform(0, 0.005))  # a random delay before WORKER_UP

    @app.task
    def noop() -> None:
        pass

    results = noop.map([() for _ in range(n)])
    # This thread's SQLite connections are opened before descriptors are counted.
    app.broker.stats([queue_of(app)])
    store = app.results
    assert store is not None
    store.count()
    settle_descriptors(app)
    before = open_fds()
    worker = Worker(app, pool="prefork", concurrency=2, max_tasks_per_child=1, until_empty=True)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        stats = worker.run()
    elapsed = time.monotonic() - started
    after = open_fds()
    with capfd.disabled():
        print(f"\n{n} tasks, one child each: {elapsed:.1f}s, {n / elapsed:.0f} tasks/s")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert capfd.readouterr().err == "", "the worker, its zygote and children write nothing"
    assert (stats.succeeded, stats.lost, stats.failed, stats.rejected) == (n, 0, 0, 0)
    assert store.count() == n
    assert all(r.state == State.SUCCESS for r in results)
    assert waiting(app) == 0
    assert after == before, f"{after - before} descriptors leaked"


def test_a_dead_zygote_of_an_app_no_process_can_import_stops_the_worker_warm(
    make_app: MakeApp, tmp_path: Path, poll: Poll, caplog: pytest.LogCaptureFixture
) -> None:
    """A new zygote imports the app by its path; an app made inside a function has none. Then
    the pool can start no child: the worker finishes what runs, takes nothing more, and says
    why, so that its supervisor starts a new one. (With a path, the zygote is replaced and the
    worker runs on: tests/integration/test_zygote.py.)"""
    app = make_app()
    started, release = tmp_path / "started", tmp_path / "release"
    started.mkdir()

    block = blocking_task(app, started, release)

    first = block.delay(0)
    worker = Worker(app, pool="prefork", concurrency=2, shutdown_grace=30)
    caplog.set_level(logging.INFO, logger="conveyor")
    with running(worker, release) as (thread, errors):
        poll((started / "0").exists, timeout=30, what="the task to start")
        assert worker._consumer is not None
        pool = worker._consumer.pool
        assert isinstance(pool, PreforkPool)
        zygote = pool._zygote_pid
        os.kill(zygote, signal.SIGKILL)
        poll(lambda: worker.failure is not None, timeout=30, what="the worker to notice")
        later = block.delay(1)
        assert thread.is_alive(), "the worker left before its running task finished"
        release.touch()
        thread.join(30)
        assert not thread.is_alive() and not errors
    reason = (
        f"the prefork zygote (pid {zygote}) was killed by SIGKILL, and app {app.name!r} cannot "
        "be imported by a new process to start another: start the worker with `conveyor worker "
        "module:attribute`, or define the app at module level"
    )
    assert worker.failure == reason
    assert first.get(timeout=5) == 0
    assert later.state == State.PENDING and waiting(app) == 1
    errors_logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors_logged == [f"{reason}: the worker stops so that a new one can start"]
