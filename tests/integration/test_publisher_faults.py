"""Producers while their RabbitMQ node dies: every send that returned is stored, every other raised.

The producer side of "a task whose send returned has been confirmed by the broker and is on disk".
Producers send with publisher confirms (the default) to a durable classic queue (the default):
single `delay` calls from threads, `map` batches, and `delay_async` from an asyncio loop, while
the node is killed with SIGKILL (or stopped) mid-stream and started again on the same data. Then
the queue is read without a worker and compared with what the producers recorded:

- every send that returned is in the queue, under the task id it returned (zero lost);
- a send that raised may be there or not (the broker may have stored it before its confirm was
  lost with the connection): counted as "raised but present anyway";
- nothing is in the queue that was never sent, and nothing twice;
- every send returned or raised, and promptly: one under way when the node died raised as soon
  as its connection was gone, not after a confirm timeout, and none came near conveyor's own
  call timeout (a hang);
- every error was a `BrokerError` whose text does not show the password of the URL.

These tests break their broker, so they run against a private node (see `rabbit_node`), started
once for the module, never against the shared server on port 5672.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import itertools
import logging
import secrets
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import aiormq
import pytest
from rabbit_node import RabbitNode, private_node

from conveyor import Conveyor, Task
from conveyor.brokers.rabbitmq import CALL_TIMEOUT_S, RabbitMQBroker
from conveyor.errors import BrokerError
from conveyor.message import Envelope, decode

pytestmark = pytest.mark.integration

Poll = Callable[..., Any]
USER = "producer"
PASSWORD = f"pw-{secrets.token_hex(12)}"
# No send may take longer than conveyor's own call timeout (and a little scheduling slack).
SEND_BOUND_S = CALL_TIMEOUT_S + 5
# A send under way when the node dies ends with its connection: well within the 30 s a confirm
# may take, which is what a send that missed the connection's end would wait.
PROMPT_S = 10.0
# While the node is down nothing listens on its port: a send fails at once, not after a timeout.
DOWN_BOUND_S = 5.0
# After a send that raised, so producers do not spin while the node is down.
PACE_S = 0.05
DELAY_THREADS = 2
ASYNC_SENDERS = 4
BATCH = 20
# Sends each kind of producer completes before the fault, and again after the restart.
STREAM = 30
KINDS = ("delay", "map", "delay_async")


@pytest.fixture(scope="module")
def node() -> Iterator[RabbitNode]:
    with private_node() as started:
        # A user with a password of its own, so every error text can be searched for it.
        started.ctl("add_user", USER, PASSWORD)
        started.ctl("set_permissions", "-p", "/", USER, ".*", ".*", ".*")
        yield started


@pytest.fixture
def queue() -> str:
    return f"faults-{uuid.uuid4().hex[:10]}"  # the node, queues and all, goes with the module


def producer_app(node: RabbitNode, queue: str) -> tuple[Conveyor, Task[[str], str]]:
    """An app on the private node, as the producing user, whose task takes a unique label.

    Its connections carry the queue's name as their connection name, so they can be counted.
    """
    url = f"amqp://{USER}:{PASSWORD}@127.0.0.1:{node.port}/?name={queue}"
    app = Conveyor("faults", broker=url, default_queue=queue)

    @app.task(name="faults.record")
    def record(label: str) -> str:
        return label

    return app, record


def connections(node: RabbitNode, queue: str) -> int:
    """Open connections of the app sending to `queue` (see `producer_app`)."""
    out = node.ctl("list_connections", "--silent", "--no-table-headers", "client_properties")
    return sum(f'{{"connection_name","{queue}"}}' in line for line in out.splitlines())


def close(app: Conveyor) -> None:
    """Close the app; anything it left pending would surface here, in the test that made it."""
    app.close()
    gc.collect()


def shows_password(exc: BaseException) -> bool:
    """True when the password is anywhere a user would see: message, repr or traceback."""
    text = f"{exc} {exc!r} {''.join(traceback.format_exception(exc))}"
    return PASSWORD in text


class Ledger:
    """What one kind of producer's sends did, keyed by the label each task carries."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.returned: dict[str, str] = {}  # label -> the task id the send returned
        self.raised: dict[str, BaseException] = {}  # label -> what the send raised
        self.slowest = 0.0
        self._under_way: dict[int, float] = {}  # send -> when it began
        self._numbers = itertools.count()
        self._lock = threading.Lock()

    def begin(self) -> int:
        with self._lock:
            send = next(self._numbers)
            self._under_way[send] = time.monotonic()
            return send

    def end(self, send: int, returned: dict[str, str]) -> None:
        with self._lock:
            self.slowest = max(self.slowest, time.monotonic() - self._under_way.pop(send))
            self.returned.update(returned)

    def fail(self, send: int, labels: list[str], exc: BaseException) -> None:
        with self._lock:
            self.slowest = max(self.slowest, time.monotonic() - self._under_way.pop(send))
            self.raised.update(dict.fromkeys(labels, exc))

    def calls(self) -> tuple[int, int]:
        """Tasks returned and raised so far."""
        with self._lock:
            return len(self.returned), len(self.raised)

    def longest_under_way(self) -> float:
        """Seconds the oldest send still under way has taken so far (0 when none is)."""
        with self._lock:
            began = min(self._under_way.values(), default=None)
        return 0.0 if began is None else time.monotonic() - began


