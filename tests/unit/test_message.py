"""The envelope: lossless round-trips, and only DecodeError out of decode, whatever the bytes."""

from __future__ import annotations

import json
from typing import Any
from unittest.mock import patch

import msgspec
import pytest
from corpus.cases import load_cases
from corpus.cases import settings as corpus_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conveyor import DeadLetterReason, message
from conveyor.errors import DecodeError, EncodeError
from conveyor.message import DEFAULT_MAX_SIZE, MAX_PRIORITY, VERSION, Envelope, decode, encode

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# JSON-compatible values: what the envelope promises to carry unchanged. NaN and infinities have no
# JSON spelling, and tuples come back as lists, so neither is generated here.
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=15,
)
timestamps = st.floats(min_value=0, max_value=1e11, allow_nan=False)
identifiers = st.text(min_size=1, max_size=128)
names = st.text(min_size=1, max_size=255)


@st.composite
def envelopes(draw: st.DrawFn) -> Envelope:
    """Any valid envelope."""
    return Envelope(
        id=draw(identifiers),
        task=draw(names),
        queue=draw(names),
        args=tuple(draw(st.lists(json_values, max_size=5))),
        kwargs=draw(st.dictionaries(st.text(), json_values, max_size=5)),
        priority=draw(st.integers(0, MAX_PRIORITY)),
        eta=draw(st.none() | timestamps),
        expires=draw(st.none() | timestamps),
        retries=draw(st.integers(0, 1_000_000)),
        max_retries=draw(st.none() | st.integers(0, 1_000_000)),
        root_id=draw(st.none() | identifiers),
        parent_id=draw(st.none() | identifiers),
        idempotency_key=draw(st.none() | st.text(max_size=255)),
        sent_at=draw(timestamps),
        headers=draw(st.dictionaries(st.text(), st.text(), max_size=4)),
    )


def envelope_dict(**changes: Any) -> dict[str, Any]:
    """A valid envelope as a JSON object, with some keys changed (or added)."""
    base = Envelope(id="abc", task="shop.resize", queue="default", args=(1, "a"), kwargs={"k": 2})
    data: dict[str, Any] = msgspec.json.decode(encode(base))
    data.update(changes)
    return data


def reason_of(data: bytes, **kwargs: Any) -> str:
    with pytest.raises(DecodeError) as info:
        decode(data, **kwargs)
    assert info.value.reason == str(info.value)
    return info.value.reason


# round-trips


@SETTINGS
@given(envelopes())
def test_encode_decode_round_trip(envelope: Envelope) -> None:
    data = encode(envelope)
    assert isinstance(data, bytes)
    decoded = decode(data)
    assert decoded == envelope
    assert decoded.args == envelope.args
    assert decoded.kwargs == envelope.kwargs
    # Encoding is deterministic: the decoded envelope encodes to the same bytes.
    assert encode(decoded) == data


@SETTINGS
@given(st.lists(json_values, max_size=5), st.dictionaries(st.text(), json_values, max_size=5))
def test_arguments_survive_unchanged(args: list[Any], kwargs: dict[str, Any]) -> None:
    envelope = Envelope(id="i", task="t", queue="q", args=tuple(args), kwargs=kwargs)
    decoded = decode(encode(envelope))
    assert list(decoded.args) == args
    assert decoded.kwargs == kwargs


def test_envelope_carries_its_version() -> None:
    data = msgspec.json.decode(encode(Envelope(id="i", task="t", queue="q")))
    assert data["v"] == VERSION == 1


def test_retried_keeps_id_and_counts_one_more_try() -> None:
    envelope = Envelope(id="i", task="t", queue="q", retries=2, sent_at=1.0)
    nxt = envelope.retried(eta=123.0)
    assert (nxt.id, nxt.retries, nxt.eta) == ("i", 3, 123.0)
    assert nxt.sent_at > 1.0
    assert decode(encode(nxt)) == nxt


# nothing but DecodeError


