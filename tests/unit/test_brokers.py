"""One suite for every broker (memory and SQLite), plus SQLite's multi-consumer guarantees."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor.brokers import Broker, DeadLetter, Delivery, Outgoing, QueueStats, from_url
from conveyor.brokers.memory import MemoryBroker
from conveyor.brokers.sqlite import SQLiteBroker
from conveyor.errors import ConfigurationError

Q = "default"
MakeBroker = Callable[..., Broker]


@pytest.fixture(params=["memory", "sqlite"])
def make_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeBroker]:
    """Brokers of one kind; every SQLite one made in a test shares the same file."""
    made: list[Broker] = []

    def make(visibility_timeout: float = 60.0) -> Broker:
        broker: Broker
        if request.param == "memory":
            broker = MemoryBroker(visibility_timeout=visibility_timeout)
        else:
            broker = SQLiteBroker(
                f"sqlite:///{tmp_path}/q.db", visibility_timeout=visibility_timeout
            )
        made.append(broker)
        return broker

    yield make
    for broker in made:
        broker.close()


@pytest.fixture
def broker(make_broker: MakeBroker) -> Broker:
    return make_broker()


def publish(broker: Broker, *bodies: bytes, queue: str = Q, **kwargs: Any) -> None:
    broker.publish([Outgoing(queue, body, **kwargs) for body in bodies])


def bodies(deliveries: list[Delivery]) -> list[bytes]:
    return [bytes(d.body) for d in deliveries]


def stats_of(broker: Broker, queue: str = Q) -> tuple[int, int, int, int]:
    [s] = broker.stats([queue])
    return (s.ready, s.delayed, s.in_flight, s.dead)


def fetch_until(broker: Broker, count: int = 1, timeout: float = 5.0) -> list[Delivery]:
    """Fetch until `count` messages came back (lease expiry, short delays), with a deadline."""
    deadline = time.monotonic() + timeout
    got: list[Delivery] = []
    while len(got) < count:
        got += broker.fetch([Q], count - len(got))
        if time.monotonic() > deadline:
            raise AssertionError(f"only {len(got)} of {count} messages came back in {timeout}s")
        time.sleep(0.005)
    return got


# publish, fetch, ack


def test_publish_fetch_ack(broker: Broker) -> None:
    publish(broker, b"one", b"two")
    assert stats_of(broker) == (2, 0, 0, 0)
    got = broker.fetch([Q], 10)
    assert bodies(got) == [b"one", b"two"]
    assert all(d.queue == Q and d.delivery_count == 1 and not d.redelivered for d in got)
    assert stats_of(broker) == (0, 0, 2, 0)
    assert broker.fetch([Q], 10) == []  # leased messages are not handed out twice
    assert broker.ack(got) == 2
    assert stats_of(broker) == (0, 0, 0, 0)
    assert broker.ack(got) == 0  # a second ack finds nothing


def test_bodies_are_carried_byte_for_byte(broker: Broker) -> None:
    payload = bytes(range(256)) * 4 + b"\x00"
    publish(broker, payload)
    [d] = broker.fetch([Q], 1)
    assert bytes(d.body) == payload


def test_fetch_from_empty_or_unknown_queue(broker: Broker) -> None:
    assert broker.fetch([Q], 10) == []
    assert broker.fetch(["nope"], 10) == []
    assert broker.fetch([], 10) == []


def test_queues_are_separate(broker: Broker) -> None:
    publish(broker, b"a", queue="a")
    publish(broker, b"b", queue="b")
    assert bodies(broker.fetch(["a"], 10)) == [b"a"]
    assert bodies(broker.fetch(["b"], 10)) == [b"b"]


def test_fetch_from_several_queues(broker: Broker) -> None:
    publish(broker, b"a1", b"a2", queue="a")
    publish(broker, b"b1", queue="b")
    got = broker.fetch(["a", "b"], 10)
    assert sorted(bodies(got)) == [b"a1", b"a2", b"b1"]
    assert {d.queue for d in got} == {"a", "b"}
    assert {bytes(d.body): d.queue for d in got}[b"b1"] == "b"


def test_priority_order_higher_first_fifo_within_a_priority(broker: Broker) -> None:
    order = [(0, b"p0-a"), (5, b"p5-a"), (9, b"p9-a"), (5, b"p5-b"), (0, b"p0-b"), (9, b"p9-b")]
    for priority, body in order:
        publish(broker, body, priority=priority)
    got = broker.fetch([Q], 10)
    assert bodies(got) == [b"p9-a", b"p9-b", b"p5-a", b"p5-b", b"p0-a", b"p0-b"]


def test_priority_order_across_several_fetches(broker: Broker) -> None:
    broker.publish([Outgoing(Q, b"%d" % i, priority=i % 3) for i in range(9)])
    seen: list[bytes] = []
    while got := broker.fetch([Q], 2):
        seen += bodies(got)
    assert seen == [b"2", b"5", b"8", b"1", b"4", b"7", b"0", b"3", b"6"]


def test_fetch_limit(broker: Broker) -> None:
    publish(broker, *(b"%d" % i for i in range(10)))
    first = broker.fetch([Q], 3)
    assert bodies(first) == [b"0", b"1", b"2"]
    assert stats_of(broker) == (7, 0, 3, 0)
    assert bodies(broker.fetch([Q], 100)) == [b"%d" % i for i in range(3, 10)]
    assert broker.fetch([Q], 0) == []


# delays


def test_future_deliver_at_is_not_fetchable(broker: Broker) -> None:
    publish(broker, b"later", deliver_at=time.time() + 3600)
    publish(broker, b"now")
    assert bodies(broker.fetch([Q], 10)) == [b"now"]
    assert stats_of(broker) == (0, 1, 1, 0)


def test_past_deliver_at_is_fetchable_at_once(broker: Broker) -> None:
    publish(broker, b"overdue", deliver_at=time.time() - 1)
    assert bodies(broker.fetch([Q], 10)) == [b"overdue"]


def test_delayed_message_arrives_when_due(broker: Broker) -> None:
    due = time.time() + 0.1
    publish(broker, b"soon", deliver_at=due, priority=3)
    [d] = fetch_until(broker)
    assert time.time() >= due
    assert bytes(d.body) == b"soon" and d.delivery_count == 1


def test_memory_broker_delay_follows_its_clock() -> None:
    broker = MemoryBroker()
    now = 1_000_000.0
    broker.clock = lambda: now
    publish(broker, b"x", deliver_at=now + 10)
    assert broker.fetch([Q], 1) == []
    broker.clock = lambda: now + 9.99
    assert broker.fetch([Q], 1) == []
    broker.clock = lambda: now + 10
    assert bodies(broker.fetch([Q], 1)) == [b"x"]


# leases


def test_lease_is_exclusive_while_it_lasts(make_broker: MakeBroker) -> None:
    one = make_broker()
    publish(one, b"x")
    [d] = one.fetch([Q], 1)
    assert one.fetch([Q], 1) == []
    assert stats_of(one) == (0, 0, 1, 0)
    assert one.ack([d]) == 1


def test_expired_lease_returns_the_message_redelivered(make_broker: MakeBroker) -> None:
    broker = make_broker(visibility_timeout=0.05)
    publish(broker, b"x")
    [first] = broker.fetch([Q], 1)
    [again] = fetch_until(broker)
    assert bytes(again.body) == b"x"
    assert again.delivery_count == 2
    assert again.redelivered is True
    assert first.redelivered is False


def test_ack_after_someone_else_took_the_lease_does_not_delete(make_broker: MakeBroker) -> None:
    broker = make_broker(visibility_timeout=0.05)
    publish(broker, b"x")
    [stale] = broker.fetch([Q], 1)
    [fresh] = fetch_until(broker)
    assert broker.ack([stale]) == 0
    assert stats_of(broker)[2] == 1  # still leased to the new holder
    broker.requeue([stale])
    broker.dead_letter([(stale, "stale")])
    assert stats_of(broker) == (0, 0, 1, 0)
    assert broker.ack([fresh]) == 1
    assert stats_of(broker) == (0, 0, 0, 0)


def test_stale_lease_cannot_settle_on_another_sqlite_instance(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/q.db"
    mine, theirs = SQLiteBroker(url, visibility_timeout=0.05), SQLiteBroker(url)
    try:
        publish(mine, b"x")
        [stale] = mine.fetch([Q], 1)
        [fresh] = fetch_until(theirs)
        assert fresh.delivery_count == 2
        assert mine.ack([stale]) == 0
        assert theirs.ack([fresh]) == 1
    finally:
        mine.close()
        theirs.close()


def test_extend_keeps_a_lease_alive(make_broker: MakeBroker) -> None:
    broker = make_broker(visibility_timeout=0.2)
    publish(broker, b"kept", b"control")
    kept, control = broker.fetch([Q], 2)
    assert (bytes(kept.body), bytes(control.body)) == (b"kept", b"control")
    broker.extend([kept], 60)
    # The control's lease started with kept's: once it is back, kept's would have expired too.
    [back] = fetch_until(broker)
    assert bytes(back.body) == b"control"
    assert broker.fetch([Q], 10) == []
    assert broker.ack([kept]) == 1


# requeue


def test_requeue_now_counts_the_delivery(broker: Broker) -> None:
    publish(broker, b"x")
    [d] = broker.fetch([Q], 1)
    broker.requeue([d])
    assert stats_of(broker) == (1, 0, 0, 0)
    [again] = broker.fetch([Q], 1)
    assert again.delivery_count == 2 and again.redelivered


def test_requeue_without_counting_keeps_the_count(broker: Broker) -> None:
    publish(broker, b"x")
    [d] = broker.fetch([Q], 1)
    broker.requeue([d], count_delivery=False)
    [again] = broker.fetch([Q], 1)
    assert again.delivery_count == 1 and not again.redelivered
    assert again.lost == 0


@pytest.mark.parametrize("delay", [0.0, 0.05])
def test_a_counted_requeue_is_a_lost_run_and_an_uncounted_one_is_not(
    broker: Broker, delay: float
) -> None:
    """`lost` counts the runs given back as lost (the poison limit of a prefork worker reads
    it), now or through a delay, and nothing else moves it."""
    publish(broker, b"x")
    [d] = broker.fetch([Q], 1)
    assert d.lost == 0
    broker.requeue([d], delay=delay)
    [d] = fetch_until(broker)
    assert (d.delivery_count, d.lost) == (2, 1)
    broker.requeue([d], delay=delay, count_delivery=False)
    [d] = fetch_until(broker)
    assert (d.delivery_count, d.lost) == (2, 1)
    broker.requeue([d], delay=delay)
    [d] = fetch_until(broker)
    assert (d.delivery_count, d.lost) == (3, 2)


def test_an_expired_lease_counts_a_delivery_but_no_lost_run(make_broker: MakeBroker) -> None:
    """A worker that died holding a message was not seen to lose a run of it."""
    broker = make_broker(visibility_timeout=0.05)
    publish(broker, b"x")
    assert len(broker.fetch([Q], 1)) == 1
    [again] = fetch_until(broker)
    assert (again.delivery_count, again.lost) == (2, 0)


def test_a_sqlite_file_from_before_lost_runs_is_upgraded_in_place(tmp_path: Path) -> None:
    """Files written before the `lost` column existed get it, and their messages keep flowing."""
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE conveyor_messages (id INTEGER PRIMARY KEY, queue TEXT NOT NULL, "
            "priority INTEGER NOT NULL, visible_at REAL NOT NULL DEFAULT 0, lease INTEGER, "
            "deliveries INTEGER NOT NULL DEFAULT 0, body BLOB NOT NULL)"
        )
        conn.execute(
            "CREATE TABLE conveyor_delayed (id INTEGER PRIMARY KEY, queue TEXT NOT NULL, "
            "priority INTEGER NOT NULL, due_at REAL NOT NULL, "
            "deliveries INTEGER NOT NULL DEFAULT 0, body BLOB NOT NULL)"
        )
        conn.execute(
            "INSERT INTO conveyor_messages (queue, priority, deliveries, body) VALUES (?, 0, 1, ?)",
            (Q, b"old"),
        )
    broker = SQLiteBroker(f"sqlite:///{path}")
    try:
        [d] = broker.fetch([Q], 1)
        assert (bytes(d.body), d.delivery_count, d.lost) == (b"old", 2, 0)
        broker.requeue([d], delay=0.01)
        [d] = fetch_until(broker)
        assert (d.delivery_count, d.lost) == (3, 1)
    finally:
        broker.close()
    again = SQLiteBroker(f"sqlite:///{path}")  # a second open finds the column there
    try:
        assert stats_of(again) == (0, 0, 1, 0)
    finally:
        again.close()


def test_requeued_message_keeps_its_place(broker: Broker) -> None:
    publish(broker, b"first", b"second")
    first, _second = broker.fetch([Q], 2)
    broker.requeue([first])
    publish(broker, b"third")
    assert bodies(broker.fetch([Q], 10)) == [b"first", b"third"]


def test_requeue_with_delay_holds_the_message(broker: Broker) -> None:
    publish(broker, b"x")
    [d] = broker.fetch([Q], 1)
    broker.requeue([d], delay=3600)
    assert stats_of(broker) == (0, 1, 0, 0)
    assert broker.fetch([Q], 1) == []


@pytest.mark.parametrize(("count_delivery", "expected"), [(True, 2), (False, 1)])
def test_requeue_with_short_delay_comes_back(
    broker: Broker, count_delivery: bool, expected: int
) -> None:
    publish(broker, b"x")
    [d] = broker.fetch([Q], 1)
    broker.requeue([d], delay=0.05, count_delivery=count_delivery)
    [again] = fetch_until(broker)
    assert bytes(again.body) == b"x"
    assert again.delivery_count == expected


def test_requeue_after_lease_lost_does_nothing(make_broker: MakeBroker) -> None:
    broker = make_broker()
    publish(broker, b"x")
    [d] = broker.fetch([Q], 1)
    assert broker.ack([d]) == 1
    broker.requeue([d])
    broker.requeue([d], delay=10)
    assert stats_of(broker) == (0, 0, 0, 0)


# dead letters


def test_dead_letter_with_reason(broker: Broker) -> None:
    publish(broker, b"bad", b"worse", b"fine")
    bad, worse, fine = broker.fetch([Q], 3)
    before = time.time()
    broker.dead_letter([(bad, "malformed JSON: oops")])
    broker.dead_letter([(worse, "unknown task 'x'")])
    assert stats_of(broker) == (0, 0, 1, 2)
    letters = broker.dead_letters(Q)
    assert [(bytes(x.body), x.reason) for x in letters] == [
        (b"worse", "unknown task 'x'"),
        (b"bad", "malformed JSON: oops"),
    ]  # newest first
    assert all(isinstance(x, DeadLetter) and x.queue == Q for x in letters)
    assert all(x.delivery_count == 1 and x.died_at >= before - 1 for x in letters)
    assert [bytes(x.body) for x in broker.dead_letters(Q, limit=1)] == [b"worse"]
    assert broker.fetch([Q], 10) == []  # dead letters are out of circulation
    assert broker.ack([fine]) == 1
    assert broker.ack([bad]) == 0


def test_dead_letter_keeps_the_delivery_count(broker: Broker) -> None:
    publish(broker, b"x")
    [d] = broker.fetch([Q], 1)
    broker.requeue([d])
    [d] = broker.fetch([Q], 1)
    broker.dead_letter([(d, "poison")])
    [letter] = broker.dead_letters(Q)
    assert letter.delivery_count == 2


def test_dead_letters_of_another_queue_are_separate(broker: Broker) -> None:
    publish(broker, b"x", queue="other")
    [d] = broker.fetch(["other"], 1)
    broker.dead_letter([(d, "r")])
    assert broker.dead_letters(Q) == []
    assert len(broker.dead_letters("other")) == 1


# sending dead letters back


def dead_letter_all(broker: Broker, reasons: dict[bytes, str], queue: str = Q) -> None:
    """Fetch every message of `queue` and dead-letter each with its body's reason."""
    deliveries = broker.fetch([queue], 100)
    broker.dead_letter([(d, reasons[bytes(d.body)]) for d in deliveries])


