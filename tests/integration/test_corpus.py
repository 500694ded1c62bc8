"""The bad-input corpus (tests/corpus/) through a real prefork worker process, on RabbitMQ and
on the embedded SQLite broker.

Each broker gets a worker (`conveyor worker` in a subprocess) and the whole corpus at once,
written as another program would write it: raw AMQP frames with exactly the properties the corpus
gives, or raw rows in the SQLite queue table. A good task follows the corpus. Then every case must
be in the dead-letter queue with its reason, none may have run, the good task must have run, and
the worker must still be alive. Run with `-s` to see the counts.

Cases marked as known bugs (`xfail` in cases.toml) go in a second round, to a second worker, with
a good task of their own: a bug that wedges a worker then shows in that round's test without
hiding what the rest of the corpus proves.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import sqlite3
import struct
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import RABBITMQ_URL, delete_rabbitmq_queues, require_rabbitmq, wait_for
from corpus.cases import Case, load_cases, pickle_payload, settings

from conveyor import Conveyor, DeadLetterReason
from conveyor.brokers.base import DeadLetter
from conveyor.testing import run_until_empty

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

LIMIT: int = settings()["max_message_size"]
SETTLE_TIMEOUT_S = 45.0
KNOWN_BUGS_TIMEOUT_S = 5.0  # these are expected not to settle: do not wait long
STOP_TIMEOUT_S = 10.0  # the worker's shutdown grace is 2 s
CASES = load_cases(limit=LIMIT)

WORKER_APP = """
from pathlib import Path

from conveyor import Conveyor, DeadLetterReason

app = Conveyor(
    "corpus", broker={broker!r}, results={results!r}, default_queue={queue!r},
    max_message_size={limit},
)


@app.task(name="corpus.record")
def record(note: str) -> str:
    # Every task that runs leaves a line: a corpus case that ran shows up here.
    with Path({ran!r}).open("a") as file:
        file.write(note + "\\n")
    return note
"""


def carried(broker: str, cases: list[Case]) -> list[Case]:
    """The cases a broker can carry: SQLite has no place for AMQP properties."""
    return [case for case in cases if broker == "rabbitmq" or not case.has_properties]


def known_bugs(broker: str) -> list[Case]:
    return [case for case in carried(broker, CASES) if case.xfail_reason(broker)]


# --- writing messages as another program would --------------------------------------------------


def _short(value: bytes) -> bytes:
    return struct.pack(">B", len(value)) + value


def content_header(channel: int, case: Case) -> bytes:
    """An AMQP content header frame with exactly the case's properties: pamqp would refuse text
    that is not UTF-8, and aiormq would add a message id."""
    flags, properties = 0, b""
    if case.content_type is not None:
        flags |= 0x8000
        properties += _short(case.content_type)
    if case.headers is not None:
        flags |= 0x2000
        table = b"".join(
            _short(name) + b"S" + struct.pack(">I", len(value)) + value
            for name, value in case.headers
        )
        properties += struct.pack(">I", len(table)) + table
    payload = struct.pack(">HHQH", 60, 0, len(case.body), flags) + properties
    return struct.pack(">BHI", 2, channel, len(payload)) + payload + b"\xce"


def body_frames(channel: int, body: bytes, frame_max: int) -> bytes:
    step = frame_max - 8  # a frame's 7-byte header and its end octet
    chunks = [body[i : i + step] for i in range(0, len(body), step)]
    return b"".join(struct.pack(">BHI", 3, channel, len(c)) + c + b"\xce" for c in chunks)


def publish_to_rabbitmq(queue: str, cases: list[Case]) -> None:
    """Publish each case's body to `queue` through the default exchange."""
    import aiormq
    from aiormq.abc import ChannelFrame
    from pamqp.commands import Basic
    from pamqp.frame import marshal

    async def publish() -> None:
        connection = await aiormq.connect(RABBITMQ_URL)
        channel = await connection.channel(publisher_confirms=False)
        frame_max = connection.connection_tune.frame_max
        for case in cases:
            frames = (
                marshal(Basic.Publish(exchange="", routing_key=queue), channel.number)
                + content_header(channel.number, case)
                + body_frames(channel.number, case.body, frame_max)
            )
            await channel.write_queue.put(ChannelFrame(frames, False))
        await channel.basic_qos(prefetch_count=1)  # a round trip: the publishes went first
        await connection.close()

    asyncio.run(publish())