def assert_only_decode_error(data: bytes, **kwargs: Any) -> None:
    try:
        decode(data, **kwargs)
    except DecodeError as exc:
        assert isinstance(exc.reason, str)
        assert exc.reason


@SETTINGS
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_raise_only_decode_error(data: bytes) -> None:
    assert_only_decode_error(data)


@SETTINGS
@given(json_values)
def test_arbitrary_json_values_raise_only_decode_error(value: Any) -> None:
    assert_only_decode_error(msgspec.json.encode(value))


@SETTINGS
@given(st.dictionaries(st.sampled_from([*Envelope.__struct_fields__, "v", "x"]), json_values))
def test_objects_with_envelope_keys_raise_only_decode_error(value: dict[str, Any]) -> None:
    assert_only_decode_error(msgspec.json.encode(value))


@SETTINGS
@given(st.sampled_from(sorted(envelope_dict())), json_values)
def test_envelope_with_one_field_replaced_raises_only_decode_error(key: str, value: Any) -> None:
    assert_only_decode_error(msgspec.json.encode(envelope_dict(**{key: value})))


@SETTINGS
@given(envelopes(), st.data())
def test_truncated_envelope_is_a_decode_error(envelope: Envelope, data: st.DataObject) -> None:
    body = encode(envelope)
    cut = data.draw(st.integers(0, len(body) - 1))
    with pytest.raises(DecodeError):
        decode(body[:cut])


@SETTINGS
@given(envelopes(), st.data())
def test_corrupted_envelope_bytes_raise_only_decode_error(
    envelope: Envelope, data: st.DataObject
) -> None:
    body = bytearray(encode(envelope))
    for _ in range(data.draw(st.integers(1, 4))):
        body[data.draw(st.integers(0, len(body) - 1))] = data.draw(st.integers(0, 255))
    assert_only_decode_error(bytes(body))


DEEP = 100_000
NEST = b"[" * DEEP + b"]" * DEEP


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"[" * DEEP, id="unclosed-arrays"),
        pytest.param(b"{" * DEEP, id="unclosed-objects"),
        pytest.param(NEST, id="closed-arrays"),
        pytest.param(b'{"v":' + NEST + b"}", id="deep-version"),
        pytest.param(
            b'{"v":1,"id":"a","task":"t","queue":"q","args":[' + NEST + b"]}", id="deep-args"
        ),
        pytest.param(b'{"args":[' + NEST + b'],"id":5}', id="deep-args-first"),
        pytest.param(b"\xff" * 1000, id="invalid-utf8"),
        pytest.param(b"", id="empty"),
        pytest.param(b"null", id="null"),
        pytest.param(b'"\\ud800"', id="lone-surrogate-escape"),
        pytest.param(b"1e999999", id="huge-exponent"),
        pytest.param(b"9" * 10_000, id="huge-integer"),
    ],
)
def test_pathological_input_is_a_decode_error(data: bytes) -> None:
    reason_of(data)


# Regression: the reason finder re-parsed the body and let RecursionError escape decode.
@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b'{"a":' * DEEP, id="unclosed-nested-objects"),
        pytest.param(b'{"x":' + NEST + b"}", id="deep-unknown-field"),
        pytest.param(b'{"v":1,"id":5,"x":' + NEST + b"}", id="deep-after-wrong-type"),
        pytest.param(
            b'{"v":1,"id":"a","task":"t","queue":"q","headers":{"h":' + NEST + b"}}",
            id="deep-header-value",
        ),
    ],
)
def test_deeply_nested_value_after_a_validation_error_is_a_decode_error(data: bytes) -> None:
    reason_of(data)


# size limits


def test_default_size_limit_is_16_mib() -> None:
    assert DEFAULT_MAX_SIZE == 16 * 1024 * 1024


