"""The PostgreSQL result store against the local server: schema on first use, the replace rule,
LISTEN/NOTIFY waits, expiry and cleanup, corrupt rows, credentials, and forks.

Every test uses a table of its own and drops it afterwards. Skipped locally when PostgreSQL is
not running on 127.0.0.1:5432; a failure in CI."""

from __future__ import annotations

import logging
import os
import pickle
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from stores import postgresql_store

from conveyor.errors import ConfigurationError, ResultError
from conveyor.results import from_url
from conveyor.results.base import ResultRecord, State, encode_record

psycopg = pytest.importorskip("psycopg", reason="pip install 'conveyor[postgresql]'")

from conveyor.results.postgres import PostgresResultStore  # noqa: E402

pytestmark = pytest.mark.integration

HOST, PORT, DATABASE = "127.0.0.1", 5432, "test"  # as in stores.postgresql_store


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The local server's URL, without a table (skipped or failed as in the shared suite)."""
    results = postgresql_store(tmp_path_factory.mktemp("postgresql")).results
    return results.partition("?")[0]


@pytest.fixture
def sql(url: str) -> Iterator[Callable[..., list[tuple[object, ...]]]]:
    """`sql(query, params)`: run a statement on a connection of the test's own."""
    with psycopg.connect(url, autocommit=True) as conn:

        def run(query: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
            cursor = conn.execute(query, params)
            return cursor.fetchall() if cursor.description else []

        yield run


@pytest.fixture
def table(sql: Callable[..., list[tuple[object, ...]]]) -> Iterator[str]:
    name = f"conveyor_test_{uuid.uuid4().hex[:12]}"
    yield name
    sql(f"DROP TABLE IF EXISTS {name}")


@pytest.fixture
def store(url: str, table: str) -> Iterator[PostgresResultStore]:
    store = PostgresResultStore(f"{url}?table={table}")
    yield store
    store.close()


def record(
    task_id: str, state: State, expires_in: float = 3600.0, **fields: object
) -> ResultRecord:
    now = time.time()
    return ResultRecord(
        id=task_id, state=state, updated_at=now, expires_at=now + expires_in, **fields
    )


def rows(sql: Callable[..., list[tuple[object, ...]]], table: str) -> int:
    return int(sql(f"SELECT count(*) FROM {table}")[0][0])  # type: ignore[call-overload]


# schema


def test_from_url_picks_postgresql_for_both_schemes(url: str, table: str) -> None:
    for scheme in ("postgresql", "postgres"):
        store = from_url(url.replace("postgresql", scheme, 1) + f"?table={table}")
        assert isinstance(store, PostgresResultStore)
        assert store.table == table
        assert store.endpoints == frozenset({(HOST, PORT)})
        store.close()


@pytest.mark.parametrize("query", ["?table=bad-name", "?table=x;drop", "?table=" + "t" * 49])
def test_a_bad_table_name_is_a_configuration_error(url: str, query: str) -> None:
    with pytest.raises(ConfigurationError, match="letters, digits"):
        PostgresResultStore(url + query)


def test_a_bad_port_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="port"):
        PostgresResultStore("postgresql://u:secret@localhost:99999/db")


def test_table_and_expiry_index_are_created_on_first_use(
    store: PostgresResultStore, table: str, sql: Callable[..., list[tuple[object, ...]]]
) -> None:
    assert sql("SELECT to_regclass(%s)", (table,)) == [(None,)]
    assert store.count() == 0
    assert sql("SELECT to_regclass(%s)::text", (table,)) == [(table,)]
    indexes = sql("SELECT indexdef FROM pg_indexes WHERE tablename = %s", (table,))
    assert any("(expires_at)" in str(definition) for (definition,) in indexes), indexes


def test_concurrent_first_use_from_threads_does_not_fail(url: str, table: str) -> None:
    stores = [PostgresResultStore(f"{url}?table={table}") for _ in range(16)]
    start = threading.Barrier(len(stores))
    errors: list[BaseException] = []

    def first_use(index: int, store: PostgresResultStore) -> None:
        try:
            start.wait(10)
            store.put([record(f"t{index}", State.SUCCESS)])
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=first_use, args=(index, store))
        for index, store in enumerate(stores)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    try:
        assert not errors, errors
        assert stores[0].count() == len(stores)
    finally:
        for store in stores:
            store.close()