def insert_into_sqlite(db: Path, queue: str, cases: list[Case]) -> None:
    with sqlite3.connect(db) as conn:
        conn.executemany(
            "INSERT INTO conveyor_messages (queue, priority, body) VALUES (?, 0, ?)",
            [(queue, case.body) for case in cases],
        )
    conn.close()


# --- the corpus, a worker per round ---------------------------------------------------------------


@dataclass
class Round:
    """Some cases, then a good task, and what the worker had done once they settled."""

    name: str
    cases: list[Case]
    good: str
    settled: bool = False
    good_ran: bool = False
    alive: bool = False
    dead: int = 0
    ran: list[str] = field(default_factory=list)
    left_in_queue: int = 0
    log: str = ""
    matched: int = 0
    exit_status: int | None = None

    def summary(self, broker: str) -> str:
        n = len(self.cases)
        text = f"{self.name} on {broker}: {n} case{'s' if n != 1 else ''}, "
        text += f"{self.matched} dead-lettered, {len(self.ran)} ran, "
        text += "worker alive" if self.alive else "worker NOT alive"
        if self.dead != self.matched:
            text += f" ({self.dead} dead letters in all: some reasons are not the expected ones)"
        if not self.good_ran:
            text += ", the good task did NOT run"
        if self.exit_status not in (0, None):
            text += f", exit status {self.exit_status} after SIGTERM"
        return text


class CorpusRun:
    """The corpus on one broker: a queue of its own, and rounds of cases, each given to a
    `conveyor worker` process of its own."""

    def __init__(self, broker: str, folder: Path) -> None:
        self.broker = broker
        self.folder = folder
        self.marker = folder / "unpickled-marker"
        self.cases = carried(broker, load_cases(limit=LIMIT, marker=self.marker))
        self.queue = f"corpus-{uuid.uuid4().hex[:10]}"
        self.ran_file = folder / "ran.txt"
        self.log_path = folder / "worker.log"
        self.rounds: list[Round] = []
        self.dead: list[DeadLetter] = []
        self.matches: dict[str, DeadLetter | None] = {}
        if broker == "rabbitmq":
            broker_url, results_url = RABBITMQ_URL, f"sqlite:///{folder / 'results.db'}"
        else:
            broker_url = results_url = f"sqlite:///{folder / 'broker.db'}"
        source = WORKER_APP.format(
            broker=broker_url,
            results=results_url,
            queue=self.queue,
            limit=LIMIT,
            ran=str(self.ran_file),
        )
        (folder / "corpusapp.py").write_text(source)
        self.app = Conveyor(
            "corpus",
            broker=broker_url,
            results=results_url,
            default_queue=self.queue,
            max_message_size=LIMIT,
        )

        @self.app.task(name="corpus.record")
        def record(note: str) -> str:
            return note  # runs only in the worker process

        self.app.broker.stats([self.queue])  # declares the queue, or creates the tables

    def start_worker(self) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
        command = [sys.executable, "-m", "conveyor", "worker", "corpusapp:app", "-P", "prefork"]
        command += ["--concurrency", "2", "--queues", self.queue, "--shutdown-grace", "2"]
        with self.log_path.open("ab") as log:
            return subprocess.Popen(command, cwd=self.folder, env=env, stdout=log, stderr=log)

    def notes(self) -> list[str]:
        return self.ran_file.read_text().splitlines() if self.ran_file.exists() else []

    def give(self, name: str, cases: list[Case], timeout: float) -> Round:
        """Start a worker, send it `cases` and then a good task, wait until all settled (or the
        deadline passed), note what happened and stop the worker."""
        round_ = Round(name, cases, good=f"the good task after the {name}")
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        worker = self.start_worker()
        try:
            self._give(round_, worker, timeout)
        finally:
            round_.exit_status = stop(worker)
        round_.log = self.log_path.read_bytes()[log_start:].decode(errors="replace")
        self.rounds.append(round_)
        return round_

    def _give(self, round_: Round, worker: subprocess.Popen[bytes], timeout: float) -> None:
        cases = round_.cases
        before = self.app.broker.stats([self.queue])[0].dead
        expected = before + len(cases)
        if self.broker == "rabbitmq":
            publish_to_rabbitmq(self.queue, cases)
        else:
            insert_into_sqlite(self.folder / "broker.db", self.queue, cases)
        seen = len(self.notes())  # tasks that ran in earlier rounds
        good = self.app.tasks["corpus.record"].delay(round_.good)

        def bad_ran() -> list[str]:
            return [note for note in self.notes()[seen:] if note != round_.good]

        def settled() -> bool:
            if worker.poll() is not None:
                return True  # nothing more will happen
            dead = self.app.broker.stats([self.queue])[0].dead
            return dead + len(bad_ran()) >= expected and good.ready()

        try:
            wait_for(settled, timeout=timeout, what=f"{round_.name} settling on {self.broker}")
            round_.settled = True
        except AssertionError:
            pass  # the tests say what is missing
        round_.alive = worker.poll() is None
        round_.good_ran = round_.good in self.notes()[seen:]
        round_.ran = bad_ran()
        stats = self.app.broker.stats([self.queue])[0]
        round_.dead, round_.left_in_queue = stats.dead - before, stats.ready

    def collect(self) -> None:
        """Read the dead letters and match each case to its own."""
        self.dead = self.app.broker.dead_letters(self.queue, limit=len(self.cases) + 50)
        self.matches = match(self.cases, self.dead)
        for round_ in self.rounds:
            round_.matched = sum(self.matches[case.name] is not None for case in round_.cases)
            print(f"\n{round_.summary(self.broker)}")

    def close(self) -> None:
        self.app.close()
        if self.broker == "rabbitmq":
            delete_rabbitmq_queues(self.queue)

    def round_of(self, name: str) -> Round:
        return next(r for r in self.rounds if any(c.name == name for c in r.cases))


