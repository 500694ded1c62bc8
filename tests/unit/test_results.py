"""Result stores (memory and SQLite) and the `Result` handle."""

from __future__ import annotations

import pickle
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from conveyor import Conveyor, Result, State
from conveyor.errors import ConfigurationError, ResultError, ResultTimeout, TaskFailed
from conveyor.results import ResultRecord, ResultStore, from_url
from conveyor.results.memory import MemoryResultStore
from conveyor.results.sqlite import SQLiteResultStore


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ResultStore]:
    made: ResultStore = (
        MemoryResultStore()
        if request.param == "memory"
        else SQLiteResultStore(f"sqlite:///{tmp_path}/r.db")
    )
    yield made
    made.close()


def record(task_id: str = "t1", state: State = State.SUCCESS, **fields: Any) -> ResultRecord:
    fields.setdefault("expires_at", time.time() + 3600)
    return ResultRecord(id=task_id, state=state, task="shop.resize", **fields)


def test_get_unknown_is_none(store: ResultStore) -> None:
    assert store.get("nope") is None
    assert store.count() == 0


def test_put_and_get(store: ResultStore) -> None:
    rec = record(
        value=msgspec.Raw(b'{"a":[1,2.5,"x",null]}'),
        retries=2,
        worker="host:1",
        started_at=1.0,
        finished_at=2.0,
        updated_at=2.0,
    )
    store.put([rec])
    got = store.get("t1")
    assert got is not None
    assert got == rec
    assert msgspec.json.decode(got.value) == {"a": [1, 2.5, "x", None]}
    assert store.count() == 1


def test_put_many_at_once(store: ResultStore) -> None:
    store.put([record(f"id{i}", value=msgspec.Raw(b"%d" % i)) for i in range(20)])
    assert store.count() == 20
    got = store.get("id7")
    assert got is not None and bytes(got.value) == b"7"


def test_unfinished_states_replace_each_other(store: ResultStore) -> None:
    store.put([record(state=State.STARTED)])
    store.put([record(state=State.RETRY, retries=0)])
    got = store.get("t1")
    assert got is not None and got.state is State.RETRY
    store.put([record(state=State.STARTED, retries=1)])
    got = store.get("t1")
    assert got is not None and (got.state, got.retries) == (State.STARTED, 1)


@pytest.mark.parametrize("finished", [State.SUCCESS, State.FAILURE])
@pytest.mark.parametrize("late", [State.STARTED, State.RETRY, State.PENDING])
def test_finished_state_is_never_overwritten_by_an_unfinished_one(
    store: ResultStore, finished: State, late: State
) -> None:
    store.put([record(state=finished, value=msgspec.Raw(b"42"))])
    store.put([record(state=late)])
    got = store.get("t1")
    assert got is not None and got.state is finished and bytes(got.value) == b"42"


def test_late_started_in_the_same_batch_does_not_undo_success(store: ResultStore) -> None:
    store.put([record(state=State.SUCCESS, value=msgspec.Raw(b"1")), record(state=State.STARTED)])
    got = store.get("t1")
    assert got is not None and got.state is State.SUCCESS


def test_a_finished_state_replaces_another(store: ResultStore) -> None:
    store.put([record(state=State.FAILURE, error_type="ValueError")])
    store.put([record(state=State.SUCCESS, value=msgspec.Raw(b"2"))])
    got = store.get("t1")
    assert got is not None and got.state is State.SUCCESS and bytes(got.value) == b"2"


def test_expired_record_reads_as_none_and_cleanup_deletes_it(store: ResultStore) -> None:
    # The SQLite store also cleans up on its first write: the expired record comes second.
    store.put([record("live")])
    store.put([record("old", expires_at=time.time() - 1)])
    assert store.get("old") is None
    assert store.get("live") is not None
    assert store.count() == 1
    assert store.cleanup() == 1
    assert store.cleanup() == 0
    assert store.count() == 1
    assert store.get("live") is not None


def test_cleanup_really_deletes_from_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/r.db"
    store = SQLiteResultStore(url)
    store.put([record("old", expires_at=time.time() - 1), record("live")])
    store.cleanup()
    with sqlite3.connect(tmp_path / "r.db") as conn:
        ids = [row[0] for row in conn.execute("SELECT id FROM conveyor_results")]
    assert ids == ["live"]
    store.close()


