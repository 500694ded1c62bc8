"""The Redis result store against the local server: the URL, the replace rule in its script,
expiry kept by Redis, waits woken by pub/sub (and not by polling), a listener that survives its
connection, corrupt values, credentials kept out of errors, and forks.

Every test uses a key prefix of its own and deletes its keys afterwards. Skipped locally when
Redis is not running on 127.0.0.1:6379; a failure in CI.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import select
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from stores import REDIS_HOST, REDIS_PORT, require_service

from conveyor.brokers.base import own_endpoints
from conveyor.errors import ConfigurationError, ResultError
from conveyor.results import ResultRecord, State, from_url

redis = pytest.importorskip("redis", reason="pip install 'conveyor[redis]'")

from conveyor.results.redis import RedisResultStore  # noqa: E402

pytestmark = pytest.mark.integration

FINISHED = (State.SUCCESS, State.FAILURE)
UNFINISHED = (State.PENDING, State.STARTED, State.RETRY)


@pytest.fixture
def client() -> Iterator[Any]:
    require_service("Redis", REDIS_HOST, REDIS_PORT, "start it: redis-server --daemonize yes")
    made = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=0)
    yield made
    made.close()


@pytest.fixture
def prefix(client: Any) -> Iterator[str]:
    name = f"test-{uuid.uuid4().hex}"
    yield name
    keys = list(client.scan_iter(match=f"{name}:*", count=1000))
    if keys:
        client.delete(*keys)


@pytest.fixture
def store(prefix: str) -> Iterator[RedisResultStore]:
    made = RedisResultStore(f"redis://{REDIS_HOST}:{REDIS_PORT}/0?prefix={prefix}")
    yield made
    made.close()


def record(task_id: str = "t1", state: State = State.SUCCESS, **fields: Any) -> ResultRecord:
    fields.setdefault("expires_at", time.time() + 3600)
    return ResultRecord(id=task_id, state=state, task="shop.resize", **fields)


def count_reads(store: RedisResultStore) -> list[str]:
    """Every read of a record the store makes from now on (a wait that polled would read often)."""
    reads: list[str] = []
    read = store._read

    def counted(task_id: str) -> ResultRecord | None:
        got = read(task_id)
        reads.append(task_id)  # once the read is done: a test that saw it can go on
        return got

    store._read = counted  # type: ignore[method-assign]
    return reads


def waiting(
    store: RedisResultStore, task_id: str, timeout: float
) -> tuple[threading.Thread, list[Any]]:
    """`store.wait` on a thread; the list gets (record, time.time() at return) or the error."""
    out: list[Any] = []

    def target() -> None:
        try:
            got = store.wait(task_id, timeout)
            out.append((got, time.time()))
        except Exception as exc:
            out.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def subscribers(client: Any, channel: str) -> int:
    return int(client.pubsub_numsub(channel)[0][1])


def listener_connections(client: Any, prefix: str) -> list[dict[str, Any]]:
    return [c for c in client.client_list(_type="pubsub") if c.get("name") == f"conveyor:{prefix}"]


# the URL


def test_url_options(prefix: str) -> None:
    store = from_url(f"redis://{REDIS_HOST}:{REDIS_PORT}/3?prefix={prefix}&socket_timeout=7")
    assert isinstance(store, RedisResultStore)
    assert store.prefix == prefix
    assert store.endpoints == frozenset({(REDIS_HOST, REDIS_PORT)})
    assert (REDIS_HOST, REDIS_PORT) in own_endpoints()  # the prefork pool knows these sockets
    kwargs = store._clients().redis.connection_pool.connection_kwargs
    assert (kwargs["db"], kwargs["socket_timeout"]) == (3, 7.0)
    assert "prefix" not in kwargs
    store.close()
    default = RedisResultStore("redis://localhost")
    assert default.prefix == "conveyor"
    assert default.endpoints == frozenset({("localhost", 6379)})


def test_rediss_is_tls() -> None:
    store = from_url("rediss://cache.example:6380/0?ssl_cert_reqs=required")
    assert store.endpoints == frozenset({("cache.example", 6380)})
    assert isinstance(store, RedisResultStore)
    pool = store._clients().redis.connection_pool  # made without connecting
    assert pool.connection_class is redis.SSLConnection


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://u:s3cret@127.0.0.1:6379/0?bogus=1", "bogus"),
        ("redis://u:s3cret@127.0.0.1:6379/0?socket_timeout=soon", "socket_timeout"),
        ("redis://u:s3cret@127.0.0.1:port/0", "port must be a number"),
        ("redis://u:s3cret@127.0.0.1:6379/0?prefix=", "prefix= is empty"),
    ],
)
def test_a_bad_url_fails_at_once_without_its_password(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as raised:
        from_url(url)
    assert "s3cret" not in str(raised.value) and "u:***@" in str(raised.value)


def test_unsupported_scheme_lists_redis() -> None:
    with pytest.raises(ConfigurationError, match=r"redis://host:6379/0, rediss://"):
        from_url("redis+sentinel://u:s3cret@host/0")


# credentials and errors


def test_the_password_never_shows(client: Any, caplog: pytest.LogCaptureFixture) -> None:
    store = RedisResultStore(f"redis://conveyor:s3cret@{REDIS_HOST}:{REDIS_PORT}/0?prefix=x")
    assert store.display_url == f"redis://conveyor:***@{REDIS_HOST}:{REDIS_PORT}/0?prefix=x"
    assert "s3cret" not in repr(store)
    with caplog.at_level(logging.DEBUG, logger="conveyor"):
        for call in (
            lambda: store.get("t1"),
            lambda: store.put([record()]),
            lambda: store.wait("t1", 0.1),
            store.count,
        ):
            with pytest.raises(ResultError) as raised:
                call()
            text = str(raised.value)
            assert "s3cret" not in text and store.display_url in text
            assert "user name and password" in text  # what to do about it
    store.close()
    assert "s3cret" not in caplog.text


def test_an_unreachable_server_is_our_error() -> None:
    store = RedisResultStore("redis://127.0.0.1:1/0?prefix=nowhere&socket_connect_timeout=1")
    for call in (
        lambda: store.get("t1"),
        lambda: store.put([record()]),
        lambda: store.forget("t1"),
        store.count,
        store.cleanup,
    ):
        with pytest.raises(ResultError, match=r"is Redis running and reachable at 127\.0\.0\.1:1"):
            call()
    store.close()


# the replace rule, in the put script


@pytest.mark.parametrize("finished", FINISHED)
@pytest.mark.parametrize("late", UNFINISHED)
def test_a_finished_record_is_never_replaced_by_an_unfinished_one(
    store: RedisResultStore, finished: State, late: State
) -> None:
    store.put([record(state=finished, value=msgspec.Raw(b"1"))])
    store.put([record(state=late, retries=5)])
    got = store.get("t1")
    assert got is not None and (got.state, got.retries) == (finished, 0)
    # Within one batch too: the script applies records in order.
    store.put([record("t2", state=finished), record("t2", state=late)])
    got = store.get("t2")
    assert got is not None and got.state is finished


def test_unfinished_records_replace_each_other_and_finished_ones_win(
    store: RedisResultStore,
) -> None:
    for state, retries in ((State.STARTED, 0), (State.RETRY, 0), (State.STARTED, 1)):
        store.put([record(state=state, retries=retries)])
        got = store.get("t1")
        assert got is not None and (got.state, got.retries) == (state, retries)
    store.put([record(state=State.FAILURE, error_type="ValueError")])
    store.put([record(state=State.SUCCESS, value=msgspec.Raw(b"2"))])  # a redelivery's outcome
    got = store.get("t1")
    assert got is not None and (got.state, bytes(got.value)) == (State.SUCCESS, b"2")
    assert store.count() == 1


def test_a_batch_is_one_script_call(store: RedisResultStore) -> None:
    records = [record(f"id{i}", value=msgspec.Raw(b"%d" % i)) for i in range(500)]
    store.put(records)
    store.put([])
    assert store.count() == 500
    got = store.get("id321")
    assert got is not None and got == records[321]


# expiry


def test_redis_expires_the_record_at_expires_at(store: RedisResultStore, client: Any) -> None:
    expires_at = time.time() + 100
    store.put([record(expires_at=expires_at)])
    key = f"{store.prefix}:result:t1"
    expire_ms = int(client.pexpiretime(key))
    assert abs(expire_ms - expires_at * 1000) <= 1
    index_ms = int(client.pexpiretime(f"{store.prefix}:results"))
    assert abs(index_ms - expires_at * 1000) <= 1  # the index outlives no record
    store.put([record("t2", expires_at=expires_at + 50), record("t3", expires_at=expires_at)])
    assert int(client.pexpiretime(f"{store.prefix}:results")) == int((expires_at + 50) * 1000)


def test_an_expired_record_is_gone(
    store: RedisResultStore, client: Any, poll: Callable[..., Any]
) -> None:
    store.put([record("past", expires_at=time.time() - 1)])
    assert store.get("past") is None and store.count() == 0
    assert not client.exists(f"{store.prefix}:result:past")
    store.put([record("soon", expires_at=time.time() + 0.2), record("later")])
    assert store.count() == 2
    poll(lambda: store.get("soon") is None, what="Redis expired the record")
    assert store.count() == 1
    assert store.cleanup() == 1  # the index entry the record left; Redis deleted the record
    assert store.cleanup() == 0


def test_forget(store: RedisResultStore, client: Any) -> None:
    store.put([record("a"), record("b")])
    store.forget("a")
    store.forget("never-stored")
    assert store.get("a") is None and store.count() == 1
    assert client.zscore(f"{store.prefix}:results", "a") is None


# waiting


def test_a_wait_reads_only_when_woken(store: RedisResultStore) -> None:
    reads = count_reads(store)
    started = time.monotonic()
    assert store.wait("never", 0.5) is None
    assert time.monotonic() - started >= 0.5
    # At the start, once subscribed, and at the deadline: a wait polling every 50 ms reads 10.
    assert len(reads) <= 3, reads


def test_a_notice_wakes_the_wait_within_milliseconds(
    store: RedisResultStore, client: Any, poll: Callable[..., Any]
) -> None:
    reads = count_reads(store)
    thread, out = waiting(store, "t1", 10)
    channel = f"{store.prefix}:done:t1"
    poll(lambda: subscribers(client, channel) == 1, what="the listener subscribed")
    poll(lambda: len(reads) == 2, what="the read after the subscription")
    store.put([record(state=State.STARTED)])  # no notice for an unfinished state
    put_at = time.time()
    store.put([record(state=State.SUCCESS, finished_at=put_at)])
    thread.join(10)
    ((got, returned_at),) = out
    assert got.state is State.SUCCESS
    assert returned_at - put_at < 0.05
    assert len(reads) == 3
    poll(lambda: subscribers(client, channel) == 0, what="the listener unsubscribed")


def test_one_listener_connection_serves_every_wait(
    store: RedisResultStore, client: Any, poll: Callable[..., Any]
) -> None:
    waits = [waiting(store, f"t{n}", 10) for n in range(20)]
    waits.append(waiting(store, "t0", 10))  # two waits on one task
    poll(
        lambda: all(subscribers(client, f"{store.prefix}:done:t{n}") == 1 for n in range(20)),
        what="every channel subscribed",
    )
    (listener,) = listener_connections(client, store.prefix)
    assert int(listener["sub"]) == 21  # 20 tasks and the listener's control channel
    store.put([record(f"t{n}", value=msgspec.Raw(b"%d" % n)) for n in range(20)])
    for thread, _ in waits:
        thread.join(10)
    values = [bytes(out[0][0].value) for _, out in waits]
    assert values == [b"%d" % n for n in range(20)] + [b"0"]


def test_a_wait_survives_the_loss_of_the_listener_connection(
    store: RedisResultStore,
    client: Any,
    poll: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    thread, out = waiting(store, "t1", 10)
    channel = f"{store.prefix}:done:t1"
    poll(lambda: subscribers(client, channel) == 1, what="the listener subscribed")
    (listener,) = listener_connections(client, store.prefix)
    with caplog.at_level(logging.WARNING, logger="conveyor.results"):
        client.client_kill_filter(_id=listener["id"])
        poll(
            lambda: (
                [c["id"] for c in listener_connections(client, store.prefix)]
                not in ([], [listener["id"]])
            ),
            what="a new listener connection",
        )
        poll(lambda: subscribers(client, channel) == 1, what="the listener subscribed again")
    assert "results listener" in caplog.text and "reconnecting" in caplog.text
    assert not out  # still waiting
    store.put([record()])
    thread.join(10)
    assert out and out[0][0].state is State.SUCCESS


def test_the_listener_ends_when_nobody_waits(
    store: RedisResultStore, client: Any, poll: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("conveyor.results.redis.LISTENER_IDLE_S", 0.0)
    store.put([record()])
    assert store.wait("t2", 0.05) is None
    poll(lambda: not listener_connections(client, store.prefix), what="the listener closed")
    thread, out = waiting(store, "t2", 10)  # a new wait starts a new listener
    poll(lambda: subscribers(client, f"{store.prefix}:done:t2") == 1, what="subscribed")
    store.put([record("t2")])
    thread.join(10)
    assert out and out[0][0].id == "t2"


# corrupt and foreign values


@pytest.mark.parametrize(
    "write",
    [
        pytest.param(lambda c, key: c.set(key, b"\x00\xffnot ours"), id="string"),
        pytest.param(lambda c, key: c.rpush(key, b"a", b"b"), id="list"),
        pytest.param(lambda c, key: c.hset(key, "data", b"{not json"), id="hash-garbage"),
        pytest.param(
            lambda c, key: c.hset(key, "data", pickle.dumps(Path("/tmp"))), id="hash-pickle"
        ),
        pytest.param(
            lambda c, key: c.hset(key, "data", json.dumps({"id": "t1"})), id="hash-no-state"
        ),
    ],
)
def test_a_corrupt_value_raises_our_error(
    store: RedisResultStore, client: Any, write: Callable[[Any, str], Any]
) -> None:
    key = f"{store.prefix}:result:t1"
    write(client, key)
    with pytest.raises(ResultError, match="corrupt or not conveyor's"):
        store.get("t1")
    with pytest.raises(ResultError, match="corrupt or not conveyor's"):
        store.wait("t1", 1)
    # Ours replaces it; it never stops a worker from storing results.
    store.put([record(state=State.STARTED)])
    got = store.get("t1")
    assert got is not None and got.state is State.STARTED


# forks


def test_a_forked_child_makes_its_own_connections(
    store: RedisResultStore, client: Any, poll: Callable[..., Any]
) -> None:
    store.put([record("done", value=msgspec.Raw(b"1"))])
    assert store.wait("done", 1) is not None
    thread, out = waiting(store, "parent-wait", 10)  # the parent's listener runs at the fork
    poll(lambda: subscribers(client, f"{store.prefix}:done:parent-wait") == 1, what="subscribed")
    # Redis numbers connections in order: one opened after this is newer than any inherited.
    fresh = redis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    before_fork = int(fresh.client_id())
    fresh.close()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, and never return into pytest
        code = 1
        try:
            os.close(read_end)
            done = store.get("done")
            child_id = store._clients().redis.client_id()
            waited = store.wait("child-wait", 10)
            report = [
                done is not None and bytes(done.value).decode(),
                child_id,
                waited is not None and bytes(waited.value).decode(),
            ]
            os.write(write_end, json.dumps(report).encode())
            code = 0
        except BaseException as exc:
            os.write(write_end, json.dumps(repr(exc)).encode())
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        channel = f"{store.prefix}:done:child-wait"
        poll(lambda: subscribers(client, channel) == 1, timeout=10, what="the child subscribed")
        store.put([record("child-wait", value=msgspec.Raw(b"2"))])
        ready, _, _ = select.select([read_end], [], [], 10)
        assert ready, "the child did not report"
        report = json.loads(os.read(read_end, 65536))
    finally:
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, report
    assert report[0] == "1" and report[2] == "2"
    assert report[1] > before_fork  # the child's own connection, not one it inherited
    # The parent's connections and listener still work.
    assert store.get("child-wait") is not None
    store.put([record("parent-wait", value=msgspec.Raw(b"3"))])
    thread.join(10)
    assert out and bytes(out[0][0].value) == b"3"


def test_close_ends_the_listener(
    store: RedisResultStore, client: Any, poll: Callable[..., Any]
) -> None:
    assert store.wait("t1", 0) is None  # a wait that cannot wait starts no listener
    assert not listener_connections(client, store.prefix)
    assert store.wait("t1", 0.05) is None
    listener = store._listeners()
    thread = listener._thread
    assert thread is not None and thread.is_alive()
    poll(lambda: listener_connections(client, store.prefix), what="the listener connected")
    store.close()
    assert not thread.is_alive()
    poll(lambda: not listener_connections(client, store.prefix), what="the listener closed")
    store.put([record()])  # the store opens new connections on its next use
    assert store.wait("t1", 1) is not None
