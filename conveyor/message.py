"""The versioned message envelope, and the only code that turns it into bytes and back.

Envelopes are frozen msgspec Structs encoded as JSON. Decoding checks the size limit, then the
signature (when the app signs, see `conveyor.signing`) before any parsing, then every field's type
and range, and that no JSON object repeats a key; anything that fails raises `DecodeError` with a
reason fit for a dead-letter record. Nothing else ever escapes `decode`: bytes from a broker
cannot crash a worker.
"""

from __future__ import annotations

import json
import math
import random
import time
from typing import Annotated, Any

import msgspec

from conveyor.errors import DecodeError, EncodeError
from conveyor.reasons import DeadLetterReason as Why
from conveyor.signing import NO_KEY, PREFIX, Signer
from conveyor.values import encoder as _value_encoder
from conveyor.workflows.wire import Workflow

VERSION = 1
DEFAULT_MAX_SIZE = 16 * 1024 * 1024
MAX_PRIORITY = 9

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
Identifier = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
# Epoch seconds. The upper bound keeps absurd values (1e308, inf) out of arithmetic on delays.
Timestamp = Annotated[float, msgspec.Meta(ge=0, le=1e11)]
Priority = Annotated[int, msgspec.Meta(ge=0, le=MAX_PRIORITY)]
Count = Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]


class Envelope(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag_field="v",
    tag=VERSION,
):
    """One task invocation as it travels through a broker (envelope version 1)."""

    id: Identifier
    task: Name
    queue: Name
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = {}
    priority: Priority = 0
    eta: Timestamp | None = None
    """Do not run before this time. Brokers hold the message until then."""
    expires: Timestamp | None = None
    """Do not run after this time."""
    retries: Count = 0
    max_retries: Count | None = None
    """Overrides the task's own `max_retries` for this message."""
    root_id: Identifier | None = None
    parent_id: Identifier | None = None
    idempotency_key: Annotated[str, msgspec.Meta(max_length=255)] | None = None
    sent_at: Timestamp = 0.0
    headers: dict[str, str] = {}
    workflow: Workflow | msgspec.UnsetType = msgspec.UNSET
    """What follows this task in a workflow (`conveyor.workflows.wire`); absent, and not
    encoded, on a plain task's message."""

    def retried(self, eta: float | None) -> Envelope:
        """The envelope of the next try: same id, one more retry, a new due time."""
        return msgspec.structs.replace(self, retries=self.retries + 1, eta=eta, sent_at=time.time())


class _NoVersion(msgspec.Struct, tag_field="v", tag=0):
    """Never sent. Decoding into a union with it makes msgspec require the `v` tag."""


class _Tagged(msgspec.Struct):
    """Just enough of an envelope to tell which version a message claims to be."""

    v: Any = None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Envelope | _NoVersion)
_version_decoder = msgspec.json.Decoder(_Tagged)


def new_id() -> str:
    """A new task id: 32 hex digits, a millisecond timestamp then 80 random bits.

    Ids sorted by time keep result-store inserts on the last page of the index instead of a
    random one, which measurably cuts what each commit writes. Ids must be unique, not secret:
    `random` (reseeded in forked children) avoids a system call per id.
    """
    return f"{time.time_ns() // 1_000_000:012x}{random.getrandbits(80):020x}"


def encode(
    envelope: Envelope, *, max_size: int = DEFAULT_MAX_SIZE, signer: Signer | None = None
) -> bytes:
    """Encode an envelope (signed, given a signer), or raise `EncodeError` saying which value
    cannot be sent. The size limit counts the whole message, signature included."""
    try:
        if _has_non_finite(envelope.args) or _has_non_finite(envelope.kwargs):
            # JSON has no NaN or infinity; the encoder would silently send null instead.
            raise ValueError("NaN and infinite floats have no JSON form")
        data = _value_encoder.encode(envelope)
    except (TypeError, ValueError, OverflowError, RecursionError, NotImplementedError) as exc:
        raise EncodeError(
            f"task {envelope.task}: arguments cannot be encoded as JSON ({exc}); "
            "pass JSON-compatible values: str, int, float, bool, None, lists and dicts"
        ) from None
    if signer is not None:
        data = signer.sign(data)
    if len(data) > max_size:
        raise EncodeError(
            f"task {envelope.task}: message is {len(data)} bytes, over the {max_size}-byte limit; "
            "pass a reference (a path or a key) instead of the data itself"
        )
    return data


