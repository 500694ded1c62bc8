"""Signed messages on real brokers: RabbitMQ (threads pool) and SQLite (prefork pool).

Both carry the signature inside the body, so delay queues, redeliveries and retries keep it; a
worker with a key runs what is signed with it and dead-letters the rest, and no rejected task
ever runs. RabbitMQ is expected on 127.0.0.1:5672 (guest/guest): without it the RabbitMQ case
skips locally and fails in CI. Each case uses queues of its own.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiormq
import pytest
from conftest import RABBITMQ_URL, delete_rabbitmq_queues, require_rabbitmq, run_bounded

from conveyor import Conveyor
from conveyor.brokers import Outgoing
from conveyor.brokers.rabbitmq import CONTENT_TYPE, SIGNED_CONTENT_TYPE
from conveyor.message import encode
from conveyor.settings import Secret
from conveyor.signing import PREFIX, Signer

pytestmark = pytest.mark.integration

KEY = "signing-key-Kq3v-Zt7w-0a9f-Xe5m"
OTHER_KEY = "someone-else-Mz4q-Ty1h-7k3e-Vu0a"


@pytest.fixture
def rabbitmq_queue() -> Iterator[str]:
    """A queue of this test's own on the local RabbitMQ, deleted afterwards."""
    require_rabbitmq()
    name = f"signing-{uuid.uuid4().hex[:10]}"
    yield name
    delete_rabbitmq_queues(name)


def _take_and_give_back(queue: str) -> tuple[str | None, bytes]:
    """The content type and body of the queue's first message, which is then nacked back (so
    RabbitMQ redelivers it, and conveyor republishes it to count that delivery)."""

    async def take() -> tuple[str | None, bytes]:
        connection = await aiormq.connect(RABBITMQ_URL)
        channel = await connection.channel()
        message = await channel.basic_get(queue)
        assert message.delivery_tag is not None, "the queue holds a message"
        await channel.basic_nack(message.delivery_tag, requeue=True)
        await connection.close()
        return message.header.properties.content_type, message.body

    return asyncio.run(take())


def _publish_raw(queue: str, bodies: list[tuple[bytes, str]]) -> None:
    """Messages put straight into a queue, as a program without the key might."""

    async def publish() -> None:
        connection = await aiormq.connect(RABBITMQ_URL)
        channel = await connection.channel(publisher_confirms=True)
        for body, content_type in bodies:
            properties = aiormq.spec.Basic.Properties(content_type=content_type, delivery_mode=2)
            await channel.basic_publish(body, routing_key=queue, properties=properties)
        await connection.close()

    asyncio.run(publish())


def test_rabbitmq_runs_signed_tasks_and_dead_letters_the_rest(rabbitmq_queue: str) -> None:
    queue = rabbitmq_queue
    app = Conveyor(
        "signed", broker=RABBITMQ_URL, results="memory://", default_queue=queue, signing_key=KEY
    )
    ran: list[Any] = []

    @app.task(name="signed.add")
    def add(x: int, y: int) -> int:
        ran.append((x, y))
        return x + y

    @app.task(name="signed.flaky", bind=True, max_retries=1)
    def flaky(self: Any) -> str:
        ran.append(f"flaky {self.request.retries}")
        if self.request.retries == 0:
            raise self.retry(countdown=0.3)  # through a RabbitMQ delay queue and back
        return "second try"

    try:
        good = add.delay(2, 3)
        content_type, body = _take_and_give_back(queue)
        assert content_type == SIGNED_CONTENT_TYPE and body.startswith(PREFIX)
        retried = flaky.delay()
        other = Signer(Secret(OTHER_KEY))
        _publish_raw(
            queue,
            [
                (encode(add.envelope((1, 1))), CONTENT_TYPE),
                (encode(add.envelope((1, 2)), signer=app.signer).replace(b"[1,2]", b"[9,9]"), ""),
                (encode(add.envelope((1, 3)), signer=other), SIGNED_CONTENT_TYPE),
            ],
        )
        stats = run_bounded(app, timeout=30)
        assert good.get(timeout=5) == 5 and retried.get(timeout=5) == "second try"
        assert sorted(map(str, ran)) == ["(2, 3)", "flaky 0", "flaky 1"], "nothing else ran"
        assert (stats.succeeded, stats.retried, stats.dead_lettered) == (2, 1, 3)
        reasons = sorted(d.reason.split(":")[0] for d in app.broker.dead_letters(queue))
        assert reasons == ["bad signature", "bad signature", "unsigned message"]
        (counts,) = app.broker.stats([queue])
        assert (counts.ready, counts.delayed, counts.dead) == (0, 0, 3)
    finally:
        app.close()


def test_sqlite_prefork_children_run_signed_tasks_only(tmp_path: Path) -> None:
    queue = "signed"
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    app = Conveyor("signed", broker=url, default_queue=queue, signing_key=KEY)
    marks = tmp_path / "ran"
    marks.mkdir()

    @app.task(name="signed.mark")
    def mark(name: str) -> int:
        (marks / name).touch()  # in a child process: a file is what the test can see
        return len(name)

    @app.task(name="signed.flaky", bind=True, max_retries=1)
    def flaky(self: Any) -> int:
        (marks / f"flaky-{self.request.retries}").touch()
        if self.request.retries == 0:
            raise self.retry(countdown=0)
        return self.request.retries

    try:
        good = mark.delay("good")
        retried = flaky.delay()
        other = Signer(Secret(OTHER_KEY))
        tampered = encode(mark.envelope(("tampered",)), signer=app.signer)
        app.broker.publish(
            [
                Outgoing(queue, encode(mark.envelope(("unsigned",)))),
                Outgoing(queue, tampered.replace(b"tampered", b"tampered!")),
                Outgoing(queue, encode(mark.envelope(("other-key",)), signer=other)),
            ]
        )
        stats = run_bounded(app, pool="prefork", concurrency=2, timeout=60)
        assert good.get(timeout=5) == 4 and retried.get(timeout=5) == 1
        assert sorted(p.name for p in marks.iterdir()) == ["flaky-0", "flaky-1", "good"]
        assert (stats.succeeded, stats.retried, stats.dead_lettered, stats.lost) == (2, 1, 3, 0)
        dead = app.broker.dead_letters(queue)
        reasons = sorted(d.reason.split(":")[0] for d in dead)
        assert reasons == ["bad signature", "bad signature", "unsigned message"]
    finally:
        app.close()