def tail(log: str, lines: int = 30) -> str:
    return "\n".join(line[:300] for line in log.splitlines()[-lines:])


def stop(worker: subprocess.Popen[bytes]) -> int:
    """Warm-stop a worker (SIGTERM) and return its exit status; kill it if it hangs."""
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(timeout=10)
    return worker.returncode


def match(cases: list[Case], dead: list[DeadLetter]) -> dict[str, DeadLetter | None]:
    """Each case's dead letter: one with its body and a reason that starts as expected.

    Some cases share a body (a valid envelope under different properties): the longest expected
    reasons choose first, and each dead letter serves one case.
    """
    unused = list(dead)
    found: dict[str, DeadLetter | None] = {}
    for case in sorted(cases, key=lambda c: -len(c.reason)):
        letter = next(
            (d for d in unused if d.body == case.body and d.reason.startswith(case.reason)), None
        )
        if letter is not None:
            unused.remove(letter)
        found[case.name] = letter
    return found


def run_corpus(broker: str, folder: Path) -> Iterator[CorpusRun]:
    run = CorpusRun(broker, folder)
    try:
        bugs = [case for case in run.cases if case.xfail_reason(broker)]
        run.give("corpus", [case for case in run.cases if case not in bugs], SETTLE_TIMEOUT_S)
        if bugs:
            run.give("known bugs", bugs, KNOWN_BUGS_TIMEOUT_S)
        run.collect()
        yield run
    finally:
        run.close()


@pytest.fixture(scope="module")
def rabbitmq_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CorpusRun]:
    require_rabbitmq()
    yield from run_corpus("rabbitmq", tmp_path_factory.mktemp("corpus-rabbitmq"))


@pytest.fixture(scope="module")
def sqlite_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CorpusRun]:
    yield from run_corpus("sqlite", tmp_path_factory.mktemp("corpus-sqlite"))


# --- the checks ---------------------------------------------------------------------------------


def case_params(broker: str) -> list[Any]:
    """The cases a broker carries, as parameters; a known bug's case is a strict xfail."""
    return [
        pytest.param(
            case.name,
            id=case.name,
            marks=[pytest.mark.xfail(strict=True, reason=why)]
            if (why := case.xfail_reason(broker))
            else [],
        )
        for case in carried(broker, CASES)
    ]


