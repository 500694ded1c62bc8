"""The control messages: what a reader or `conveyor inspect` asks every worker, and the report
a worker sends back.

A control message is one JSON object with a `type`. Anything else on the control channel (not
JSON, an unknown type, a field out of range, over `MAX_REQUEST_BYTES`) is dropped by the worker
with one log line (`decode_request` says why): it never stops a worker.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

#: The largest control message a worker reads.
MAX_REQUEST_BYTES = 64 * 1024
#: The longest a reader may turn events on for at once.
MAX_EVENTS_ON_S = 3600.0


def events_channel(app: str) -> str:
    """The channel an app's workers publish their events and heartbeats to."""
    return f"events.{app}"


def control_channel(app: str) -> str:
    """The channel an app's workers take control requests from."""
    return f"control.{app}"


class EventsOn(msgspec.Struct, tag="events", tag_field="type", forbid_unknown_fields=True):
    """Publish task events for the next `seconds` (a reader sends it again while it runs)."""

    seconds: Annotated[float, msgspec.Meta(gt=0, le=MAX_EVENTS_ON_S)]


class Inspect(msgspec.Struct, tag="inspect", tag_field="type", forbid_unknown_fields=True):
    """Send a `WorkerReport` to the private address `reply_to`, naming request `id`."""

    id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    reply_to: Annotated[str, msgspec.Meta(min_length=1, max_length=255)]


Request = EventsOn | Inspect
_requests = msgspec.json.Decoder(Request)
_encoder = msgspec.json.Encoder()


def encode(message: msgspec.Struct) -> bytes:
    """A control message or report as JSON."""
    return _encoder.encode(message)


def decode_request(body: bytes) -> Request:
    """The request in `body`; ValueError saying why when it is not one."""
    if len(body) > MAX_REQUEST_BYTES:
        raise ValueError(f"{len(body):,} bytes, over the limit of {MAX_REQUEST_BYTES:,}")
    try:
        return _requests.decode(body)
    except msgspec.MsgspecError as exc:
        raise ValueError(str(exc)) from None


class ActiveTask(msgspec.Struct, kw_only=True):
    """A task a worker runs now."""

    id: str
    task: str
    queue: str
    since: float
    """When it went to the pool, in seconds since the epoch."""
    pid: int | None
    """The process running it: a prefork child's pid, else the worker's own."""
    retries: int = 0


class ReservedTask(msgspec.Struct, kw_only=True):
    """A message a worker holds and has not started: queued in a prefork child behind the task
    it runs, waiting in the pool for a child, or prefetched from the broker."""

    id: str | None
    task: str | None
    queue: str
    where: str
    """`child <pid>`, `pool` or `prefetched`."""


class WorkerReport(msgspec.Struct, kw_only=True):
    """What a worker answers to `Inspect`."""

    request: str
    worker: str
    hostname: str
    pid: int
    app: str
    pool: str
    concurrency: int
    loop: str
    broker: str
    """The broker's URL, password masked."""
    queues: list[str]
    started: float
    """When the worker started, in seconds since the epoch."""
    uptime: float
    stats: dict[str, int]
    """The worker's counts (`WorkerStats`): received, succeeded, failed, retried..."""
    active: list[ActiveTask]
    reserved: list[ReservedTask]
    registered: list[str]
    events: bool
    """True while the worker publishes task events."""
    dropped: int
    """Events dropped because the worker's buffer was full."""
    load: tuple[float, float, float]
    busy: bool = False
    """The worker's event loop did not answer in time (a task of the solo or asyncio pool holds
    it): `active` then lists the jobs without their processes, and `reserved` is empty."""


_reports = msgspec.json.Decoder(WorkerReport)


def decode_report(body: bytes) -> WorkerReport:
    """A report; ValueError saying why when `body` is not one."""
    try:
        return _reports.decode(body)
    except msgspec.MsgspecError as exc:
        raise ValueError(str(exc)) from None
