"""One typed settings object: keyword arguments first, then `CONVEYOR_*` variables, then defaults.

Every setting has exactly one name. `CONVEYOR_VISIBILITY_TIMEOUT=30` sets `visibility_timeout`.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec

from conveyor.errors import ConfigurationError

ENV_PREFIX = "CONVEYOR_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

Positive = Annotated[float, msgspec.Meta(gt=0)]
Count = Annotated[int, msgspec.Meta(ge=0)]


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything configurable about an app and its workers."""

    broker: str = "sqlite:///conveyor.db"
    """Where tasks go: `sqlite:///path.db` (embedded, the default) or `memory://` (tests)."""
    results: str | None = None
    """Where results go. Unset: the SQLite file with the SQLite broker, memory with memory."""
    ignore_results: bool = False
    """Store no results for any task (a task's own `ignore_result` does this for one task)."""
    default_queue: str = "default"
    result_expires: Positive = 86_400.0
    """Seconds a stored result is kept."""
    visibility_timeout: Positive = 60.0
    """Seconds a fetched message stays leased to a worker; workers extend leases while running."""
    max_message_size: Annotated[int, msgspec.Meta(gt=0)] = 16 * 1024 * 1024
    queue_max_priority: Annotated[int, msgspec.Meta(ge=0, le=255)] = 9
    """RabbitMQ queues' x-max-priority; 0 declares queues without priorities."""
    queue_type: Literal["classic", "quorum"] = "classic"
    """RabbitMQ queue type. Quorum queues are replicated and count deliveries; no priorities."""
    poison_limit: Annotated[int, msgspec.Meta(ge=1)] = 3
    """Deliveries that ended without being settled (worker or child died) before dead-lettering."""
    default_max_retries: Count = 3
    default_retry_backoff_max: Positive = 600.0
    concurrency: Annotated[int, msgspec.Meta(ge=1)] = max(os.cpu_count() or 1, 1)
    pool: Literal["prefork", "threads", "asyncio", "solo"] = (
        "prefork" if sys.platform == "linux" else "threads"
    )
    """prefork: child processes (the default); threads: blocking I/O; asyncio: many `async def`
    tasks at once on one event loop; solo: one task at a time, for debugging."""
    max_tasks_per_child: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """Replace a prefork child with a fresh one after this many tasks."""
    max_memory_per_child: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """Replace a prefork child after a task that left it using more resident memory than this:
    bytes, or a size such as `200MB` or `1GiB`."""
    child_start_timeout: Positive = 30.0
    """Seconds a new prefork child has to report WORKER_UP before it is killed and replaced."""
    shutdown_grace: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    """Seconds a warm shutdown waits for running tasks before releasing them."""
    log_level: str = "INFO"

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from keyword arguments, then `CONVEYOR_*` variables, then defaults."""
        env = os.environ if env is None else env
        names = cls.__struct_fields__
        for key in overrides:
            if key not in names:
                raise ConfigurationError(unknown_name_message(key, names, "setting"))
        raw: dict[str, Any] = {}
        for name in names:
            value = env.get(ENV_PREFIX + name.upper())
            if value is not None:
                raw[name] = None if value == "" and name == "results" else value
        raw.update({k: v for k, v in overrides.items() if v is not None})
        size = raw.get("max_memory_per_child")
        if isinstance(size, str):
            try:
                raw["max_memory_per_child"] = parse_size(size)
            except ValueError as exc:
                origin = "" if "max_memory_per_child" in overrides else " (from "
                origin += f"{ENV_PREFIX}MAX_MEMORY_PER_CHILD)" if origin else ""
                message = f"invalid setting: max_memory_per_child {exc}{origin}"
                raise ConfigurationError(message) from None
        try:
            # strict=False lets "30" from the environment become 30.0.
            settings = msgspec.convert(raw, cls, strict=False)
        except msgspec.ValidationError as exc:
            where = next((n for n in names if f"`$.{n}`" in str(exc)), None)
            source = (
                f" (from {ENV_PREFIX}{where.upper()})"
                if where is not None and where not in overrides
                else ""
            )
            raise ConfigurationError(f"invalid setting: {exc}{source}") from None
        if settings.log_level.upper() not in LOG_LEVELS:
            raise ConfigurationError(
                f"invalid setting: log_level {settings.log_level!r}; use one of "
                f"{', '.join(LOG_LEVELS)}"
            )
        return settings


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}
_UNITS |= {"K": 2**10, "KIB": 2**10, "M": 2**20, "MIB": 2**20, "G": 2**30, "GIB": 2**30}


def parse_size(text: str) -> int:
    """A memory size in bytes from `200MB`, `1.5GiB`, `300M` (binary) or plain bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _UNITS or float(match.group(1)) * _UNITS[unit] < 1:
        raise ValueError(f"{text!r} is not a size: write e.g. 200MB, 1GiB or 500000 (bytes)")
    return int(float(match.group(1)) * _UNITS[unit])


def unknown_name_message(key: str, known: tuple[str, ...], what: str) -> str:
    """An error message for an unknown name, with the closest known one when there is one."""
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {what} {key!r}{hint}; known: {', '.join(sorted(known))}"