def test_encode_enforces_the_size_limit_exactly() -> None:
    envelope = Envelope(id="i", task="t", queue="q", args=("x" * 1000,))
    size = len(encode(envelope))
    assert encode(envelope, max_size=size)  # exactly at the limit is fine
    with pytest.raises(EncodeError, match=f"{size} bytes, over the {size - 1}-byte limit"):
        encode(envelope, max_size=size - 1)


def test_decode_enforces_the_size_limit_exactly() -> None:
    data = encode(Envelope(id="i", task="t", queue="q", args=("x" * 1000,)))
    assert decode(data, max_size=len(data)).args == ("x" * 1000,)
    reason = reason_of(data, max_size=len(data) - 1)
    assert f"over the {len(data) - 1}-byte limit" in reason


def test_decode_checks_the_size_before_parsing() -> None:
    # Junk that would be a parse error: the size check must be what rejects it.
    reason = reason_of(b"[" * 2000, max_size=1000)
    assert "2000 bytes" in reason and "1000-byte limit" in reason


def test_encode_rejects_unencodable_arguments() -> None:
    with pytest.raises(EncodeError, match="cannot be encoded as JSON"):
        encode(Envelope(id="i", task="t", queue="q", args=(object(),)))


# validation reasons


@pytest.mark.parametrize("version", [0, 2, 99, -1, "2", "one", 2**70])
def test_unknown_version_reason_mentions_the_version(version: object) -> None:
    reason = reason_of(msgspec.json.encode(envelope_dict(v=version)))
    assert "unknown envelope version" in reason
    assert repr(version) in reason


@SETTINGS
@given(st.integers().filter(lambda v: v != VERSION))
def test_any_other_integer_version_is_unknown(version: int) -> None:
    reason = reason_of(msgspec.json.encode(envelope_dict(v=version)))
    assert f"unknown envelope version: {version}" in reason


def test_object_without_version_among_other_errors_is_not_an_envelope() -> None:
    data = envelope_dict(id=5)
    del data["v"]
    assert "no version field" in reason_of(msgspec.json.encode(data))


# Regression: msgspec treats the tag of a directly decoded tagged Struct as optional.
def test_otherwise_valid_envelope_without_version_is_rejected() -> None:
    data = envelope_dict()
    del data["v"]
    assert "no version field" in reason_of(msgspec.json.encode(data))


WRONG_TYPES = [
    ("id", 5),
    ("id", ""),
    ("task", None),
    ("task", ["t"]),
    ("queue", {}),
    ("args", "not-a-list"),
    ("kwargs", [1, 2]),
    ("kwargs", "k=1"),
    ("priority", "high"),
    ("priority", 10),
    ("priority", -1),
    ("priority", 1.5),
    ("eta", "soon"),
    ("eta", -1.0),
    ("eta", 1e300),
    ("expires", {}),
    ("retries", -1),
    ("retries", "0"),
    ("max_retries", 2.5),
    ("root_id", 1),
    ("parent_id", False),
    ("idempotency_key", 7),
    ("idempotency_key", "k" * 256),
    ("sent_at", "now"),
    ("headers", {"h": 1}),
    ("headers", ["h"]),
]


@pytest.mark.parametrize(("field", "value"), WRONG_TYPES)
def test_wrong_field_type_reason_names_the_field(field: str, value: object) -> None:
    reason = reason_of(msgspec.json.encode(envelope_dict(**{field: value})))
    assert f"$.{field}" in reason
    assert "invalid envelope" in reason


@pytest.mark.parametrize("field", ["id", "task", "queue"])
def test_missing_required_field_reason_names_it(field: str) -> None:
    data = envelope_dict()
    del data[field]
    assert f"`{field}`" in reason_of(msgspec.json.encode(data))


@pytest.mark.parametrize("extra", ["x", "pickle", "Task", "v2"])
def test_unknown_fields_are_rejected(extra: str) -> None:
    reason = reason_of(msgspec.json.encode(envelope_dict(**{extra: 1})))
    assert "unknown field" in reason
    assert f"`{extra}`" in reason