def test_requeue_dead_sends_every_dead_letter_back_as_a_fresh_message(broker: Broker) -> None:
    """Counts start over (delivery 1, no lost runs, so the poison limit does not dead-letter it
    again at once); body and priority are kept."""
    publish(broker, b"low", priority=1)
    publish(broker, b"high", priority=7)
    publish(broker, b"crashy")
    broker.requeue(broker.fetch([Q], 10))  # lost runs: deliveries 2, lost 1 from here
    again = broker.fetch([Q], 10)
    assert all((d.delivery_count, d.lost) == (2, 1) for d in again)
    broker.dead_letter([(d, "poison message: x") for d in again])
    assert [d.delivery_count for d in broker.dead_letters(Q)] == [2, 2, 2]
    assert {bytes(d.body): d.priority for d in broker.dead_letters(Q)}[b"high"] == 7
    assert stats_of(broker) == (0, 0, 0, 3)

    assert broker.requeue_dead(Q) == 3

    assert stats_of(broker) == (3, 0, 0, 0)
    assert broker.dead_letters(Q) == []
    got = broker.fetch([Q], 10)
    assert bodies(got)[0] == b"high"  # the priority came back with it
    assert sorted(bodies(got)) == [b"crashy", b"high", b"low"]
    assert all((d.delivery_count, d.lost, d.redelivered) == (1, 0, False) for d in got)
    assert broker.ack(got) == 3
    assert stats_of(broker) == (0, 0, 0, 0)