def check_case(run: CorpusRun, name: str) -> None:
    [case] = [c for c in run.cases if c.name == name]
    round_ = run.round_of(name)
    letter = run.matches[name]
    if letter is None:
        same_body = [d.reason for d in run.dead if d.body == case.body]
        raise AssertionError(
            f"{run.broker}: case {name} was not dead-lettered with a reason starting "
            f"{case.reason!r}; dead letters with its body: {same_body}; tasks that ran: "
            f"{round_.ran}; {round_.summary(run.broker)}\nworker log:\n{tail(round_.log)}"
        )
    category = DeadLetterReason.of(case.reason)
    assert category is not None, f"{name}: {case.reason!r} does not start with a fixed category"
    assert letter.category is category, f"{name}: {letter.reason!r}"
    assert letter.delivery_count == 1, f"{name}: delivered {letter.delivery_count} times"


def check_round(run: CorpusRun, round_: Round) -> None:
    summary = f"{round_.summary(run.broker)}\nworker log:\n{tail(round_.log)}"
    assert round_.alive, f"the worker exited: {summary}"
    assert round_.good_ran, f"the good task sent after the {round_.name} did not run: {summary}"
    assert round_.settled, f"the {round_.name} did not settle: {summary}"
    assert round_.ran == [], f"{round_.name} messages ran as tasks: {round_.ran}; {summary}"
    assert not run.marker.exists(), f"a pickle payload was unpickled: {summary}"
    assert round_.matched == len(round_.cases), f"not all dead-lettered as expected: {summary}"
    assert round_.dead == len(round_.cases), f"{round_.dead} dead letters: {summary}"
    assert round_.left_in_queue == 0, f"{round_.left_in_queue} left in the queue: {summary}"
    assert "Traceback" not in round_.log, f"the worker logged a traceback: {summary}"
    status = round_.exit_status
    assert status == 0, f"the worker's warm shutdown (SIGTERM) ended with {status}: {summary}"


@pytest.mark.parametrize("name", case_params("rabbitmq"))
def test_case_is_dead_lettered_on_rabbitmq(rabbitmq_run: CorpusRun, name: str) -> None:
    check_case(rabbitmq_run, name)


@pytest.mark.parametrize("name", case_params("sqlite"))
def test_case_is_dead_lettered_on_sqlite(sqlite_run: CorpusRun, name: str) -> None:
    check_case(sqlite_run, name)


@pytest.mark.parametrize("broker", ["rabbitmq", "sqlite"])
def test_the_worker_survives_the_corpus(broker: str, request: pytest.FixtureRequest) -> None:
    run: CorpusRun = request.getfixturevalue(f"{broker}_run")
    check_round(run, run.rounds[0])


def known_bug_params() -> list[Any]:
    """Each broker; a strict xfail where cases are marked as known bugs."""
    params = []
    for broker in ("rabbitmq", "sqlite"):
        names = ", ".join(case.name for case in known_bugs(broker))
        marks = [pytest.mark.xfail(strict=True, reason=f"known bugs: {names}")] if names else []
        params.append(pytest.param(broker, marks=marks))
    return params


@pytest.mark.parametrize("broker", known_bug_params())
def test_the_worker_survives_the_known_bugs(broker: str, request: pytest.FixtureRequest) -> None:
    """The cases marked as known bugs, in a round of their own: a strict xfail until fixed.
    With none marked, the corpus ran in one round."""
    run: CorpusRun = request.getfixturevalue(f"{broker}_run")
    if not known_bugs(broker):
        assert [r.name for r in run.rounds] == ["corpus"]
        return
    check_round(run, run.rounds[1])


# --- without a service ---------------------------------------------------------------------------


def test_the_pickle_payload_is_live(tmp_path: Path) -> None:
    """The corpus's pickles really would create their marker: its absence means something."""
    marker = tmp_path / "marker"
    opened = pickle.loads(pickle_payload(marker))  # the side effect, here, on purpose
    opened.close()
    assert marker.exists()


def test_over_16_mib_is_dead_lettered_under_the_default_limit(tmp_path: Path) -> None:
    """The corpus runs with a lowered limit; its largest case also meets the default one."""
    [case] = [c for c in CASES if c.name == "envelope-over-16-mib"]
    app = Conveyor("corpus", broker=f"sqlite:///{tmp_path / 'broker.db'}")
    try:
        app.broker.stats(["default"])  # creates the tables
        insert_into_sqlite(tmp_path / "broker.db", "default", [case])
        stats = run_until_empty(app, pool="threads")
        [letter] = app.broker.dead_letters("default")
        assert letter.reason.startswith(
            "message too large: 16777217 bytes, over the 16777216-byte limit"
        )
        assert stats.succeeded == 0
    finally:
        app.close()