def test_forget(store: ResultStore) -> None:
    store.put([record("a"), record("b")])
    store.forget("a")
    store.forget("never-stored")
    assert store.get("a") is None
    assert store.get("b") is not None
    assert store.count() == 1


def test_wait_returns_when_finished(
    store: ResultStore, monkeypatch: pytest.MonkeyPatch, poll: Any
) -> None:
    store.put([record(state=State.STARTED)])
    reads: list[str] = []
    get = store.get

    def counting_get(task_id: str) -> ResultRecord | None:
        reads.append(task_id)
        return get(task_id)

    monkeypatch.setattr(store, "get", counting_get)
    got: list[ResultRecord | None] = []
    waiter = threading.Thread(target=lambda: got.append(store.wait("t1", timeout=10)))
    waiter.start()
    poll(lambda: len(reads) >= 2, what="the waiter polled twice")  # it is really waiting
    assert got == []
    store.put([record(state=State.RETRY)])
    store.put([record(state=State.SUCCESS, value=msgspec.Raw(b'"done"'))])
    waiter.join(timeout=10)
    assert not waiter.is_alive()
    assert len(got) == 1 and got[0] is not None
    assert got[0].state is State.SUCCESS and bytes(got[0].value) == b'"done"'


def test_wait_for_an_already_finished_task_returns_at_once(store: ResultStore) -> None:
    store.put([record(state=State.FAILURE)])
    started = time.monotonic()
    got = store.wait("t1", timeout=30)
    assert got is not None and got.state is State.FAILURE
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("state", [None, State.STARTED, State.RETRY])
def test_wait_returns_none_after_timeout(store: ResultStore, state: State | None) -> None:
    if state is not None:
        store.put([record(state=state)])
    started = time.monotonic()
    assert store.wait("t1", timeout=0.05) is None
    assert 0.05 <= time.monotonic() - started < 5


# the Result handle


def test_result_get_returns_the_value(store: ResultStore) -> None:
    store.put([record(value=msgspec.Raw(b'{"size":[100,200]}'))])
    result: Result[Any] = Result("t1", store, "shop.resize")
    assert result.state is State.SUCCESS
    assert result.ready()
    assert result.get(timeout=1) == {"size": [100, 200]}


def test_result_state_of_unknown_or_expired_is_pending(store: ResultStore) -> None:
    store.put([record("old", expires_at=time.time() - 1)])
    assert Result("nope", store).state is State.PENDING
    assert Result("old", store).state is State.PENDING
    assert not Result("old", store).ready()


@pytest.mark.parametrize("state", [State.STARTED, State.RETRY])
def test_result_is_not_ready_while_running(store: ResultStore, state: State) -> None:
    store.put([record(state=state)])
    result: Result[Any] = Result("t1", store)
    assert result.state is state
    assert not result.ready()


def test_result_get_raises_task_failed_with_the_stored_failure(store: ResultStore) -> None:
    trace = 'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: bad width\n'
    store.put(
        [
            record(
                state=State.FAILURE,
                error_type="ValueError",
                error_message="bad width",
                traceback=trace,
            )
        ]
    )
    with pytest.raises(TaskFailed) as info:
        Result("t1", store, "shop.resize").get(timeout=1)
    failed = info.value
    assert (failed.task_id, failed.type_name, failed.message) == ("t1", "ValueError", "bad width")
    assert failed.traceback == trace
    assert "ValueError: bad width" in str(failed)


def test_task_failed_never_rebuilds_the_exception_class(store: ResultStore) -> None:
    store.put([record(state=State.FAILURE, error_type="os.system", error_message="rm -rf /")])
    with pytest.raises(TaskFailed) as info:
        Result("t1", store).get(timeout=1)
    assert type(info.value) is TaskFailed and info.value.type_name == "os.system"


def test_result_get_raises_result_timeout(store: ResultStore) -> None:
    store.put([record(state=State.STARTED)])
    result: Result[Any] = Result("t1", store, "shop.resize")
    with pytest.raises(ResultTimeout) as info:
        result.get(timeout=0.05)
    assert isinstance(info.value, TimeoutError)
    assert "t1" in str(info.value) and "STARTED" in str(info.value)


