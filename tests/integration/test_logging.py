"""What `conveyor worker` prints, read from a real worker's stderr.

Each test writes a tasks module into tmp_path (an embedded SQLite broker there), queues tasks,
and runs `python -m conveyor worker tasks:app --until-empty` in a subprocess, with the prefork
pool (tasks run in forked children) and the threads pool (in the worker's own process). A task's
own logger prints with time, level, pid, and the task's name and id; the worker prints a line per
task that succeeds while few finish, a summary while many do, nothing with --quiet-tasks; a
--log-config file replaces all that (JSON lines here); a broken one stops the worker at once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import wait_for

from conveyor import Conveyor

pytestmark = pytest.mark.integration

TIMEOUT_S = 30.0

TASKS = """
import logging

from conveyor import Conveyor

app = Conveyor("shop", broker="sqlite:///q.db")
log = logging.getLogger(__name__)


@app.task
def charge(order: int) -> int:
    log.info("charging order %d", order)
    if order % 2:
        log.warning("order %d is odd", order)
    return order


@app.task
def noop(order: int) -> None:
    pass
"""

JSON_FORMATTER = """
import json
import logging


class JsonFormatter(logging.Formatter):
    def format(self, record):
        return json.dumps({
            "time": self.formatTime(record),
            "level": record.levelname,
            "pid": record.process,
            "logger": record.name,
            "task": getattr(record, "task_name", None),
            "task_id": getattr(record, "task_id", None),
            "message": record.getMessage(),
        })
"""

JSON_CONFIG = {
    "version": 1,
    "formatters": {"json": {"()": "jsonlog.JsonFormatter"}},
    "handlers": {
        "stderr": {
            "class": "logging.StreamHandler",
            "formatter": "json",
            "stream": "ext://sys.stderr",
        }
    },
    "root": {"level": "INFO", "handlers": ["stderr"]},
}

# time, level, [pid/thread], logger: then the task's name[id] when logged inside a task
LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[A-Z]+) +\[(?P<pid>\d+)/[^\]]+\] "
    r"(?P<logger>[\w.]+): (?:(?P<task>[\w.]+)\[(?P<id>[0-9a-f]{32})\] )?(?P<message>.*)$"
)
SUCCEEDED = re.compile(r"^task (?P<task>[\w.]+)\[(?P<id>[0-9a-f]{32})\] succeeded in [\d.]+m?s$")
SUMMARY = re.compile(r"^([\d,]+) tasks finished in the last [\d.]+s \([\d,.]+/s\); (?P<rest>.*)$")


@dataclass
class Line:
    level: str
    pid: int
    logger: str
    task: str | None
    id: str | None
    message: str


def parse(stderr: str) -> list[Line]:
    """Every line of conveyor's format; the traceback lines of an error are skipped."""
    lines = []
    for text in stderr.splitlines():
        match = LINE.match(text)
        if match:
            lines.append(
                Line(
                    match["level"],
                    int(match["pid"]),
                    match["logger"],
                    match["task"],
                    match["id"],
                    match["message"],
                )
            )
    return lines


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "tasks.py").write_text(textwrap.dedent(TASKS))
    return tmp_path


def send(project: Path, task: str, orders: range) -> list[str]:
    """Queue `tasks.TASK` once per order; the ids, in order."""
    producer = Conveyor("shop", broker=f"sqlite:///{project / 'q.db'}")
    try:
        registered = producer.task(name=f"tasks.{task}")(lambda order: None)
        return [r.id for r in registered.map([(n,) for n in orders])]
    finally:
        producer.close()