def test_requeue_dead_takes_only_what_select_accepts(broker: Broker) -> None:
    publish(broker, b"a", b"b", b"c", b"d")
    reasons = {b"a": "poison message: 1", b"b": "unknown task: 2", b"c": "poison message: 3"}
    dead_letter_all(broker, {**reasons, b"d": "bad arguments: 4"})
    seen: list[bytes] = []
    progress: list[int] = []

    def poison(letter: DeadLetter) -> bool:
        seen.append(bytes(letter.body))
        return letter.reason.startswith("poison message")

    assert broker.requeue_dead(Q, poison, progress=progress.append) == 2
    assert sorted(seen) == [b"a", b"b", b"c", b"d"]  # every dead letter was offered once
    assert sum(progress) == 2
    assert sorted(bodies(broker.fetch([Q], 10))) == [b"a", b"c"]
    # The others stay, in their order (newest first).
    assert [bytes(d.body) for d in broker.dead_letters(Q)] == [b"d", b"b"]
    assert stats_of(broker) == (0, 0, 2, 2)


def test_requeue_dead_leaves_other_queues_alone(broker: Broker) -> None:
    publish(broker, b"mine")
    publish(broker, b"theirs", queue="other")
    dead_letter_all(broker, {b"mine": "r: 1"})
    dead_letter_all(broker, {b"theirs": "r: 2"}, queue="other")
    assert broker.requeue_dead("never-used") == 0
    assert broker.requeue_dead(Q, lambda letter: False) == 0
    assert broker.requeue_dead(Q) == 1
    assert broker.requeue_dead(Q) == 0  # nothing left to send
    assert stats_of(broker) == (1, 0, 0, 0)
    assert stats_of(broker, "other") == (0, 0, 0, 1)


