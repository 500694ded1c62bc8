"""Whole-worker deaths do not count towards the poison limit for messages the worker only held.

A prefork worker on RabbitMQ runs four blocking tasks, one in each child, and holds 3 short
tasks behind them that it has not started (pushed by RabbitMQ up to its prefetch). The test
SIGKILLs the whole worker, starts a new one, and brings it to the same state, three times in a
row; the 3 messages come back each time, marked redelivered. A prefork worker sees every run
that dies (its children's), so none of this is a task's doing: after the third kill every one of
the 3 runs, none is dead-lettered. Before, each kill counted a delivery towards the poison
limit of 3, and the fourth delivery dead-lettered all 3 healthy messages.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import RABBITMQ_URL, delete_rabbitmq_queues, require_rabbitmq
from ledger import Ledger, new_ledger

from conveyor import Conveyor
from conveyor.brokers.base import DeadLetter

Popen = subprocess.Popen[bytes]

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

HERE = Path(__file__).parent
CHILDREN = 4
# While the blockers run, the prefetch counts what the children hold (4): the blockers were
# acknowledged before they ran, so these fit under it, pushed behind them.
HELD = 3
WARM_UP = 500  # short runs that take the pool's look-ahead (and the prefetch) to its ceiling
KILLS = 3


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture
def queue() -> Iterator[str]:
    require_rabbitmq()
    name = f"held-{uuid.uuid4().hex[:8]}"
    try:
        yield name
    finally:
        delete_rabbitmq_queues(name)


class HeldRun:
    """The producer, the worker processes and the ledger of one test."""

    def __init__(self, queue: str, folder: Path, ledger: Ledger) -> None:
        self.queue, self.folder, self.ledger = queue, folder, ledger
        self.log = folder / "worker.log"
        self.producer = Conveyor(
            "held", broker=RABBITMQ_URL, results=None, default_queue=queue, queue_max_priority=9
        )
        # The names the worker's app runs; high priority unless sent otherwise.
        self.step = self.producer.task(name="held.step", priority=9)(_nothing)
        self.warm = self.producer.task(name="held.warm", priority=9)(_nothing)
        self.block = self.producer.task(name="held.block", priority=9)(_nothing)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
        self.env = (
            env
            | ledger.env
            | {
                "CONVEYOR_BROKER": RABBITMQ_URL,
                "CONVEYOR_DEFAULT_QUEUE": queue,
                "CONVEYOR_QUEUE_MAX_PRIORITY": "9",
                "PYTHONPATH": str(HERE),
                "HELD_DIR": str(folder),
            }
        )

    def start(self) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as out:
            command = [sys.executable, "-m", "conveyor", "worker", "held_app:app"]
            return subprocess.Popen(
                [*command, "-c", str(CHILDREN)],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def wait(self, condition: Callable[[], bool], what: str, worker: Popen) -> None:
        deadline = time.monotonic() + 60
        while not condition():
            assert worker.poll() is None, f"the worker exited: {what}\n{tail(self.log)}"
            assert time.monotonic() < deadline, f"{what}: not within 60 s\n{tail(self.log)}"
            time.sleep(0.05)  # polling the ledger, files and queue depth

    def ready(self) -> int:
        return self.producer.broker.stats([self.queue])[0].ready

    def ran(self, ids: list[str]) -> int:
        return len({task_id for task_id, _, _, _ in self.ledger.rows()} & set(ids))

    def hold_and_kill(self, round_: int, held: list[str]) -> list[str]:
        """Bring a new worker to run a blocking task in every child with the held messages
        behind them, unstarted; then SIGKILL it. The held ids (sent on the first round)."""
        # All sent before the worker starts: RabbitMQ hands out the high-priority short and
        # blocking tasks first, so the held messages (priority 0) come in behind the blockers.
        self.warm.map([(n,) for n in range(WARM_UP)])
        blockers = range(CHILDREN * round_, CHILDREN * (round_ + 1))
        for n in blockers:
            self.block.delay(n)
        held = held or [self.step.apply_async((n,), priority=0).id for n in range(HELD)]
        worker = self.start()
        started = [self.folder / f"started-{n}" for n in blockers]
        try:
            self.wait(lambda: all(f.exists() for f in started), "every child blocked", worker)
            self.wait(lambda: self.ready() == 0, "the worker to hold every message", worker)
            assert self.ran(held) == 0, "a held message started"
        finally:
            worker.kill()  # its blockers were acknowledged before they ran: they are gone
            worker.wait(30)
        return held


def _nothing(n: int) -> None:
    raise AssertionError("runs only in workers")


def test_three_worker_kills_do_not_dead_letter_the_messages_it_only_held(
    queue: str, tmp_path: Path
) -> None:
    with new_ledger() as ledger:
        run = HeldRun(queue, tmp_path, ledger)
        held: list[str] = []
        for round_ in range(KILLS):
            held = run.hold_and_kill(round_, held)
        worker = run.start()
        dead: list[DeadLetter] = []

        def settled() -> bool:
            dead[:] = run.producer.broker.dead_letters(queue)
            return bool(dead) or run.ran(held) == HELD

        try:
            run.wait(settled, "every held message to run", worker)
        finally:
            worker.send_signal(signal.SIGTERM)
            status = worker.wait(60)
        attempts = {task_id: attempt for task_id, attempt, _, _ in ledger.rows()}
    run.producer.close()
    print(
        f"\n{KILLS} worker kills, {HELD} held messages: delivery counts at their runs "
        f"{sorted({attempts.get(i, 0) for i in held})}, {len(dead)} dead-lettered"
    )
    assert dead == [], [d.reason for d in dead]
    assert status == 0, tail(run.log)
    assert all(attempts[i] > KILLS for i in held), "each was delivered once per kill, held"
