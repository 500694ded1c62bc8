"""Events and inspection: what workers tell about themselves, over the broker's broadcast.

A worker's `Beacon` (in the worker's own process, on a thread of its own, off the rounds)
registers the worker in its app's roster under a lease, publishes its heartbeats and task events
to the app's events channel while events are on, and answers control requests: "events on for
N seconds" (a reader renews it while it runs) and "inspect" (a report through the asker's
private address). `EventReader` and `inspect` are the other side, used by `conveyor events`
and `conveyor inspect`. The schema of every event is in docs/events.md.

Channel names, per app `A`: `events.A` (task events and heartbeats), `control.A` (requests to
every worker of the app); the roster is `A`. See `conveyor.brokers.broadcast` for what a
channel, a private address and a roster are on each broker.
"""

from __future__ import annotations

from conveyor.control.client import EventReader, InspectResult, Silent, inspect
from conveyor.control.events import TaskEvent, WorkerEvent
from conveyor.control.protocol import (
    ActiveTask,
    ReservedTask,
    WorkerReport,
    control_channel,
    events_channel,
)

__all__ = [
    "ActiveTask",
    "EventReader",
    "InspectResult",
    "ReservedTask",
    "Silent",
    "TaskEvent",
    "WorkerEvent",
    "WorkerReport",
    "control_channel",
    "events_channel",
    "inspect",
]
