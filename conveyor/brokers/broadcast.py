"""Broadcast: the broker-level channels workers and tools talk over, beside the task queues.

Three primitives, which each broker implements once (`Broker.broadcast()`):

- a *channel* carries bodies from any number of publishers to every listener that is listening
  when a body is published (no history, no acknowledgement: events and control requests);
- a *private* listener has an address that one peer sends to (the replies to a request);
- a *roster* keeps, per member, the newest body it registered until its lease runs out (which
  workers exist, so that one that is known and does not answer can be named).

Every listener is bounded: it holds at most `limit` bodies, and what comes when it is full is
dropped (the oldest first) and counted, so a reader that never reads costs a fixed amount.
Delivery is best effort: nothing here is durable, and nothing a broker carries for tasks waits
on it. On RabbitMQ a broadcast has a connection of its own; on SQLite it uses the broker's file.
"""

from __future__ import annotations

import abc
import collections
import threading
import time
from collections.abc import Sequence

#: Bodies a listener holds by default before it drops the oldest.
LISTEN_LIMIT = 1000


class Listener(abc.ABC):
    """Bodies published to one channel (or sent to one address) since the listener was made."""

    #: Where peers send to reach a private listener (`Broadcast.listen_private`).
    address: str = ""

    @property
    def dropped(self) -> int:
        """Bodies dropped because the listener was full (not those a broker dropped itself)."""
        return 0

    @abc.abstractmethod
    def read(self, timeout: float) -> list[bytes]:
        """What arrived, oldest first; waits up to `timeout` seconds for the first body.

        Raises `BrokerError` when the listener can no longer receive (its connection closed).
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Stop listening and let the broker drop what waits (idempotent)."""

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Broadcast(abc.ABC):
    """A broker's broadcast channels, private addresses and rosters (see the module's docstring).

    Calls are blocking and may be made from any thread of the process that made the broadcast.
    """

    @abc.abstractmethod
    def publish(self, channel: str, bodies: Sequence[bytes]) -> None:
        """Give `bodies` to every listener of `channel` now listening (none: dropped)."""

    @abc.abstractmethod
    def listen(self, channel: str, *, limit: int = LISTEN_LIMIT) -> Listener:
        """Listen to `channel` from now on, holding at most `limit` bodies."""

    @abc.abstractmethod
    def listen_private(self, *, limit: int = LISTEN_LIMIT) -> Listener:
        """A listener with an address of its own (`Listener.address`) for `send`."""

    @abc.abstractmethod
    def send(self, address: str, body: bytes) -> None:
        """Give `body` to the private listener at `address`, if it still listens."""

    @abc.abstractmethod
    def register(self, roster: str, member: str, body: bytes, lease: float) -> None:
        """Make `body` the newest entry of `member` in `roster`, kept for `lease` seconds."""

    @abc.abstractmethod
    def unregister(self, roster: str, member: str) -> None:
        """Take `member` out of `roster` (it stops)."""

    @abc.abstractmethod
    def members(self, roster: str) -> list[bytes]:
        """The newest body of each member of `roster` whose lease has not run out."""

    def close(self) -> None:  # noqa: B027
        """Release what this process holds (its connection). Listeners stop."""


class Queue:
    """A thread-safe bounded queue of bodies for listeners that are pushed to: when full, the
    oldest body is dropped and counted."""

    def __init__(self, limit: int) -> None:
        self._items: collections.deque[bytes] = collections.deque()
        self._limit = max(limit, 1)
        self._ready = threading.Condition()
        self.dropped = 0
        self.closed = False

    def put(self, body: bytes) -> None:
        """Add a body, dropping the oldest if full."""
        with self._ready:
            if len(self._items) >= self._limit:
                self._items.popleft()
                self.dropped += 1
            self._items.append(body)
            self._ready.notify()

    def take(self, timeout: float) -> list[bytes]:
        """Everything queued, waiting up to `timeout` for the first."""
        with self._ready:
            if not self._items and not self.closed and timeout > 0:
                self._ready.wait(timeout)
            items = list(self._items)
            self._items.clear()
            return items

    def close(self) -> None:
        """Wake a waiting `take`; later ones return at once."""
        with self._ready:
            self.closed = True
            self._ready.notify_all()


class _MemoryListener(Listener):
    def __init__(self, owner: MemoryBroadcast, key: str, limit: int) -> None:
        self._owner, self._key = owner, key
        self.queue = Queue(limit)
        self.address = key

    @property
    def dropped(self) -> int:
        """Bodies dropped because the listener was full."""
        return self.queue.dropped

    def read(self, timeout: float) -> list[bytes]:
        return self.queue.take(timeout)

    def close(self) -> None:
        """Let go of this process's connection (once)."""
        self.queue.close()
        self._owner._forget(self._key, self)


class MemoryBroadcast(Broadcast):
    """The memory broker's broadcast: in this process only."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: dict[str, list[_MemoryListener]] = {}
        self._rosters: dict[str, dict[str, tuple[float, bytes]]] = {}
        self._private = 0

    def publish(self, channel: str, bodies: Sequence[bytes]) -> None:
        """Give the bodies to the channel's listeners."""
        with self._lock:
            listeners = list(self._listeners.get(channel, ()))
        for listener in listeners:
            for body in bodies:
                listener.queue.put(body)

    def listen(self, channel: str, *, limit: int = LISTEN_LIMIT) -> Listener:
        """Listen to a channel from now on."""
        listener = _MemoryListener(self, channel, limit)
        with self._lock:
            self._listeners.setdefault(channel, []).append(listener)
        return listener

    def listen_private(self, *, limit: int = LISTEN_LIMIT) -> Listener:
        """A listener with an address of its own."""
        with self._lock:
            self._private += 1
            address = f"private.{self._private}"
        return self.listen(address, limit=limit)

    def send(self, address: str, body: bytes) -> None:
        """Give a body to the private listener at `address`."""
        self.publish(address, [body])

    def register(self, roster: str, member: str, body: bytes, lease: float) -> None:
        """Make `body` the newest entry of `member`, for `lease` seconds."""
        with self._lock:
            self._rosters.setdefault(roster, {})[member] = (time.time() + lease, body)

    def unregister(self, roster: str, member: str) -> None:
        """Take `member` out of the roster."""
        with self._lock:
            self._rosters.get(roster, {}).pop(member, None)

    def members(self, roster: str) -> list[bytes]:
        """The newest live entry of each member."""
        now = time.time()
        with self._lock:
            entries = self._rosters.get(roster, {})
            return [body for until, body in entries.values() if until > now]

    def _forget(self, key: str, listener: _MemoryListener) -> None:
        with self._lock:
            listeners = self._listeners.get(key, [])
            if listener in listeners:
                listeners.remove(listener)