class Producers:
    """`delay` from threads, `map` batches from a thread, `delay_async` from an asyncio loop,
    all on one app, as in one producing process, until told to stop."""

    def __init__(self, record: Task[[str], str]) -> None:
        self.record = record
        self.ledgers = {kind: Ledger(kind) for kind in KINDS}
        self.enough = threading.Event()
        self.threads = [
            *(
                threading.Thread(target=self._delays, args=(f"d{n}",), daemon=True)
                for n in range(DELAY_THREADS)
            ),
            threading.Thread(target=self._maps, daemon=True),
            threading.Thread(target=lambda: asyncio.run(self._async_delays()), daemon=True),
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        """Stop sending; every send under way must end within the bound."""
        self.enough.set()
        deadline = time.monotonic() + SEND_BOUND_S
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self.threads), (
            f"a send neither returned nor raised within {SEND_BOUND_S:.0f}s: {self.summary()}"
        )

    def _delays(self, prefix: str) -> None:
        ledger = self.ledgers["delay"]
        for n in itertools.count():
            if self.enough.is_set():
                return
            label = f"{prefix}-{n}"
            send = ledger.begin()
            try:
                result = self.record.delay(label)
            except Exception as exc:
                ledger.fail(send, [label], exc)
                time.sleep(PACE_S)
            else:
                ledger.end(send, {label: result.id})

    def _maps(self) -> None:
        ledger = self.ledgers["map"]
        for n in itertools.count():
            if self.enough.is_set():
                return
            labels = [f"m{n}-{k}" for k in range(BATCH)]
            send = ledger.begin()
            try:
                results = self.record.map([(label,) for label in labels])
            except Exception as exc:
                ledger.fail(send, labels, exc)
                time.sleep(PACE_S)
            else:
                ledger.end(send, {label: r.id for label, r in zip(labels, results, strict=True)})

    async def _async_delays(self) -> None:
        ledger = self.ledgers["delay_async"]

        async def sender(prefix: str) -> None:
            for n in itertools.count():
                if self.enough.is_set():
                    return
                label = f"{prefix}-{n}"
                send = ledger.begin()
                try:
                    result = await self.record.delay_async(label)
                except Exception as exc:
                    ledger.fail(send, [label], exc)
                    await asyncio.sleep(PACE_S)
                else:
                    ledger.end(send, {label: result.id})

        await asyncio.gather(*(sender(f"a{n}") for n in range(ASYNC_SENDERS)))

    def calls(self) -> dict[str, tuple[int, int]]:
        return {kind: ledger.calls() for kind, ledger in self.ledgers.items()}

    def each(
        self, since: dict[str, tuple[int, int]], *, returned: int = 0, raised: int = 0
    ) -> bool:
        """True once every kind returned and raised at least that many more tasks than `since`."""
        now = self.calls()
        return all(
            now[k][0] >= since[k][0] + returned and now[k][1] >= since[k][1] + raised for k in KINDS
        )

    def summary(self) -> str:
        parts = []
        for kind, ledger in self.ledgers.items():
            done, failed = ledger.calls()
            parts.append(
                f"{kind}: {done} returned, {failed} raised, slowest {ledger.slowest:.2f}s, "
                f"oldest under way {ledger.longest_under_way():.1f}s"
            )
        return "; ".join(parts)


