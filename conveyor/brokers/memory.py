"""An in-process broker for unit tests: the same semantics as the real ones, no I/O.

Leases expire after the visibility timeout, delays are honoured, dead letters are kept. `clock`
can be replaced to test time-dependent behaviour without waiting.
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from conveyor.brokers.base import Broker, DeadLetter, Delivery, Outgoing, QueueStats
from conveyor.brokers.broadcast import MemoryBroadcast
from conveyor.errors import BrokerError


@dataclass(order=True)
class _Message:
    sort_key: tuple[int, int]
    queue: str = field(compare=False)
    body: bytes = field(compare=False)
    priority: int = field(compare=False)
    deliveries: int = field(default=0, compare=False)
    lost: int = field(default=0, compare=False)
    lease: int = field(default=0, compare=False)
    lease_until: float = field(default=0.0, compare=False)


class MemoryBroker(Broker):
    """A thread-safe broker that lives in this process's memory."""

    display_url = "memory://"
    local = True

    def __init__(self, *, visibility_timeout: float = 60.0) -> None:
        self.visibility_timeout = visibility_timeout
        self._pid = os.getpid()
        self.clock: Callable[[], float] = time.time
        self._lock = threading.Lock()
        self._seq = itertools.count()
        self._ready: dict[str, list[_Message]] = {}
        self._delayed: list[tuple[float, int, _Message]] = []
        self._leased: dict[int, _Message] = {}
        self._dead: dict[str, list[DeadLetter]] = {}
        self._broadcast: MemoryBroadcast | None = None

    def broadcast(self) -> MemoryBroadcast:
        """This broker's broadcast, in this process (the same one for every caller)."""
        with self._lock:
            if self._broadcast is None:
                self._broadcast = MemoryBroadcast()
            return self._broadcast

    def publish(self, messages: Sequence[Outgoing]) -> None:
        """Enqueue messages; delayed ones wait in a heap until due."""
        if os.getpid() != self._pid:
            raise BrokerError(
                "memory:// lives in the process that created it: a task in a prefork child "
                "cannot send to it. Test with the threads pool (run_until_empty uses it) or "
                "with a sqlite:// broker"
            )
        with self._lock:
            for out in messages:
                msg = _Message((-out.priority, next(self._seq)), out.queue, out.body, out.priority)
                if out.deliver_at is not None and out.deliver_at > self.clock():
                    heapq.heappush(self._delayed, (out.deliver_at, next(self._seq), msg))
                else:
                    heapq.heappush(self._ready.setdefault(out.queue, []), msg)

    def fetch(self, queues: Sequence[str], limit: int) -> list[Delivery]:
        """Lease up to `limit` ready messages across `queues`."""
        with self._lock:
            now = self.clock()
            self._promote(now)
            out: list[Delivery] = []
            for queue in queues:
                heap = self._ready.get(queue)
                while heap and len(out) < limit:
                    msg = heapq.heappop(heap)
                    msg.deliveries += 1
                    msg.lease = next(self._seq)
                    msg.lease_until = now + self.visibility_timeout
                    self._leased[msg.lease] = msg
                    out.append(Delivery(queue, msg.body, msg.lease, msg.deliveries, lost=msg.lost))
            return out

    def ack(self, deliveries: Sequence[Delivery]) -> int:
        """Forget settled messages."""
        with self._lock:
            return sum(self._leased.pop(d.receipt, None) is not None for d in deliveries)

    def requeue(
        self, deliveries: Sequence[Delivery], *, delay: float = 0.0, count_delivery: bool = True
    ) -> None:
        """Return leased messages to their queue, optionally after a delay."""
        with self._lock:
            for d in deliveries:
                msg = self._leased.pop(d.receipt, None)
                if msg is None:
                    continue
                if count_delivery:
                    msg.lost += 1
                else:
                    msg.deliveries -= 1
                self._put_back(msg, self.clock() + delay if delay > 0 else None)

    def dead_letter(self, items: Sequence[tuple[Delivery, str]]) -> None:
        """Move messages to the dead-letter list of their queue."""
        with self._lock:
            for d, reason in items:
                msg = self._leased.pop(d.receipt, None)
                if msg is not None:
                    now = self.clock()
                    dead = DeadLetter(d.queue, d.body, reason, msg.deliveries, now, msg.priority)
                    self._dead.setdefault(d.queue, []).append(dead)

    def extend(self, deliveries: Sequence[Delivery], seconds: float) -> None:
        """Push lease expiry further out."""
        with self._lock:
            until = self.clock() + seconds
            for d in deliveries:
                msg = self._leased.get(d.receipt)
                if msg is not None:
                    msg.lease_until = until

    def stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        """Counts per queue."""
        with self._lock:
            self._promote(self.clock())
            names = sorted(
                set(self._ready)
                | {m.queue for _, _, m in self._delayed}
                | {m.queue for m in self._leased.values()}
                | set(self._dead)
            )
            return [
                QueueStats(
                    queue,
                    len(self._ready.get(queue, ())),
                    sum(m.queue == queue for _, _, m in self._delayed),
                    sum(m.queue == queue for m in self._leased.values()),
                    len(self._dead.get(queue, ())),
                )
                for queue in (names if queues is None else queues)
            ]

    def purge(self, queue: str, *, dead: bool = False) -> int:
        """Drop a queue's waiting messages, or its dead letters."""
        with self._lock:
            if dead:
                return len(self._dead.pop(queue, []))
            count = len(self._ready.pop(queue, []))
            kept = [item for item in self._delayed if item[2].queue != queue]
            count += len(self._delayed) - len(kept)
            self._delayed = kept
            heapq.heapify(self._delayed)
            return count

    def dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        """Newest dead letters first."""
        with self._lock:
            return list(reversed(self._dead.get(queue, [])))[:limit]

    def requeue_dead(
        self,
        queue: str,
        select: Callable[[DeadLetter], bool] | None = None,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Move the selected dead letters back to the queue as new messages, oldest first."""
        with self._lock:
            kept: list[DeadLetter] = []
            moved = 0
            for dead in self._dead.get(queue, []):
                if select is not None and not select(dead):
                    kept.append(dead)
                    continue
                sort_key = (-dead.priority, next(self._seq))
                msg = _Message(sort_key, queue, dead.body, dead.priority)
                heapq.heappush(self._ready.setdefault(queue, []), msg)
                moved += 1
            if kept:
                self._dead[queue] = kept
            else:
                self._dead.pop(queue, None)
        if progress is not None and moved:
            progress(moved)
        return moved

    def exists(self, queue: str) -> bool:
        """True while the queue holds anything: ready, delayed, leased or dead."""
        with self._lock:
            return (
                bool(self._ready.get(queue))
                or bool(self._dead.get(queue))
                or any(m.queue == queue for _, _, m in self._delayed)
                or any(m.queue == queue for m in self._leased.values())
            )

    def _promote(self, now: float) -> None:
        """Make due delayed messages and expired leases ready again (lock held)."""
        while self._delayed and self._delayed[0][0] <= now:
            _, _, msg = heapq.heappop(self._delayed)
            heapq.heappush(self._ready.setdefault(msg.queue, []), msg)
        for lease in [k for k, m in self._leased.items() if m.lease_until <= now]:
            self._put_back(self._leased.pop(lease), None)

    def _put_back(self, msg: _Message, deliver_at: float | None) -> None:
        # The message keeps its original sort key, so a released message keeps its place.
        if deliver_at is None:
            heapq.heappush(self._ready.setdefault(msg.queue, []), msg)
        else:
            heapq.heappush(self._delayed, (deliver_at, next(self._seq), msg))
