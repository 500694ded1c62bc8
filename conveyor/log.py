"""Logging for the worker's whole process tree, on the standard library's `logging`.

`setup` runs once in the worker, before its pool starts: forked prefork children inherit what it
configured, and a zygote started in a fresh interpreter calls it again with the same `LogSpec`.
It configures the root logger, so task code's own loggers (`logging.getLogger(__name__)`) print
too, in one of three ways:

- the user's `--log-config` (a `logging.config.dictConfig` dictionary as JSON) replaces conveyor's;
- else handlers already on the root logger (the app module called `logging.basicConfig`, say)
  mean the user configured logging themselves, and their configuration is left as it is;
- else conveyor's own: one stderr handler with time, level, pid/thread, logger name and the
  running task, at the worker's log level.

Whichever it is, the root logger's handlers get `TaskContext` (the running task's name and id on
every record, for any formatter to use) and `RedactingFilter` (passwords masked).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import msgspec

from conveyor.errors import ConfigurationError
from conveyor.redact import RedactingFilter, redact_text
from conveyor.task import current_request

FORMAT = (
    "%(asctime)s %(levelname)-7s [%(process)d/%(threadName)s] %(name)s: "
    "%(conveyor_task)s%(message)s"
)


class LogSpec(msgspec.Struct, frozen=True):
    """How a worker configured logging, so that a fresh zygote can do the same."""

    level: str = "INFO"
    """The level of conveyor's own configuration (the root logger's)."""
    config: str | None = None
    """The absolute path of a `--log-config` file, which replaces conveyor's configuration."""
    level_given: bool = False
    """`-l` was given: under the user's own configuration it still sets the `conveyor` logger's
    level (and nothing else)."""


class TaskContext(logging.Filter):
    """Adds the running task to each record: `task_name`, `task_id` (None outside a task) and
    `conveyor_task` (`"name[id] "`, or empty outside a task, for conveyor's own format).

    A filter rather than a record factory: a factory's attributes would make `extra={"task_id":
    ...}` in a user's call raise KeyError, while a filter leaves values the call set alone.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Set the task attributes the record does not carry yet; never drops a record."""
        fields = record.__dict__
        if "conveyor_task" in fields:
            return True  # an earlier handler's filter did it
        request = current_request.get()
        if request is None:
            fields.setdefault("task_name", None)
            fields.setdefault("task_id", None)
            fields["conveyor_task"] = ""
        else:
            fields.setdefault("task_name", request.task)
            fields.setdefault("task_id", request.id)
            fields["conveyor_task"] = f"{request.task}[{request.id}] "
        return True


_applied: LogSpec | None = None


def applied() -> LogSpec | None:
    """What `setup` configured in this process, or None if it was never called."""
    return _applied


def setup(
    level: str = "INFO", *, config: str | Path | None = None, level_given: bool = False
) -> None:
    """Configure logging for the worker's process tree (see the module docstring).

    `level` applies to conveyor's own configuration; `config` is a dictConfig JSON file that
    replaces it; `level_given` says that `level` came from the command line, so it also sets the
    `conveyor` logger's level under the user's configuration. A broken `config` raises
    `ConfigurationError` naming the file and the reason.
    """
    global _applied
    level = level.upper()
    root = logging.getLogger()
    path = None
    if config is not None:
        path = str(Path(config).resolve())  # the same file for a fresh zygote, wherever it runs
        _apply_config(path, shown=str(config))
    ours = [h for h in root.handlers if getattr(h, "_conveyor", False)]
    if path is None and len(ours) == len(root.handlers):
        # Nobody else configured the root logger: conveyor's handler, at the worker's level.
        if not ours:
            stderr = logging.StreamHandler(sys.stderr)
            stderr.setFormatter(logging.Formatter(FORMAT))
            stderr._conveyor = True  # type: ignore[attr-defined]
            root.addHandler(stderr)
        root.setLevel(level)
    elif level_given:
        logging.getLogger("conveyor").setLevel(level)
    for handler in root.handlers:
        for kind in (TaskContext, RedactingFilter):
            if not any(isinstance(f, kind) for f in handler.filters):
                handler.addFilter(kind())
    _applied = LogSpec(level, path, level_given)


def _apply_config(path: str, *, shown: str) -> None:
    """Apply the dictConfig dictionary in the JSON file `path`; errors name the file as `shown`."""
    name = Path(path).name

    def fail(reason: str) -> ConfigurationError:
        return ConfigurationError(f"--log-config {shown}: {redact_text(reason)}")

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise fail(exc.strerror or str(exc)) from None
    except UnicodeDecodeError as exc:
        raise fail(f"not UTF-8 text ({exc.reason})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = ""
        if name.endswith((".ini", ".conf", ".cfg", ".yaml", ".yml", ".toml")):
            hint = " (--log-config takes a logging.config.dictConfig dictionary written as JSON)"
        raise fail(f"not valid JSON: {exc}{hint}") from None
    if not isinstance(value, dict):
        raise fail(
            f"a JSON {type(value).__name__}, not an object: write a logging.config.dictConfig "
            'dictionary, e.g. {"version": 1, ...}'
        )
    # dictConfig's own default (True) would silence every logger that exists already, conveyor's
    # and the app's, unless the file names it: a trap with no upside for a worker.
    value.setdefault("disable_existing_loggers", False)
    # Imported here: it brings logging.handlers, socketserver and pickle, which a worker without
    # --log-config never uses, and every process of a prefork pool would carry them.
    import logging.config

    try:
        logging.config.dictConfig(value)
    except (ValueError, TypeError, AttributeError, ImportError) as exc:
        # dictConfig says which part failed ("Unable to configure handler 'file'") and keeps
        # the actual reason as the cause ("No such file or directory: '/var/log/x.log'").
        cause = exc.__cause__
        reason = f"{exc}: {cause}" if cause is not None and str(cause) not in str(exc) else str(exc)
        raise fail(reason) from None
