"""What a schedule is and when its ticks fall.

A tick is an instant (UTC, whole microseconds) computed from the schedule alone, never from
when the last one ran: an `every=` schedule ticks at `anchor + k * every`, so it does not drift,
and a cron schedule ticks where its expression matches the wall clock of its time zone. Around
daylight saving the cron rules are Debian cron's, as cronsim implements them: a time the
spring-forward skips runs once, just after the jump; a time the fall-back repeats runs once, the
first time; an expression that names no hour (`*/30 * * * *`) runs in both copies of the
repeated hour, because they are different instants.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from conveyor.errors import ConfigurationError

Missed = Literal["once", "skip", "all"]
MISSED: tuple[Missed, ...] = ("once", "skip", "all")
UTC = dt.UTC
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)
# Task ids of ticks: the same schedule and instant give the same id on every scheduler.
TICK_NAMESPACE = uuid.UUID("5c0f3e52-5d0e-4d55-9a49-2f1f2f0c6d3b")
# A tick at most this late is sent by a running scheduler whatever the `missed` policy: its loop
# can wake late on a busy machine. Older ticks were missed (no scheduler ran) and the policy
# decides.
ON_TIME = dt.timedelta(seconds=5)
_NAME = re.compile(r"^[^\x00-\x1f\x7f@|]{1,200}$")


@dataclass(frozen=True)
class Schedule:
    """A task sent at every tick of a cron expression or an interval."""

    name: str
    task: str
    cron: str | None = None
    every: dt.timedelta | None = None
    tz: str = "UTC"
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    missed: Missed = "once"
    """Ticks more than 5 s late when a scheduler gets to them (none ran then): `once`, the latest
    of them, unless a tick on time is due too; `skip`, none; `all`, each (up to `max_missed`, the
    latest ones)."""
    max_missed: int = 100
    grace: dt.timedelta | None = None
    """A tick older than this when a scheduler gets to it is skipped and logged; None: no limit."""
    anchor: dt.datetime = EPOCH
    """Where an `every=` schedule's ticks are counted from."""

    def __post_init__(self) -> None:
        where = f"schedule {self.name!r}"
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ConfigurationError(
                f"schedule name {self.name!r}: use 1 to 200 printable characters, without '@' "
                "or '|'"
            )
        if (self.cron is None) == (self.every is None):
            raise ConfigurationError(f"{where}: give exactly one of cron= and every=")
        zone = self.zone  # checks the time zone
        if self.cron is not None:
            try:
                CronSim(self.cron, dt.datetime.now(zone))
            except (CronSimError, ValueError, TypeError) as exc:
                raise ConfigurationError(
                    f"{where}: cannot read cron expression {self.cron!r}: {exc}"
                ) from None
        if self.every is not None and (
            not isinstance(self.every, dt.timedelta) or self.every < dt.timedelta(milliseconds=10)
        ):
            raise ConfigurationError(f"{where}: every= must be a timedelta of 10 ms or more")
        if self.missed not in MISSED:
            raise ConfigurationError(
                f"{where}: missed={self.missed!r}; use one of {', '.join(MISSED)}"
            )
        if not isinstance(self.max_missed, int) or self.max_missed < 1:
            raise ConfigurationError(f"{where}: max_missed must be a positive number")
        if self.grace is not None and self.grace <= dt.timedelta(0):
            raise ConfigurationError(f"{where}: grace must be a positive timedelta or None")
        if self.anchor.tzinfo is None:
            raise ConfigurationError(f"{where}: anchor must be an aware datetime")

    @property
    def zone(self) -> ZoneInfo:
        """The schedule's time zone."""
        try:
            return ZoneInfo(self.tz)
        except (ZoneInfoNotFoundError, ValueError, TypeError):
            raise ConfigurationError(
                f"schedule {self.name!r}: unknown time zone {self.tz!r} (use an IANA name such "
                "as 'Europe/Berlin' or 'UTC')"
            ) from None

    @property
    def what(self) -> str:
        """The schedule in a few words: `cron 0 3 * * * (Europe/Berlin)` or `every 0:00:10`."""
        if self.cron is not None:
            return f"cron {self.cron} ({self.tz})"
        return f"every {self.every}"

    def ticks(self, after: dt.datetime) -> Iterator[dt.datetime]:
        """The ticks strictly after `after`, in order, as UTC instants."""
        if self.every is not None:
            step = self.every
            k = (after - self.anchor) // step + 1
            while True:
                yield self.anchor + k * step
                k += 1
        assert self.cron is not None
        zone = self.zone
        for local in CronSim(self.cron, after.astimezone(zone)):
            yield local.astimezone(UTC)

    def due(self, after: dt.datetime, now: dt.datetime, most: int) -> tuple[list[dt.datetime], int]:
        """The ticks in (after, now]: the last `most` of them, and how many came before those."""
        if self.every is not None:  # counted, not walked: a long downtime costs nothing
            first = (after - self.anchor) // self.every + 1
            last = (now - self.anchor) // self.every
            start = max(first, last - most + 1)
            return [self.anchor + k * self.every for k in range(start, last + 1)], max(
                start - first, 0
            )
        kept: list[dt.datetime] = []
        dropped = 0
        for tick in self.ticks(after):
            if tick > now:
                break
            kept.append(tick)
            if len(kept) > most:
                kept.pop(0)
                dropped += 1
        return kept, dropped


def tick_id(schedule: str, tick: dt.datetime) -> str:
    """`name@2026-12-03T03:00:00Z`: what claims a tick, and what the task's request carries."""
    return f"{schedule}@{tick.astimezone(UTC).isoformat(timespec='microseconds')[:-6]}Z"


def tick_task_id(schedule: str, tick: dt.datetime) -> str:
    """The task id a tick is sent with: the same on every scheduler."""
    return str(uuid.uuid5(TICK_NAMESPACE, tick_id(schedule, tick)))
