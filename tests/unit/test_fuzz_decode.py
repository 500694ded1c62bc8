"""Fuzzing `conveyor.message.decode`: the atheris target for a bounded time, and a structured
fuzz of envelope-shaped JSON written the ways other producers write it.

tests/unit/test_message.py already feeds decode arbitrary bytes, arbitrary JSON values, objects
with envelope keys, one field replaced, truncations and flipped bytes. The structured fuzz here
works on the JSON text instead: repeated keys (also spelled with escapes), key order, whitespace,
number and string spellings, nesting at any depth, types swapped, fields dropped or added. Only
`DecodeError` may escape; an accepted envelope must hold no repeated key, encode again and decode
back to itself, and agree with Python's own JSON parser on every field it was given.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conveyor.errors import DecodeError
from conveyor.message import decode, encode

FUZZ_TARGET = Path(__file__).parents[1] / "fuzz" / "fuzz_decode.py"
FUZZ_SECONDS = 20
NO_SIZE_LIMIT = 2**62  # re-encoding checks encodability, not size


# --- the atheris target, for a bounded time -------------------------------------------------------


@pytest.mark.timeout(FUZZ_SECONDS + 90)
def test_the_atheris_target_finds_no_crash(tmp_path: Path) -> None:
    if importlib.util.find_spec("atheris") is None:
        pytest.skip(
            "atheris is not installed (pip install atheris): the coverage-guided fuzz run of "
            "decode is skipped"
        )
    corpus, artifacts = tmp_path / "corpus", tmp_path / "artifacts"
    artifacts.mkdir()
    command = [sys.executable, str(FUZZ_TARGET), f"-max_total_time={FUZZ_SECONDS}"]
    command += ["-max_len=4096", "-timeout=10", "-rss_limit_mb=2048"]
    command += [f"-artifact_prefix={artifacts}/", str(corpus)]
    proc = subprocess.run(
        command,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=FUZZ_SECONDS + 60,
        check=False,
    )
    log = "\n".join(line for line in proc.stderr.splitlines() if "Instrumenting" not in line)
    found = {path.name: path.read_bytes()[:500] for path in sorted(artifacts.iterdir())}
    assert proc.returncode == 0 and not found, (
        f"the fuzzer found inputs that crash decode: {found}\n{log[-4000:]}"
    )
    assert len(list(corpus.glob("seed-*"))) >= 50, "the corpus bodies did not seed the fuzzer"
    done = re.search(r"Done (\d+) runs", proc.stderr)
    assert done is not None, log[-4000:]
    print(f"\nfuzz_decode: {int(done.group(1)):,} inputs in {FUZZ_SECONDS} s, no crash")


# --- structured fuzz: envelope-shaped JSON text ---------------------------------------------------


@dataclass
class Obj:
    members: list[tuple[bytes, Any]]  # (the key as written, with its quotes; the value)


@dataclass
class Arr:
    items: list[Any]


@dataclass
class Raw:
    text: bytes  # a scalar exactly as written


@dataclass
class Nest:
    """`inner` wrapped in `depth` one-member objects or one-item arrays (too deep to recurse)."""

    depth: int
    objects: bool
    inner: Any


def tree(value: Any, ascii_only: bool) -> Any:
    if isinstance(value, dict):
        return Obj([(literal(k, ascii_only), tree(v, ascii_only)) for k, v in value.items()])
    if isinstance(value, list):
        return Arr([tree(v, ascii_only) for v in value])
    return Raw(literal(value, ascii_only))


def literal(value: Any, ascii_only: bool) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only).encode()


def render(node: Any, space: bytes) -> bytes:
    if isinstance(node, Raw):
        return node.text
    if isinstance(node, Nest):
        opening, closing = (b'{"n":', b"}") if node.objects else (b"[", b"]")
        return opening * node.depth + render(node.inner, space) + closing * node.depth
    if isinstance(node, Arr):
        inner = (b"," + space).join(render(item, space) for item in node.items)
        return b"[" + space + inner + space + b"]"
    pairs = (key + space + b":" + space + render(value, space) for key, value in node.members)
    return b"{" + space + (b"," + space).join(pairs) + space + b"}"


def containers(node: Any) -> list[Obj | Arr]:
    """Every object and array in the tree (inside nesting too), outermost first."""
    found: list[Obj | Arr] = []
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, Nest):
            stack.append(current.inner)
        elif isinstance(current, Obj):
            found.append(current)
            stack.extend(value for _, value in current.members)
        elif isinstance(current, Arr):
            found.append(current)
            stack.extend(current.items)
    return found


def has_repeated_key(node: Any) -> bool:
    for container in containers(node):
        if isinstance(container, Obj):
            keys = [json.loads(key) for key, _ in container.members]
            if len(set(keys)) < len(keys):
                return True
    return False


def escape_some(key: bytes, draw: st.DrawFn) -> bytes:
    """The same key with some characters written as \\uXXXX escapes."""
    text = json.loads(key)
    chars = [
        f"\\u{ord(c):04x}" if ord(c) < 0x10000 and draw(st.booleans()) else json.dumps(c)[1:-1]
        for c in text
    ]
    return ('"' + "".join(chars) + '"').encode()


ODD_NUMBERS = [
    b"1e999",
    b"-1e999",
    b"-0",
    b"-0.0",
    b"1E+2",
    b"5e-324",
    b"1.7976931348623157e309",
    b"9" * 4300,
    b"9" * 4301,
    b"-" + b"9" * 20,
    b"18446744073709551616",
    b"00",
    b"01",
    b"1.",
    b".5",
    b"+1",
    b"0x10",
    b"NaN",
    b"-Infinity",
]
ODD_STRINGS = [
    b'"\\u0000"',
    b'"\\ud83d\\ude00"',
    b'"\\ud800"',
    b'"\\udc00\\ud800"',
    b'"\\/\\b\\f\\n\\r\\t"',
    b'"\\x41"',
    b'"\\U0041"',
    b'"caf\xe9"',
    b'"\xc0\xaf"',
    b'"\xed\xa0\x80"',
    b'"tab\there"',
    b'"\x01"',
    b"'single'",
    '"\u2028\ufeff"'.encode(),
]
OTHER_TYPES = [b"true", b"false", b"null", b"[]", b"{}", b'""', b"0", b'"1"']
SPACES = [b"", b" ", b"\n\t", b"\r\n  ", b"\x0b", b"\x0c", b"\xc2\xa0"]
# Known bug (test_an_accepted_deep_argument_encodes_again): decode reads arguments nested nearly as
# deep as the recursion limit (which Hypothesis raises while it runs a test), but encode refuses
# them from a third of it. Nesting keeps out of that window, so this property keeps guarding
# everything else: four shallow nests at most stay under 330 levels, and 100k levels is past any.
SHALLOW, DEEP = 60, 100_000
MUTATIONS = [
    "repeat-key",
    "respell-key",
    "shuffle",
    "odd-number",
    "odd-string",
    "other-type",
    "nest",
    "drop",
    "unknown-key",
]

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
timestamps = st.floats(min_value=0, max_value=1e11)
envelope_dicts = st.fixed_dictionaries(
    {
        "v": st.just(1),
        "id": st.text(min_size=1, max_size=16),
        "task": st.text(min_size=1, max_size=24),
        "queue": st.text(min_size=1, max_size=12),
    },
    optional={
        "args": st.lists(json_values, max_size=3),
        "kwargs": st.dictionaries(st.text(max_size=6), json_values, max_size=3),
        "priority": st.integers(0, 9),
        "eta": st.none() | timestamps,
        "expires": st.none() | timestamps,
        "retries": st.integers(0, 1_000_000),
        "max_retries": st.none() | st.integers(0, 1_000_000),
        "root_id": st.none() | st.text(min_size=1, max_size=16),
        "idempotency_key": st.none() | st.text(max_size=16),
        "sent_at": timestamps,
        "headers": st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3),
    },
)


def mutate(root: Obj, draw: st.DrawFn, mutation: str) -> None:
    """Apply one mutation to some object or array of the tree, in place."""
    target = draw(st.sampled_from(containers(root)))
    children: list[Any]
    if isinstance(target, Obj):
        if mutation == "unknown-key":
            target.members.append((literal(f"x-{len(target.members)}", True), Raw(b"1")))
            return
        if not target.members:
            return
        i = draw(st.integers(0, len(target.members) - 1))
        key, value = target.members[i]
        if mutation == "repeat-key":
            spelled = escape_some(key, draw) if draw(st.booleans()) else key
            other = draw(st.sampled_from([Raw(b"1"), Raw(b'"other"'), value]))
            at = draw(st.integers(0, len(target.members)))
            target.members.insert(at, (spelled, other))
            return
        if mutation == "respell-key":
            target.members[i] = (escape_some(key, draw), value)
            return
        if mutation == "shuffle":
            target.members[:] = draw(st.permutations(target.members))
            return
        if mutation == "drop":
            del target.members[i]
            return
        children = [value for _, value in target.members]
    else:
        if not target.items or mutation in ("unknown-key", "repeat-key", "respell-key"):
            return
        if mutation == "shuffle":
            target.items[:] = draw(st.permutations(target.items))
            return
        if mutation == "drop":
            del target.items[draw(st.integers(0, len(target.items) - 1))]
            return
        children = target.items
    i = draw(st.integers(0, len(children) - 1))
    if mutation == "odd-number":
        replacement: Any = Raw(draw(st.sampled_from(ODD_NUMBERS)))
    elif mutation == "odd-string":
        replacement = Raw(draw(st.sampled_from(ODD_STRINGS)))
    elif mutation == "other-type":
        replacement = Raw(draw(st.sampled_from(OTHER_TYPES)))
    else:  # nest: shallow, or far deeper than decode reads (see SHALLOW)
        depth = draw(st.integers(1, SHALLOW) | st.just(DEEP))
        replacement = Nest(depth, draw(st.booleans()), children[i])
    if isinstance(target, Obj):
        target.members[i] = (target.members[i][0], replacement)
    else:
        target.items[i] = replacement


@st.composite
def envelope_texts(draw: st.DrawFn) -> tuple[bytes, bool]:
    """An envelope-shaped JSON text, mutated; and whether some object in it repeats a key."""
    root = tree(draw(envelope_dicts), ascii_only=draw(st.booleans()))
    for mutation in draw(st.lists(st.sampled_from(MUTATIONS), max_size=4)):
        mutate(root, draw, mutation)
    space = draw(st.sampled_from(SPACES)) if draw(st.booleans()) else b""
    return render(root, space), has_repeated_key(root)


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(envelope_texts())
def test_mutated_envelope_text_is_refused_with_a_reason_or_read_faithfully(
    case: tuple[bytes, bool],
) -> None:
    body, repeats_a_key = case
    try:
        envelope = decode(body)
    except DecodeError as exc:
        assert exc.reason, f"a DecodeError without a reason for {body[:200]!r}"
        return
    assert not repeats_a_key, f"accepted an envelope with a repeated key: {body[:300]!r}"
    again = encode(envelope, max_size=NO_SIZE_LIMIT)
    assert decode(again, max_size=NO_SIZE_LIMIT) == envelope
    # Python's own parser reads every field the body gave the same way.
    given_fields = json.loads(body)
    fields = msgspec.json.decode(again)
    for name, value in given_fields.items():
        assert fields[name] == value, f"{name}: {fields[name]!r} != {value!r} in {body[:300]!r}"


@pytest.mark.parametrize("depth", [400, 600])
def test_an_accepted_deep_argument_encodes_again(depth: int) -> None:
    nested = b"[" * depth + b"null" + b"]" * depth
    body = b'{"v":1,"id":"a","task":"t","queue":"q","args":[' + nested + b"]}"
    try:
        envelope = decode(body)
    except DecodeError:
        return  # refusing it is as good as reading it faithfully
    assert decode(encode(envelope)) == envelope
