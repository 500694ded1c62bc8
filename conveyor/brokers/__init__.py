"""Brokers carry messages between producers and workers. `from_url` picks one by URL scheme."""

from __future__ import annotations

from urllib.parse import urlsplit

from conveyor.brokers.base import Broker, DeadLetter, Delivery, Outgoing, QueueStats
from conveyor.errors import ConfigurationError
from conveyor.message import DEFAULT_MAX_SIZE
from conveyor.redact import redact_url

__all__ = ["Broker", "DeadLetter", "Delivery", "Outgoing", "QueueStats", "from_url"]


def from_url(
    url: str,
    *,
    visibility_timeout: float,
    max_priority: int | None = None,
    queue_type: str = "classic",
    delivery_limit: int = 30,
    max_message_size: int = DEFAULT_MAX_SIZE,
) -> Broker:
    """The broker for a URL: `sqlite:///file.db` (embedded), `amqp://` (RabbitMQ), `memory://`."""
    scheme = urlsplit(url).scheme
    if scheme in ("amqp", "amqps"):
        try:
            from conveyor.brokers.rabbitmq import RabbitMQBroker
        except ImportError:
            raise ConfigurationError(
                "the RabbitMQ broker needs aiormq: pip install 'conveyor[rabbitmq]'"
            ) from None
        return RabbitMQBroker(
            url, max_priority=max_priority, queue_type=queue_type, delivery_limit=delivery_limit
        )
    if scheme == "sqlite":
        from conveyor.brokers.sqlite import SQLiteBroker

        return SQLiteBroker(
            url, visibility_timeout=visibility_timeout, max_message_size=max_message_size
        )
    if scheme == "memory":
        from conveyor.brokers.memory import MemoryBroker

        return MemoryBroker(visibility_timeout=visibility_timeout)
    raise ConfigurationError(
        f"unsupported broker URL {redact_url(url)!r}: use sqlite:///path.db, "
        "amqp://user:pass@host:5672/ or memory://"
    )
