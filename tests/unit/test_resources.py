"""`@app.resource`: lazy per-process (or per-thread, or pooled) instances, health-checked,
forgotten in a forked child without being closed, closed with the app."""

from __future__ import annotations

import itertools
import json
import logging
import os
import select
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from conveyor import Conveyor, Resource, ResourceError, Worker
from conveyor.errors import ConfigurationError


class Client:
    """A stand-in for a network client: numbered, and it records whether it was closed."""

    numbers = itertools.count(1)

    def __init__(self) -> None:
        self.number = next(Client.numbers)
        self.closed = False
        self.connected = True

    def __repr__(self) -> str:
        return f"<Client mqtt://user:hunter2@broker #{self.number}>"  # must never be logged

    def close(self) -> None:
        self.closed = True


class Factory:
    """Makes Clients and counts them; `fail` makes the next calls raise."""

    def __init__(self) -> None:
        self.made: list[Client] = []
        self.fail = 0

    def __call__(self) -> Client:
        if self.fail:
            self.fail -= 1
            raise ConnectionError("broker at mqtt://user:hunter2@127.0.0.1 refused")
        client = Client()
        self.made.append(client)
        return client


@pytest.fixture
def factory() -> Factory:
    return Factory()


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """caplog for conveyor.resources, even after a test set up conveyor's own log handler."""
    monkeypatch.setattr(logging.getLogger("conveyor"), "propagate", True)
    caplog.set_level(logging.INFO, logger="conveyor.resources")
    yield caplog


