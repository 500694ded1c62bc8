"""One typed settings object: keyword arguments first, then `CONVEYOR_*` variables, then defaults.

Every setting has exactly one name. `CONVEYOR_VISIBILITY_TIMEOUT=30` sets `visibility_timeout`.
"""

from __future__ import annotations

import hmac
import os
import re
import sys
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec

from conveyor.errors import ConfigurationError

ENV_PREFIX = "CONVEYOR_"
DELIVERY_LIMIT_FACTOR = 10
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

Positive = Annotated[float, msgspec.Meta(gt=0)]
Count = Annotated[int, msgspec.Meta(ge=0)]
MIN_KEY_BYTES = 16
_NEW_KEY = "python -c 'import secrets; print(secrets.token_hex(32))'"


class Secret:
    """A setting that must never show: its repr and str are `'***'`, whatever it holds."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The value itself, for the one place that uses it."""
        return self._value

    def __repr__(self) -> str:
        return "'***'"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)


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
    queue_max_priority: Annotated[int, msgspec.Meta(ge=0, le=255)] | None = None
    """RabbitMQ queues' x-max-priority: 1 to 255 for that many priority levels, 0 for none.
    Unset: a queue conveyor creates has no priorities, and a queue that exists keeps the
    x-max-priority it has (earlier releases declared 9). See docs/brokers.md."""
    store: str | None = None
    """Where fleet-wide state lives (schedule claims, revocations): `postgresql://...` or
    `redis://...` for workers on several machines, `sqlite:///file.db` on one. Unset: the result
    store if it is one of those, else the SQLite broker's file. See docs/revoke.md."""
    scheduler_store: str | None = None
    """Where schedulers claim periodic ticks, if not in `store`: `postgresql://...` or
    `redis://...` for schedulers on several machines, `sqlite:///file.db` on one. Unset: `store`
    and its default. See docs/periodic-tasks.md."""
    queue_type: Literal["classic", "quorum"] = "classic"
    """RabbitMQ queue type. Quorum queues are replicated and count deliveries; no priorities."""
    poison_limit: Annotated[int, msgspec.Meta(ge=1)] = 3
    """Runs of a message that may die (its process crashed, or a shutdown gave it up) before it
    is dead-lettered. With the prefork pool these are the runs the worker saw die; with the
    other pools, which run tasks in the worker's own process, every delivery that ended
    without being settled counts."""
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
    loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    """The worker's event loop: uvloop (`conveyor[uvloop]`) or asyncio's; auto, uvloop when it
    is installed. Only the worker's own process; prefork children are not affected."""
    shutdown_grace: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    """Seconds a warm shutdown waits for running tasks before releasing them."""
    log_level: str = "INFO"
    task_log: Literal["auto", "each", "quiet"] = "auto"
    """What a worker logs at INFO about tasks that succeed: auto, a line each while at most 10
    finish a second and a summary every 5 s above that; each, always a line; quiet, nothing.
    Failures and retries are logged in every mode. See docs/logging.md."""
    events: bool = False
    """Workers publish task events and heartbeats all the time. Unset, they publish them only
    while a reader asks (`conveyor events`). See docs/events.md."""
    signing_key: Secret | None = None
    """Sign every message sent with HMAC-SHA256 under this key, and run only messages signed
    with it (or with one of `verify_keys`). At least 16 bytes. Unset: nothing is signed, and a
    signed message is dead-lettered. See docs/signing.md."""
    verify_keys: tuple[Secret, ...] = ()
    """More keys whose signatures are accepted but which never sign: for rotating `signing_key`.
    Comma-separated in `CONVEYOR_VERIFY_KEYS`."""

    @property
    def delivery_limit(self) -> int:
        """The most deliveries of a message that never finishes, whatever ended them: ten times
        `poison_limit`. A prefork worker dead-letters past it a message whose runs no one saw
        die (a container's memory limit taking the whole worker down with its task, say), and it
        is one below a quorum queue's `x-delivery-limit`."""
        return self.poison_limit * DELIVERY_LIMIT_FACTOR

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
        if isinstance(raw.get("verify_keys"), str):
            raw["verify_keys"] = [k.strip() for k in raw["verify_keys"].split(",") if k.strip()]
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
            settings = msgspec.convert(raw, cls, strict=False, dec_hook=_secret)
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
        _check_keys(settings, overrides)
        return settings


def _secret(kind: type, value: Any) -> Secret:
    """Text from keyword arguments or the environment as a `Secret` (msgspec's hook)."""
    if kind is not Secret:
        raise NotImplementedError(kind)
    if isinstance(value, Secret):
        return value
    if not isinstance(value, str):
        # The value itself is not shown: it may be the key, as bytes.
        raise TypeError(f"expected text (str), got {type(value).__name__}")
    return Secret(value)


def _check_keys(settings: Settings, overrides: Mapping[str, Any]) -> None:
    """Keys long enough to be keys, and verify-only keys only beside a signing key.

    The messages name the setting and never show a key, not even a wrong one.
    """
    for name, keys in (
        ("signing_key", () if settings.signing_key is None else (settings.signing_key,)),
        ("verify_keys", settings.verify_keys),
    ):
        if any(len(key.reveal().encode()) < MIN_KEY_BYTES for key in keys):
            given = overrides.get(name) is not None
            source = "" if given else f" (from {ENV_PREFIX}{name.upper()})"
            raise ConfigurationError(
                f"invalid setting: {name}{source} holds a key shorter than {MIN_KEY_BYTES} bytes; "
                f"use a random key of 32 bytes or more, such as the output of {_NEW_KEY}"
            )
    if settings.verify_keys and settings.signing_key is None:
        raise ConfigurationError(
            "invalid setting: verify_keys is set but signing_key is not; set signing_key to "
            "the key messages are signed with (verify_keys only adds keys that are accepted)"
        )


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
    import difflib  # only ever needed for this error message

    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {what} {key!r}{hint}; known: {', '.join(sorted(known))}"
