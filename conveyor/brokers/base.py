"""The broker interface: the few primitives a transport implements.

A broker moves opaque bodies between named queues. Everything above these primitives (envelopes,
retries, poison handling, dead-letter decisions) is shared code in `conveyor.worker`.

Consumer-side calls are blocking and made from one worker thread; `publish` may be called from any
thread of any process. A broker is fork-safe: a child process never uses its parent's connections.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from conveyor.errors import ConfigurationError
from conveyor.reasons import DeadLetterReason

if TYPE_CHECKING:
    from conveyor.brokers.broadcast import Broadcast

#: Everything of conveyor's that connects somewhere (brokers, result stores), in this process.
_connecting: weakref.WeakSet[Any] = weakref.WeakSet()


def connects(owner: Any) -> None:
    """Note that `owner` (with an `endpoints` attribute) opens connections of conveyor's own."""
    _connecting.add(owner)


def own_endpoints() -> set[tuple[str, int]]:
    """The (host, port) pairs conveyor's brokers and stores in this process connect to."""
    return {endpoint for owner in list(_connecting) for endpoint in owner.endpoints}


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A body to publish. `deliver_at` (epoch seconds) holds it in the broker until then."""

    queue: str
    body: bytes
    priority: int = 0
    deliver_at: float | None = None
    reply_to: str | None = None
    """Where the task's result records go (RPC results over RabbitMQ's direct reply-to)."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """A body leased to this consumer until it is acked, requeued or dead-lettered.

    `receipt` is the broker's own handle for settling it; `delivery_count` is 1 the first time a
    message is handed out and grows each time it comes back without having been settled. `lost`
    counts only the runs of it that a worker saw start and not finish (its prefork child died,
    or a shutdown gave it up): a message a dead worker merely held comes back with `lost`
    unchanged.
    """

    queue: str
    body: bytes
    receipt: Any
    delivery_count: int = 1
    reply_to: str | None = None
    lost: int = 0
    #: The broker's priority of the message, where the broker says (RabbitMQ), for copies of it.
    priority: int = 0

    @property
    def redelivered(self) -> bool:
        """True when an earlier delivery of this message ended without being settled."""
        return self.delivery_count > 1


@dataclass(frozen=True, slots=True)
class QueueStats:
    """How many messages a queue holds, by where they are."""

    queue: str
    ready: int
    delayed: int
    in_flight: int
    dead: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message taken out of circulation, with the reason."""

    queue: str
    body: bytes
    reason: str
    delivery_count: int
    died_at: float
    #: The message's priority, which a requeue keeps (0 where the broker did not record one).
    priority: int = 0

    @property
    def category(self) -> DeadLetterReason | None:
        """The fixed category the reason starts with (None if conveyor did not write it)."""
        return DeadLetterReason.of(self.reason)


