"""The worker's I/O round, written once and driven twice: the blocking driver and the one for a
broker attached to the loop make the same calls in the same order."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from conveyor.brokers import Delivery, Outgoing
from conveyor.results import ResultRecord, State
from conveyor.worker.rounds import Fetched, settle_and_fetch, settle_and_fetch_async
from conveyor.worker.verdict import Settlements

Q = "default"


class Recorder:
    """A broker and a result store that note each call (`*_async` ones as the same name)."""

    def __init__(self, acked: int | None = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.acked = acked

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        self.calls.append(("begin",))
        yield
        self.calls.append(("commit",))

    def put(self, records: Sequence[ResultRecord]) -> None:
        self.calls.append(("put", [r.id for r in records]))

    def publish(self, messages: Sequence[Outgoing]) -> None:
        self.calls.append(("publish", list(messages)))

    def ack(self, deliveries: Sequence[Delivery]) -> int:
        self.calls.append(("ack", list(deliveries)))
        return len(deliveries) if self.acked is None else self.acked

    def dead_letter(self, items: Sequence[tuple[Delivery, str]]) -> None:
        self.calls.append(("dead_letter", list(items)))

    def requeue(
        self, deliveries: Sequence[Delivery], *, delay: float = 0.0, count_delivery: bool = True
    ) -> None:
        self.calls.append(("requeue", list(deliveries), delay, count_delivery))

    def fetch(self, queues: Sequence[str], limit: int) -> list[Delivery]:
        self.calls.append(("fetch", list(queues), limit))
        return [Delivery(Q, b"new", n) for n in range(limit)]

    async def publish_async(self, messages: Sequence[Outgoing]) -> None:
        self.publish(messages)

    async def ack_async(self, deliveries: Sequence[Delivery]) -> int:
        return self.ack(deliveries)

    async def dead_letter_async(self, items: Sequence[tuple[Delivery, str]]) -> None:
        self.dead_letter(items)

    async def requeue_async(
        self, deliveries: Sequence[Delivery], *, delay: float = 0.0, count_delivery: bool = True
    ) -> None:
        self.requeue(deliveries, delay=delay, count_delivery=count_delivery)

    async def fetch_async(self, queues: Sequence[str], limit: int) -> list[Delivery]:
        return self.fetch(queues, limit)


def run(how: str, fake: Recorder, batch: Settlements, free: int, store: bool = True) -> Fetched:
    if how == "blocking":
        return settle_and_fetch(fake, fake if store else None, [Q], batch, free)  # type: ignore[arg-type]
    with ThreadPoolExecutor(1) as io:
        return asyncio.run(
            settle_and_fetch_async(fake, fake if store else None, [Q], batch, free, io)  # type: ignore[arg-type]
        )


def full_batch() -> tuple[Settlements, list[Delivery]]:
    d = [Delivery(Q, b"", n) for n in range(6)]
    batch = Settlements(
        records={"t1": ResultRecord(id="t1", state=State.SUCCESS)},
        publish=[Outgoing(Q, b"retry")],
        acks=[d[0], d[1]],
        dead=[(d[2], "poison message: x")],
        release=[d[3]],
        delay=[(d[4], 1.5), (d[5], 3.0)],
    )
    return batch, d


@pytest.fixture(params=["blocking", "on the loop"])
def how(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_results_and_retries_go_out_before_their_messages_are_removed(how: str) -> None:
    fake, (batch, d) = Recorder(), full_batch()
    deliveries, stale = run(how, fake, batch, free=2)
    calls = [c for c in fake.calls if c[0] not in ("begin", "commit")]
    assert calls == [
        ("put", ["t1"]),
        ("publish", [Outgoing(Q, b"retry")]),
        ("ack", [d[0], d[1]]),
        ("dead_letter", [(d[2], "poison message: x")]),
        ("requeue", [d[3]], 0.0, True),
        ("requeue", [d[4]], 1.5, False),
        ("requeue", [d[5]], 3.0, False),
        ("fetch", [Q], 2),
    ]
    assert (len(deliveries), stale) == (2, 0)
    if how == "blocking":  # one transaction around the whole round
        assert (fake.calls[0], fake.calls[-1]) == (("begin",), ("commit",))


def test_acks_that_came_too_late_are_counted(how: str) -> None:
    fake, (batch, _) = Recorder(acked=1), full_batch()
    assert run(how, fake, batch, free=0) == ([], 1)
    assert not any(c[0] == "fetch" for c in fake.calls)


def test_nothing_to_settle_is_a_fetch_alone(how: str) -> None:
    fake = Recorder()
    deliveries, stale = run(how, fake, Settlements(), free=3)
    assert fake.calls == [("fetch", [Q], 3)]
    assert (len(deliveries), stale) == (3, 0)


def test_without_a_store_records_are_not_written(how: str) -> None:
    fake = Recorder()
    batch = Settlements(records={"t1": ResultRecord(id="t1", state=State.STARTED)})
    run(how, fake, batch, free=0, store=False)
    assert [c for c in fake.calls if c[0] not in ("begin", "commit")] == []
