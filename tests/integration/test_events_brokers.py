"""Events and inspection on the SQLite broker and on RabbitMQ: every task event from a prefork
worker (and the threads and asyncio pools), heartbeats, nothing published unless enabled or
asked for, a reader that never reads, `conveyor events --json` and `conveyor inspect` as real
processes against two live workers and a stopped one, and malformed messages.

RabbitMQ is expected on 127.0.0.1:5672 (guest/guest); each test uses an app and queue of its
own and deletes its queues and exchanges afterwards.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    RABBITMQ_URL,
    delete_rabbitmq_queues,
    require_rabbitmq,
    run_bounded,
    start_worker,
    wait_for,
)

from conveyor import Conveyor, Worker
from conveyor.control import EventReader, TaskEvent, WorkerEvent, inspect
from conveyor.control.beacon import HEARTBEAT_S
from conveyor.control.protocol import control_channel, events_channel
from conveyor.errors import TaskSkipped
from conveyor.middleware import Middleware

pytestmark = pytest.mark.integration

MakeApp = Callable[..., Conveyor]


def delete_broadcast(app_name: str) -> None:
    """Delete an app's roster queue and broadcast exchanges from the local RabbitMQ."""
    import aiormq

    async def delete() -> None:
        connection = await aiormq.connect(RABBITMQ_URL)
        channel = await connection.channel()
        await channel.queue_delete(f"conveyor.roster.{app_name}")
        for name in (events_channel(app_name), control_channel(app_name)):
            await channel.exchange_delete(f"conveyor.{name}")
        await connection.close()

    asyncio.run(delete())


class Broker:
    """One test's broker: its URL, app name and queue."""

    def __init__(self, kind: str, tmp_path: Path) -> None:
        self.kind = kind
        self.name = f"ev-{uuid.uuid4().hex[:10]}"
        self.queue = self.name
        if kind == "rabbitmq":
            require_rabbitmq()
            self.url = RABBITMQ_URL
            self.results = f"sqlite:///{tmp_path / 'results.db'}"
        else:
            self.url = self.results = f"sqlite:///{tmp_path / 'broker.db'}"

    def cleanup(self) -> None:
        if self.kind == "rabbitmq":
            delete_rabbitmq_queues(self.queue)
            delete_broadcast(self.name)