def read_queue(url: str, queue: str) -> list[Envelope]:
    """Take every message out of `queue` (acknowledged on delivery), without a worker."""

    async def read() -> list[bytes]:
        connection = await aiormq.connect(url)
        try:
            channel = await connection.channel()
            declared = await channel.queue_declare(queue, passive=True)
            expected = int(declared.message_count or 0)
            bodies: list[bytes] = []
            complete = asyncio.Event()

            async def take(message: aiormq.abc.DeliveredMessage) -> None:
                bodies.append(message.body)
                if len(bodies) >= expected:
                    complete.set()

            if expected:
                await channel.basic_consume(queue, take, no_ack=True)
                await asyncio.wait_for(complete.wait(), 60)
            left = await channel.queue_declare(queue, passive=True)
            assert not left.message_count, "the queue is empty once read"
            return bodies
        finally:
            await connection.close()

    return [decode(body) for body in asyncio.run(read())]


def check_queue(node: RabbitNode, queue: str, producers: Producers, how: str) -> str:
    """Compare the queue with the producers' ledgers; the one-line account of the run."""
    envelopes = read_queue(node.url, queue)
    present = collections.Counter(str(e.args[0]) for e in envelopes)
    ids = {str(e.args[0]): e.id for e in envelopes}
    returned: dict[str, str] = {}
    raised: dict[str, BaseException] = {}
    for ledger in producers.ledgers.values():
        returned.update(ledger.returned)
        raised.update(ledger.raised)
    lost = sorted(set(returned) - set(present))
    wrong_id = sorted(label for label, id_ in returned.items() if ids.get(label, id_) != id_)
    never_sent = sorted(set(present) - set(returned) - set(raised))
    twice = sorted(label for label, count in present.items() if count > 1)
    anyway = set(raised) & set(present)
    by_type: collections.Counter[str] = collections.Counter()
    anyway_by_type: collections.Counter[str] = collections.Counter()
    for label, exc in raised.items():
        by_type[type(exc).__name__] += 1
        anyway_by_type[type(exc).__name__] += label in anyway
    raised_text = ", ".join(
        f"{kind} {count:,} ({anyway_by_type[kind]} present)" for kind, count in by_type.items()
    )
    account = (
        f"publisher faults ({how}): {len(returned):,} returned, {len(lost)} lost, "
        f"{len(raised):,} raised ({len(anyway)} present anyway); {len(envelopes):,} in the "
        f"queue, {len(never_sent)} never sent, {len(twice)} twice; raised: {raised_text}"
    )
    print(f"\n{account}\n  {producers.summary()}")
    for text in sorted({f"{type(exc).__name__}: {exc}" for exc in raised.values()}):
        print(f"  {text}")
    assert not lost, f"sends that returned are missing ({lost[:5]}...): {account}"
    assert not wrong_id, f"stored under another task id ({wrong_id[:5]}...): {account}"
    assert not never_sent, f"in the queue but never sent ({never_sent[:5]}...): {account}"
    assert not twice, f"stored twice ({twice[:5]}...): {account}"
    unexpected = [exc for exc in raised.values() if not isinstance(exc, BrokerError)]
    assert not unexpected, f"a send raised {unexpected[0]!r}, not a BrokerError: {account}"
    assert not any(shows_password(exc) for exc in raised.values()), "an error shows the password"
    slowest = max(ledger.slowest for ledger in producers.ledgers.values())
    assert slowest <= PROMPT_S, f"a send took {slowest:.1f}s to return or raise: {account}"
    return account


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["kill", "stop"])
def test_every_send_that_returned_is_stored_when_the_node_dies_mid_stream(
    node: RabbitNode, queue: str, poll: Poll, how: str
) -> None:
    app, record = producer_app(node, queue)
    producers = Producers(record)
    try:
        producers.start()
        poll(
            lambda: producers.each(dict.fromkeys(KINDS, (0, 0)), returned=STREAM),
            timeout=30,
            what=f"{STREAM} sends of each kind returned",
        )
        before = producers.calls()
        if how == "kill":
            node.kill()  # a crash: the socket dies under sends and confirms under way
        else:
            node.stop()  # a clean shutdown: the node closes the connection first
        poll(
            lambda: producers.each(before, raised=1),
            timeout=DOWN_BOUND_S + SEND_BOUND_S,
            what=f"every kind of producer seeing the node down ({producers.summary()})",
        )
        down = producers.calls()
        restarted_in = node.start()
        poll(
            lambda: producers.each(down, returned=STREAM),
            timeout=30,
            what=f"{STREAM} sends of each kind returned after the restart ({producers.summary()})",
        )
        producers.stop()
        opened = connections(node, queue)
    finally:
        producers.enough.set()
        close(app)
    check_queue(node, queue, producers, how)
    print(f"  the node was back in {restarted_in:.1f}s; the app had {opened} connections open")


