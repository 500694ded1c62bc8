"""The scheduler against real stores and processes: claims on SQLite, PostgreSQL and Redis, and
three `conveyor scheduler` processes whose current claimer is SIGKILLed every 2 s."""

from __future__ import annotations

import collections
import datetime as dt
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import RABBITMQ_URL, delete_rabbitmq_queues, require_rabbitmq, wait_for
from stores import postgresql_store, redis_store

from conveyor import Conveyor
from conveyor.message import decode
from conveyor.scheduler import HEADER_TICK, tick_id, tick_task_id
from conveyor.scheduler.claims import Claims, from_url

pytestmark = pytest.mark.integration

T0 = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.UTC)


def _postgres(tmp_path: Path) -> str:
    return postgresql_store(tmp_path).results.split("?")[0]


_cleanups: list[Callable[[], None]] = []


def _redis(tmp_path: Path) -> str:
    setup = redis_store(tmp_path)
    _cleanups.append(setup.cleanup)
    return setup.results


@pytest.fixture(autouse=True)
def _clean_redis() -> Iterator[None]:
    yield
    while _cleanups:
        _cleanups.pop()()


STORES: dict[str, Callable[[Path], str]] = {
    "sqlite": lambda tmp_path: f"sqlite:///{tmp_path}/claims.db",
    "postgresql": _postgres,
    "redis": _redis,
}


@pytest.fixture(params=sorted(STORES))
def claims(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Claims]:
    store = from_url(STORES[request.param](tmp_path))
    yield store
    store.close()


def test_a_tick_is_claimed_once_and_a_claim_that_ran_out_unsent_is_taken_over(
    claims: Claims,
) -> None:
    name = f"test-{uuid.uuid4().hex[:8]}"
    tick, now = T0, dt.datetime.now(dt.UTC)
    assert claims.last(name) is None
    assert claims.claim(name, tick, "a", 0.2, now)
    assert not claims.claim(name, tick, "b", 0.2, now)  # held
    last = claims.last(name)
    assert last is not None and (last.tick, last.owner, last.sent) == (tick, "a", False)
    # "a" dies; once its lease has run out, the tick is stranded and "b" takes it over.
    later = now + dt.timedelta(seconds=1)
    # Redis expires the claim on its own clock.
    assert wait_for(lambda: claims.stranded(name, later), what="the claim to run out") == [tick]
    assert claims.claim(name, tick, "b", 30, later)
    claims.sent(name, tick, "b")
    assert claims.stranded(name, later + dt.timedelta(hours=1)) == []
    assert not claims.claim(name, tick, "c", 30, later + dt.timedelta(hours=1))  # sent: for good
    last = claims.last(name)
    assert last is not None and (last.tick, last.owner, last.sent) == (tick, "b", True)
    # The latest tick is what a restarted scheduler starts from, whatever order claims came in.
    older = tick - dt.timedelta(minutes=1)
    assert claims.claim(name, older, "c", 30, later)
    last = claims.last(name)
    assert last is not None and last.tick == tick


HA_APP = textwrap.dedent(
    """
    import datetime as dt
    from conveyor import Conveyor

    app = Conveyor("ha")

    @app.periodic(
        every=dt.timedelta(milliseconds={every_ms}), name="fast", missed="all", max_missed=1000
    )
    @app.task(name="ha.tick")
    def tick() -> None:
        pass
    """
)


