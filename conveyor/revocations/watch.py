"""The worker's side of revocations: what it knows, and how it keeps up with the store.

`KnownRevocations` holds the live revoked ids in the worker's process, bounded: past
`MAX_KNOWN`, those that expire soonest are forgotten, with a warning. Admission looks ids up in
its `ids` dict directly, so a worker with no revocations pays one dict lookup per delivery.

`RevocationWatch` loads the live revocations before the worker fetches its first message, then
polls the store every `POLL_S`: one indexed read (SQL) or XREAD (Redis) per poll, on a thread
of its own for a remote store, on the loop for a local one (SQLite: microseconds, on the
connection the embedded broker uses there already). What it learns goes to the consumer
(`Consumer.revoke`), which skips those ids from then on and tells the pool about the jobs it
already holds. A store that does not answer is logged and retried with backoff; revoked tasks
may run meanwhile, which the log says.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from conveyor.revocations import Cursor, Revocation

if TYPE_CHECKING:
    from conveyor.revocations import RevocationStore

log = logging.getLogger("conveyor.revocations")
T = TypeVar("T")

#: Seconds between polls: a revoke reaches every worker within about this.
POLL_S = 0.25
#: The most revocations a worker keeps in memory.
MAX_KNOWN = 100_000
#: Seconds the first load may take before the worker starts without it (and keeps trying).
LOAD_TIMEOUT_S = 10.0
RETRY_MAX_S = 5.0


class KnownRevocations:
    """The revoked ids a worker skips, each until its revocation expires."""

    def __init__(self, most: int = MAX_KNOWN, clock: Callable[[], float] = time.time) -> None:
        #: Task id -> when its revocation expires. Changed in place, never replaced: admission
        #: holds this very dict.
        self.ids: dict[str, float] = {}
        self._expiry: list[tuple[float, str]] = []  # a heap; stale entries are skipped
        self._most = most
        self._clock = clock

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self.ids

    def add(self, revocations: Sequence[Revocation]) -> dict[str, bool]:
        """Learn revocations; the live ones among them, id -> terminate."""
        now = self._clock()
        self.prune(now)
        live: dict[str, bool] = {}
        ids = self.ids
        for r in revocations:
            if r.expires_at <= now:
                continue
            live[r.id] = live.get(r.id, False) or r.terminate
            if ids.get(r.id, 0.0) < r.expires_at:
                ids[r.id] = r.expires_at
                heapq.heappush(self._expiry, (r.expires_at, r.id))
        over = len(ids) - self._most
        if over > 0:
            self._drop(over)
        return live

    def prune(self, now: float) -> None:
        """Forget the revocations that expired by `now`."""
        heap, ids = self._expiry, self.ids
        while heap and heap[0][0] <= now:
            at, task_id = heapq.heappop(heap)
            if ids.get(task_id) == at:
                del ids[task_id]

    def _drop(self, count: int) -> None:
        heap, ids = self._expiry, self.ids
        dropped = 0
        while dropped < count and heap:
            at, task_id = heapq.heappop(heap)
            if ids.get(task_id) == at:
                del ids[task_id]
                dropped += 1
        log.warning(
            "more than %d revocations are live: forgot the %d that expire soonest, whose tasks "
            "this worker would now run",
            self._most,
            dropped,
        )


class RevocationWatch:
    """Keeps a worker's `KnownRevocations` up to date with its store (see the module's
    docstring)."""

    def __init__(
        self,
        store: RevocationStore,
        learn: Callable[[Sequence[Revocation]], None],
        *,
        interval: float = POLL_S,
        owned: bool = False,
    ) -> None:
        self.store = store
        self._owned = owned
        self._learn = learn
        self.interval = interval
        self._cursor: Cursor | None = None
        self._io = ThreadPoolExecutor(1, thread_name_prefix="conveyor-revocations")

    async def load(self) -> None:
        """Learn the live revocations, before the first fetch. A store that does not answer in
        time is logged; `run` keeps trying."""
        try:
            async with asyncio.timeout(LOAD_TIMEOUT_S):
                await self._poll()
        except Exception as exc:
            log.error(
                "could not load revocations from %s: %s; revoked tasks may run until it "
                "answers (retrying)",
                self.store.display_url,
                exc,
            )
        else:
            log.debug("revocations from %s: polled every %gs", self.store.display_url, POLL_S)

    async def run(self) -> None:
        """Poll until cancelled."""
        failures = 0
        while True:
            if failures:
                await asyncio.sleep(random.uniform(0, min(RETRY_MAX_S, 0.25 * 2**failures)))
            else:
                await asyncio.sleep(self.interval)
            try:
                await self._poll()
            except Exception as exc:
                failures += 1
                if failures == 1 or failures % 20 == 0:
                    log.error(
                        "could not read revocations from %s: %s (failure %d in a row; retrying)",
                        self.store.display_url,
                        exc,
                        failures,
                    )
                continue
            if failures:
                log.warning("revocations from %s can be read again", self.store.display_url)
            failures = 0

    async def _call(self, fn: Callable[[Any], T], argument: Any) -> T:
        if self.store.local:
            return fn(argument)
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, argument)

    async def _poll(self) -> None:
        while True:
            if self._cursor is None:
                found, cursor = await self._call(self.store.load, time.time())
                more = False
            else:
                found, cursor = await self._call(self.store.since, self._cursor)
                more = cursor != self._cursor  # a full batch, maybe: read on
            self._cursor = cursor
            if found:
                self._learn(found)
            if not more:
                return

    def close(self) -> None:
        """Stop the poll thread, and close the store if it is the watch's own. A poll still
        waiting on a store that does not answer is not waited for: the worker stops now."""
        self._io.shutdown(wait=False, cancel_futures=True)
        if self._owned:
            self.store.close()