def each_way(record: Task[[str], str], prefix: str) -> dict[str, Callable[[], dict[str, str]]]:
    """One send of each kind, labelled `prefix-kind`; each returns {label: task id}."""

    def one() -> dict[str, str]:
        label = f"{prefix}-delay"
        return {label: record.delay(label).id}

    def batch() -> dict[str, str]:
        labels = [f"{prefix}-map-{k}" for k in range(3)]
        results = record.map([(label,) for label in labels])
        return {label: r.id for label, r in zip(labels, results, strict=True)}

    def awaited() -> dict[str, str]:
        label = f"{prefix}-delay_async"
        return {label: asyncio.run(record.delay_async(label)).id}

    return {"delay": one, "map": batch, "delay_async": awaited}


@pytest.mark.timeout(120)
def test_a_send_while_the_node_is_down_raises_at_once_and_sends_work_again_once_it_is_back(
    node: RabbitNode, queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    app, record = producer_app(node, queue)
    returned: dict[str, str] = {}
    refused: list[tuple[str, BrokerError, float]] = []
    try:
        returned["before"] = record.delay("before").id
        node.kill()
        for round_ in range(2):
            for kind, send in each_way(record, f"down{round_}").items():
                began = time.monotonic()
                with pytest.raises(BrokerError) as caught:
                    send()
                refused.append((kind, caught.value, time.monotonic() - began))
        restarted_in = node.start()
        first_after: list[float] = []
        for send in each_way(record, "up").values():
            began = time.monotonic()
            returned.update(send())  # at the first try: the app reconnects by itself
            first_after.append(time.monotonic() - began)
    finally:
        close(app)
    envelopes = read_queue(node.url, queue)
    present = {str(e.args[0]): e.id for e in envelopes}
    account = (
        f"publisher faults (down): {len(refused)} sends refused while the node was down "
        f"(slowest {max(t for _, _, t in refused):.3f}s); back in {restarted_in:.1f}s, then "
        f"{len(returned)} returned (the first in {first_after[0]:.2f}s); "
        f"{len(envelopes)} in the queue"
    )
    print(f"\n{account}")
    for kind, exc, _ in refused:
        print(f"  {kind}: {type(exc).__name__}: {exc}")
    for kind, exc, took in refused:
        assert took <= DOWN_BOUND_S, f"{kind} took {took:.1f}s to fail: {account}"
        assert not shows_password(exc), f"{kind}: {exc!r} shows the password"
        assert "RabbitMQ" in str(exc), f"{kind}: {exc} does not say what failed"
    # The first send may meet the connection's end before the app read it; every later one
    # says which node it cannot reach, password masked.
    for kind, exc, _ in refused[1:]:
        assert f"{USER}:***@127.0.0.1:{node.port}" in str(exc), f"{kind}: {exc} says not where"
    logged = [f"{r.getMessage()} {r.args} {r.exc_text or ''}" for r in caplog.records]
    assert not [text for text in logged if PASSWORD in text], "a log record shows the password"
    assert present == returned, f"exactly the sends that returned are stored: {account}"


def closed(app: Conveyor) -> bool:
    """True once the app's broker has seen its connection close (nothing kept referenced)."""
    broker = app.broker
    assert isinstance(broker, RabbitMQBroker) and broker._connection is not None
    return broker._connection.is_closed


@pytest.mark.timeout(60)
def test_sends_under_way_together_share_one_new_connection(
    node: RabbitNode, queue: str, poll: Poll
) -> None:
    app, record = producer_app(node, queue)
    senders = 8

    async def together(prefix: str) -> None:
        await asyncio.gather(*(record.delay_async(f"{prefix}-{n}") for n in range(senders)))

    try:
        asyncio.run(together("first"))  # the app's first sends, all at once
        at_first = connections(node, queue)
        node.close_all_connections("publisher fault test")
        poll(lambda: closed(app), timeout=10, what="the app seeing its connection closed")
        asyncio.run(together("again"))  # all at once again, on a closed connection
        after_drop = connections(node, queue)
    finally:
        close(app)
    print(f"\nconnections of one app: {at_first} at first, {after_drop} after a drop")
    assert (at_first, after_drop) == (1, 1), (
        f"{senders} sends at once opened {at_first} connections, and {after_drop} after a drop"
    )
