"""RabbitMQ (AMQP 0-9-1) through aiormq: durable queues, publisher confirms, broker-held delays.

Topology for a conveyor queue `Q`, declared once per process on first use:

- `Q`, durable, bound to the durable direct exchange `conveyor`, with `x-max-priority`;
- `Q.dead`, bound to the exchange `conveyor.dead`: dead letters, each with its reason in the
  `x-conveyor-reason` header;
- `Q.delay.<ms>`, one per delay bucket, whose messages expire after `<ms>` and are dead-lettered
  back to `conveyor` with routing key `Q`. A delay goes to the longest bucket that fits; a message
  that arrives early is delayed again by the worker for the rest. Workers hold nothing in memory,
  so a two-hour ETA never meets the consumer acknowledgement timeout.

Every publish is persistent and mandatory and waits for the broker's confirm; a nack, a return
(no route) or a timeout raises `PublishError`. Calls are synchronous for any thread: they run on
the broker's own event-loop thread, which owns the connection, except a blocking send from any
other thread, which once the connection is open writes its frames to the socket itself, on a
channel of its own (`_direct`), and waits for the confirms that loop reads. A forked child
never touches the connection.

RabbitMQ marks a message redelivered but does not count deliveries on classic queues, so a
redelivered message is published again with the `x-conveyor-deliveries` header one higher
before it is handed out. Runs a worker saw die (`Delivery.lost`, which the poison limit reads)
are counted in `x-conveyor-lost`: a message given back after such a run is published again
with that header one higher, never nacked, since a nack could not carry the count.

The parts: `_broker` (`RabbitMQBroker`: its calls, consuming and settling), `_bridge` (the
event loop the connection lives on, and how calls from any thread reach it), `_topology` (what
is declared, and the names it goes by), `_confirms` (publishing with confirms), `_direct`
(blocking sends written by the calling thread), `_aiormq` (every use of aiormq's internals,
in one file checked against one aiormq version) and
`_pamqp_text` (pamqp decoding text that is not UTF-8).
"""

# First: it imports aiormq without importlib.metadata (see its docstring).
from conveyor.brokers.rabbitmq import _aiormq  # noqa: F401
from conveyor.brokers.rabbitmq._broker import (
    CALL_TIMEOUT_S,
    CONTENT_TYPE,
    DELIVERIES,
    DIED_AT,
    LOST,
    MAX_COUNT,
    REASON,
    REPLY_TO,
    REQUEUE_BATCH,
    SIGNED_CONTENT_TYPE,
    RabbitMQBroker,
)
from conveyor.brokers.rabbitmq._confirms import CHUNK, CONFIRM_TIMEOUT_S, WINDOW
from conveyor.brokers.rabbitmq._topology import BUCKETS_MS, DEAD_EXCHANGE, EXCHANGE, QUEUE_TYPES

__all__ = [
    "BUCKETS_MS",
    "CALL_TIMEOUT_S",
    "CHUNK",
    "CONFIRM_TIMEOUT_S",
    "CONTENT_TYPE",
    "DEAD_EXCHANGE",
    "DELIVERIES",
    "DIED_AT",
    "EXCHANGE",
    "LOST",
    "MAX_COUNT",
    "QUEUE_TYPES",
    "REASON",
    "REPLY_TO",
    "REQUEUE_BATCH",
    "SIGNED_CONTENT_TYPE",
    "WINDOW",
    "RabbitMQBroker",
]