# records


def test_put_get_forget_count(store: PostgresResultStore) -> None:
    assert store.get("t1") is None
    stored = record(
        "t1",
        State.FAILURE,
        task="shop.resize",
        error_type="ValueError",
        error_message="bad width",
        traceback="Traceback ...",
        retries=2,
        worker="w1@host",
        started_at=1.0,
        finished_at=2.0,
    )
    store.put([stored])
    assert store.get("t1") == stored
    assert store.count() == 1
    store.forget("t1")
    assert store.get("t1") is None
    assert store.count() == 0
    store.put([])  # nothing to do, and no error


def test_a_value_with_a_nul_character_round_trips(store: PostgresResultStore) -> None:
    import msgspec

    stored = record("t1", State.SUCCESS, value=msgspec.Raw(msgspec.json.encode("a\x00b")))
    store.put([stored])
    got = store.get("t1")
    assert got is not None
    assert msgspec.json.decode(got.value) == "a\x00b"


def test_a_finished_state_is_never_overwritten_by_an_unfinished_one(
    store: PostgresResultStore,
) -> None:
    store.put([record("t1", State.SUCCESS)])
    store.put([record("t1", State.STARTED)])
    assert store.get("t1").state == State.SUCCESS  # type: ignore[union-attr]

    store.put([record("t2", State.STARTED)])
    store.put([record("t2", State.RETRY, retries=1)])
    assert store.get("t2").state == State.RETRY  # type: ignore[union-attr]
    store.put([record("t2", State.FAILURE)])
    store.put([record("t2", State.SUCCESS)])  # finished over finished: the later one wins
    assert store.get("t2").state == State.SUCCESS  # type: ignore[union-attr]

    # In one batch, in order: the late STARTED loses too.
    store.put(
        [record("t3", State.STARTED), record("t3", State.SUCCESS), record("t3", State.STARTED)]
    )
    assert store.get("t3").state == State.SUCCESS  # type: ignore[union-attr]


def test_an_expired_finished_record_counts_as_absent_for_the_replace_rule(
    store: PostgresResultStore,
) -> None:
    store.put([record("t1", State.SUCCESS, expires_in=-1)])
    store.put([record("t1", State.STARTED)])
    assert store.get("t1").state == State.STARTED  # type: ignore[union-attr]


# waiting


