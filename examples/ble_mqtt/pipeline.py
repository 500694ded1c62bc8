"""The pipeline's steps, shared by the command and the tests: send batches, then add up.

readings = generate(n, seed, malformed)
with Subscriber(url, prefix, len(readings)) as subscriber:     # subscribed before any send
    results = send_batches(app, readings, batch=50)
    Worker(app, pool="prefork", until_empty=True, ...).run()
    report = summarize(readings, results, subscriber)          # flushes the subscriber first
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from conveyor import Conveyor, Result, State
from examples.ble_mqtt.frames import MalformedFrame, Reading, decode
from examples.ble_mqtt.subscriber import Subscriber
from examples.ble_mqtt.tasks import PUBLISH_BATCH


@dataclass(frozen=True)
class Report:
    """What went in, what came out, and what it took."""

    sent: int  # readings sent to the tasks
    malformed: int  # readings the tasks rejected
    published: int  # readings the tasks published (by the try that succeeded)
    delivered: int  # distinct readings the subscriber received
    duplicates: int  # receptions beyond the first
    missing: list[int]  # good readings that never arrived
    tasks: int
    failed: int  # tasks that did not succeed in the end
    children: int  # distinct child processes that ran a successful task
    connections: int  # MQTT connections those tasks' publishers opened
    rejected: dict[str, int] = field(default_factory=dict)  # malformed readings, by reason

    @property
    def complete(self) -> bool:
        """Every good reading arrived and every task succeeded."""
        return not self.missing and not self.failed


def send_batches(app: Conveyor, readings: Sequence[Reading], batch: int) -> list[Result[Any]]:
    """One task per `batch` readings, sent in one go."""
    task = app.get_task(PUBLISH_BATCH)
    batches = [readings[at : at + batch] for at in range(0, len(readings), batch)]
    return task.map([([r.to_dict() for r in chunk],) for chunk in batches])


def good_ids(readings: Sequence[Reading]) -> set[int]:
    """The readings that decode: the ones the subscriber must receive."""
    ids = set()
    for reading in readings:
        try:
            decode(reading)
        except MalformedFrame:
            continue
        ids.add(reading.id)
    return ids


def summarize(
    readings: Sequence[Reading],
    results: Sequence[Result[Any]],
    subscriber: Subscriber,
    flush_timeout: float = 30.0,
) -> Report:
    """The report once the tasks are done: the subscriber is flushed first, so what the broker
    confirmed has arrived and the counts are final."""
    tally = subscriber.flush(flush_timeout)
    values = [r.get(timeout=1) for r in results if r.state == State.SUCCESS]
    connections: dict[str, int] = {}
    rejected: Counter[str] = Counter()
    for value in values:
        # A publisher's count only grows: its last report is its total.
        client = value.get("client_id", "")
        connections[client] = max(connections.get(client, 0), value.get("connections", 0))
        rejected.update(value["rejected"])
    return Report(
        sent=len(readings),
        malformed=sum(v["malformed"] for v in values),
        published=sum(v["published"] for v in values),
        delivered=tally.delivered,
        duplicates=tally.duplicates,
        missing=subscriber.missing(good_ids(readings)),
        tasks=len(results),
        failed=len(results) - len(values),
        children=len({v["pid"] for v in values}),
        connections=sum(connections.values()),
        rejected=dict(rejected),
    )