def test_requeue_dead_reports_progress_in_batches_of_a_large_table(broker: Broker) -> None:
    """Many dead letters (more than one of SQLite's chunks) all go back, none twice."""
    count = 1234
    broker.publish([Outgoing(Q, b"%d" % n) for n in range(count)])
    broker.dead_letter([(d, "r: x") for d in broker.fetch([Q], count)])
    progress: list[int] = []
    assert broker.requeue_dead(Q, progress=progress.append) == count
    assert sum(progress) == count
    assert sorted(bodies(broker.fetch([Q], count + 1))) == sorted(b"%d" % n for n in range(count))


def test_a_queue_exists_while_it_holds_anything(broker: Broker) -> None:
    assert not broker.exists(Q)
    publish(broker, b"later", deliver_at=time.time() + 3600)
    assert broker.exists(Q) and not broker.exists("other")
    assert broker.purge(Q) == 1
    assert not broker.exists(Q)
    publish(broker, b"x")
    assert broker.exists(Q)
    [d] = broker.fetch([Q], 1)
    assert broker.exists(Q)  # leased
    broker.dead_letter([(d, "r: x")])
    assert broker.exists(Q)  # dead
    broker.purge(Q, dead=True)
    assert not broker.exists(Q)


def test_a_sqlite_file_from_before_dead_priorities_is_upgraded_in_place(tmp_path: Path) -> None:
    """Dead letters written before `conveyor_dead` had a priority column list and go back."""
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE conveyor_dead (id INTEGER PRIMARY KEY, queue TEXT NOT NULL, "
            "reason TEXT NOT NULL, deliveries INTEGER NOT NULL, died_at REAL NOT NULL, "
            "body BLOB NOT NULL)"
        )
        conn.execute(
            "INSERT INTO conveyor_dead (queue, reason, deliveries, died_at, body) "
            "VALUES (?, 'poison message: old', 4, 1.0, ?)",
            (Q, b"old"),
        )
    broker = SQLiteBroker(f"sqlite:///{path}")
    try:
        [letter] = broker.dead_letters(Q)
        assert (bytes(letter.body), letter.delivery_count, letter.priority) == (b"old", 4, 0)
        assert broker.requeue_dead(Q) == 1
        [d] = broker.fetch([Q], 1)
        assert (bytes(d.body), d.delivery_count, d.lost) == (b"old", 1, 0)
    finally:
        broker.close()


