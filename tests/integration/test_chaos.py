"""Chaos runs: thousands of tasks through a prefork worker while processes and brokers die.

A run sends its tasks with confirms, starts `conveyor worker chaos_app:app` (prefork, 4
children), and while the worker drains the queue:

- a random child is SIGKILLed every second,
- at set points of progress, the worker's parent is SIGKILLed and a new worker started, the
  pool's zygote is SIGKILLed (the worker must start a new zygote and run on), the broker closes
  every connection (`rabbitmqctl
  close_all_connections`), and the broker restarts (a private RabbitMQ node with its own name,
  ports and data; never the shared service).

Every run of a task is a row in a PostgreSQL ledger (`ledger.py`), so the end counts exactly:
no task whose send returned may be missing; duplicate runs may only come from tasks in flight at
a fault (at most one per killed child, at most the worker's prefetch per killed parent or lost
connection); and after the broker's return the worker is back to full speed within 30 s.

The short runs (20,000 tasks) are part of `make test`. `make chaos` runs the long ones
(`CONVEYOR_CHAOS=long`: 100,000 tasks, more faults). Counts are printed (`pytest -s`).
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from ledger import Ledger, Tally, new_ledger
from rabbit_node import RabbitNode, private_node

from conveyor import Conveyor
from conveyor.worker.pools.prefork import MAX_DEPTH

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

HERE = Path(__file__).parent
LONG = os.environ.get("CONVEYOR_CHAOS") == "long"
TASKS = 100_000 if LONG else 20_000
CHILDREN = 4
SEND_BATCH = 1_000
#: A killed worker holds at most this many unacknowledged deliveries: its pool's prefetch.
PREFETCH_CEILING = CHILDREN * MAX_DEPTH
RECOVERY_LIMIT_S = 30.0
#: "Full throughput" after the broker's return: this share of the rate before it went away.
FULL_SHARE = 0.75
RUN_TIMEOUT_S = 900 if LONG else 300
WORKER_COMMAND = (sys.executable, "-m", "conveyor", "worker", "chaos_app:app")

WORKER, ZYGOTE = "kill the worker", "kill the zygote"
CONNECTIONS, BROKER = "close all connections", "restart the broker"
RABBIT_PLAN = (
    [
        (0.10, WORKER),
        # The rate before the restart is measured from the last fault's end to it: seconds
        # enough for a median, however fast the worker has become.
        (0.40, BROKER),
        (0.55, CONNECTIONS),
        (0.65, WORKER),
        (0.70, ZYGOTE),
        (0.80, WORKER),
    ]
    if not LONG
    else [
        (0.05, WORKER),
        (0.12, CONNECTIONS),
        (0.20, WORKER),
        (0.30, BROKER),
        (0.45, WORKER),
        (0.55, CONNECTIONS),
        (0.65, WORKER),
        (0.75, WORKER),
        (0.80, ZYGOTE),
        (0.85, CONNECTIONS),
        (0.92, WORKER),
    ]
)
SQLITE_PLAN = [(0.10, WORKER), (0.35, WORKER), (0.50, ZYGOTE), (0.60, WORKER), (0.80, WORKER)] + (
    [(0.20, WORKER), (0.45, ZYGOTE), (0.70, WORKER), (0.90, WORKER)] if LONG else []
)


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid`, from /proc (children first, then theirs)."""
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with suppress(OSError):
                kids = [int(p) for p in (task / "children").read_text().split()]
                found += kids
                frontier += kids
    return found


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


