"""The scheduler's loop: find the ticks that came due, claim each, send what it claimed.

Any number of schedulers may run the same schedules against the same claim store: a tick is
sent by the one that claims it. Each scheduler starts from the latest tick claimed in the store,
so ticks that came due while none ran are found and handled by the schedule's `missed` policy.
A store that cannot be reached means nothing is claimed and so nothing is sent; the scheduler
retries with backoff and the ticks are late, never doubled.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence

from conveyor.app import Conveyor
from conveyor.scheduler.claims import Claims, from_url
from conveyor.scheduler.schedules import ON_TIME, UTC, Schedule, tick_id, tick_task_id

log = logging.getLogger("conveyor.scheduler")

LEASE_S = 30.0
"""How long a claim holds before another scheduler may take the tick over."""
MAX_SLEEP_S = 1.0
"""The longest the loop sleeps: it also looks for claims that ran out unsent."""
RETRY_MAX_S = 30.0
RECENT_MAX = 10_000
"""The most ticks of one schedule sent in one step (an `every=` of 10 ms has 500 on time)."""
HEADER_SCHEDULE = "conveyor-schedule"
HEADER_TICK = "conveyor-tick"


def store_url(app: Conveyor) -> str:
    """Where this app's schedulers claim ticks: `scheduler_store`, else the fleet store
    (`conveyor.fleet`: `store`, else its SQLite or SQL/Redis result store, else its SQLite
    broker)."""
    from conveyor import fleet

    url = app.settings.scheduler_store or fleet.store_url(app.settings)
    if url is not None:
        return url
    from conveyor.errors import ConfigurationError

    raise ConfigurationError(
        "the scheduler needs a store to claim ticks in: set scheduler_store "
        "(CONVEYOR_SCHEDULER_STORE), or " + fleet.HOW_TO_SET
    )


class Scheduler:
    """Sends the app's schedules' ticks, each once across every scheduler on the same store."""

    def __init__(
        self,
        app: Conveyor,
        claims: Claims | None = None,
        *,
        clock: Callable[[], float] = time.time,
        lease: float = LEASE_S,
        owner: str | None = None,
    ) -> None:
        self.app = app
        self.schedules: Sequence[Schedule] = list(app.schedules.values())
        for schedule in self.schedules:
            app.get_task(schedule.task)  # an unknown task is refused now, by name
        self.claims = claims if claims is not None else from_url(store_url(app))
        self.clock = clock
        self.lease = lease
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._after: dict[str, dt.datetime] = {}
        self._stop = threading.Event()
        self.sent = 0

    def now(self) -> dt.datetime:
        """The clock's time as an aware UTC datetime."""
        return dt.datetime.fromtimestamp(self.clock(), UTC)

    def stop(self) -> None:
        """Make `run` return after its current step (from any thread)."""
        self._stop.set()

    @property
    def stopped(self) -> bool:
        """`stop()` was called."""
        return self._stop.is_set()

    def run(self) -> None:
        """Send ticks until `stop()`."""
        log.info(
            "scheduler %s: %d schedules, claims in %s",
            self.owner,
            len(self.schedules),
            self.claims.display_url,
        )
        failures = 0
        while not self._stop.is_set():
            try:
                wait = self.step()
                failures = 0
            except Exception as exc:
                failures += 1
                wait = random.uniform(0, min(RETRY_MAX_S, 0.5 * 2**failures))
                log.error(
                    "scheduler: %s; nothing is sent that is not claimed, retrying in %.1fs",
                    exc,
                    wait,
                )
            self._stop.wait(wait)

    def step(self) -> float:
        """Handle every schedule once; return the seconds until there may be more to do."""
        now = self.now()
        wake = now + dt.timedelta(seconds=MAX_SLEEP_S)
        for schedule in self.schedules:
            after = self._start(schedule, now)
            for tick in self.claims.stranded(schedule.name, now):
                self._send(schedule, tick, now, late=True)
            self._due(schedule, after, now)
            wake = min(wake, next(schedule.ticks(self._after[schedule.name])))
        return max((wake - self.now()).total_seconds(), 0.0)

    def _start(self, schedule: Schedule, now: dt.datetime) -> dt.datetime:
        """Where this schedule's ticks are looked for from: the latest claimed, else now."""
        after = self._after.get(schedule.name)
        if after is None:
            last = self.claims.last(schedule.name)
            after = self._after[schedule.name] = now if last is None else last.tick
        return after

    def _due(self, schedule: Schedule, after: dt.datetime, now: dt.datetime) -> None:
        """Send the ticks in (after, now]: each one that is at most `ON_TIME` late, and of the
        older ones (missed: no scheduler ran then) what the schedule's `missed` policy says."""
        cutoff = now - ON_TIME
        recent, _ = schedule.due(max(after, cutoff), now, RECENT_MAX)
        old: list[dt.datetime] = []
        skipped = 0
        if after < cutoff:
            most = schedule.max_missed if schedule.missed == "all" else 1
            old, skipped = schedule.due(after, cutoff, most)
        if not recent and not old:
            return
        self._after[schedule.name] = (recent or old)[-1]
        chosen = old
        if schedule.missed == "skip" or (schedule.missed == "once" and recent):
            chosen = []
        chosen = chosen + recent
        if schedule.grace is not None:
            chosen = [t for t in chosen if now - t <= schedule.grace]
        skipped += len(old) + len(recent) - len(chosen)
        if skipped:
            log.warning(
                "schedule %s: %d ticks after %s skipped (missed=%s%s)",
                schedule.name,
                skipped,
                tick_id(schedule.name, after),
                schedule.missed,
                "" if schedule.grace is None else f", grace {schedule.grace}",
            )
        for tick in chosen:
            self._send(schedule, tick, now, late=False)

    def _send(self, schedule: Schedule, tick: dt.datetime, now: dt.datetime, *, late: bool) -> None:
        ident = tick_id(schedule.name, tick)
        task = self.app.get_task(schedule.task)
        with self.claims.atomic():
            if not self.claims.claim(schedule.name, tick, self.owner, self.lease, now):
                return  # another scheduler has it
            task.apply_async(
                schedule.args,
                schedule.kwargs,
                task_id=tick_task_id(schedule.name, tick),
                headers={HEADER_SCHEDULE: schedule.name, HEADER_TICK: ident},
            )
            self.claims.sent(schedule.name, tick, self.owner)
        self.sent += 1
        delay = (now - tick).total_seconds()
        if late:
            log.warning(
                "schedule %s: sent %s, taken over from a claim that ran out", schedule.name, ident
            )
        else:
            log.info("schedule %s: sent %s (%.3fs after its time)", schedule.name, ident, delay)

    def close(self) -> None:
        """Let the claim store go."""
        self.claims.close()
