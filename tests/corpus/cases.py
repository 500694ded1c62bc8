"""Read `cases.toml` into `Case`s: each a body, optional AMQP properties and the expected reason.

Bodies come from a file under `bodies/` or, for ones too big or too odd to commit, from a small
generator run here. See README.md for the format.
"""

from __future__ import annotations

import pickle
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
MANIFEST = HERE / "cases.toml"
BROKERS = ("rabbitmq", "sqlite")

_CASE_KEYS = {
    "name",
    "file",
    "text",
    "hex",
    "generate",
    "reason",
    "content_type",
    "content_type_hex",
    "headers",
    "xfail",
    "xfail_on",
    # generator parameters
    "template",
    "unit",
    "middle",
    "close",
    "count",
    "size",
    "of",
    "at",
    "protocol",
}
_BODY_KEYS = ("file", "text", "hex", "generate")
_LIMIT = re.compile(r"limit\s*\+\s*(\d+)")
# What a padded body is made of: an envelope for a registered task with one string argument.
_PADDED = b'{"v":1,"id":"corpus-oversized","task":"corpus.record","queue":"default","args":["%s"]}'


@dataclass(frozen=True)
class Case:
    """One bad message and what a worker must do with it: dead-letter it with `reason`."""

    name: str
    body: bytes
    reason: str
    """The dead-letter reason must start with this."""
    content_type: bytes | None = None
    headers: tuple[tuple[bytes, bytes], ...] | None = None
    xfail: str | None = None
    xfail_on: tuple[str, ...] = BROKERS

    @property
    def has_properties(self) -> bool:
        """True for a case that needs AMQP properties (so only RabbitMQ can carry it)."""
        return self.content_type is not None or self.headers is not None

    def xfail_reason(self, broker: str) -> str | None:
        """Why this case is expected to fail on `broker` today (a known bug), or None."""
        return self.xfail if broker in self.xfail_on else None


class _CreatesMarker:
    """Unpickling this opens, and so creates, the marker file: proof that something unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def pickle_payload(marker: Path, protocol: int = pickle.HIGHEST_PROTOCOL) -> bytes:
    """Pickle bytes that would create `marker` if anything ever unpickled them."""
    return pickle.dumps(_CreatesMarker(str(marker)), protocol=protocol)


def settings() -> dict[str, Any]:
    """The `[worker]` table: settings the corpus expects the worker to run with."""
    return dict(_manifest()["worker"])


def load_cases(*, limit: int | None = None, marker: Path | None = None) -> list[Case]:
    """Every case, bodies generated for a worker whose `max_message_size` is `limit` (the
    manifest's own by default), with pickles that would create `marker`."""
    limit = settings()["max_message_size"] if limit is None else limit
    marker = marker if marker is not None else HERE / "unpickled-marker"
    cases = [_case(entry, limit, marker) for entry in _manifest()["case"]]
    names = [c.name for c in cases]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"cases.toml: case names used twice: {', '.join(repeated)}")
    return cases


def seed_bodies(max_len: int) -> Iterator[tuple[str, bytes]]:
    """(name, body) for every case body of at most `max_len` bytes: seeds for a fuzzer."""
    for case in load_cases():
        if len(case.body) <= max_len:
            yield case.name, case.body


def _manifest() -> dict[str, Any]:
    with MANIFEST.open("rb") as file:
        return tomllib.load(file)


def _case(entry: dict[str, Any], limit: int, marker: Path) -> Case:
    name = entry.get("name", "?")
    unknown = sorted(set(entry) - _CASE_KEYS)
    if unknown:
        raise ValueError(f"cases.toml: case {name}: unknown keys {', '.join(unknown)}")
    given = [key for key in _BODY_KEYS if key in entry]
    if len(given) != 1:
        raise ValueError(f"cases.toml: case {name}: give exactly one of {', '.join(_BODY_KEYS)}")
    body = _body(entry, given[0], limit, marker)
    reason = entry["reason"].replace("{size}", str(len(body))).replace("{limit}", str(limit))
    headers = entry.get("headers")
    xfail_on = tuple(entry.get("xfail_on", BROKERS))
    if not set(xfail_on) <= set(BROKERS):
        raise ValueError(f"cases.toml: case {name}: xfail_on names brokers of {BROKERS}")
    return Case(
        name=name,
        body=body,
        reason=reason,
        content_type=_text_or_hex(entry, "content_type"),
        headers=None if headers is None else tuple(_header(name, h) for h in headers),
        xfail=entry.get("xfail"),
        xfail_on=xfail_on,
    )


def _body(entry: dict[str, Any], kind: str, limit: int, marker: Path) -> bytes:
    if kind == "file":
        return (HERE / entry["file"]).read_bytes()
    if kind == "text":
        return str(entry["text"]).encode()
    if kind == "hex":
        return bytes.fromhex(entry["hex"])
    generator = entry["generate"]
    if generator == "repeat":
        count = _size(entry["count"], limit)
        filling = entry["unit"] * count + entry.get("middle", "") + entry.get("close", "") * count
        return entry.get("template", "@@").replace("@@", filling).encode()
    if generator == "pad":
        size = _size(entry["size"], limit)
        padding = size - len(_PADDED % b"")
        if padding < 0:
            raise ValueError(f"cases.toml: case {entry['name']}: size {size} is too small to pad")
        return _PADDED % (b"x" * padding)
    if generator == "truncate":
        return (HERE / entry["of"]).read_bytes()[: entry["at"]]
    if generator == "pickle":
        return pickle_payload(marker, entry.get("protocol", pickle.HIGHEST_PROTOCOL))
    raise ValueError(f"cases.toml: case {entry['name']}: unknown generator {generator!r}")


def _size(value: int | str, limit: int) -> int:
    """A count in bytes: a number, or `limit+N` for N past the worker's size limit."""
    if isinstance(value, int):
        return value
    found = _LIMIT.fullmatch(value.strip())
    if found is None:
        raise ValueError(f"cases.toml: a size is a number or limit+N, not {value!r}")
    return limit + int(found.group(1))


def _text_or_hex(table: dict[str, Any], key: str) -> bytes | None:
    if key in table:
        return str(table[key]).encode()
    if f"{key}_hex" in table:
        return bytes.fromhex(table[f"{key}_hex"])
    return None


def _header(case: str, table: dict[str, Any]) -> tuple[bytes, bytes]:
    name, value = _text_or_hex(table, "name"), _text_or_hex(table, "value")
    if name is None or value is None or len(set(table) - {"repeat"}) != 2:
        raise ValueError(
            f"cases.toml: case {case}: a header is "
            "{name or name_hex, value or value_hex, and optionally repeat}"
        )
    return name, value * table.get("repeat", 1)