class Schedulers:
    """Three `conveyor scheduler` processes on one app and one claim store."""

    def __init__(self, folder: Path, broker: str, store: str) -> None:
        self.folder, self.broker, self.store = folder, broker, store
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
        self.env = env | {
            "CONVEYOR_BROKER": broker,
            "CONVEYOR_SCHEDULER_STORE": store,
            "PYTHONPATH": str(folder),
        }
        self.running: dict[int, subprocess.Popen[bytes]] = {}
        self.started = 0

    def start(self) -> None:
        log = open(self.folder / f"scheduler-{self.started}.log", "wb")  # noqa: SIM115
        self.started += 1
        process = subprocess.Popen(
            [sys.executable, "-m", "conveyor", "scheduler", "ha_app:app", "--lease", "3"],
            cwd=self.folder,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.running[process.pid] = process

    def kill_claimer(self, claims: Claims) -> bool:
        """SIGKILL the scheduler that claimed the latest tick, and start another."""
        last = claims.last("fast")
        pid = None if last is None else int(last.owner.split(":")[1])
        if pid not in self.running:
            print(f"no running claimer to kill: last claim {last}, running {sorted(self.running)}")
            return False
        process = self.running.pop(pid)  # type: ignore[arg-type]
        process.kill()
        process.wait(timeout=10)
        self.start()
        return True

    def stop(self) -> None:
        for process in self.running.values():
            process.send_signal(signal.SIGTERM)
        for process in self.running.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def logs(self) -> str:
        return "\n".join(
            p.read_text(errors="replace")[-2000:] for p in sorted(self.folder.glob("*.log"))
        )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("store_kind", ["sqlite", "redis"])
def test_three_schedulers_with_their_claimer_killed_send_every_tick_once(
    tmp_path: Path, store_kind: str
) -> None:
    """A tick every 100 ms for 20 s (200 ticks), the current claimer SIGKILLed every 2 s.

    A replacement scheduler takes seconds to start on a busy machine, so at times none runs:
    the schedule sends every missed tick (`missed="all"`), and none may be lost. Claims hold for
    3 s (`--lease 3`), so that a killed claimer's unsent tick goes out soon.

    On SQLite the claims live in the broker's own file: claim, send and record are one
    transaction, so every tick is sent exactly once. With Redis claims the documented window
    remains (killed after the send and before the store's record of it: the tick is sent again
    with the same task id), so a tick may be sent twice only as often as kills happened, and
    never with another id.
    """
    every_ms, seconds, kill_every = 100, 20.0, 2.0
    (tmp_path / "ha_app.py").write_text(HA_APP.format(every_ms=every_ms))
    broker = f"sqlite:///{tmp_path}/broker.db"
    store = broker if store_kind == "sqlite" else STORES[store_kind](tmp_path)
    claims = from_url(store)
    fleet = Schedulers(tmp_path, broker, store)
    kills = 0
    try:
        for _ in range(3):
            fleet.start()
        wait_for(lambda: claims.last("fast"), timeout=60, what="a scheduler to start")
        for _ in range(int(seconds / kill_every)):
            time.sleep(kill_every)  # the faults' timetable, not a wait for anything
            kills += fleet.kill_claimer(claims)
    finally:
        fleet.stop()
        claims.close()
    reader = Conveyor("ha-reader", broker=broker, results=None)
    try:
        deliveries = reader.broker.fetch(["default"], 100_000)
    finally:
        reader.close()
    sent = collections.Counter(decode(d.body).headers[HEADER_TICK] for d in deliveries)
    ids = {decode(d.body).headers[HEADER_TICK]: decode(d.body).id for d in deliveries}
    ticks = sorted(sent)
    assert len(ticks) >= seconds * 1000 / every_ms / 2, fleet.logs()  # start-up takes a while
    # Consecutive: every tick from the first to the last was sent (none missed).
    step = dt.timedelta(milliseconds=every_ms)
    expected = {tick_id("fast", _at(ticks[0]) + k * step) for k in range(len(ticks))}
    missing = sorted(expected - set(ticks))
    doubled = {t: n for t, n in sent.items() if n > 1}
    print(
        f"\nscheduler HA on {store_kind}: {len(ticks)} ticks, {sum(sent.values())} sent, "
        f"{len(missing)} missed, {len(doubled)} doubled, {kills} claimers SIGKILLed, "
        f"{fleet.started} schedulers started"
    )
    assert kills >= 5, fleet.logs()
    assert missing == [], fleet.logs()
    assert all(ids[t] == tick_task_id("fast", _at(t)) for t in ticks)
    if store_kind == "sqlite":
        assert doubled == {}, fleet.logs()
    else:
        assert len(doubled) <= kills and all(n == 2 for n in doubled.values()), doubled


def _at(tick: str) -> dt.datetime:
    return dt.datetime.fromisoformat(tick.split("@")[1].replace("Z", "+00:00"))


WORKER_APP = textwrap.dedent(
    """
    import datetime as dt
    import os
    from conveyor import Conveyor
    from conveyor.task import current_request

    app = Conveyor("embedded")

    @app.periodic(every=dt.timedelta(milliseconds=200), name="often")
    @app.task(name="embedded.tick")
    def tick() -> None:
        request = current_request.get()
        with open(os.environ["TICKS_FILE"], "a") as out:
            out.write(request.headers["conveyor-tick"] + "\\n")
    """
)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("broker", ["sqlite", "rabbitmq"])
def test_a_worker_with_the_scheduler_sends_and_runs_the_ticks(tmp_path: Path, broker: str) -> None:
    """In the prefork worker's own process, started once its pool is up (it forks then)."""
    (tmp_path / "worker_app.py").write_text(WORKER_APP)
    ticks = tmp_path / "ticks.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env |= {"PYTHONPATH": str(tmp_path), "TICKS_FILE": str(ticks)}
    queue = f"sched-{uuid.uuid4().hex[:8]}"
    if broker == "rabbitmq":
        require_rabbitmq()
        env |= {
            "CONVEYOR_BROKER": RABBITMQ_URL,
            "CONVEYOR_DEFAULT_QUEUE": queue,
            "CONVEYOR_RESULTS": "",
            "CONVEYOR_SCHEDULER_STORE": f"sqlite:///{tmp_path}/claims.db",
        }
    command = [sys.executable, "-m", "conveyor", "worker", "worker_app:app", "--scheduler"]
    with open(tmp_path / "worker.log", "wb") as log:
        worker = subprocess.Popen(
            [*command, "-c", "2"],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(
            lambda: ticks.exists() and len(ticks.read_text().split()) >= 5,
            timeout=60,
            what="five ticks run",
        )
    finally:
        worker.send_signal(signal.SIGTERM)
        status = worker.wait(timeout=30)
        if broker == "rabbitmq":
            delete_rabbitmq_queues(queue)
    assert status == 0, (tmp_path / "worker.log").read_text()[-3000:]
    ran = ticks.read_text().split()
    assert len(ran) == len(set(ran)) and all(t.startswith("often@") for t in ran)