@pytest.fixture(params=["sqlite", "rabbitmq"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Broker]:
    where = Broker(str(request.param), tmp_path)
    yield where
    where.cleanup()


@pytest.fixture
def make_app(broker: Broker) -> Iterator[MakeApp]:
    apps: list[Conveyor] = []

    def make(**settings: Any) -> Conveyor:
        app = Conveyor(
            broker.name,
            broker=broker.url,
            results=broker.results,
            default_queue=broker.queue,
            **settings,
        )
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


def collect(
    reader: EventReader, until: Callable[[list[Any]], bool], timeout: float = 30
) -> list[Any]:
    seen: list[Any] = []

    def done() -> bool:
        seen.extend(reader.read(0.1))
        return until(seen)

    wait_for(done, timeout, "the expected events")
    return seen


def types_of(events: list[Any], task_id: str) -> list[str]:
    return [e.type for e in events if isinstance(e, TaskEvent) and e.id == task_id]


class Skip(Middleware):
    def before_admit(self, task: Any, request: Any) -> None:
        if task.name.endswith("skipped"):
            raise TaskSkipped("not today")


def test_every_task_event_from_a_prefork_worker(make_app: MakeApp) -> None:
    app = make_app(middleware=[Skip()], poison_limit=1)

    @app.task
    def ok(x: int) -> int:
        return x

    @app.task
    def boom() -> None:
        raise ValueError("boom")

    @app.task(max_retries=1, retry_backoff=False, autoretry_for=(KeyError,))
    def flaky() -> None:
        raise KeyError("again")

    @app.task
    def die() -> None:
        os._exit(3)

    @app.task
    def skipped() -> None: ...

    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    ids = {
        "ok": ok.delay(1).id,
        "boom": boom.delay().id,
        "flaky": flaky.delay().id,
        "die": die.delay().id,
        "skipped": skipped.delay().id,
        "expired": ok.apply_async((2,), expires=past).id,
    }
    with EventReader(app, request=False) as reader:
        stats = run_bounded(app, pool="prefork", concurrency=2, timeout=60, events=True)
        seen = collect(
            reader,
            lambda e: (
                "task-dead-lettered" in types_of(e, ids["die"])
                and "task-dead-lettered" in types_of(e, ids["flaky"])
                and "task-expired" in types_of(e, ids["expired"])
            ),
        )
    assert stats.lost == 1
    assert types_of(seen, ids["ok"]) == ["task-received", "task-started", "task-succeeded"]
    assert types_of(seen, ids["boom"]) == ["task-received", "task-started", "task-failed"]
    assert types_of(seen, ids["flaky"]) == [
        *("task-received", "task-started", "task-retried"),
        *("task-received", "task-started", "task-dead-lettered"),
    ]
    assert types_of(seen, ids["die"]) == [
        *("task-received", "task-started", "task-lost"),
        *("task-received", "task-dead-lettered"),
    ]
    assert types_of(seen, ids["skipped"]) == ["task-received", "task-skipped"]
    assert types_of(seen, ids["expired"]) == ["task-received", "task-expired"]
    beats = [e for e in seen if isinstance(e, WorkerEvent) and e.type == "worker-heartbeat"]
    assert beats and beats[0].pool == "prefork" and beats[0].concurrency == 2
    assert beats[0].app == app.name and beats[0].events
    lost = next(e for e in seen if e.type == "task-lost")
    assert lost.worker == beats[0].worker


@pytest.mark.parametrize("pool", ["threads", "asyncio"])
def test_the_threads_and_asyncio_pools_report_events(make_app: MakeApp, pool: str) -> None:
    app = make_app()

    @app.task
    async def fetch(x: int) -> int:
        return x

    task_id = fetch.delay(1).id
    with EventReader(app, request=False) as reader:
        run_bounded(app, pool=pool, timeout=30, events=True)
        seen = collect(reader, lambda e: "task-succeeded" in types_of(e, task_id))
    assert types_of(seen, task_id) == ["task-received", "task-started", "task-succeeded"]
    beat = next(e for e in seen if e.type == "worker-heartbeat")
    assert beat.pool == pool


@pytest.fixture
def running() -> Iterator[Callable[..., Worker]]:
    workers: list[tuple[Worker, threading.Thread]] = []

    def start(app: Conveyor, **options: Any) -> Worker:
        options.setdefault("pool", "threads")
        options.setdefault("concurrency", 2)
        options.setdefault("shutdown_grace", 0)
        worker = Worker(app, **options)
        thread, _ = start_worker(worker)
        assert worker.started.wait(30)
        workers.append((worker, thread))
        return worker

    yield start
    for worker, thread in workers:
        if thread.is_alive():
            worker.stop()
            worker.stop()
        thread.join(30)


def test_nothing_is_published_unless_enabled_or_asked(
    make_app: MakeApp, running: Callable[..., Worker]
) -> None:
    app = make_app()

    @app.task
    def ok() -> None: ...

    broadcast = app.broker.broadcast()
    try:
        with broadcast.listen(events_channel(app.name)) as listener:
            worker = running(app)
            for _ in range(20):
                ok.delay()
            wait_for(lambda: worker.stats.succeeded == 20, 30, "20 tasks done")
            # Past a heartbeat's interval: a worker with events off publishes not even those.
            assert listener.read(HEARTBEAT_S + 0.5) == []
            assert broadcast.members(app.name)  # it is in the roster all the same
    finally:
        broadcast.close()


def test_a_reader_that_never_reads_costs_the_worker_nothing(
    broker: Broker, make_app: MakeApp, running: Callable[..., Worker]
) -> None:
    """RabbitMQ holds at most the reader's limit (drop-head); the worker drops nothing, and
    its buffer stays empty. On SQLite the table keeps a fixed number of rows."""
    app = make_app()

    @app.task
    def ok() -> None: ...

    with EventReader(app, limit=20) as reader:
        worker = running(app)
        consumer = worker._consumer
        assert consumer is not None
        wait_for(lambda: consumer.events.on, 10, "events on")
        ok.map([() for _ in range(1000)])
        wait_for(lambda: worker.stats.succeeded == 1000, 60, "1,000 tasks done")
        wait_for(lambda: len(consumer.events) == 0, 10, "the buffer drained")
        assert consumer.events.dropped == 0
        if broker.kind == "rabbitmq":
            depth = queue_depth(reader)
            assert 0 < depth <= 20
        # What it reads now is at most its limit, the newest.
        first = reader._listener.read(1.0)
        assert 0 < len(first) <= 20 + 64 * 2


def queue_depth(reader: EventReader) -> int:
    """Messages waiting in the reader's exclusive queue (asked on its own connection: no other
    may look at an exclusive queue)."""
    broadcast: Any = reader._broadcast
    name = reader._listener.address

    async def depth() -> int:
        channel = await (await broadcast._connect()).channel()
        declared = await channel.queue_declare(name, passive=True)
        await channel.close()
        return int(declared.message_count or 0)

    return int(broadcast._run(depth()))


def test_malformed_messages_are_dropped_with_a_line_each(
    make_app: MakeApp, running: Callable[..., Worker], caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()
    worker = running(app, events=True)
    broadcast = app.broker.broadcast()
    bad = [b"not json", b'{"type": "reboot"}', b'{"type": "events", "seconds": 1e9}', b"\xff\xfe"]
    try:
        wait_for(lambda: broadcast.members(app.name), 10, "the worker registered")
        with EventReader(app, request=False) as reader, caplog.at_level(logging.WARNING):
            broadcast.publish(control_channel(app.name), bad)
            broadcast.publish(events_channel(app.name), [b"[{", b'{"type": "task-received"}'])
            result = inspect(app, timeout=5)
            collect(reader, lambda e: any(x.type == "worker-heartbeat" for x in e))
            wait_for(lambda: reader.malformed == 2, 10, "both bad event messages dropped")
    finally:
        broadcast.close()
    assert len(result.reports) == 1 and worker.failure is None
    lines = [r.getMessage() for r in caplog.records]
    assert sum("malformed control message" in line for line in lines) == len(bad)
    assert sum("malformed events message" in line for line in lines) == 2


# real processes

APP_SOURCE = """
import os
import time
from pathlib import Path

from conveyor import Conveyor

app = Conveyor(
    os.environ["EV_APP"],
    broker=os.environ["EV_BROKER"],
    results=os.environ["EV_RESULTS"],
    default_queue=os.environ["EV_APP"],
)


@app.task(name="ev.add")
def add(x, y):
    return x + y


@app.task(name="ev.hold")
def hold(path):
    while not Path(path).exists():
        time.sleep(0.02)
"""


class Processes:
    """`conveyor` commands run as processes in one directory, stopped at the end."""

    def __init__(self, directory: Path, broker: Broker) -> None:
        (directory / "ev_app.py").write_text(APP_SOURCE)
        self.directory = directory
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
        self.env |= {"EV_APP": broker.name, "EV_BROKER": broker.url, "EV_RESULTS": broker.results}
        self.env["PYTHONPATH"] = str(directory)
        self.started: list[subprocess.Popen[str]] = []

    def start(self, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "conveyor", *args],
            cwd=self.directory,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.started.append(proc)
        return proc

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "conveyor", *args],
            cwd=self.directory,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def stop(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.terminate()
        for proc in self.started:
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


@pytest.fixture
def processes(tmp_path: Path, broker: Broker) -> Iterator[Processes]:
    procs = Processes(tmp_path, broker)
    yield procs
    procs.stop()


def lines_of(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    """The process's stdout, line by line, read on a thread."""
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    return lines


def next_json(lines: queue.Queue[str], match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The next JSON line that `match`es, within 30 s."""
    while True:
        try:
            line = lines.get(timeout=30)
        except queue.Empty:
            raise AssertionError("no matching line within 30s") from None
        event = json.loads(line)
        if match(event):
            return event


def test_conveyor_events_json_in_a_process(processes: Processes, broker: Broker) -> None:
    processes.start("worker", "ev_app:app", "--pool", "prefork", "-c", "1")
    reader = processes.start("events", "ev_app:app", "--json")
    lines = lines_of(reader)
    # The worker was started without --events: the reader's request turns them on.
    beat = next_json(lines, lambda e: e["type"] == "worker-heartbeat" and e["events"])
    assert beat["app"] == broker.name and beat["pool"] == "prefork"
    sent = processes.run("send", "ev_app:app", "ev.add", "2", "3")
    assert sent.returncode == 0, sent.stderr
    task_id = sent.stdout.strip()
    received = next_json(lines, lambda e: e.get("id") == task_id)
    assert received["type"] == "task-received" and received["task"] == "ev.add"
    started = next_json(lines, lambda e: e.get("id") == task_id)
    done = next_json(lines, lambda e: e.get("id") == task_id)
    assert (started["type"], done["type"]) == ("task-started", "task-succeeded")
    assert done["runtime"] >= 0 and done["worker"] == beat["worker"]
    reader.send_signal(signal.SIGINT)
    assert reader.wait(30) == 0


def test_conveyor_inspect_two_live_workers_and_a_stopped_one(
    processes: Processes, broker: Broker, tmp_path: Path
) -> None:
    workers = [
        processes.start("worker", "ev_app:app", "--pool", "prefork", "-c", "1") for _ in range(3)
    ]
    app = Conveyor(broker.name, broker=broker.url, results=broker.results)
    release = tmp_path / "release"
    try:
        wait_for(lambda: len(app.broker.broadcast().members(app.name)) == 3, 60, "3 workers up")
        sent = processes.run("send", "ev_app:app", "ev.hold", json.dumps(str(release)))
        assert sent.returncode == 0, sent.stderr
        task_id = sent.stdout.strip()

        def holder() -> int | None:
            reports = inspect(app, timeout=3).reports
            return next((r.pid for r in reports for t in r.active if t.id == task_id), None)

        # Stopped once the task runs elsewhere: RabbitMQ might have pushed it to this one.
        busy = wait_for(holder, 60, "the held task running")
        stopped = next(w for w in workers if w.pid != busy)
        live = [w for w in workers if w is not stopped]
        os.kill(stopped.pid, signal.SIGSTOP)
        proc = processes.run("inspect", "ev_app:app", "--json", "--timeout", "3")
        found = json.loads(proc.stdout) | {"returncode": proc.returncode}
        text = processes.run("inspect", "ev_app:app", "--timeout", "2")
    finally:
        release.touch()
        app.close()
    assert found["returncode"] == 1  # a known worker did not answer
    assert sorted(w["pid"] for w in found["workers"]) == sorted(w.pid for w in live)
    [silent] = found["silent"]
    assert silent["pid"] == stopped.pid
    [active] = [t for w in found["workers"] for t in w["active"]]
    assert (active["id"], active["task"]) == (task_id, "ev.hold")
    assert active["pid"] not in {w.pid for w in workers}  # the prefork child's
    for report in found["workers"]:
        assert report["registered"] == ["ev.add", "ev.hold"]
        assert report["pool"] == "prefork" and report["concurrency"] == 1
        assert "guest:guest" not in report["broker"]
    assert text.returncode == 1
    assert f"(pid {stopped.pid}) did not answer within 2s" in " ".join(text.stdout.split())
    assert "ev.hold" in text.stdout


def test_conveyor_events_ends_quietly_when_its_reader_goes_away(
    processes: Processes, broker: Broker
) -> None:
    """`conveyor events | head -1`: once the pipe's reader is gone, the next write ends the
    command with status 0 and no traceback."""
    processes.start("worker", "ev_app:app", "--pool", "threads", "-c", "1")
    reader = processes.start("events", "ev_app:app", "--json")
    assert reader.stdout is not None and reader.stderr is not None
    first = json.loads(reader.stdout.readline())
    assert first["app"] == broker.name
    reader.stdout.close()  # heartbeats keep coming: the next one meets a closed pipe
    assert reader.wait(30) == 0
    assert "Traceback" not in reader.stderr.read()