def test_malformed_json_reason() -> None:
    assert "malformed JSON" in reason_of(b'{"v": 1, "id": ')


# dead-letter categories: chosen by conveyor, whatever the parser's own words


def category_of(data: bytes, **kwargs: Any) -> DeadLetterReason:
    with pytest.raises(DecodeError) as info:
        decode(data, **kwargs)
    assert info.value.reason.startswith(f"{info.value.category}: ")
    assert DeadLetterReason.of(info.value.reason) is info.value.category
    return info.value.category


@pytest.mark.parametrize(
    "body",
    [
        b'{"v":1,"id":"a","task":"t","queue":"q","args":["caf\xe9"]}',  # a Latin-1 byte
        b'{"v":1,"id":"a","task":"t","queue":"q","kwargs":{"\xff":1}}',  # in a key
        b'{"v":1,"id":"a","task":"t","queue":"q","args":["\xed\xa0\x80"]}',  # a UTF-8 surrogate
        b'{"v":1,"id":"a","task":"t","queue":"q","args":["\xe2\x82"]}',  # cut short
        b"\x89PNG\r\n\x1a\n",
        b'{"v":1,"id":"a","task":"t","queue":"q","x":"\xc0\xaf"}',  # an overlong form
    ],
)
def test_invalid_utf8_is_undecodable_wherever_it_is(body: bytes) -> None:
    assert category_of(body) is DeadLetterReason.UNDECODABLE
    assert reason_of(body).startswith("undecodable message: not valid UTF-8 (byte 0x")


@pytest.mark.parametrize(
    "raised",
    [
        msgspec.DecodeError("Invalid UTF-8 encoded string"),  # what msgspec 0.23 says
        msgspec.DecodeError("JSON is malformed: invalid character (byte 40)"),  # 0.22
        msgspec.DecodeError("some wording of a release to come"),
        msgspec.ValidationError("Invalid UTF-8 encoded string"),
        UnicodeDecodeError("utf-8", b"\xe9", 0, 1, "invalid continuation byte"),
    ],
)
def test_the_category_of_invalid_utf8_does_not_depend_on_the_parsers_words(
    raised: Exception,
) -> None:
    """Whatever the JSON parser raises, with whatever text, bytes that are not UTF-8 are
    `undecodable message`, and UTF-8 text it refuses keeps the category of the exception's kind."""

    class Parser:
        def decode(self, body: bytes) -> Any:
            raise raised

    with patch.object(message, "_decoder", Parser()):
        assert category_of(b'{"v":1,"args":["caf\xe9"]}') is DeadLetterReason.UNDECODABLE
        text_category = category_of(b'{"v":1,"args":["cafe"]}')
    expected = {
        msgspec.DecodeError: DeadLetterReason.MALFORMED_JSON,
        msgspec.ValidationError: DeadLetterReason.INVALID_ENVELOPE,
        UnicodeDecodeError: DeadLetterReason.UNDECODABLE,
    }[type(raised)]
    assert text_category is expected


def test_every_corpus_refusal_has_the_category_the_corpus_expects() -> None:
    """The bad-input corpus, through `decode` alone: each refusal's category is the one the
    case names, so the worker runs (tests/integration/test_corpus.py) fail only for I/O."""
    limit = corpus_settings()["max_message_size"]
    decoded = set()
    for case in load_cases(limit=limit):
        if case.has_properties:
            continue  # refused for the broker's properties, before decode
        expected = DeadLetterReason.of(case.reason)
        try:
            decode(case.body, max_size=limit)
        except DecodeError as exc:
            assert exc.category is expected, (case.name, exc.reason)
        else:
            decoded.add(expected)
    # What decodes is refused later, by the worker, for what the envelope asks.
    assert decoded <= {DeadLetterReason.UNKNOWN_TASK, DeadLetterReason.BAD_ARGUMENTS}


# duplicate keys: msgspec keeps a repeated key's last value, so a second "task" would win