# stats and purge


def test_stats_counts_every_state(broker: Broker) -> None:
    publish(broker, b"r1", b"r2", b"f1", b"f2")
    publish(broker, b"d1", b"d2", deliver_at=time.time() + 3600)
    publish(broker, b"elsewhere", queue="other")
    f1, f2 = broker.fetch([Q], 2)
    broker.dead_letter([(f2, "dead")])
    assert broker.stats([Q]) == [QueueStats(Q, ready=2, delayed=2, in_flight=1, dead=1)]
    everything = broker.stats()
    assert [s.queue for s in everything] == sorted(["default", "other"])
    assert QueueStats("other", 1, 0, 0, 0) in everything
    assert broker.stats(["never-used"]) == [QueueStats("never-used", 0, 0, 0, 0)]
    broker.ack([f1])


def test_purge_ready_and_delayed_but_not_in_flight(broker: Broker) -> None:
    publish(broker, b"dead", b"leased", b"r1")
    publish(broker, b"d1", deliver_at=time.time() + 3600)
    publish(broker, b"other", queue="other")
    [dead] = broker.fetch([Q], 1)
    broker.dead_letter([(dead, "x")])
    [still] = broker.fetch([Q], 1)
    publish(broker, b"r2")
    assert broker.purge(Q) == 3  # r1, r2 and the delayed d1
    assert stats_of(broker) == (0, 0, 1, 1)
    assert stats_of(broker, "other") == (1, 0, 0, 0)
    assert broker.ack([still]) == 1
    assert broker.purge(Q, dead=True) == 1
    assert stats_of(broker) == (0, 0, 0, 0)
    assert broker.dead_letters(Q) == []
    assert broker.purge(Q) == 0