class CountingStore(PostgresResultStore):
    """Counts reads of the row, to tell waiting on a notification from polling."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.reads = 0

    def get(self, task_id: str) -> ResultRecord | None:
        self.reads += 1
        return super().get(task_id)


@pytest.fixture
def counting(url: str, table: str) -> Iterator[CountingStore]:
    store = CountingStore(f"{url}?table={table}")
    yield store
    store.close()


def start_waiter(
    store: PostgresResultStore, task_id: str, timeout: float
) -> tuple[threading.Thread, dict[str, object]]:
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["record"] = store.wait(task_id, timeout)
        except BaseException as exc:
            outcome["error"] = exc
        outcome["at"] = time.monotonic()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def test_notify_wakes_a_waiter_within_milliseconds_without_polling(
    counting: CountingStore, poll: Callable[..., object]
) -> None:
    thread, outcome = start_waiter(counting, "t1", timeout=30)
    poll(lambda: counting.reads >= 1, what="the waiter read the row once")
    counting.put([record("t1", State.STARTED)])  # not finished: no notification, no read
    stored = record("t1", State.SUCCESS)
    put_at = time.monotonic()
    counting.put([stored])
    thread.join(10)
    assert not thread.is_alive()
    assert outcome.get("record") == stored, outcome
    latency = float(outcome["at"]) - put_at  # type: ignore[arg-type]
    assert latency < 0.25, f"the waiter woke {latency * 1000:.1f} ms after the put"
    assert counting.reads <= 3, f"{counting.reads} reads: the waiter polled"


def test_a_wait_that_times_out_reads_the_row_only_at_its_ends(counting: CountingStore) -> None:
    started = time.monotonic()
    assert counting.wait("t1", 0.5) is None
    assert time.monotonic() - started >= 0.5
    assert counting.reads <= 2  # when it starts and at the deadline; polling would read ~10x


def test_wait_returns_a_finished_record_at_once(store: PostgresResultStore) -> None:
    stored = record("t1", State.FAILURE, error_type="KeyError", error_message="'x'")
    store.put([stored])
    assert store.wait("t1", 0) == stored
    assert store.wait("t1", None) == stored


@pytest.mark.parametrize("health_s", [30.0, 0.0], ids=["quiet", "health checks all along"])
def test_many_waiters_on_many_ids_share_one_listener(
    store: PostgresResultStore, poll: Callable[..., object], health_s: float
) -> None:
    store._listener().health_s = health_s  # notifications arriving during a check are kept
    waiters = {f"t{i}": start_waiter(store, f"t{i}", timeout=30) for i in range(10)}
    poll(lambda: len(store._listener()._waiters) == 10, what="every waiter registered")
    put_at = time.monotonic()
    store.put([record(task_id, State.SUCCESS) for task_id in waiters])
    for task_id, (thread, outcome) in waiters.items():
        thread.join(10)
        assert outcome["record"].id == task_id  # type: ignore[attr-defined]
        assert float(outcome["at"]) - put_at < 2.0  # type: ignore[arg-type]  # not the recheck


def test_a_waiter_survives_its_listening_connection_being_killed(
    counting: CountingStore,
    sql: Callable[..., list[tuple[object, ...]]],
    poll: Callable[..., object],
) -> None:
    thread, outcome = start_waiter(counting, "t1", timeout=30)
    poll(lambda: counting.reads >= 1, what="the waiter read the row once")
    listener = counting._listener()
    conn = listener._conn
    assert conn is not None
    sql("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
    poll(lambda: listener._conn is not conn, what="the listener noticed")
    stored = record("t1", State.SUCCESS)
    counting.put([stored])
    thread.join(10)
    assert outcome.get("record") == stored, outcome


def test_the_listening_connection_closes_when_idle_and_reopens_quietly(
    store: PostgresResultStore, poll: Callable[..., object], caplog: pytest.LogCaptureFixture
) -> None:
    listener = store._listener()
    listener.idle_s = 0.0
    store.put([record("t1", State.SUCCESS), record("t2", State.SUCCESS)])
    assert store.wait("t1", 5) is not None
    poll(lambda: listener._conn is None, what="the idle listening connection closed")
    assert store.wait("t2", 5) is not None  # listens again
    assert store._listener() is listener
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_a_killed_pooled_connection_is_replaced_transparently(
    store: PostgresResultStore,
    sql: Callable[..., list[tuple[object, ...]]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "conveyor.results.postgres")
    store.pool_max = 1  # so the next get gets the connection killed here
    store.put([record("t1", State.SUCCESS)])
    pid = store._run("", lambda conn: conn.execute("SELECT pg_backend_pid()").fetchone())
    sql("SELECT pg_terminate_backend(%s)", pid)
    assert store.get("t1").state == State.SUCCESS  # type: ignore[union-attr]
    assert "broken; retrying" in caplog.text


# expiry


def test_expired_records_are_invisible_and_cleanup_deletes_them(
    store: PostgresResultStore, table: str, sql: Callable[..., list[tuple[object, ...]]]
) -> None:
    store.put([record("new", State.SUCCESS)])  # the first put also cleans up: nothing yet
    store.put([record("old", State.SUCCESS, expires_in=-1)])  # the next cleanup is not due
    assert store.get("old") is None
    assert store.count() == 1
    assert rows(sql, table) == 2
    assert store.cleanup() == 1
    assert rows(sql, table) == 1
    assert store.cleanup() == 0


def test_put_deletes_expired_records_on_the_side_in_bounded_batches(
    store: PostgresResultStore, table: str, sql: Callable[..., list[tuple[object, ...]]]
) -> None:
    store.cleanup_interval = 3600.0
    store.cleanup_batch = 2
    store.put([record("live", State.SUCCESS)])  # the first put cleans: nothing yet
    store.put([record(f"old{i}", State.SUCCESS, expires_in=-1) for i in range(5)])
    assert rows(sql, table) == 6  # not due for an hour

    store.cleanup_interval = 0.0
    store.put([record("live2", State.SUCCESS)])
    assert rows(sql, table) == 5  # one bounded batch of 2 expired rows
    assert store.cleanup() == 3  # on demand: every batch
    assert rows(sql, table) == 2
    assert store.count() == 2


# corrupt and foreign rows


class Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("kind", ["garbage", "pickle", "foreign json", "another task's record"])
def test_a_corrupt_or_foreign_row_raises_result_error_and_runs_nothing(
    store: PostgresResultStore,
    table: str,
    sql: Callable[..., list[tuple[object, ...]]],
    tmp_path: Path,
    kind: str,
) -> None:
    marker = tmp_path / "executed"
    data = {
        "garbage": b"\x00\xffnot json",
        "pickle": pickle.dumps(Exploit(marker)),
        "foreign json": b'{"celery": "result", "status": "SUCCESS"}',
        "another task's record": encode_record(record("other", State.SUCCESS)),
    }[kind]
    store.put([record("t1", State.SUCCESS)])
    sql(f"UPDATE {table} SET data = %s WHERE id = 't1'", (data,))
    with pytest.raises(ResultError):
        store.get("t1")
    with pytest.raises(ResultError):
        store.wait("t1", 5)
    assert not marker.exists()


# credentials


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    "bad_url",
    [
        f"postgresql://conveyor:hunter2-secret@{HOST}:{closed_port()}/{DATABASE}",
        f"postgresql://conveyor:hunter2-secret@{HOST}:{PORT}/no_such_database_here",
    ],
)
def test_credentials_never_appear_in_errors_or_logs(
    bad_url: str, caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest
) -> None:
    if f":{PORT}/" in bad_url:
        request.getfixturevalue("url")  # needs the server: skipped or failed without it
    caplog.set_level(logging.DEBUG)
    store = PostgresResultStore(bad_url)
    assert store.display_url == bad_url.replace("hunter2-secret", "***")
    with pytest.raises(ResultError) as raised:
        store.get("t1")
    text = str(raised.value)
    assert "hunter2" not in text
    assert "***" in text
    assert "PostgreSQL" in text and "?" in text  # says where, and what to check
    assert raised.value.__suppress_context__  # the driver's exception is not printed with it
    assert "hunter2" not in caplog.text
    store.close()


def test_a_bad_libpq_parameter_is_a_configuration_error_without_the_password() -> None:
    url = f"postgresql://conveyor:hunter2-secret@{HOST}:{PORT}/{DATABASE}?no_such_option=1"
    with pytest.raises(ConfigurationError, match="no_such_option") as raised:
        PostgresResultStore(url)
    assert "hunter2" not in str(raised.value)


def test_a_password_url_that_works_is_masked_everywhere(
    url: str, table: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with_password = url.replace("@", ":hunter2-secret@", 1) + f"?table={table}"
    store = PostgresResultStore(with_password)  # trust auth: the password is not checked
    store.put([record("t1", State.SUCCESS)])
    assert store.wait("t1", 5) is not None
    assert "hunter2" not in store.display_url
    assert "hunter2" not in caplog.text
    store.close()


# fork


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_uses_its_own_connections_and_the_parent_keeps_working(
    store: PostgresResultStore,
) -> None:
    store.put([record("before", State.SUCCESS)])
    assert store.wait("before", 5) is not None  # the parent has a pool and a listener
    parent_pool, parent_listener = id(store._pool()), id(store._listener())
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        status = 1
        try:
            os.close(read)
            own = id(store._pool()) != parent_pool and id(store._listener()) != parent_listener
            got = store.get("before")
            waited = store.wait("before", 5)
            store.put([record("from-child", State.SUCCESS)])
            store.close()
            ok = own and got is not None and waited is not None
            os.write(write, b"ok" if ok else f"own={own} got={got} waited={waited}".encode())
            status = 0
        except BaseException as exc:
            os.write(write, repr(exc).encode())
        finally:
            os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        report = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert report == "ok" and status == 0, report
    # The parent's connections were neither used nor closed by the child.
    assert store.get("from-child") is not None
    store.put([record("after", State.SUCCESS)])
    assert store.wait("after", 5) is not None
    assert id(store._pool()) == parent_pool
