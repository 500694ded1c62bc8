"""A 1,000-member chord through a prefork worker whose children are SIGKILLed every 0.5 s (and,
on RabbitMQ, whose connection the broker closes once): the callback must run exactly once, with
every member's result in order. Its one run is a row in the PostgreSQL ledger (`ledger.py`).

Killed children redeliver their members, which join the chord again; the chord's join counts each
member once, and a callback published twice runs once (see docs/workflows.md).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import pytest
import stores
from ledger import Ledger, new_ledger
from rabbit_node import private_node

from conveyor import Conveyor, chord

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

HERE = Path(__file__).parent
MEMBERS = 1_000
CHILDREN = 4
KILL_EVERY_S = 0.5
RUN_TIMEOUT_S = 300.0
WORKER_COMMAND = (sys.executable, "-m", "conveyor", "worker", "chord_chaos_app:app")


def _children_of(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with suppress(OSError):
            kids += [int(p) for p in (task / "children").read_text().split()]
    return kids


class Killer(threading.Thread):
    """SIGKILLs a random task child (a grandchild of the worker: the zygote's) every 0.5 s."""

    def __init__(self, worker: subprocess.Popen[bytes]) -> None:
        super().__init__(name="child-killer", daemon=True)
        self.worker = worker
        self.kills = 0
        self.done = threading.Event()
        self.random = random.Random(18)

    def run(self) -> None:
        while not self.done.wait(KILL_EVERY_S):  # the pace of the faults, not a synchronization
            children = [k for z in _children_of(self.worker.pid) for k in _children_of(z)]
            if children:
                with suppress(ProcessLookupError):
                    os.kill(self.random.choice(children), signal.SIGKILL)
                    self.kills += 1


def run_chord(
    broker: str,
    results: str,
    ledger: Ledger,
    log: Path,
    fault: Callable[[], None] | None = None,
    **settings: str,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env |= {"CONVEYOR_BROKER": broker, "CONVEYOR_RESULTS": results, "PYTHONPATH": str(HERE)}
    env |= {f"CONVEYOR_{k.upper()}": v for k, v in settings.items()} | ledger.env
    sys.path.insert(0, str(HERE))
    try:
        import chord_chaos_app as module
    finally:
        sys.path.remove(str(HERE))
    sender = Conveyor("chord-chaos", broker=broker, results=results, **settings)
    member = sender.task(name="chord-chaos.member")(module.member.fn)
    collect = sender.task(name="chord-chaos.collect", bind=True)(module.collect.fn)
    result = chord([member.s(n) for n in range(MEMBERS)], collect.s()).apply_async()
    sender.broker.close()  # the worker's is then the only connection a fault can close
    with log.open("ab") as out:
        worker = subprocess.Popen(
            [*WORKER_COMMAND, "--pool", "prefork", "--concurrency", str(CHILDREN)],
            cwd=HERE,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    killer = Killer(worker)
    killer.start()
    try:
        if fault is not None:
            fault()
        value = result.get(timeout=RUN_TIMEOUT_S)
        killer.done.set()
        killer.join()
        # The callback ran; a second copy would have to arrive and run after it: give the
        # worker the time to drain what is left, then count.
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
    finally:
        killer.done.set()
        if worker.poll() is None:
            worker.kill()
            worker.wait(30)
        sender.close()
    tally = ledger.tally([result.id])
    report = (
        f"{MEMBERS} members, {killer.kills} children SIGKILLed; callback: {tally.describe()}\n"
        + "\n".join(log.read_text(errors="replace").splitlines()[-15:])
    )
    print("\n" + report)
    assert value == [MEMBERS, 1], report
    assert tally.lost == [] and tally.duplicates == 0 and tally.strangers == 0, report
    assert killer.kills >= 3, report
    if fault is not None:
        assert "CONNECTION_FORCED" in log.read_text(errors="replace"), report


@pytest.mark.timeout(RUN_TIMEOUT_S + 120)
def test_sqlite_chord_under_child_kills_calls_back_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'chord.db'}"
    with new_ledger() as ledger:
        run_chord(url, url, ledger, tmp_path / "worker.log", visibility_timeout="3")


@pytest.mark.timeout(RUN_TIMEOUT_S + 300)
def test_rabbitmq_chord_under_child_kills_and_a_closed_connection_calls_back_once(
    tmp_path: Path,
) -> None:
    redis = stores.redis_store(tmp_path)
    try:
        with private_node() as node, new_ledger() as ledger:
            log = tmp_path / "worker.log"

            def close_once() -> None:
                # Once members run (100 results stored), the broker drops the worker's
                # connection: deliveries settled but not yet acknowledged come back.
                import redis as redis_client

                prefix = redis.results.rsplit("prefix=", 1)[1]
                client = redis_client.Redis(host=stores.REDIS_HOST, port=stores.REDIS_PORT)
                deadline = time.monotonic() + 120
                try:
                    while client.zcard(f"{prefix}:results") < 100:
                        assert time.monotonic() < deadline, "no member ran within 120 s"
                        time.sleep(0.05)  # polling the store for progress
                finally:
                    client.close()
                assert node.close_all_connections() >= 1

            run_chord(node.url, redis.results, ledger, log, close_once)
    finally:
        redis.cleanup()
