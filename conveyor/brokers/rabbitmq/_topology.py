"""What conveyor declares on RabbitMQ for a queue `Q`, and the names it goes by.

The exchanges `conveyor` and `conveyor.dead`; `Q` and `Q.dead` bound to them with routing key
`Q`; one delay queue `Q.delay.<ms>` per bucket of `BUCKETS_MS`, whose messages expire back to
`Q` (the package docstring says why). A queue that exists with other arguments is reported with
the one that differs and the setting that fixes it, never redeclared; the one exception is
`x-max-priority` when `queue_max_priority` is unset, where conveyor takes the queue's own
(`existing_priority`), so that queues declared with priorities by an earlier default keep them.
"""

from __future__ import annotations

import re
from typing import Any

import aiormq
import aiormq.abc

from conveyor.errors import ConfigurationError
from conveyor.redact import redact_text

EXCHANGE = "conveyor"
DEAD_EXCHANGE = "conveyor.dead"
# Delay buckets in milliseconds: 250 ms doubling to about 36 hours.
BUCKETS_MS: tuple[int, ...] = tuple(250 << k for k in range(20))
QUEUE_TYPES = ("classic", "quorum")


def dead_queue(queue: str) -> str:
    """The queue holding `queue`'s dead letters."""
    return f"{queue}.dead"


def delay_queue(queue: str, ms: int) -> str:
    """The queue that holds messages for `queue` for `ms` milliseconds (a bucket)."""
    return f"{queue}.delay.{ms}"


def bucket(delay: float) -> int:
    """The longest delay bucket not longer than `delay` (the shortest, for shorter delays)."""
    ms = delay * 1000
    fitting = [b for b in BUCKETS_MS if b <= ms]
    return fitting[-1] if fitting else BUCKETS_MS[0]


def queue_arguments(queue_type: str, max_priority: int, delivery_limit: int) -> dict[str, Any]:
    """The arguments conveyor declares a queue with."""
    arguments: dict[str, Any] = {"x-dead-letter-exchange": DEAD_EXCHANGE}
    if queue_type == "quorum":
        # RabbitMQ's own limit is a backstop one past the worker's, which dead-letters
        # with a reason first.
        arguments["x-queue-type"] = "quorum"
        arguments["x-delivery-limit"] = delivery_limit + 1
    elif max_priority:
        arguments["x-max-priority"] = max_priority
    return arguments


async def existing_priority(
    connection: aiormq.abc.AbstractConnection, queue: str, delivery_limit: int
) -> int:
    """The `x-max-priority` of a classic `queue`, declaring it without one if it is new.

    AMQP has no call that reads a queue's arguments, but RabbitMQ names the current value when a
    declaration differs from it. The declaration goes on a channel of its own, since a refused
    one closes its channel, and the connection's channel may hold deliveries and consumers.
    """
    arguments = queue_arguments("classic", 0, delivery_limit)
    channel = await connection.channel()
    try:
        await channel.queue_declare(queue, durable=True, arguments=arguments)
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        # "inequivalent arg 'x-max-priority' for queue 'q' in vhost '/': received none but
        # current is the value '9' of type 'byte'"
        found = re.search(r"arg 'x-max-priority'.*received none but current is (.+)", str(exc))
        current = _value(found.group(1)) if found else ""
        if not current.isdigit():
            raise ConfigurationError(mismatch(queue, exc, arguments)) from None
        return int(current)
    finally:
        if not channel.is_closed:
            await channel.close()
    return 0


async def declare(
    channel: aiormq.abc.AbstractChannel,
    queue: str,
    *,
    queue_type: str,
    max_priority: int,
    delivery_limit: int,
) -> None:
    """Declare `queue`, its dead-letter queue and its delay queues, and the exchanges."""
    await channel.exchange_declare(EXCHANGE, exchange_type="direct", durable=True)
    await channel.exchange_declare(DEAD_EXCHANGE, exchange_type="direct", durable=True)
    arguments = queue_arguments(queue_type, max_priority, delivery_limit)
    dead_arguments: dict[str, Any] = {}
    if queue_type == "quorum":
        dead_arguments["x-queue-type"] = "quorum"
    try:
        await channel.queue_declare(queue, durable=True, arguments=arguments)
        await channel.queue_declare(dead_queue(queue), durable=True, arguments=dead_arguments)
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        raise ConfigurationError(mismatch(queue, exc, arguments)) from None
    await channel.queue_bind(queue, EXCHANGE, routing_key=queue)
    await channel.queue_bind(dead_queue(queue), DEAD_EXCHANGE, routing_key=queue)
    for ms in BUCKETS_MS:
        await channel.queue_declare(
            delay_queue(queue, ms),
            durable=True,
            arguments={
                "x-message-ttl": ms,
                "x-dead-letter-exchange": EXCHANGE,
                "x-dead-letter-routing-key": queue,
            },
        )


def mismatch(queue: str, exc: BaseException, wanted: dict[str, Any]) -> str:
    """Say which queue argument differs from what exists, and how to fix it."""
    text = redact_text(str(exc))
    # RabbitMQ says e.g. "inequivalent arg 'x-max-priority' for queue 'q' in vhost '/':
    # received '9' but current is '3'" (or "the value '9' of type 'byte'", or "none")
    match = re.search(r"inequivalent arg '([^']+)'.*received (.+) but current is (.+)", text)
    if match is None:
        what = f"different arguments ({text})"
    else:
        name, received, current = match.groups()
        what = f"{name} {_value(current)} where conveyor asks for {_value(received)}"
    hint = {
        "x-max-priority": "set queue_max_priority (CONVEYOR_QUEUE_MAX_PRIORITY) to match or "
        "unset it (conveyor then takes the queue's own)",
        "x-queue-type": "set queue_type (CONVEYOR_QUEUE_TYPE) to match",
        "x-delivery-limit": "it is 10 x poison_limit + 1: set poison_limit (CONVEYOR_POISON_LIMIT) "
        "to match",
    }.get(match.group(1) if match else "", "configure conveyor to match it")
    return (
        f"RabbitMQ queue {queue!r} exists with {what}: {hint}, or delete the queue "
        f"(and its messages) so conveyor declares it with {_arguments(wanted)}"
    )


def _value(text: str) -> str:
    """`'9'` or `the value '9' of type 'byte'` as `9`, and `none` as `not set`."""
    found = re.match(r"(?:the value )?'([^']*)'", text.strip())
    return found.group(1) if found else "not set"


def _arguments(arguments: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(arguments.items()))