def environment(project: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env["PYTHONPATH"] = str(project)
    return env


def worker(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`conveyor worker tasks:app --until-empty ARGS` in `project`, to its end."""
    return subprocess.run(
        [sys.executable, "-m", "conveyor", "worker", "tasks:app", "--until-empty", *args],
        cwd=project,
        env=environment(project),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def successes(lines: list[Line]) -> dict[str, Line]:
    """The worker's per-task lines, by task id."""
    found = {}
    for line in lines:
        match = SUCCEEDED.match(line.message)
        if line.logger == "conveyor.worker.tasklog" and match:
            assert line.level == "INFO"
            found[match["id"]] = line
    return found


def summarized(lines: list[Line], task: str) -> int:
    """How many successes of `task` the summary lines count."""
    total = 0
    for line in lines:
        match = SUMMARY.match(line.message)
        if line.logger == "conveyor.worker.tasklog" and match:
            part = re.search(rf"(?:^|; ){re.escape(task)}: ([\d,]+) succeeded", match["rest"])
            total += int(part[1].replace(",", "")) if part else 0
    return total


@pytest.fixture(params=["prefork", "threads"])
def pool(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_task_logs_carry_time_level_pid_and_the_task(project: Path, pool: str) -> None:
    ids = send(project, "charge", range(3))
    proc = worker(project, "--pool", pool, "-c", "2")
    assert proc.returncode == 0, proc.stderr
    lines = parse(proc.stderr)
    starting = next(line for line in lines if "worker for shop starting" in line.message)
    ours = [line for line in lines if line.logger == "tasks"]
    assert [
        (line.level, line.task, line.id, line.message) for line in ours if line.id == ids[1]
    ] == [
        ("INFO", "tasks.charge", ids[1], "charging order 1"),
        ("WARNING", "tasks.charge", ids[1], "order 1 is odd"),
    ]
    assert sorted(line.id for line in ours if line.level == "INFO") == sorted(ids)
    if pool == "prefork":  # in the children
        assert all(line.pid != starting.pid for line in ours), proc.stderr
    else:
        assert all(line.pid == starting.pid for line in ours), proc.stderr
    # One line per success, from the worker, which settles every task.
    done = successes(lines)
    assert sorted(done) == sorted(ids)
    assert {(line.pid, line.task) for line in done.values()} == {(starting.pid, None)}
    assert "worker stopped: 3 succeeded" in proc.stderr


def test_many_tasks_are_summarized(project: Path, pool: str) -> None:
    n = 300
    send(project, "noop", range(n))
    proc = worker(project, "--pool", pool, "-c", "2")
    assert proc.returncode == 0, proc.stderr
    lines = parse(proc.stderr)
    done = successes(lines)
    assert len(done) <= 10, proc.stderr  # lines while few finished, then summaries
    folded = summarized(lines, "tasks.noop")
    assert folded > 0, proc.stderr
    assert len(done) + folded == n, proc.stderr
    assert f"worker stopped: {n} succeeded" in proc.stderr


def test_log_each_task(project: Path) -> None:
    ids = send(project, "noop", range(50))
    proc = worker(project, "--pool", "threads", "--log-each-task")
    assert proc.returncode == 0, proc.stderr
    lines = parse(proc.stderr)
    assert sorted(successes(lines)) == sorted(ids)
    assert summarized(lines, "tasks.noop") == 0


def test_quiet_tasks(project: Path, pool: str) -> None:
    ids = send(project, "charge", range(30))
    proc = worker(project, "--pool", pool, "--quiet-tasks")
    assert proc.returncode == 0, proc.stderr
    lines = parse(proc.stderr)
    assert [line for line in lines if line.logger == "conveyor.worker.tasklog"] == []
    # The task's own lines stay, and so do the worker's start and stop.
    assert sorted(line.id for line in lines if line.message.startswith("charging")) == sorted(ids)
    assert "worker stopped: 30 succeeded" in proc.stderr


def test_loglevel_warning_keeps_the_tasks_warnings(project: Path, pool: str) -> None:
    ids = send(project, "charge", range(4))
    proc = worker(project, "--pool", pool, "-l", "warning")
    assert proc.returncode == 0, proc.stderr
    lines = parse(proc.stderr)
    # Only warnings: the tasks' own (in whatever order the children wrote them), no INFO.
    assert sorted((line.level, line.id) for line in lines) == sorted(
        [("WARNING", ids[1]), ("WARNING", ids[3])]
    ), proc.stderr


def test_log_config_with_a_json_formatter(project: Path, pool: str) -> None:
    (project / "jsonlog.py").write_text(textwrap.dedent(JSON_FORMATTER))
    (project / "logging.json").write_text(json.dumps(JSON_CONFIG))
    ids = send(project, "charge", range(3))
    proc = worker(project, "--pool", pool, "--log-config", "logging.json")
    assert proc.returncode == 0, proc.stderr
    entries = [json.loads(text) for text in proc.stderr.splitlines()]  # every line is JSON
    ours = [e for e in entries if e["logger"] == "tasks"]
    assert {(e["task"], e["task_id"]) for e in ours} == {("tasks.charge", i) for i in ids}
    assert {e["level"] for e in ours} == {"INFO", "WARNING"}
    done = [e for e in entries if e["logger"] == "conveyor.worker.tasklog"]
    assert sorted(e["task_id"] for e in done) == sorted(ids)
    assert all(e["task"] == "tasks.charge" for e in done)
    stopped = [e for e in entries if e["message"].startswith("worker stopped: 3 succeeded")]
    assert len(stopped) == 1
    assert stopped[0]["task"] is None


def test_logging_configured_by_the_app_module_wins(project: Path) -> None:
    """`logging.basicConfig` in the tasks module: its format, with the task's fields."""
    source = (project / "tasks.py").read_text()
    (project / "tasks.py").write_text(
        "import logging\n"
        "logging.basicConfig(level=logging.INFO, format='%(levelname)s|%(task_id)s|%(message)s')\n"
        + source
    )
    ids = send(project, "charge", range(2))
    proc = worker(project, "--pool", "prefork", "-c", "1")
    assert proc.returncode == 0, proc.stderr
    assert f"INFO|{ids[0]}|charging order 0" in proc.stderr.splitlines()
    assert f"WARNING|{ids[1]}|order 1 is odd" in proc.stderr.splitlines()
    assert "INFO|None|worker stopped: 2 succeeded" in proc.stderr
    assert parse(proc.stderr) == []  # conveyor's format is nowhere


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "No such file or directory"),
        (
            '{"version": 1, "handlers": {"h": {"class": "nowhere.Handler"}}}',
            "Unable to configure handler 'h'",
        ),
        ("version: 1", "not valid JSON"),
    ],
)
def test_a_broken_log_config_stops_the_worker_at_start(
    project: Path, content: str | None, reason: str
) -> None:
    if content is not None:
        (project / "logging.json").write_text(content)
    send(project, "charge", range(1))
    proc = worker(project, "--log-config", "logging.json")
    assert proc.returncode == 1
    assert proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert line.startswith("Error: --log-config logging.json: "), line
    assert reason in line
    # Nothing ran: the task is still queued.
    app = Conveyor("shop", broker=f"sqlite:///{project / 'q.db'}")
    try:
        (stats,) = app.broker.stats(["default"])
    finally:
        app.close()
    assert stats.ready == 1