def _has_non_finite(value: Any) -> bool:
    """True if a NaN or an infinity is anywhere in `value`.

    A loop over a stack, not recursion: whatever nesting `decode` accepts, a retry of it must
    encode again.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return True
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return False


def decode(
    data: bytes, *, max_size: int = DEFAULT_MAX_SIZE, signer: Signer | None = None
) -> Envelope:
    """Decode and validate an envelope; raise `DecodeError` with a reason for anything else.

    With a signer, only a body it signed is parsed; without one, a signed body is rejected.
    """
    if len(data) > max_size:
        raise DecodeError(Why.TOO_LARGE, oversize(len(data), max_size))
    if signer is not None:
        body = signer.verify(data)
    elif data.startswith(PREFIX):
        raise DecodeError(Why.UNEXPECTED_SIGNATURE, NO_KEY)
    else:
        body = data
    try:
        envelope = _decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise _not_utf8(body) or _invalid(body, exc) from None
    except msgspec.DecodeError as exc:
        raise _not_utf8(body) or DecodeError(Why.MALFORMED_JSON, str(exc)) from None
    except (RecursionError, MemoryError, UnicodeError, ValueError) as exc:
        raise _not_utf8(body) or DecodeError(Why.UNDECODABLE, _unreadable(exc)) from None
    if not isinstance(envelope, Envelope):
        raise DecodeError(Why.UNKNOWN_VERSION, f"0 (this worker reads version {VERSION})")
    if not _reencodes_to(envelope, body):
        # Written some other way (spacing, escapes), or with a repeated key: look closer.
        refusal = _not_utf8(body)
        if refusal is None:
            try:
                key = _repeated_key(body)
            except ValueError as exc:
                refusal = DecodeError(Why.UNDECODABLE, str(exc))
            else:
                refusal = None if key is None else _repeated(key)
        if refusal is not None:
            raise refusal
    return envelope


def oversize(size: int, limit: int) -> str:
    """The detail of a `message too large` reason, wherever the size is checked."""
    return f"{size} bytes, over the {limit}-byte limit (max_message_size)"


def _not_utf8(body: bytes) -> DecodeError | None:
    """The refusal for a body that is not UTF-8 text, whatever the JSON parser made of it.

    Checked here rather than read from the parser's error, so that invalid UTF-8 is always
    `undecodable message`: JSON parsers disagree (and change between releases) about whether it
    is a syntax error, a string error, or no error at all.
    """
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        byte = body[exc.start : exc.start + 1].hex()
        return DecodeError(
            Why.UNDECODABLE, f"not valid UTF-8 (byte 0x{byte} at offset {exc.start})"
        )
    return None


def _unreadable(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply to parse"
    if isinstance(exc, MemoryError):
        return "too large to parse in memory"
    return f"{type(exc).__name__}"


def _reencodes_to(envelope: Envelope, body: bytes) -> bool:
    """True if encoding `envelope` gives back `body` byte for byte: then no key repeats.

    msgspec keeps the last value of a repeated key, so a body with one re-encodes shorter. What
    conveyor encoded comes back identical (floats print shortest-first, text as UTF-8, fields
    and keys in order), so this one encode settles nearly every message; only bodies written
    some other way pay for `_repeated_key`.
    """
    try:
        return _encoder.encode(envelope) == body
    except (TypeError, ValueError, OverflowError, RecursionError, MemoryError):
        return False


class _RepeatedKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _check_pairs(pairs: list[tuple[str, Any]]) -> None:
    if len(pairs) > 1 and len({key for key, _ in pairs}) < len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _RepeatedKey(key)
            seen.add(key)


def _skip(text: str) -> None:
    return None


def _repeated_key(body: bytes) -> str | None:
    """The first key some JSON object in `body` holds twice, or None; `ValueError` if the body
    cannot be scanned.

    Keys are compared unescaped: `"task"` and `"\\u0074ask"` are the same key. Values are
    skipped, not built: numbers and objects become None.
    """
    try:
        json.loads(
            body,
            object_pairs_hook=_check_pairs,
            parse_int=_skip,
            parse_float=_skip,
            parse_constant=_skip,
            strict=False,
        )
    except _RepeatedKey as exc:
        return exc.key
    except RecursionError:
        raise ValueError("too deeply nested to check for duplicate keys") from None
    except MemoryError:
        raise ValueError("too large to check for duplicate keys") from None
    return None


def _repeated(key: str) -> DecodeError:
    shown = json.dumps(key[:100]) + ("..." if len(key) > 100 else "")
    return DecodeError(Why.DUPLICATE_KEY, f"{shown} appears twice in one JSON object")


def _invalid(data: bytes, exc: msgspec.ValidationError) -> DecodeError:
    """Say "duplicate key" or "unknown envelope version" when that is the problem, else which
    field is wrong."""
    try:
        key = _repeated_key(data)
    except ValueError:
        key = None
    if key is not None:
        return _repeated(key)
    try:
        version = _version_decoder.decode(data).v
    except (RecursionError, MemoryError) as too_deep:
        # Some value is nested past what can be read, whatever version the message claims.
        return DecodeError(Why.UNDECODABLE, _unreadable(too_deep))
    except (msgspec.MsgspecError, ValueError):
        version = None
    if version is None:
        return DecodeError(Why.NOT_AN_ENVELOPE, "no version field `v`")
    if version != VERSION:
        return DecodeError(
            Why.UNKNOWN_VERSION, f"{version!r} (this worker reads version {VERSION})"
        )
    return DecodeError(Why.INVALID_ENVELOPE, str(exc))