def run_threads(count: int, target: Callable[[int], object], timeout: float = 10) -> None:
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            target(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive(), "a thread did not finish in time"
    if errors:
        raise errors[0]


# registration


def test_created_lazily_on_first_call_then_reused(
    app: Conveyor, factory: Factory, logs: pytest.LogCaptureFixture
) -> None:
    mqtt = app.resource(name="mqtt")(factory)
    assert factory.made == [], "nothing is created at decoration time"
    first = mqtt()
    assert mqtt() is first
    assert factory.made == [first]
    assert f"resource {mqtt.name} created in pid {os.getpid()} (thread MainThread)" in logs.text


def test_names_default_to_module_and_function(app: Conveyor) -> None:
    @app.resource
    def mqtt() -> Client:
        return Client()

    @app.resource(name="db", scope="thread")
    def database() -> Client:
        return Client()

    assert isinstance(mqtt, Resource)
    assert mqtt.name == f"{__name__}.test_names_default_to_module_and_function.<locals>.mqtt"
    assert database.name == "db"
    assert list(app.resources) == [mqtt, database]
    assert app.resources.get("db") is database
    assert app.resources.get("nope") is None
    assert "db" in app.resources and len(app.resources) == 2


def test_a_duplicate_name_is_a_configuration_error(app: Conveyor, factory: Factory) -> None:
    app.resource(name="mqtt")(factory)
    with pytest.raises(ConfigurationError, match=r"two resources are named 'mqtt'.*name="):
        app.resource(name="mqtt")(factory)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"scope": "cluster"}, "scope must be 'process' or 'thread'"),
        ({"pool_size": 0}, "pool_size must be a whole number"),
        ({"pool_size": True}, "pool_size must be a whole number"),
        ({"pool_size": 2, "scope": "thread"}, "drop scope='thread'"),
        ({"check": "connected"}, "check= must be a function"),
        ({"close": 1}, "close= must be a function"),
    ],
)
def test_bad_options_fail_at_decoration(
    app: Conveyor, factory: Factory, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        app.resource(name="mqtt", **options)(factory)
    assert len(app.resources) == 0


def test_a_factory_without_a_function_name_needs_name(app: Conveyor, factory: Factory) -> None:
    with pytest.raises(ConfigurationError, match=r"a Factory object.*pass name="):
        app.resource(factory)


# scopes


def test_one_instance_per_process_under_concurrent_first_calls(
    app: Conveyor, poll: Callable[..., Any]
) -> None:
    entered, release = threading.Event(), threading.Event()
    made: list[Client] = []

    @app.resource
    def mqtt() -> Client:
        entered.set()
        assert release.wait(10)
        made.append(Client())
        return made[-1]

    barrier = threading.Barrier(8)
    got: list[Client] = []

    def use(_: int) -> None:
        barrier.wait(10)
        got.append(mqtt())

    def release_once_entered() -> None:  # the others are at the lock by then, or soon after
        entered.wait(10)
        release.set()

    releaser = threading.Thread(target=release_once_entered, daemon=True)
    releaser.start()
    run_threads(8, use)
    releaser.join(10)
    assert len(made) == 1
    assert got == made * 8


def test_thread_scope_gives_each_thread_its_own(app: Conveyor, factory: Factory) -> None:
    conn = app.resource(name="conn", scope="thread")(factory)
    mine = conn()
    assert conn() is mine
    theirs: list[Client] = []
    run_threads(3, lambda _: theirs.extend([conn(), conn()]))
    assert len({id(c) for c in theirs}) == 3, "one per thread, reused within it"
    assert mine not in theirs
    with conn.lease() as leased:
        assert leased is mine
    app.resources.close_all()
    assert all(c.closed for c in factory.made), "every thread's instance is closed"
    assert len(factory.made) == 4
    assert conn() is not mine, "a new one after close"


def test_an_ended_threads_instance_is_closed_when_another_thread_creates_one(
    app: Conveyor, factory: Factory
) -> None:
    conn = app.resource(name="conn", scope="thread")(factory)
    run_threads(1, lambda _: conn())
    (ended,) = factory.made
    assert not ended.closed
    run_threads(1, lambda _: conn())
    assert ended.closed
    assert not factory.made[1].closed


def test_lease_on_a_process_scoped_resource_gives_the_process_instance(
    app: Conveyor, factory: Factory
) -> None:
    mqtt = app.resource(name="mqtt")(factory)
    with mqtt.lease() as first, mqtt.lease() as second:
        assert first is second is mqtt()
    assert len(factory.made) == 1
    assert not first.closed, "a lease without a pool does not close anything"


# pools


def test_a_pool_is_used_through_lease_only(app: Conveyor, factory: Factory) -> None:
    pool = app.resource(name="pool", pool_size=2)(factory)
    with pytest.raises(ConfigurationError, match=r"pool_size=2.*with resource\.lease\(\)"):
        pool()


def test_pool_size_bounds_the_instances_and_a_lease_times_out(
    app: Conveyor, factory: Factory
) -> None:
    pool = app.resource(name="pool", pool_size=2)(factory)
    with pool.lease() as a, pool.lease() as b:
        assert a is not b
        expected = r"all 2 instances stayed leased for 0\.05s"
        with pytest.raises(ResourceError, match=expected), pool.lease(timeout=0.05):
            pass
    with pool.lease() as again:
        assert again in (a, b), "an idle instance is reused"
    assert len(factory.made) == 2


def test_a_waiting_lease_gets_the_instance_given_back(app: Conveyor, factory: Factory) -> None:
    pool = app.resource(name="pool", pool_size=1)(factory)
    got: list[Client] = []
    started = threading.Event()

    def borrow(_: int) -> None:
        started.set()
        with pool.lease(timeout=10) as client:
            got.append(client)

    with pool.lease() as held:
        waiter = threading.Thread(target=borrow, args=(0,), daemon=True)
        waiter.start()
        assert started.wait(10)
    waiter.join(10)
    assert got == [held]
    assert len(factory.made) == 1


def test_concurrent_leases_never_exceed_pool_size(app: Conveyor, factory: Factory) -> None:
    pool = app.resource(name="pool", pool_size=3)(factory)
    lock = threading.Lock()
    in_use: set[int] = set()
    most = 0
    barrier = threading.Barrier(12)

    def borrow(_: int) -> None:
        nonlocal most
        barrier.wait(10)
        for _ in range(50):
            with pool.lease(timeout=10) as client:
                with lock:
                    assert client.number not in in_use, "one borrower at a time"
                    in_use.add(client.number)
                    most = max(most, len(in_use))
                with lock:
                    in_use.discard(client.number)

    run_threads(12, borrow)
    assert len(factory.made) <= 3
    assert most <= 3


def test_closing_a_pool_closes_idle_instances_now_and_leased_ones_on_return(
    app: Conveyor, factory: Factory
) -> None:
    pool = app.resource(name="pool", pool_size=2)(factory)
    with pool.lease() as idle:
        pass
    with pool.lease() as leased:
        assert leased is idle
        with pool.lease() as other:
            pool.close()
            assert not leased.closed and not other.closed, "in use: not closed under a task"
        assert other.closed
    assert leased.closed
    with pool.lease() as fresh:
        assert fresh not in (leased, other)


def test_a_failing_factory_in_a_pool_frees_its_slot(app: Conveyor, factory: Factory) -> None:
    pool = app.resource(name="pool", pool_size=1)(factory)
    factory.fail = 1
    with pytest.raises(ConnectionError), pool.lease(timeout=0.05):
        pass
    with pool.lease(timeout=0.05) as client:
        assert client is factory.made[0]


# health checks


def test_a_dead_instance_is_closed_and_re_created_with_a_warning(
    app: Conveyor, factory: Factory, logs: pytest.LogCaptureFixture
) -> None:
    checked: list[Client] = []

    def alive(client: Client) -> bool:
        checked.append(client)
        return client.connected

    mqtt = app.resource(name="mqtt", check=alive)(factory)
    first = mqtt()
    assert checked == [], "a new instance is not checked"
    assert mqtt() is first and checked == [first], "checked before each use"
    first.connected = False
    second = mqtt()
    assert second is not first
    assert first.closed and not second.closed
    pid = os.getpid()
    (warning,) = [r for r in logs.records if r.levelno == logging.WARNING]
    assert warning.getMessage() == (
        f"resource {mqtt.name}: dead in pid {pid} (thread MainThread), re-creating"
    )
    assert logs.text.count(f"created in pid {pid}") == 2
    assert "hunter2" not in logs.text and "Client" not in logs.text


def test_a_check_that_raises_means_dead(
    app: Conveyor, factory: Factory, logs: pytest.LogCaptureFixture
) -> None:
    def broken(client: Client) -> bool:
        raise OSError(f"lost mqtt://user:hunter2@host {client!r}")

    mqtt = app.resource(name="mqtt", check=broken, scope="thread")(factory)
    first = mqtt()
    assert mqtt() is not first
    assert first.closed
    assert f"dead in pid {os.getpid()}" in logs.text
    assert "check raised OSError" in logs.text
    assert "hunter2" not in logs.text


def test_a_lease_checks_pooled_instances(app: Conveyor, factory: Factory) -> None:
    pool = app.resource(name="pool", pool_size=1, check=lambda c: c.connected)(factory)
    with pool.lease() as first:
        first.connected = False
    with pool.lease() as second:
        assert second is not first
    assert first.closed
    assert len(factory.made) == 2


def test_an_error_closing_a_dead_instance_is_logged(
    app: Conveyor, factory: Factory, logs: pytest.LogCaptureFixture
) -> None:
    def bad_close(client: Client) -> None:
        raise RuntimeError("mqtt://user:hunter2@host")

    mqtt = app.resource(name="mqtt", check=lambda c: c.connected, close=bad_close)(factory)
    mqtt().connected = False
    assert mqtt() is factory.made[1]
    assert "closing an instance in pid" in logs.text and "RuntimeError" in logs.text
    assert "hunter2" not in logs.text


def test_a_factory_that_raises_propagates_and_the_next_call_retries(
    app: Conveyor, factory: Factory
) -> None:
    mqtt = app.resource(name="mqtt")(factory)
    factory.fail = 2
    for _ in range(2):
        with pytest.raises(ConnectionError):
            mqtt()
    client = mqtt()
    assert factory.made == [client]


# closing


def test_close_all_closes_every_instance_and_logs_errors(
    app: Conveyor, factory: Factory, logs: pytest.LogCaptureFixture
) -> None:
    closed: list[str] = []

    def failing_close(client: Client) -> None:
        raise RuntimeError("socket already gone")

    broken = app.resource(name="broken", close=failing_close)(factory)
    custom = app.resource(name="custom", close=lambda c: closed.append("custom"))(factory)
    plain = app.resource(name="plain")(factory)
    no_close = app.resource(name="no_close")(object)
    b, c, p = broken(), custom(), plain()
    no_close()
    app.resources.close_all()  # never raises
    assert not b.closed and not c.closed, "a close= function replaces the close() method"
    assert closed == ["custom"]
    assert p.closed
    assert "resource broken: closing an instance" in logs.text
    assert "RuntimeError" in logs.text
    assert plain() is not p, "the next use creates a new one"


def test_app_close_closes_resources(factory: Factory) -> None:
    app = Conveyor("resources", broker="memory://")
    mqtt = app.resource(name="mqtt")(factory)
    client = mqtt()
    app.close()
    assert client.closed


# fork


def test_a_forked_child_re_creates_without_closing_the_parents(
    app: Conveyor, factory: Factory, poll: Callable[..., Any]
) -> None:
    mqtt = app.resource(name="mqtt", check=lambda c: c.connected)(factory)
    per_thread = app.resource(name="per_thread", scope="thread")(factory)
    pool = app.resource(name="pool", pool_size=1)(factory)
    parent_pid = os.getpid()
    entered, release = threading.Event(), threading.Event()

    @app.resource(name="slow")
    def slow() -> Client:
        if os.getpid() == parent_pid:  # hold the resource's lock in the parent across the fork
            entered.set()
            assert release.wait(10)
        return factory()

    mqtt_parent, thread_parent = mqtt(), per_thread()
    with pool.lease() as pooled_parent:
        pass
    holder = threading.Thread(target=slow, daemon=True)
    holder.start()
    assert entered.wait(10)

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            os.close(read_end)
            signal.alarm(10)  # a deadlocked child dies instead of hanging the test
            report = {
                "new": mqtt() is not mqtt_parent,
                "thread_new": per_thread() is not thread_parent,
                "slow_created": isinstance(slow(), Client),
            }
            with pool.lease(timeout=1) as pooled:
                report["pool_new"] = pooled is not pooled_parent
            app.resources.close_all()
            report["parents_closed"] = any(
                c.closed for c in (mqtt_parent, thread_parent, pooled_parent)
            )
            os.write(write_end, json.dumps(report).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], 15)
        assert ready, "the child reported nothing"
        report = json.loads(os.read(read_end, 4096))
    finally:
        os.close(read_end)
        release.set()
        holder.join(10)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert report == {
        "new": True,
        "thread_new": True,
        "slow_created": True,
        "pool_new": True,
        "parents_closed": False,
    }
    assert mqtt() is mqtt_parent and per_thread() is thread_parent, "the parent's are untouched"
    assert not any(c.closed for c in (mqtt_parent, thread_parent, pooled_parent))
    with pool.lease() as pooled:
        assert pooled is pooled_parent
    poll(lambda: not holder.is_alive(), what="the slow factory finished in the parent")


@pytest.mark.parametrize("pool", ["threads", "solo", "asyncio"])
def test_the_worker_closes_resources_when_it_stops(pool: str) -> None:
    app = Conveyor("closing", broker="memory://")
    closed: list[str] = []

    class Client:
        def close(self) -> None:
            closed.append(threading.current_thread().name)

    @app.resource
    def client() -> Client:
        return Client()

    @app.task
    def use() -> None:
        client()

    use.delay()
    stats = Worker(app, pool=pool, concurrency=1, until_empty=True).run()
    assert stats.succeeded == 1
    assert len(closed) == 1, "closed once, at shutdown"
    app.close()
    assert len(closed) == 1, "and not again"