# the children of a zygote started in a fresh interpreter


def children_of(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with suppress(OSError):
            kids += [int(p) for p in (task / "children").read_text().split()]
    return kids


def json_lines(text: str) -> list[Line]:
    """The lines of the JSON formatter above, as `Line`s (a line cut short is left out)."""
    lines = []
    for raw in text.splitlines():
        with suppress(ValueError):
            e = json.loads(raw)
            lines.append(
                Line(e["level"], e["pid"], e["logger"], e["task"], e["task_id"], e["message"])
            )
    return lines


@pytest.mark.parametrize("config", [False, True], ids=["conveyor", "log-config"])
def test_the_children_of_a_fresh_zygote_log_the_same_way(project: Path, config: bool) -> None:
    """The worker's zygote dies and one is started in a fresh interpreter: its children's task
    lines look as before (conveyor's format, or the --log-config's)."""
    args = []
    read = parse
    if config:
        (project / "jsonlog.py").write_text(textwrap.dedent(JSON_FORMATTER))
        (project / "logging.json").write_text(json.dumps(JSON_CONFIG))
        args, read = ["--log-config", "logging.json"], json_lines
    log = project / "worker.log"
    command = [sys.executable, "-m", "conveyor", "worker", "tasks:app", "-P", "prefork", "-c", "1"]
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*command, *args], cwd=project, env=environment(project), stdout=out, stderr=out
        )

    def line_of(task_id: str) -> Line | None:
        found = [x for x in read(log.read_text()) if x.id == task_id and x.logger == "tasks"]
        return found[0] if found else None

    try:
        (first,) = send(project, "charge", range(1))
        before = wait_for(lambda: line_of(first), timeout=TIMEOUT_S, what="the first task's line")
        (zygote,) = [pid for pid in children_of(proc.pid) if before.pid in children_of(pid)]
        os.kill(zygote, signal.SIGKILL)
        wait_for(
            lambda: "new prefork zygote" in log.read_text(), timeout=TIMEOUT_S, what="a new zygote"
        )
        (second,) = send(project, "charge", range(2, 3))
        after = wait_for(lambda: line_of(second), timeout=TIMEOUT_S, what="the second task's line")
        assert after.pid not in (proc.pid, before.pid, zygote)
        assert (after.level, after.task, after.message) == (
            "INFO",
            "tasks.charge",
            "charging order 2",
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT_S) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# the page docs/logging.md: its files, commands and outputs, run as written

PAGE = Path(__file__).resolve().parents[2] / "docs" / "logging.md"
MARKED = re.compile(
    r"<!-- (?P<kind>file|run|output):? ?(?P<what>[^>]*?) ?-->\n```\w*\n(?P<body>.*?)```", re.S
)


def page_blocks(kind: str) -> list[tuple[str, str]]:
    """(what, body) of each block of the page marked `<!-- KIND: WHAT -->`."""
    text = PAGE.read_text()
    return [(m["what"], m["body"]) for m in MARKED.finditer(text) if m["kind"] == kind]