def test_publish_nothing_is_fine(broker: Broker) -> None:
    broker.publish([])
    assert broker.stats() == []


def test_publish_async(broker: Broker) -> None:
    import asyncio

    asyncio.run(broker.publish_async([Outgoing(Q, b"a"), Outgoing(Q, b"b")]))
    assert bodies(broker.fetch([Q], 10)) == [b"a", b"b"]


# URLs


def test_from_url(tmp_path: Path) -> None:
    memory = from_url("memory://", visibility_timeout=5)
    assert isinstance(memory, MemoryBroker) and memory.visibility_timeout == 5
    sqlite = from_url(f"sqlite:///{tmp_path}/x.db", visibility_timeout=7)
    assert isinstance(sqlite, SQLiteBroker) and sqlite.visibility_timeout == 7
    sqlite.close()
    with pytest.raises(ConfigurationError, match="unsupported broker URL") as info:
        from_url("redis://user:secret@host/0", visibility_timeout=1)
    assert "secret" not in str(info.value)


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite://host/x.db"])
def test_bad_sqlite_urls(url: str) -> None:
    with pytest.raises(ConfigurationError):
        SQLiteBroker(url).stats()


# SQLite: many consumers on one file


BACKLOG = 3000


def claim_all(broker: Broker, batch: int, out: list[bytes], acked: list[int]) -> None:
    """Claim and ack until the queue is empty."""
    while True:
        got = broker.fetch([Q], batch)
        if not got:
            [s] = broker.stats([Q])
            if s.ready == 0:
                return
            continue
        out.extend(bytes(d.body) for d in got)
        acked.append(broker.ack(got))