ENVELOPE = (
    b'{"v":1,"id":"a","task":"shop.pay","queue":"q","args":[1,{"x":2}],'
    b'"kwargs":{"k":{"n":[3]}},"headers":{"h":"1"}}'
)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        pytest.param(ENVELOPE.replace(b'"queue"', b'"task":"evil","queue"'), "task", id="task"),
        pytest.param(ENVELOPE.replace(b'"queue"', b'"task":"shop.pay","queue"'), "task", id="same"),
        pytest.param(ENVELOPE.replace(b'"id"', b'"v":1,"id"'), "v", id="version"),
        pytest.param(ENVELOPE.replace(b'"queue"', b'"id":"b","queue"'), "id", id="id"),
        pytest.param(ENVELOPE.replace(b'{"k"', b'{"k":0,"k"'), "k", id="kwargs"),
        pytest.param(ENVELOPE.replace(b'{"n"', b'{"n":0,"n"'), "n", id="nested-in-kwargs"),
        pytest.param(ENVELOPE.replace(b'{"h"', b'{"h":"0","h"'), "h", id="headers"),
        pytest.param(ENVELOPE.replace(b'{"x"', b'{"x":0,"x"'), "x", id="object-in-args"),
        pytest.param(
            ENVELOPE.replace(b'"queue"', b'"\\u0074ask":"evil","queue"'), "task", id="esc"
        ),
        pytest.param(ENVELOPE.replace(b'{"h"', b'{"\\u0068":"0","h"'), "h", id="escaped-header"),
        pytest.param(
            ENVELOPE.replace(b'"shop.pay"', b'5,"task":"shop.pay"'), "task", id="bad-type"
        ),
    ],
)
def test_a_repeated_key_anywhere_is_a_decode_error(data: bytes, key: str) -> None:
    reason = reason_of(data)
    assert reason == f'duplicate key: "{key}" appears twice in one JSON object'


def test_a_repeated_key_after_whitespace_is_found_too() -> None:
    data = ENVELOPE.replace(b",", b", ").replace(b'"queue"', b'"task": "evil", "queue"')
    assert reason_of(data).startswith('duplicate key: "task"')


def test_the_envelope_the_duplicate_tests_change_is_valid() -> None:
    assert decode(ENVELOPE).task == "shop.pay"


def test_a_long_repeated_key_is_shown_cut_short() -> None:
    key = "k" * 1000
    data = ENVELOPE.replace(b'{"k"', f'{{"{key}":0,"{key}":1,"k"'.encode())
    reason = reason_of(data)
    assert reason == f'duplicate key: "{"k" * 100}"... appears twice in one JSON object'


@SETTINGS
@given(envelopes())
def test_any_encoded_envelope_decodes_without_the_duplicate_scan(envelope: Envelope) -> None:
    data = encode(envelope)
    # What conveyor encoded re-encodes byte for byte, so the slower scan never runs for it.
    with patch.object(message, "_repeated_key", side_effect=AssertionError("scanned")):
        assert decode(data) == envelope


@SETTINGS
@given(envelopes(), st.data())
def test_repeating_any_field_of_any_envelope_is_a_decode_error(
    envelope: Envelope, data: st.DataObject
) -> None:
    fields = msgspec.json.decode(encode(envelope))
    key = data.draw(st.sampled_from(sorted(fields)))
    repeated = b"{" + msgspec.json.encode({key: fields[key]})[1:-1] + b"," + encode(envelope)[1:]
    assert (
        reason_of(repeated) == f"duplicate key: {json.dumps(key)} appears twice in one JSON object"
    )


@SETTINGS
@given(envelopes())
def test_an_envelope_encoded_some_other_way_still_decodes(envelope: Envelope) -> None:
    # Spaces, escaped non-ASCII text, stdlib number spelling: not what conveyor writes.
    other = json.dumps(msgspec.json.decode(encode(envelope)), indent=1).encode()
    assert decode(other) == envelope