class Normal:
    """Lines with what differs between runs made comparable: times, task ids and run times
    become placeholders, and process ids labels in order of appearance (so "the task ran in
    another process than the worker" is still compared)."""

    def __init__(self) -> None:
        self.pids: dict[str, str] = {}

    def pid(self, pid: object) -> str:
        return self.pids.setdefault(str(pid), f"<pid {len(self.pids) + 1}>")

    def text(self, line: str) -> str:
        line = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}", "<time>", line)
        line = re.sub(r"\[(\d+)/", lambda m: f"[{self.pid(m[1])}/", line)
        line = re.sub(r"01a23b7c…|[0-9a-f]{32}", "<id>", line)
        line = re.sub(r"in \d+\.\d+m?s\b", "in <duration>", line)
        line = re.sub(r"pool prefork x\d+", "pool prefork x<n>", line)
        # uvloop where it is installed (conveyor[uvloop], as in the dev environment), else asyncio
        return re.sub(r", loop (asyncio|uvloop)$", ", loop <loop>", line)

    def json(self, line: str) -> dict[str, object]:
        entry: dict[str, object] = json.loads(line)
        entry["time"] = "<time>"
        entry["pid"] = self.pid(entry["pid"])
        if entry["task_id"] is not None:
            entry["task_id"] = "<id>"
        entry["message"] = self.text(str(entry["message"]))
        return entry


def test_the_pages_examples_run_as_written(tmp_path: Path) -> None:
    for name, body in page_blocks("file"):
        (tmp_path / name).write_text(body)
    outputs = dict(page_blocks("output"))
    runs = page_blocks("run")
    assert len(runs) == 2 and len(outputs) == 2
    for _, body in runs:
        for command in body.splitlines():
            args = command.split()
            assert args[0] == "conveyor"
            if args[1] == "worker":
                args.append("--until-empty")
            proc = subprocess.run(
                [sys.executable, "-m", "conveyor", *args[1:]],
                cwd=tmp_path,
                env=environment(tmp_path),
                capture_output=True,
                text=True,
                timeout=TIMEOUT_S,
                check=False,
            )
            assert proc.returncode == 0, proc.stderr
            if command not in outputs:
                continue
            expected = outputs[command].splitlines()
            got = proc.stderr.splitlines()[: len(expected)]
            if command.endswith("logging.json"):
                ours, theirs = Normal(), Normal()
                assert [theirs.json(x) for x in got] == [ours.json(x) for x in expected]
            else:
                ours, theirs = Normal(), Normal()
                assert [theirs.text(x) for x in got] == [ours.text(x) for x in expected]


def test_the_pages_broken_log_config(tmp_path: Path) -> None:
    (shown,) = [x for x in PAGE.read_text().splitlines() if "Error: --log-config" in x]
    path = re.search(r"'(/[^']+)'", shown)
    assert path is not None
    if Path(path[1]).parent.exists():
        pytest.skip(f"{Path(path[1]).parent} exists on this machine")
    (tmp_path / "tasks.py").write_text(textwrap.dedent(TASKS))
    config = {
        "version": 1,
        "handlers": {"file": {"class": "logging.FileHandler", "filename": path[1]}},
    }
    (tmp_path / "logging.json").write_text(json.dumps(config))
    proc = worker(tmp_path, "--log-config", "logging.json")
    assert proc.returncode == 1
    assert proc.stderr == shown.strip() + "\n"


def test_the_pages_benchmark_figures_are_the_saved_ones() -> None:
    """The table under `<!-- bench: logging -->` shows the figures bench/logging_cost.py saved."""
    text = PAGE.read_text()
    table = text[text.index("<!-- bench: logging -->") :].split("\n\n")[0].splitlines()[3:]
    shown = {row.split("|")[1].strip(): [c.strip() for c in row.split("|")[2:5]] for row in table}
    saved = json.loads((PAGE.parent / "bench-data" / "logging.json").read_text())
    extra_ns = saved["hot_path"]["summarizing_ns"] - saved["hot_path"]["quiet_ns"]
    assert shown == {
        saved["labels"][variant]: [
            f"{f['ratio']:.2f}",
            f"{f['paired']:.2f}",
            f"{extra_ns * f['quiet'] / 1e7:.2f}%",
        ]
        for variant, f in saved["figures"].items()
    }
    assert f"{saved['tasks']:,} no-op tasks, {saved['repeat']} rounds" in " ".join(text.split())
    assert f"about {extra_ns / 1000:.2f} µs a task" in " ".join(text.split())