class Broker(abc.ABC):
    """What every transport provides."""

    #: The URL with any password masked, safe to print.
    display_url: str = ""
    #: True when consumer-side calls are short local operations (an embedded database, memory)
    #: that the worker may make on its event loop instead of handing them to an I/O thread.
    local: bool = False
    #: Seconds a delivery may stay unacknowledged before the broker takes it back by itself
    #: (RabbitMQ's consumer timeout), or None when the worker keeps leases alive.
    ack_timeout: float | None = None
    #: (host, port) pairs this broker connects to: sockets to them are conveyor's own, not the
    #: user's (the prefork pool warns about user connections its children would inherit).
    endpoints: frozenset[tuple[str, int]] = frozenset()
    #: Messages this broker dead-lettered as they arrived, before a worker saw them: a content
    #: type or header no worker reads, a body over the size limit. Workers add them to their
    #: counts of dead letters.
    refused: int = 0

    # producer side

    @abc.abstractmethod
    def publish(self, messages: Sequence[Outgoing]) -> None:
        """Store messages durably; return only once the broker has accepted all of them."""

    async def publish_async(self, messages: Sequence[Outgoing]) -> None:
        """`publish` for asyncio producers."""
        await asyncio.to_thread(self.publish, messages)

    # consumer side

    @abc.abstractmethod
    def fetch(self, queues: Sequence[str], limit: int) -> list[Delivery]:
        """Lease up to `limit` ready messages, highest priority first; never blocks long."""

    @abc.abstractmethod
    def ack(self, deliveries: Sequence[Delivery]) -> int:
        """Remove settled messages. Returns how many were still leased to us."""

    @abc.abstractmethod
    def requeue(
        self, deliveries: Sequence[Delivery], *, delay: float = 0.0, count_delivery: bool = True
    ) -> None:
        """Give messages back, visible again after `delay` seconds.

        By default the delivery was a run that did not finish: it counts as a delivery and as a
        lost run (`Delivery.lost`, which the poison limit reads). With `count_delivery=False` it
        counts as neither (a worker releases messages it never started, or delays one again).
        """

    @abc.abstractmethod
    def dead_letter(self, items: Sequence[tuple[Delivery, str]]) -> None:
        """Move messages out of circulation, each with the reason."""

    def batch(self) -> contextlib.AbstractContextManager[object]:
        """Make the consumer-side calls inside one transaction where the transport can.

        The worker settles a round of outcomes and fetches the next messages inside one batch.
        """
        return contextlib.nullcontext()

    def on_arrival(self, callback: Callable[[], None]) -> None:  # noqa: B027
        """Call `callback`, from any thread, when new messages may be ready to fetch.

        Brokers that push messages (RabbitMQ) use it so an idle worker need not poll; brokers
        that are polled (SQLite, memory) ignore it.
        """

    def reserve(self, slots: int, most: int | None = None) -> None:  # noqa: B027
        """The consumer can start at most `slots` messages at once: a broker that pushes
        messages (RabbitMQ) never holds more than that unacknowledged. Called again when that
        changes (at most `most`). Default: nothing to do."""

    def extend(self, deliveries: Sequence[Delivery], seconds: float) -> None:  # noqa: B027
        """Keep leases of running messages alive for another `seconds`. Default: nothing to do."""

    # on the worker's event loop

    def attach(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Make the consumer-side calls coroutines on `loop`, the worker's, if the transport can.

        A broker that talks asyncio anyway (RabbitMQ) then runs its connection on the worker's
        loop: the `*_async` calls below are awaited there with no thread in between. Returns
        False for brokers that cannot (their blocking calls then go through a thread).
        """
        return False

    async def detach(self) -> None:  # noqa: B027
        """Undo `attach`: the worker's loop is about to end."""

    async def fetch_async(self, queues: Sequence[str], limit: int) -> list[Delivery]:
        """`fetch` on the attached loop."""
        return self.fetch(queues, limit)

    async def ack_async(self, deliveries: Sequence[Delivery]) -> int:
        """`ack` on the attached loop."""
        return self.ack(deliveries)

    def ack_nowait(self, deliveries: Sequence[Delivery]) -> int:
        """`ack` on the attached loop's own thread, without waiting (frames queued at once)."""
        return self.ack(deliveries)

    def take_nowait(self, limit: int) -> list[Delivery] | None:
        """On the attached loop's thread: up to `limit` deliveries already pushed by the broker,
        while consuming is under way; None when it is not (a round must start it again)."""
        return None

    async def requeue_async(
        self, deliveries: Sequence[Delivery], *, delay: float = 0.0, count_delivery: bool = True
    ) -> None:
        """`requeue` on the attached loop."""
        self.requeue(deliveries, delay=delay, count_delivery=count_delivery)

    async def dead_letter_async(self, items: Sequence[tuple[Delivery, str]]) -> None:
        """`dead_letter` on the attached loop."""
        self.dead_letter(items)

    async def stats_async(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        """`stats` on the attached loop."""
        return self.stats(queues)

    async def round_trip_async(self) -> float | None:
        """Seconds one request to the broker and its answer take, timed on the attached loop,
        or None when there is nothing to time (an embedded broker, or nothing consumed yet)."""
        return None

    # administration

    @abc.abstractmethod
    def stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        """Counts for the given queues, or for every queue the broker knows."""

    @abc.abstractmethod
    def purge(self, queue: str, *, dead: bool = False) -> int:
        """Delete every ready and delayed message of a queue (or its dead letters); the count."""

    @abc.abstractmethod
    def dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        """The most recent dead letters of a queue, newest first."""

    @abc.abstractmethod
    def requeue_dead(
        self,
        queue: str,
        select: Callable[[DeadLetter], bool] | None = None,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Send the dead letters of `queue` that `select` accepts (all, without it) back to
        `queue` to run again; returns how many went back.

        Each goes back as a fresh message with its body and priority: delivery count 1, no lost
        runs, so the poison limit starts over. None is lost: a dead letter leaves the dead
        letters only once its copy is stored in the queue (a crash in between can leave it in
        both). `progress(n)` is called as each batch of `n` has gone back.
        """

    @abc.abstractmethod
    def exists(self, queue: str) -> bool:
        """True when the broker holds the queue: messages or dead letters of it in an embedded
        broker, the queue itself on a server. Creates nothing."""

    def on_reply(self, callback: Callable[[bytes], None]) -> str:
        """Receive replies to messages sent with the returned `reply_to` address, calling
        `callback(body)` for each (RPC results). Only RabbitMQ can."""
        raise ConfigurationError(
            "rpc:// results travel over RabbitMQ's direct reply-to: use an amqp:// broker"
        )

    def reply(self, replies: Sequence[tuple[str, bytes]]) -> None:
        """Send each body to a `reply_to` address; one whose receiver is gone is dropped."""
        raise ConfigurationError(
            "rpc:// results travel over RabbitMQ's direct reply-to: use an amqp:// broker"
        )

    def broadcast(self) -> Broadcast:
        """A new handle on this broker's broadcast channels (events, control requests and
        replies, the roster of workers): see `conveyor.brokers.broadcast`. Its owner closes it."""
        raise ConfigurationError(f"{type(self).__name__} has no broadcast channels")

    def held(self) -> list[Delivery]:
        """Deliveries the broker pushed to this consumer that no job has taken yet (RabbitMQ's
        prefetch): what `conveyor inspect` lists as reserved. Default: none."""
        return []

    def close(self) -> None:  # noqa: B027
        """Release connections held by this process."""
