"""The reading side: `EventReader` (what `conveyor events` prints) and `inspect` (what
`conveyor inspect` shows).

A reader turns events on in every worker of its app while it is open: it sends `EventsOn` for
`EVENTS_ON_S` seconds now and again every `RENEW_S`, so workers stop publishing within
`EVENTS_ON_S` of the last reader going away. A malformed message on the events channel, or a
malformed reply, is dropped with one log line.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from conveyor.brokers.broadcast import LISTEN_LIMIT
from conveyor.control.events import Event, WorkerEvent, decode_batch
from conveyor.control.protocol import (
    EventsOn,
    Inspect,
    WorkerReport,
    control_channel,
    decode_report,
    encode,
    events_channel,
)

if TYPE_CHECKING:
    from conveyor.app import Conveyor

log = logging.getLogger("conveyor.events")

EVENTS_ON_S = 10.0
RENEW_S = 3.0


class EventReader:
    """The events of an app's workers, from now on: `read(timeout)`, or iterate.

    With `request=True` (the default) it turns events on in the workers while open; with False
    it only listens (to workers started with `events` on). Use it as a context manager, or
    call `close()`.
    """

    def __init__(self, app: Conveyor, *, request: bool = True, limit: int = LISTEN_LIMIT) -> None:
        self.app = app
        self._broadcast = app.broker.broadcast()
        try:
            self._listener = self._broadcast.listen(events_channel(app.name), limit=limit)
        except BaseException:
            self._broadcast.close()
            raise
        self._closed = threading.Event()
        self._renewer: threading.Thread | None = None
        self.malformed = 0
        if request:
            self._request()
            self._renewer = threading.Thread(
                target=self._renew, name="conveyor-events-renew", daemon=True
            )
            self._renewer.start()

    @property
    def dropped(self) -> int:
        """Messages of events dropped because this reader fell behind."""
        return self._listener.dropped

    def _request(self) -> None:
        body = encode(EventsOn(seconds=EVENTS_ON_S))
        self._broadcast.publish(control_channel(self.app.name), [body])

    def _renew(self) -> None:
        while not self._closed.wait(RENEW_S):
            try:
                self._request()
            except Exception as exc:  # the next renewal tries again
                log.warning("could not ask the workers for events: %s", exc)

    def read(self, timeout: float) -> list[Event]:
        """The events that arrived, waiting up to `timeout` seconds for the first."""
        events: list[Event] = []
        for body in self._listener.read(timeout):
            try:
                events += decode_batch(body)
            except ValueError as exc:
                self.malformed += 1
                log.warning("dropped a malformed events message (%d bytes): %s", len(body), exc)
        return events

    def __iter__(self) -> Iterator[Event]:
        while not self._closed.is_set():
            yield from self.read(1.0)

    def close(self) -> None:
        """Stop reading (and asking for events)."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._renewer is not None:
            self._renewer.join(5)
        self._listener.close()
        self._broadcast.close()

    def __enter__(self) -> EventReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Silent:
    """A worker in the roster (its lease runs) that did not answer in time."""

    worker: str
    hostname: str
    pid: int
    last_seen: float
    """Its last heartbeat, in seconds since the epoch."""


@dataclass(frozen=True)
class InspectResult:
    """What `inspect` found: the reports of the workers that answered, and those that did not."""

    reports: list[WorkerReport] = field(default_factory=list)
    silent: list[Silent] = field(default_factory=list)


def inspect(app: Conveyor, timeout: float = 1.0) -> InspectResult:
    """Ask every worker of `app` for its report; wait until each known worker answered, or
    `timeout` seconds."""
    broadcast = app.broker.broadcast()
    try:
        known = _roster(broadcast.members(app.name))
        with broadcast.listen_private() as replies:
            request = Inspect(id=uuid.uuid4().hex, reply_to=replies.address)
            broadcast.publish(control_channel(app.name), [encode(request)])
            reports: dict[str, WorkerReport] = {}
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or (known and known.keys() <= reports.keys()):
                    break
                for body in replies.read(left):
                    try:
                        report = decode_report(body)
                    except ValueError as exc:
                        log.warning("dropped a malformed reply (%d bytes): %s", len(body), exc)
                        continue
                    if report.request == request.id:
                        reports[report.worker] = report
    finally:
        broadcast.close()
    silent = [
        Silent(beat.worker, beat.hostname, beat.pid, beat.time)
        for worker, beat in sorted(known.items())
        if worker not in reports
    ]
    return InspectResult([reports[w] for w in sorted(reports)], silent)


def _roster(bodies: list[bytes]) -> dict[str, WorkerEvent]:
    known: dict[str, WorkerEvent] = {}
    for body in bodies:
        try:
            [beat] = decode_batch(b"[" + body + b"]")
        except ValueError as exc:
            log.warning("dropped a malformed roster entry (%d bytes): %s", len(body), exc)
            continue
        if isinstance(beat, WorkerEvent):
            known[beat.worker] = beat
    return known
