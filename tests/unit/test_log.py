"""`conveyor.log`: the worker's logging set-up, in this process.

Which configuration wins (conveyor's, the user's handlers, a `--log-config`), the running task on
every record, and a broken `--log-config` reported with the file and the reason. The same in real
worker processes, prefork children included: tests/integration/test_logging.py.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import fresh_root_logger

from conveyor import log
from conveyor.errors import ConfigurationError
from conveyor.task import Request, current_request

LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[A-Z]+) +\[(?P<pid>\d+)/(?P<thread>[^\]]+)\] "
    r"(?P<logger>[\w.]+): (?P<message>.*)$"
)


@pytest.fixture(autouse=True)
def _restore_conveyor_level() -> Iterator[None]:
    conveyor = logging.getLogger("conveyor")
    level = conveyor.level
    yield
    conveyor.setLevel(level)


@pytest.fixture
def in_task() -> Iterator[Request]:
    request = Request(id="0123abcd", task="shop.charge")
    token = current_request.set(request)
    yield request
    current_request.reset(token)


def record(msg: str = "hello", **extra: Any) -> logging.LogRecord:
    made = logging.LogRecord("shop", logging.INFO, __file__, 1, msg, None, None)
    made.__dict__.update(extra)
    return made


def write_json(path: Path, value: Any) -> str:
    path.write_text(json.dumps(value))
    return str(path)


# the running task on every record


def test_task_context_outside_a_task() -> None:
    r = record()
    assert log.TaskContext().filter(r) is True
    assert (r.task_name, r.task_id, r.conveyor_task) == (None, None, "")  # type: ignore[attr-defined]


def test_task_context_inside_a_task(in_task: Request) -> None:
    r = record()
    log.TaskContext().filter(r)
    assert (r.task_name, r.task_id) == ("shop.charge", "0123abcd")  # type: ignore[attr-defined]
    assert r.conveyor_task == "shop.charge[0123abcd] "  # type: ignore[attr-defined]


def test_task_context_leaves_what_the_call_set(in_task: Request) -> None:
    """A user's `extra={"task_id": ...}` is theirs to keep (a record factory would refuse it)."""
    r = record(task_id="their-own")
    log.TaskContext().filter(r)
    assert r.task_id == "their-own"  # type: ignore[attr-defined]
    assert r.task_name == "shop.charge"  # type: ignore[attr-defined]


# which configuration wins (each test empties the root logger of pytest's handlers: see
# `fresh_root_logger`)


def test_conveyors_own_configuration(capsys: pytest.CaptureFixture[str], in_task: Request) -> None:
    with fresh_root_logger():
        log.setup("DEBUG")
        logging.getLogger("shop.tasks").debug("charging %d", 7)
        assert log.applied() == log.LogSpec("DEBUG", None, False)
    line = capsys.readouterr().err.rstrip("\n")
    match = LINE.match(line)
    assert match, line
    assert match["level"] == "DEBUG"
    assert match["logger"] == "shop.tasks"
    assert match["message"] == "shop.charge[0123abcd] charging 7"


def test_setup_twice_keeps_one_handler(capsys: pytest.CaptureFixture[str]) -> None:
    with fresh_root_logger():
        log.setup("INFO")
        log.setup("WARNING")
        root = logging.getLogger()
        assert len(root.handlers) == 1
        assert root.level == logging.WARNING
        logging.getLogger("shop").warning("once")
    assert capsys.readouterr().err.count("once") == 1


def test_handlers_already_on_the_root_logger_are_the_users(in_task: Request) -> None:
    """As after `logging.basicConfig(...)` in the app's module: their format and level stay,
    and their formatter can use the task's name and id."""
    stream = io.StringIO()
    theirs = logging.StreamHandler(stream)
    theirs.setFormatter(logging.Formatter("%(levelname)s %(task_name)s %(task_id)s %(message)s"))
    with fresh_root_logger():
        root = logging.getLogger()
        root.addHandler(theirs)
        root.setLevel(logging.WARNING)
        log.setup("DEBUG")
        assert root.handlers == [theirs]
        assert root.level == logging.WARNING
        assert logging.getLogger("conveyor").level == logging.NOTSET  # -l was not given
        logging.getLogger("shop").warning("card %s declined", "amqp://u:hunter2@host/")
    assert stream.getvalue() == "WARNING shop.charge 0123abcd card amqp://u:***@host/ declined\n"


def test_loglevel_given_sets_only_conveyors_logger_under_the_users_configuration() -> None:
    with fresh_root_logger():
        root = logging.getLogger()
        root.addHandler(logging.NullHandler())
        root.setLevel(logging.WARNING)
        log.setup("DEBUG", level_given=True)
        assert logging.getLogger("conveyor").level == logging.DEBUG
        assert root.level == logging.WARNING


def test_log_config_replaces_conveyors_configuration(tmp_path: Path) -> None:
    existing = logging.getLogger(f"shop.{tmp_path.name}")  # made before the file is applied
    path = write_json(
        tmp_path / "logging.json",
        {
            "version": 1,
            "formatters": {"plain": {"format": "%(task_id)s|%(name)s|%(message)s"}},
            "handlers": {
                "file": {
                    "class": "logging.FileHandler",
                    "filename": str(tmp_path / "out.log"),
                    "formatter": "plain",
                }
            },
            "root": {"level": "INFO", "handlers": ["file"]},
        },
    )
    with fresh_root_logger():
        log.setup("DEBUG", config=path)
        existing.info("still heard")  # dictConfig's default would have disabled it
        assert log.applied() == log.LogSpec("DEBUG", str(Path(path).resolve()), False)
    assert (tmp_path / "out.log").read_text() == f"None|{existing.name}|still heard\n"


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "No such file or directory"),
        ("{not json", "not valid JSON: Expecting property name enclosed in double quotes"),
        ("[1, 2]", "a JSON list, not an object"),
        ("{}", "dictionary doesn't specify a version"),
        (
            '{"version": 1, "handlers": {"h": {"class": "logging.NoSuchHandler"}}}',
            "Unable to configure handler 'h'",
        ),
        (
            '{"version": 1, "handlers": {"h": {"class": "logging.FileHandler", '
            '"filename": "/nonexistent-dir/x.log"}}}',
            "No such file or directory: '/nonexistent-dir/x.log'",
        ),
    ],
)
def test_a_broken_log_config_names_the_file_and_the_reason(
    tmp_path: Path, content: str | None, reason: str
) -> None:
    path = tmp_path / "logging.json"
    if content is not None:
        path.write_text(content)
    with fresh_root_logger(), pytest.raises(ConfigurationError) as caught:
        log.setup("INFO", config=path)
    message = str(caught.value)
    assert message.startswith(f"--log-config {path}: "), message
    assert reason in message
    assert "\n" not in message


def test_a_log_config_in_another_format_says_json_is_needed(tmp_path: Path) -> None:
    path = tmp_path / "logging.ini"
    path.write_text("[loggers]\nkeys=root\n")
    with (
        fresh_root_logger(),
        pytest.raises(ConfigurationError, match="dictConfig dictionary written as JSON"),
    ):
        log.setup("INFO", config=path)