@pytest.mark.parametrize("consumers", [2, 4])
def test_sqlite_instances_on_one_file_never_share_a_message(tmp_path: Path, consumers: int) -> None:
    url = f"sqlite:///{tmp_path}/q.db"
    producer = SQLiteBroker(url)
    expected = [b"m%05d" % i for i in range(BACKLOG)]
    producer.publish([Outgoing(Q, body, priority=i % 3) for i, body in enumerate(expected)])
    outs: list[list[bytes]] = [[] for _ in range(consumers)]
    acks: list[list[int]] = [[] for _ in range(consumers)]
    start = threading.Barrier(consumers)
    # One instance per consumer, as separate processes would have; each thread gets its own
    # connection.
    brokers = [SQLiteBroker(url) for _ in range(consumers)]

    def run(n: int) -> None:
        start.wait(timeout=10)
        claim_all(brokers[n], 7, outs[n], acks[n])

    threads = [threading.Thread(target=run, args=(n,)) for n in range(consumers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    for b in brokers:
        b.close()
    delivered = [body for out in outs for body in out]
    assert len(delivered) == BACKLOG  # nothing twice ...
    assert sorted(delivered) == expected  # ... and nothing lost
    assert sum(sum(a) for a in acks) == BACKLOG  # every ack found its own lease
    assert stats_of(producer) == (0, 0, 0, 0)
    producer.close()


def consumer_process(url: str, path: str, barrier: Any) -> None:
    """A consumer in its own process: claims until empty, writes what it got to `path`."""
    barrier.wait(timeout=30)
    out: list[bytes] = []
    acked: list[int] = []
    broker = SQLiteBroker(url)
    claim_all(broker, 5, out, acked)
    broker.close()
    assert sum(acked) == len(out)
    Path(path).write_bytes(b"\n".join(out))


@pytest.mark.integration
def test_sqlite_two_processes_never_share_a_message(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/q.db"
    producer = SQLiteBroker(url)
    expected = [b"m%05d" % i for i in range(BACKLOG)]
    producer.publish([Outgoing(Q, body) for body in expected])
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    paths = [tmp_path / f"consumer-{n}.out" for n in range(2)]
    procs = [ctx.Process(target=consumer_process, args=(url, str(path), barrier)) for path in paths]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=90)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    per_process = [path.read_bytes().split(b"\n") for path in paths]
    delivered = [body for out in per_process for body in out if body]
    assert len(delivered) == BACKLOG
    assert sorted(delivered) == expected
    assert all(out != [b""] for out in per_process), "one process got nothing: no contention"
    assert stats_of(producer) == (0, 0, 0, 0)
    producer.close()


def close_while_in_use(tmp_path: Path, closes: int) -> tuple[list[str], tuple[int, ...]]:
    """Close one instance `closes` times while another is inside a batch on another thread.

    Returns the errors the other instance hit and its queue counts afterwards.
    """
    url = f"sqlite:///{tmp_path}/q.db"
    mine, theirs = SQLiteBroker(url), SQLiteBroker(url)
    publish(theirs, b"x")
    mine.stats([Q])
    claimed, closed = threading.Event(), threading.Event()
    errors: list[str] = []

    def consume() -> None:
        try:
            with theirs.batch():
                got = theirs.fetch([Q], 1)
                claimed.set()
                closed.wait(10)
                assert theirs.ack(got) == 1
        except Exception as exc:
            errors.append(repr(exc))

    thread = threading.Thread(target=consume)
    thread.start()
    assert claimed.wait(10)
    for _ in range(closes):
        mine.close()
    closed.set()
    thread.join(10)
    counts = stats_of(theirs)
    theirs.close()
    return errors, counts


def test_closing_one_sqlite_broker_leaves_another_alone(tmp_path: Path) -> None:
    errors, counts = close_while_in_use(tmp_path, closes=1)
    assert errors == []
    assert counts == (0, 0, 0, 0)


# Regression: closing one broker twice closed the connections another instance was using
# (its transaction was lost; a statement running at that moment segfaulted the process).
def test_closing_one_sqlite_broker_twice_leaves_another_alone(tmp_path: Path) -> None:
    errors, counts = close_while_in_use(tmp_path, closes=2)
    assert errors == []
    assert counts == (0, 0, 0, 0)


def test_sqlite_dead_letters_an_oversized_body_without_handing_it_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The claim returns only the size of a body over the limit: the body stays in SQLite,
    moves to the dead letters whole, and the next message is handed out as usual."""
    broker = SQLiteBroker(f"sqlite:///{tmp_path}/q.db", max_message_size=1000)
    try:
        big, small = b"x" * 1001, b"y" * 1000
        publish(broker, big, small)
        got = broker.fetch([Q], 10)
        assert bodies(got) == [small]
        [dead] = broker.dead_letters(Q)
        assert dead.body == big
        assert (
            dead.reason
            == "message too large: 1001 bytes, over the 1000-byte limit (max_message_size)"
        )
        assert dead.delivery_count == 1
        assert stats_of(broker) == (0, 0, 1, 1)
        assert broker.refused == 1
        assert any("over the 1000-byte limit" in r.getMessage() for r in caplog.records)
    finally:
        broker.close()
