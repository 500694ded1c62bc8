"""Fault tests on the embedded broker: real worker processes, killed and stopped by signals.

Every task execution is written to a ledger (a separate SQLite file) by the task itself, so the
tests count lost and duplicated work exactly instead of trusting the worker's own numbers.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor import Conveyor
from conveyor.results import State

pytestmark = pytest.mark.integration

Poll = Callable[..., Any]

APP_MODULE = """
import os, sqlite3, time
from conveyor import Conveyor

app = Conveyor("faults", broker="sqlite:///{db}", visibility_timeout=2.0)


def _ledger(n):
    return sqlite3.connect("{ledger}", timeout=30, isolation_level=None)


@app.task(name="faults.work")
def work(n: int, seconds: float) -> int:
    conn = _ledger(n)
    conn.execute("INSERT INTO runs VALUES (?, ?, 'start')", (n, os.getpid()))
    time.sleep(seconds)  # the work itself
    conn.execute("INSERT INTO runs VALUES (?, ?, 'end')", (n, os.getpid()))
    conn.close()
    return n
"""


@pytest.fixture
def project(tmp_path: Path) -> Iterator[tuple[Path, Conveyor]]:
    """A module with the app, importable by worker processes started in `tmp_path`."""
    db, ledger = tmp_path / "broker.db", tmp_path / "ledger.db"
    source = APP_MODULE.format(db=db, ledger=ledger)
    (tmp_path / "faultapp.py").write_text(textwrap.dedent(source))
    # Created up front: tasks racing to create it could fail on the journal-mode switch.
    conn = sqlite3.connect(ledger, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE runs (n INTEGER, pid INTEGER, phase TEXT)")
    conn.close()
    producer = Conveyor("faults", broker=f"sqlite:///{db}", visibility_timeout=2.0)

    @producer.task(name="faults.work")
    def work(n: int, seconds: float) -> int:
        raise AssertionError("runs only in workers")

    yield tmp_path, producer
    producer.close()


StartWorker = Callable[..., "subprocess.Popen[bytes]"]


@pytest.fixture
def start_worker() -> Iterator[StartWorker]:
    """Start `conveyor worker faultapp:app` processes; any still running at the end is killed."""
    started: list[subprocess.Popen[bytes]] = []

    def start(cwd: Path, *args: str, pool: str = "threads") -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "conveyor", "worker", "faultapp:app", "--pool", pool]
        process = subprocess.Popen(
            [*cmd, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.communicate()


def ledger_rows(cwd: Path, phase: str) -> list[tuple[int, int]]:
    conn = sqlite3.connect(cwd / "ledger.db", timeout=30)
    try:
        return conn.execute("SELECT n, pid FROM runs WHERE phase = ?", (phase,)).fetchall()
    finally:
        conn.close()


def test_sigkill_mid_run_then_restart_loses_nothing(
    project: tuple[Path, Conveyor], poll: Poll, start_worker: StartWorker
) -> None:
    cwd, app = project
    n = 1500
    results = app.tasks["faults.work"].map([(i, 0.002) for i in range(n)])
    worker = start_worker(cwd, "--concurrency", "4")
    poll(lambda: len(ledger_rows(cwd, "end")) >= 200, timeout=60, what="the first 200 tasks")
    worker.send_signal(signal.SIGKILL)
    assert worker.wait(timeout=10) == -signal.SIGKILL
    killed_at = len(ledger_rows(cwd, "end"))
    assert killed_at < n, "the worker finished everything before it was killed"

    restarted = start_worker(cwd, "--concurrency", "4", "--until-empty")
    output = restarted.communicate(timeout=120)[0].decode()
    assert restarted.returncode == 0, output

    states = [r.state for r in results]
    ran = [number for number, _ in ledger_rows(cwd, "end")]
    begun = [number for number, _ in ledger_rows(cwd, "start")]
    duplicates = len(ran) - len(set(ran))
    print(
        f"\nSIGKILL after {killed_at} of {n} tasks: {len(begun) - len(set(begun))} interrupted "
        f"tasks ran again, {duplicates} completed twice, 0 lost"
    )
    assert states.count(State.SUCCESS) == n
    assert sorted(set(ran)) == list(range(n))
    # Only tasks in flight at the kill can run twice: at most the worker's concurrency.
    assert duplicates <= 4
    assert all(s.ready == s.in_flight == s.delayed == 0 for s in app.broker.stats())


@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_sigterm_finishes_running_tasks_and_loses_none(
    project: tuple[Path, Conveyor], poll: Poll, start_worker: StartWorker, pool: str
) -> None:
    cwd, app = project
    n = 40
    results = app.tasks["faults.work"].map([(i, 0.3) for i in range(n)])
    concurrency = "1" if pool == "solo" else "4"  # solo runs one at a time, and says so
    worker = start_worker(cwd, "--concurrency", concurrency, "--shutdown-grace", "30", pool=pool)
    # The solo pool runs tasks on the loop's own thread: it must still hear the signal.
    poll(lambda: len(ledger_rows(cwd, "start")) >= 3, timeout=60, what="tasks to start")
    worker.send_signal(signal.SIGTERM)
    output = worker.communicate(timeout=60)[0].decode()
    assert worker.returncode == 0, output
    assert "warm shutdown" in output

    started = {number for number, _ in ledger_rows(cwd, "start")}
    finished = {number for number, _ in ledger_rows(cwd, "end")}
    assert started == finished, "a task that started was cut off"
    assert all(results[i].state == State.SUCCESS for i in finished)
    (stats,) = app.broker.stats()
    assert stats.in_flight == 0
    assert stats.ready == n - len(finished)

    rest = start_worker(cwd, "--concurrency", "4", "--until-empty")
    assert rest.wait(timeout=120) == 0
    ran = [number for number, _ in ledger_rows(cwd, "end")]
    assert sorted(ran) == list(range(n)), "lost or duplicated tasks"
    assert all(r.state == State.SUCCESS for r in results)


def test_second_signal_gives_running_tasks_back_at_once(
    project: tuple[Path, Conveyor], poll: Poll, start_worker: StartWorker
) -> None:
    cwd, app = project
    results = app.tasks["faults.work"].map([(i, 30.0) for i in range(2)])
    worker = start_worker(cwd, "--concurrency", "2", "--shutdown-grace", "60")
    poll(lambda: len(ledger_rows(cwd, "start")) == 2, timeout=60, what="both tasks to start")
    worker.send_signal(signal.SIGTERM)
    # Two signals sent back to back can merge into one; send the second once the first landed.
    assert worker.stdout is not None
    seen = b""
    while b"warm shutdown" not in seen:
        line = worker.stdout.readline()
        assert line, f"the worker exited before a warm shutdown: {seen.decode()}"
        seen += line
    worker.send_signal(signal.SIGTERM)
    output = seen.decode() + worker.communicate(timeout=20)[0].decode()
    assert worker.returncode == 0, output
    assert "cold shutdown" in output
    (stats,) = app.broker.stats()
    assert stats.ready == 2 and stats.in_flight == 0, "the running tasks were not given back"
    assert all(r.state == State.STARTED for r in results)
    fetched = app.broker.fetch(["default"], 2)
    assert [d.delivery_count for d in fetched] == [2, 2]
    assert os.path.exists(cwd / "broker.db")
