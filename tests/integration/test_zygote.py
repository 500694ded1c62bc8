"""The prefork zygote dies mid-run: the worker starts a new one and finishes every task.

A real `conveyor worker chaos_app:app` (prefork, 4 children) drains 3,000 tasks of 2 ms, each
run noted in the PostgreSQL ledger; at a third of them the test SIGKILLs the pool's zygote. The
worker must stay up, start a new zygote in a fresh interpreter, and run every task exactly once:
the orphaned children finish what they were given, so not even a duplicate is allowed. A zygote
that cannot be started (the app's module no longer imports) is reported once per attempt, and
then the worker stops with status 1, leaving what it did not run in the broker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest
from conftest import RABBITMQ_URL, delete_rabbitmq_queues, require_rabbitmq
from ledger import new_ledger

from conveyor import Conveyor
from conveyor.worker.pools.prefork import ZYGOTE_ATTEMPTS

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

HERE = Path(__file__).parent
TASKS = 3_000
STOP_TIMEOUT_S = 60


def children_of(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with suppress(OSError):
            kids += [int(p) for p in (task / "children").read_text().split()]
    return kids


def wait(condition: object, what: str, worker: subprocess.Popen[bytes], log: Path) -> None:
    """Poll `condition` (a callable) for up to 120 s while the worker stays up."""
    assert callable(condition)
    deadline = time.monotonic() + 120
    while not condition():
        assert worker.poll() is None, f"the worker exited while waiting for {what}\n{tail(log)}"
        assert time.monotonic() < deadline, f"{what}: not within 120 s\n{tail(log)}"
        time.sleep(0.05)  # polling the ledger or /proc


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def send(url: str, n: int, **settings: object) -> list[str]:
    producer = Conveyor("chaos", broker=url, **settings)  # type: ignore[arg-type]

    @producer.task(name="chaos.step", ignore_result=True)
    def step(k: int) -> None:
        raise AssertionError("runs only in workers")

    try:
        return [h.id for h in step.map([(k,) for k in range(n)])]
    finally:
        producer.close()


def start_worker(
    app: str, env: dict[str, str], log: Path, cwd: Path, *args: str
) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "conveyor", "worker", app, "--pool", "prefork", *args],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def stop(worker: subprocess.Popen[bytes]) -> int:
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
    try:
        return worker.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait(10)
        raise


@pytest.fixture(params=["sqlite", "rabbitmq"])
def broker_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The worker's broker settings: a SQLite file, or a queue of its own on RabbitMQ."""
    if request.param == "sqlite":
        yield {"CONVEYOR_BROKER": f"sqlite:///{tmp_path / 'q.db'}"}
        return
    require_rabbitmq()
    queue = f"zygote-{uuid.uuid4().hex[:8]}"
    try:
        yield {"CONVEYOR_BROKER": RABBITMQ_URL, "CONVEYOR_DEFAULT_QUEUE": queue}
    finally:
        delete_rabbitmq_queues(queue)


def test_a_killed_zygote_is_replaced_and_every_task_runs_once(
    broker_env: dict[str, str], tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env |= broker_env | {"PYTHONPATH": str(HERE)}
    settings = {"default_queue": broker_env.get("CONVEYOR_DEFAULT_QUEUE", "default")}
    log = tmp_path / "worker.log"
    with new_ledger() as ledger:
        sent = send(broker_env["CONVEYOR_BROKER"], TASKS, **settings)
        worker = start_worker("chaos_app:app", env | ledger.env, log, HERE, "-c", "4")
        try:
            wait(lambda: ledger.distinct() >= TASKS // 3, "a third of the tasks", worker, log)
            (zygote,) = children_of(worker.pid)
            orphans = children_of(zygote)
            os.kill(zygote, signal.SIGKILL)
            wait(
                lambda: children_of(worker.pid) not in ([], [zygote]),
                "a new zygote",
                worker,
                log,
            )
            (new_zygote,) = children_of(worker.pid)
            wait(lambda: len(children_of(new_zygote)) == 4, "4 new children", worker, log)
            wait(lambda: ledger.distinct() >= TASKS, "every task", worker, log)
            assert worker.poll() is None, f"the worker exited\n{tail(log)}"
        finally:
            status = stop(worker)
        tally = ledger.tally(sent)
    text = log.read_text()
    print(f"\nzygote SIGKILLed at a third, {len(orphans)} orphaned children: {tally.describe()}")
    assert status == 0, tail(log)
    assert tally.lost == [] and tally.strangers == 0
    assert tally.duplicates == 0, "orphaned children finish their tasks: nothing runs twice"
    assert f"the prefork zygote (pid {zygote}) was killed by SIGKILL: starting a new one" in text
    assert f"new prefork zygote (pid {new_zygote}) ready in" in text
    assert "Traceback" not in text, tail(log)


FLAKY_APP = textwrap.dedent(
    """
    import os
    import time
    from pathlib import Path

    from conveyor import Conveyor

    if Path(os.environ["FLAKY_FLAG"]).exists():
        raise RuntimeError("flaky_app refuses to be imported again")

    app = Conveyor("flaky")


    @app.task(name="flaky.work")
    def work(n: int) -> int:
        time.sleep(0.05)
        return n
    """
)


def test_a_zygote_that_cannot_start_is_reported_per_attempt_and_messages_stay(
    tmp_path: Path,
) -> None:
    (tmp_path / "flaky_app.py").write_text(FLAKY_APP)
    flag = tmp_path / "refuse"
    url = f"sqlite:///{tmp_path / 'q.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env |= {"CONVEYOR_BROKER": url, "FLAKY_FLAG": str(flag)}
    log = tmp_path / "worker.log"
    app = Conveyor("flaky", broker=url)

    @app.task(name="flaky.work")
    def work(n: int) -> int:
        raise AssertionError("runs only in workers")

    n = 200
    handles = work.map([(k,) for k in range(n)])
    store = app.results
    assert store is not None
    worker = start_worker("flaky_app:app", env, log, tmp_path, "-c", "1")
    try:
        wait(lambda: store.count() >= 5, "the first tasks", worker, log)
        flag.touch()
        (zygote,) = children_of(worker.pid)
        os.kill(zygote, signal.SIGKILL)
        status = worker.wait(STOP_TIMEOUT_S)
    finally:
        if worker.poll() is None:
            stop(worker)
    text = log.read_text()
    attempts = [
        line for line in text.splitlines() if "could not start a new prefork zygote (" in line
    ]
    reason = "RuntimeError: flaky_app refuses to be imported again"
    assert status == 1, tail(log)
    assert len(attempts) == ZYGOTE_ATTEMPTS, tail(log)
    assert all(reason in line for line in attempts), attempts
    assert all(f"(attempt {k} of {ZYGOTE_ATTEMPTS})" in line for k, line in enumerate(attempts, 1))
    assert (
        f"the worker stopped: could not start a new prefork zygote in {ZYGOTE_ATTEMPTS} "
        f"attempts: {reason}"
    ) in text
    ran = sum(1 for h in handles if h.ready())
    [stats] = app.broker.stats(["default"])
    assert ran >= 5 and stats.dead == 0
    assert stats.ready == n - ran, "what the worker did not run stays in the broker"
    app.close()