class WorkerProcess:
    """`conveyor worker chaos_app:app` in a subprocess, started again after each kill."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0

    def start(self) -> None:
        """Start a worker; its output goes to the log file."""
        self.started += 1
        with self.log.open("ab") as out:
            out.write(f"--- worker {self.started}\n".encode())
            out.flush()
            self.process = subprocess.Popen(
                [*WORKER_COMMAND, "--pool", "prefork", "--concurrency", str(CHILDREN)],
                cwd=HERE,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def children(self) -> list[int]:
        """The processes running tasks: the children of the pool's zygote."""
        process = self.process
        if process is None or process.poll() is not None:
            return []
        zygotes = [int(p) for p in _children_of(process.pid)]
        return [kid for zygote in zygotes for kid in _children_of(zygote)]

    def kill(self) -> None:
        """SIGKILL the worker's parent process; its zygote and children must follow it out."""
        process = self.process
        assert process is not None
        family = descendants(process.pid)
        process.kill()
        process.wait(30)
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in family):
            assert time.monotonic() < deadline, (
                f"processes of a SIGKILLed worker still running after 30 s: "
                f"{[pid for pid in family if alive(pid)]}\n{self.tail()}"
            )
            time.sleep(0.05)

    def kill_zygote(self) -> None:
        """SIGKILL the pool's zygote; the worker must start a new one and run on."""
        process = self.process
        assert process is not None
        (zygote,) = _children_of(process.pid)
        os.kill(zygote, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while _children_of(process.pid) in ([], [zygote]):
            assert process.poll() is None, f"the worker exited\n{self.tail()}"
            assert time.monotonic() < deadline, f"no new zygote in 60 s\n{self.tail()}"
            time.sleep(0.05)  # polling /proc for the new zygote
        assert process.poll() is None, f"the worker exited\n{self.tail()}"

    def stop(self) -> int | None:
        """SIGTERM and wait: a warm shutdown. The exit code (None if it had to be killed)."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                return process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(30)
                return None
        return process.returncode

    def tail(self, lines: int = 30) -> str:
        """The end of the workers' output, for failure messages."""
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


def _children_of(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with suppress(OSError):
            kids += [int(p) for p in (task / "children").read_text().split()]
    return kids


class ChildKiller(threading.Thread):
    """SIGKILLs a random task child of the current worker every second."""

    def __init__(self, worker: WorkerProcess) -> None:
        super().__init__(name="child-killer", daemon=True)
        self.worker = worker
        self.kills = 0
        self.done = threading.Event()
        self.random = random.Random(8)

    def run(self) -> None:
        while not self.done.wait(1.0):  # the pace of the faults, not a synchronization
            children = self.worker.children()
            if not children:
                continue
            with suppress(ProcessLookupError):
                os.kill(self.random.choice(children), signal.SIGKILL)
                self.kills += 1


@dataclass
class Fault:
    """One fault of a run: what, when, and the most duplicates it may cause."""

    kind: str
    at: float
    progress: int
    back_at: float = 0.0
    """When a restarted broker served again."""


@dataclass
class Run:
    """What a chaos run did and what its ledger says."""

    tally: Tally
    faults: list[Fault] = field(default_factory=list)
    child_kills: int = 0
    workers: int = 0
    seconds: float = 0.0
    recovery_s: float | None = None
    rate_before: float = 0.0

    @property
    def duplicate_bound(self) -> int:
        """The most duplicate runs the faults allow: what was in flight at each."""
        return self.child_kills + PREFETCH_CEILING * len(self.faults)

    def report(self, broker: str) -> str:
        """The counts, as printed after the run."""
        kinds = ", ".join(
            f"{sum(1 for f in self.faults if f.kind == k)}x {k}"
            for k in (WORKER, ZYGOTE, CONNECTIONS, BROKER)
            if any(f.kind == k for f in self.faults)
        )
        lines = [
            f"chaos on {broker}: {TASKS:,} tasks, {CHILDREN} children, {self.seconds:.1f} s",
            f"  faults: {self.child_kills} children SIGKILLed, {kinds}; "
            f"{self.workers} worker processes in all",
            f"  ledger: {self.tally.describe()}",
            f"  duplicates {self.tally.duplicates} <= bound {self.duplicate_bound} "
            f"(1 per killed child, {PREFETCH_CEILING} per other fault)",
        ]
        if self.recovery_s is not None:
            lines.append(
                f"  after the broker's return: {FULL_SHARE:.0%} of the "
                f"{self.rate_before:,.0f} tasks/s before it, within {self.recovery_s:.1f} s"
            )
        return "\n".join(lines)


def wait_progress(
    ledger: Ledger, count: int, worker: WorkerProcess, timeout: float = RUN_TIMEOUT_S
) -> int:
    """Poll the ledger until `count` different tasks have run; the count reached."""
    deadline = time.monotonic() + timeout
    while True:
        done = ledger.distinct()
        if done >= count:
            return done
        assert time.monotonic() < deadline, (
            f"only {done:,} of {count:,} tasks ran within {timeout:.0f} s\n{worker.tail()}"
        )
        assert worker.process is None or worker.process.poll() is None, (
            f"the worker exited by itself\n{worker.tail()}"
        )
        time.sleep(0.2)  # polling interval of the ledger


def send_all(url: str, **settings: object) -> list[str]:
    """Send the run's tasks with confirms; the ids of those whose sends returned."""
    producer = Conveyor("chaos", broker=url, **settings)  # type: ignore[arg-type]

    @producer.task(name="chaos.step", ignore_result=True)
    def step(n: int) -> None:
        raise AssertionError("runs only in workers")

    sent: list[str] = []
    try:
        for start in range(0, TASKS, SEND_BATCH):
            handles = step.map([(n,) for n in range(start, min(start + SEND_BATCH, TASKS))])
            sent += [h.id for h in handles]
    finally:
        producer.close()
    return sent


def full_speed_after(
    per_second: dict[int, int], before: tuple[float, float], back_at: float
) -> tuple[float, float | None]:
    """The rate before a broker restart, and the seconds after its return to reach it again.

    The rate before is the median of whole seconds in `before`; "reached" is the end of the
    first two-second window after `back_at` that ran `FULL_SHARE` of that rate.
    """
    first, last = int(before[0]) + 1, int(before[1]) - 1
    rates = [per_second.get(s, 0) for s in range(first, last)]
    rate = statistics.median(rates) if rates else 0.0
    start = int(back_at)
    for second in range(start, start + int(RECOVERY_LIMIT_S) + 60):
        window = per_second.get(second, 0) + per_second.get(second + 1, 0)
        if window >= 2 * FULL_SHARE * rate:
            return rate, second + 2 - back_at
    return rate, None


@contextmanager
def worker_under_chaos(
    env: dict[str, str], tmp_path: Path
) -> Iterator[tuple[WorkerProcess, ChildKiller]]:
    """A started worker and a running child killer; both stopped on the way out."""
    worker = WorkerProcess(env, tmp_path / "workers.log")
    worker.start()
    killer = ChildKiller(worker)
    killer.start()
    try:
        yield worker, killer
    finally:
        killer.done.set()
        killer.join(10)
        worker.stop()


def run_chaos(
    env: dict[str, str],
    ledger: Ledger,
    sent: list[str],
    plan: list[tuple[float, str]],
    tmp_path: Path,
    act: Callable[[str, WorkerProcess], float],
) -> Run:
    """Drain `sent` through a worker under the faults of `plan`; `act` carries out one fault."""
    began = time.time()
    faults: list[Fault] = []
    with worker_under_chaos(env | ledger.env, tmp_path) as (worker, killer):
        for share, kind in sorted(plan):
            progress = wait_progress(ledger, int(share * len(sent)), worker)
            fault = Fault(kind, time.time(), progress)
            fault.back_at = act(kind, worker)
            faults.append(fault)
        wait_progress(ledger, len(sent), worker)
        run = Run(ledger.tally(sent), faults, killer.kills, worker.started, time.time() - began)
    return run


def chaos_env(broker: str, **extra: str) -> dict[str, str]:
    """The workers' environment: this interpreter's, with the broker and nothing inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    return env | {"CONVEYOR_BROKER": broker, "PYTHONPATH": str(HERE)} | extra


def replace_worker(kind: str, worker: WorkerProcess) -> None:
    """Kill the worker's parent, then start a new worker; or kill its zygote, which the
    worker replaces by itself."""
    if kind == ZYGOTE:
        worker.kill_zygote()
    else:
        worker.kill()
        worker.start()


def check(run: Run, broker: str) -> None:
    """Print the run's counts; nothing lost, nothing strange, duplicates within the bound."""
    report = run.report(broker)
    print("\n" + report)
    assert run.tally.lost == [], report
    assert run.tally.strangers == 0, report
    assert run.tally.duplicates <= run.duplicate_bound, report


@pytest.fixture
def node() -> Iterator[RabbitNode]:
    with private_node() as started:
        yield started


@pytest.mark.timeout(RUN_TIMEOUT_S + 300)
def test_rabbitmq_chaos_loses_nothing(node: RabbitNode, tmp_path: Path) -> None:
    with new_ledger() as ledger:
        sent = send_all(node.url)

        def act(kind: str, worker: WorkerProcess) -> float:
            if kind == CONNECTIONS:
                node.close_all_connections()
            elif kind == BROKER:
                node.stop()
                node.start()
            else:
                replace_worker(kind, worker)
            return time.time()

        run = run_chaos(chaos_env(node.url), ledger, sent, RABBIT_PLAN, tmp_path, act)
        restart = next(f for f in run.faults if f.kind == BROKER)
        earlier = max(f.back_at for f in run.faults if f.back_at < restart.at)
        run.rate_before, run.recovery_s = full_speed_after(
            ledger.per_second(), (earlier, restart.at), restart.back_at
        )
    check(run, "RabbitMQ")
    assert run.rate_before > 0, "no whole second before the restart to measure the rate in"
    assert run.recovery_s is not None and run.recovery_s <= RECOVERY_LIMIT_S, run.report("RabbitMQ")


@pytest.mark.timeout(RUN_TIMEOUT_S + 120)
def test_sqlite_chaos_loses_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'chaos.db'}"
    # A SIGKILLed worker's leases run out after this; the next worker then runs those tasks.
    lease = "3"
    with new_ledger() as ledger:
        sent = send_all(url, visibility_timeout=float(lease))

        def act(kind: str, worker: WorkerProcess) -> float:
            replace_worker(kind, worker)
            return time.time()

        env = chaos_env(url, CONVEYOR_VISIBILITY_TIMEOUT=lease)
        run = run_chaos(env, ledger, sent, SQLITE_PLAN, tmp_path, act)
    check(run, "SQLite")
