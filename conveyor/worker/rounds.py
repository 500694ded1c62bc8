"""A round of the worker's I/O, written once: settle what finished, then fetch.

`_flow` is the round: a generator that yields each call to make, as a `Call` and its argument,
and is sent back the result. Two drivers make the calls: `settle_and_fetch` with the blocking
methods, inside one batch of the broker's (a transaction where it has one), and
`settle_and_fetch_async` by awaiting the `*_async` methods of a broker attached to the worker's
loop (the result store, which blocks, still goes through the given I/O thread).

The order is the guarantee: outcomes are stored and retries published before their messages are
acknowledged or dead-lettered, so a crash in between means a redelivery, never a lost result.
A workflow's finished tasks are followed (`conveyor.workflows.plan`) after their records are
stored: their chords joined, what comes next published with the rest, then their chords marked
fired, all before the acks.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Generator, Sequence
from concurrent.futures import Executor
from typing import Any

from conveyor.brokers import Broker, Delivery
from conveyor.results import ResultStore
from conveyor.worker.verdict import Settlements
from conveyor.workflows.plan import Continuations, Plan


class Call(enum.Enum):
    """A call the round asks its driver to make, by the argument that comes with it."""

    STORE = "store"  # result records: ResultStore.put
    PUBLISH = "publish"  # outgoing messages (retries)
    ACK = "ack"  # deliveries; the result is how many were still ours
    DEAD_LETTER = "dead_letter"  # (delivery, reason) pairs
    RELEASE = "release"  # deliveries given back unfinished, as lost runs
    DELAY = "delay"  # one (delivery, seconds) pair, given back for later, counted as nothing
    FETCH = "fetch"  # how many to fetch at most; the result is the deliveries
    FOLLOW = "follow"  # finished workflow tasks; the result is a `Plan`
    FIRED = "fired"  # chord ids whose callbacks were published


#: What a round returns: the deliveries fetched, and how many acks came too late to count.
Fetched = tuple[list[Delivery], int]
_Flow = Generator[tuple[Call, Any], Any, Fetched]


def _flow(batch: Settlements, free: int, store: bool) -> _Flow:
    if batch.records and store:
        yield Call.STORE, list(batch.records.values())
    publish, fired = batch.publish, []
    if batch.follow:
        plan: Plan = yield Call.FOLLOW, batch.follow
        publish, fired = publish + plan.publish, plan.fired
    if publish:
        yield Call.PUBLISH, publish
    if fired:
        yield Call.FIRED, fired
    acked = (yield Call.ACK, batch.acks) if batch.acks else 0
    if batch.dead:
        yield Call.DEAD_LETTER, batch.dead
    if batch.release:
        yield Call.RELEASE, batch.release
    for item in batch.delay:
        yield Call.DELAY, item
    deliveries = (yield Call.FETCH, free) if free > 0 else []
    return deliveries, len(batch.acks) - acked


def settle_and_fetch(
    broker: Broker,
    store: ResultStore | None,
    queues: Sequence[str],
    batch: Settlements,
    free: int,
    follow: Continuations | None = None,
) -> Fetched:
    """The round with blocking calls, in one batch of the broker's when there is anything to
    settle (a fetch alone needs none)."""
    flow = _flow(batch, free, store is not None)
    result: Any = None
    with broker.batch() if batch else contextlib.nullcontext():
        while True:
            try:
                call, arg = flow.send(result)
            except StopIteration as end:
                fetched: Fetched = end.value
                return fetched
            result = None
            match call:
                case Call.FETCH:
                    result = broker.fetch(queues, arg)
                case Call.ACK:
                    result = broker.ack(arg)
                case Call.STORE:
                    assert store is not None
                    store.put(arg)
                case Call.PUBLISH:
                    broker.publish(arg)
                case Call.DEAD_LETTER:
                    broker.dead_letter(arg)
                case Call.RELEASE:
                    broker.requeue(arg)
                case Call.DELAY:
                    broker.requeue([arg[0]], delay=arg[1], count_delivery=False)
                case Call.FOLLOW:
                    assert follow is not None
                    result = follow.plan(arg)
                case Call.FIRED:
                    assert follow is not None
                    follow.fired(arg)


async def settle_and_fetch_async(
    broker: Broker,
    store: ResultStore | None,
    queues: Sequence[str],
    batch: Settlements,
    free: int,
    io: Executor,
    follow: Continuations | None = None,
) -> Fetched:
    """The round on a broker attached to the running loop; the store's calls go through `io`."""
    flow = _flow(batch, free, store is not None)
    result: Any = None
    while True:
        try:
            call, arg = flow.send(result)
        except StopIteration as end:
            fetched: Fetched = end.value
            return fetched
        result = None
        match call:
            case Call.FETCH:
                result = await broker.fetch_async(queues, arg)
            case Call.ACK:
                result = await broker.ack_async(arg)
            case Call.STORE:
                assert store is not None
                await asyncio.get_running_loop().run_in_executor(io, store.put, arg)
            case Call.PUBLISH:
                await broker.publish_async(arg)
            case Call.DEAD_LETTER:
                await broker.dead_letter_async(arg)
            case Call.RELEASE:
                await broker.requeue_async(arg)
            case Call.DELAY:
                await broker.requeue_async([arg[0]], delay=arg[1], count_delivery=False)
            case Call.FOLLOW:
                assert follow is not None
                result = await asyncio.get_running_loop().run_in_executor(io, follow.plan, arg)
            case Call.FIRED:
                assert follow is not None
                await asyncio.get_running_loop().run_in_executor(io, follow.fired, arg)