def test_result_forget(store: ResultStore) -> None:
    store.put([record()])
    result: Result[Any] = Result("t1", store)
    result.forget()
    assert result.state is State.PENDING


def test_result_on_an_app_without_results_is_a_configuration_error() -> None:
    app = Conveyor("x", broker="memory://", results=None)

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    result = add.delay(1, 2)
    for use in (lambda: result.state, lambda: result.get(timeout=1), result.ready, result.forget):
        with pytest.raises(ConfigurationError, match="results="):
            use()
    with pytest.raises(ConfigurationError):
        _ = app.result("any").state


# corrupt data in the SQLite table


class _Armed:
    """A pickle that creates a file when loaded: proof that nothing stored is ever unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def armed_pickle(marker: Path) -> bytes:
    return pickle.dumps(_Armed(marker))


def test_armed_pickle_is_really_armed(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    pickle.loads(armed_pickle(probe))  # the point: loading it does something
    assert probe.exists()


@pytest.mark.parametrize(
    "junk",
    [
        pytest.param(b"\x00\x01\x02 not json", id="binary"),
        pytest.param(b"{", id="truncated"),
        pytest.param(b"[1, 2, 3]", id="json-array"),
        pytest.param(b'{"id": "t1"}', id="missing-state"),
        pytest.param(b'{"id": "t1", "state": "EXPLODED"}', id="unknown-state"),
        pytest.param(b'{"id": 5, "state": "SUCCESS"}', id="wrong-type"),
        pytest.param(b"[" * 100_000, id="deep-nesting"),
        pytest.param("text, not bytes", id="text"),
        pytest.param(12345, id="integer"),
        pytest.param("pickle", id="pickle"),
    ],
)
def test_corrupt_stored_value_is_a_result_error_and_runs_nothing(
    tmp_path: Path, junk: object
) -> None:
    marker = tmp_path / "pwned"
    if junk == "pickle":
        junk = armed_pickle(marker)
    url = f"sqlite:///{tmp_path}/r.db"
    store = SQLiteResultStore(url)
    store.put([record("other")])  # creates the table
    with sqlite3.connect(tmp_path / "r.db") as conn:
        conn.execute(
            "INSERT INTO conveyor_results (id, state, expires_at, data) VALUES (?, ?, ?, ?)",
            ("t1", "SUCCESS", time.time() + 3600, junk),
        )
    result: Result[Any] = Result("t1", store)
    with pytest.raises(ResultError) as info:
        result.get(timeout=1)
    assert not isinstance(info.value, ResultTimeout)
    assert "corrupt" in str(info.value)
    with pytest.raises(ResultError):
        _ = result.state
    assert not marker.exists()
    assert store.get("other") is not None  # the rest of the store is fine
    store.close()


def test_from_url(tmp_path: Path) -> None:
    assert isinstance(from_url("memory://"), MemoryResultStore)
    sqlite = from_url(f"sqlite:///{tmp_path}/r.db")
    assert isinstance(sqlite, SQLiteResultStore)
    sqlite.close()
    with pytest.raises(ConfigurationError, match="unsupported result store URL") as info:
        from_url("mongodb://:hunter2@localhost/0")
    assert "hunter2" not in str(info.value)


def test_a_task_keeps_its_results_for_its_own_result_expires() -> None:
    from conveyor.testing import memory_app, run_until_empty

    app = memory_app(result_expires=3600)

    @app.task(result_expires=5)
    def brief() -> int:
        return 1

    @app.task
    def usual() -> int:
        return 2

    short, long = brief.delay(), usual.delay()
    run_until_empty(app)
    store = app.results
    assert store is not None
    short_record, long_record = store.get(short.id), store.get(long.id)
    assert short_record is not None and long_record is not None
    assert short_record.expires_at - short_record.updated_at == pytest.approx(5, abs=0.01)
    assert long_record.expires_at - long_record.updated_at == pytest.approx(3600, abs=0.01)


def test_result_expires_must_be_positive() -> None:
    app = Conveyor("t", broker="memory://")
    with pytest.raises(ConfigurationError, match="result_expires"):

        @app.task(result_expires=0)
        def never() -> None: ...
