"""Message signing: the wire format, verification before parsing, the settings, key rotation, a
worker that runs only what is signed with its key, and the key never showing anywhere."""

from __future__ import annotations

import hashlib
import hmac
import logging
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest.mock import Mock, patch

import msgspec
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conveyor import Conveyor, State, Task
from conveyor.brokers import Outgoing
from conveyor.cli import main
from conveyor.errors import ConfigurationError, DecodeError, EncodeError
from conveyor.message import Envelope, decode, encode
from conveyor.settings import Secret, Settings
from conveyor.signing import PREFIX, Signer
from conveyor.testing import memory_app, run_until_empty

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KEY = "signing-key-Kq3v-Zt7w-0a9f-Xe5m"
OLD_KEY = "previous-key-Lp2x-Rb8n-4c1d-Wj6s"
OTHER_KEY = "someone-else-Mz4q-Ty1h-7k3e-Vu0a"
Q = "default"
ENVELOPE = Envelope(
    id="01a1ff6a10c44132d2dc54830184babe",
    task="shop.pay",
    queue=Q,
    args=("order-7", 1250),
    kwargs={"currency": "EUR", "note": "café"},
    headers={"trace": "t1"},
)


def signer(key: str = KEY, *accepted: str) -> Signer:
    return Signer(Secret(key), [Secret(k) for k in accepted])


def reason_of(data: bytes, **kwargs: Any) -> str:
    with pytest.raises(DecodeError) as info:
        decode(data, **kwargs)
    return info.value.reason


@pytest.fixture
def unparsed() -> Iterator[None]:
    """Fail the test if any JSON is parsed: verification must come first."""
    from conveyor import message

    parser = Mock(decode=Mock(side_effect=AssertionError("parsed before the signature")))
    with patch.object(message, "_decoder", parser):
        yield


# the wire format


def test_a_signed_body_is_a_signature_line_then_the_exact_envelope() -> None:
    plain = encode(ENVELOPE)
    body = encode(ENVELOPE, signer=signer())
    line, envelope = body.split(b"\n", 1)
    assert envelope == plain
    assert line == PREFIX + hmac.new(KEY.encode(), plain, hashlib.sha256).hexdigest().encode()
    assert line.isascii() and len(line) == len("hmac-sha256:") + 64
    assert not plain.startswith(b"h"), "a JSON envelope never looks signed"


def test_signed_bodies_decode_to_the_envelope() -> None:
    assert decode(encode(ENVELOPE, signer=signer()), signer=signer()) == ENVELOPE


@SETTINGS
@given(st.binary(max_size=2000))
def test_sign_then_verify_gives_back_any_bytes(envelope: bytes) -> None:
    assert signer().verify(signer().sign(envelope)) == envelope


def test_the_size_limit_counts_the_signature_line() -> None:
    plain = encode(ENVELOPE)
    with pytest.raises(EncodeError, match="over the"):
        encode(ENVELOPE, max_size=len(plain), signer=signer())
    signed = encode(ENVELOPE, max_size=len(plain) + 77, signer=signer())
    assert decode(signed, max_size=len(signed), signer=signer()) == ENVELOPE
    assert "over the" in reason_of(signed, max_size=len(signed) - 1, signer=signer())


def test_the_size_is_checked_before_the_signature() -> None:
    body = b"x" * 2000
    reason = reason_of(body, max_size=1000, signer=signer())
    assert reason.startswith("message too large: 2000 bytes")


# what is rejected, before any JSON is parsed


def test_an_unsigned_message_is_rejected_unparsed(unparsed: None) -> None:
    reason = reason_of(encode(ENVELOPE), signer=signer())
    assert reason.startswith("unsigned message")


@pytest.mark.parametrize("junk", [b"", b"{", b"not json at all", b"hmac-sha256", b"HMAC-SHA256:"])
def test_junk_is_an_unsigned_message_to_a_signing_worker(junk: bytes, unparsed: None) -> None:
    assert reason_of(junk, signer=signer()).startswith("unsigned message")


def test_every_single_byte_change_is_rejected_unparsed(unparsed: None) -> None:
    body = encode(ENVELOPE, signer=signer())
    for at in range(len(body)):
        for flip in (0x01, 0x20, 0x80):
            tampered = bytearray(body)
            tampered[at] ^= flip
            reason = reason_of(bytes(tampered), signer=signer())
            if at < len(PREFIX):  # no longer looks signed at all
                assert reason.startswith("unsigned message"), (at, flip, reason)
            else:
                assert reason.startswith("bad signature"), (at, flip, reason)


@SETTINGS
@given(st.data())
def test_a_changed_envelope_is_rejected_whatever_the_change(data: st.DataObject) -> None:
    body = encode(ENVELOPE, signer=signer())
    line, envelope = body[: len(PREFIX) + 65], body[len(PREFIX) + 65 :]
    changed = data.draw(st.binary(max_size=len(envelope) + 10).filter(lambda b: b != envelope))
    assert reason_of(line + changed, signer=signer()).startswith("bad signature")


@pytest.mark.parametrize("cut", [0, 1, 31, 63, 64, 65])
def test_a_truncated_signature_is_a_bad_signature(cut: int, unparsed: None) -> None:
    body = encode(ENVELOPE, signer=signer())
    at = len(PREFIX) + cut
    assert reason_of(body[:at], signer=signer()).startswith("bad signature")
    if cut < 64:  # the digits cut short, the envelope kept
        shortened = body[:at] + body[len(PREFIX) + 64 :]
        assert reason_of(shortened, signer=signer()).startswith("bad signature")


def test_an_uppercase_or_padded_signature_is_a_bad_signature(unparsed: None) -> None:
    body = encode(ENVELOPE, signer=signer())
    digits = body[len(PREFIX) : len(PREFIX) + 64]
    upper = body.replace(digits, digits.upper())
    assert upper != body
    assert reason_of(upper, signer=signer()).startswith("bad signature")
    padded = body.replace(PREFIX, PREFIX + b" ")
    assert reason_of(padded, signer=signer()).startswith("bad signature")


def test_a_message_signed_with_another_key_is_a_bad_signature(unparsed: None) -> None:
    body = encode(ENVELOPE, signer=signer(OTHER_KEY))
    reason = reason_of(body, signer=signer(KEY, OLD_KEY))
    assert reason.startswith("bad signature")
    assert KEY not in reason and OTHER_KEY not in reason


def test_a_signed_message_to_a_worker_without_a_key_says_so(unparsed: None) -> None:
    reason = reason_of(encode(ENVELOPE, signer=signer()))
    assert reason.startswith(
        "unexpected signature: the message is signed, but this worker has no signing_key"
    )


# rotation


def test_a_rotated_key_still_verifies_and_the_new_one_signs() -> None:
    rotated = signer(KEY, OLD_KEY)
    assert decode(encode(ENVELOPE, signer=signer(OLD_KEY)), signer=rotated) == ENVELOPE
    assert decode(encode(ENVELOPE, signer=rotated), signer=signer(KEY)) == ENVELOPE
    reason = reason_of(encode(ENVELOPE, signer=rotated), signer=signer(OLD_KEY))
    assert reason.startswith("bad signature"), "verify-only keys never sign"


def test_a_verify_key_equal_to_the_signing_key_changes_nothing() -> None:
    twice = signer(KEY, KEY, OLD_KEY, OLD_KEY)
    assert repr(twice) == "<Signer hmac-sha256, 2 keys accepted>"
    assert twice.sign(b"{}") == signer(KEY).sign(b"{}")


# settings


def test_signing_is_off_by_default() -> None:
    settings = Settings.load(env={})
    assert (settings.signing_key, settings.verify_keys) == (None, ())
    assert memory_app().signer is None


def test_keys_from_keyword_arguments_and_the_environment() -> None:
    settings = Settings.load(env={}, signing_key=KEY, verify_keys=[OLD_KEY])
    assert settings.signing_key == Secret(KEY) and settings.verify_keys == (Secret(OLD_KEY),)
    env = {"CONVEYOR_SIGNING_KEY": KEY, "CONVEYOR_VERIFY_KEYS": f" {OLD_KEY}, {OTHER_KEY} ,"}
    settings = Settings.load(env=env)
    assert settings.signing_key is not None and settings.signing_key.reveal() == KEY
    assert [k.reveal() for k in settings.verify_keys] == [OLD_KEY, OTHER_KEY]
    assert Settings.load(env=env, verify_keys=OLD_KEY).verify_keys == (Secret(OLD_KEY),)


@pytest.mark.parametrize(
    ("overrides", "env", "says"),
    [
        ({"signing_key": "short-key"}, {}, "signing_key holds a key shorter than 16 bytes"),
        ({}, {"CONVEYOR_SIGNING_KEY": "short-key"}, "(from CONVEYOR_SIGNING_KEY)"),
        ({}, {"CONVEYOR_SIGNING_KEY": ""}, "shorter than 16 bytes"),
        ({"signing_key": KEY, "verify_keys": [KEY, "short-key"]}, {}, "verify_keys holds a key"),
        ({"verify_keys": [OLD_KEY]}, {}, "verify_keys is set but signing_key is not"),
        ({"signing_key": KEY.encode()}, {}, "expected text (str), got bytes"),
        ({"signing_key": 1234567890123456789}, {}, "signing_key"),
    ],
)
def test_bad_keys_are_configuration_errors_that_never_show_the_key(
    overrides: dict[str, Any], env: dict[str, str], says: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.load(env=env, **overrides)
    message = str(info.value)
    assert says in message
    for text in ("short-key", KEY, OLD_KEY, "1234567890123456789"):
        assert text not in message


def test_a_short_key_error_says_how_to_make_a_good_one() -> None:
    with pytest.raises(ConfigurationError, match=r"32 bytes or more.*secrets\.token_hex\(32\)"):
        Conveyor("shop", broker="memory://", signing_key="x" * 15)
    assert Conveyor("shop", broker="memory://", signing_key="x" * 16).signer is not None


# a worker with a key


@pytest.fixture
def signed_app() -> Iterator[Conveyor]:
    app = memory_app(signing_key=KEY, verify_keys=[OLD_KEY])
    yield app
    app.close()


def _pay_task(app: Conveyor, ran: list[tuple[str, int]]) -> Task[[str, int], str]:
    @app.task(name="shop.pay")
    def pay(order: str, cents: int) -> str:
        ran.append((order, cents))
        return f"paid {order}"

    return pay


@pytest.mark.parametrize("pool", ["threads", "solo", "asyncio"])
def test_a_signing_worker_runs_only_what_is_signed_with_its_keys(
    signed_app: Conveyor, pool: str, caplog: pytest.LogCaptureFixture
) -> None:
    ran: list[tuple[str, int]] = []
    pay = _pay_task(signed_app, ran)
    good = pay.delay("order-1", 100)
    envelope = pay.envelope(("order-2", 200))
    signed = encode(envelope, signer=signer())
    old = pay.envelope(("order-3", 300))
    bad = {
        "unsigned message": encode(pay.envelope(("unsigned", 1))),
        "bad signature": signed.replace(b"order-2", b"order-9"),  # the task must never see it
    }
    signed_app.broker.publish(
        [Outgoing(Q, body) for body in bad.values()]
        + [
            Outgoing(Q, encode(pay.envelope(("other-key", 1)), signer=signer(OTHER_KEY))),
            Outgoing(Q, encode(old, signer=signer(OLD_KEY))),  # rotated out, still accepted
        ]
    )
    with caplog.at_level(logging.WARNING, logger="conveyor"):
        stats = run_until_empty(signed_app, pool=pool)
    assert good.get(timeout=1) == "paid order-1"
    assert signed_app.result(old.id).get(timeout=1) == "paid order-3"
    assert sorted(ran) == [("order-1", 100), ("order-3", 300)], "nothing else ever ran"
    assert (stats.succeeded, stats.rejected, stats.dead_lettered) == (2, 3, 3)
    reasons = sorted(d.reason for d in signed_app.broker.dead_letters(Q))
    assert [r.split(":")[0] for r in reasons] == [
        "bad signature",
        "bad signature",
        "unsigned message",
    ]
    assert signed_app.result(envelope.id).state is State.PENDING, "an unverified id gets nothing"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 3 and all(KEY not in w and OLD_KEY not in w for w in warnings)


def test_a_worker_without_a_key_dead_letters_signed_messages(app: Conveyor) -> None:
    ran: list[tuple[str, int]] = []
    pay = _pay_task(app, ran)
    plain = pay.delay("plain", 1)
    app.broker.publish([Outgoing(Q, encode(pay.envelope(("signed", 2)), signer=signer()))])
    stats = run_until_empty(app)
    assert plain.get(timeout=1) == "paid plain" and ran == [("plain", 1)]
    assert (stats.succeeded, stats.dead_lettered) == (1, 1)
    [letter] = app.broker.dead_letters(Q)
    assert letter.reason.startswith(
        "unexpected signature: the message is signed, but this worker has no signing_key"
    )


def test_retries_stay_signed_with_the_current_key(signed_app: Conveyor) -> None:
    tries: list[int] = []

    @signed_app.task(name="shop.flaky", bind=True, max_retries=2)
    def flaky(self: Any) -> int:
        tries.append(self.request.retries)
        if len(tries) < 3:
            raise self.retry(countdown=0)
        return len(tries)

    sent: list[bytes] = []
    publish = signed_app.broker.publish

    def record(messages: Any) -> None:
        sent.extend(m.body for m in messages)
        publish(messages)

    with patch.object(signed_app.broker, "publish", side_effect=record):
        # Sent with the key being rotated out; the worker re-signs with its own.
        first = flaky.envelope(())
        signed_app.broker.publish([Outgoing(Q, encode(first, signer=signer(OLD_KEY)))])
        run_until_empty(signed_app)
    assert signed_app.result(first.id).get(timeout=1) == 3 and tries == [0, 1, 2]
    retries = sent[1:]
    assert len(retries) == 2
    for body in retries:
        assert decode(body, signer=signer(KEY)).id == first.id, "signed with signing_key"


# the key never shows


def _everything_printed(app: Conveyor) -> str:
    settings = app.settings
    return "\n".join(
        [
            repr(app),
            str(app),
            repr(app.signer),
            repr(settings),
            str(settings),
            repr(msgspec.structs.asdict(settings)),
            repr(vars(app)),
        ]
    )


def test_the_key_never_shows_in_reprs(signed_app: Conveyor) -> None:
    text = _everything_printed(signed_app)
    assert "signing_key='***'" in text and "verify_keys=('***',)" in text
    assert KEY not in text and OLD_KEY not in text
    with pytest.raises(TypeError):
        msgspec.json.encode(signed_app.settings)  # no way to dump it by accident


def test_the_key_never_shows_in_logs_or_reasons(
    signed_app: Conveyor, caplog: pytest.LogCaptureFixture
) -> None:
    ran: list[tuple[str, int]] = []
    pay = _pay_task(signed_app, ran)
    pay.delay("order-1", 100)
    body = encode(pay.envelope(("order-2", 1)), signer=signer(OTHER_KEY))
    signed_app.broker.publish([Outgoing(Q, body), Outgoing(Q, b"{}")])
    with caplog.at_level(logging.DEBUG):
        run_until_empty(signed_app)
    text = "\n".join(
        [r.getMessage() + str(r.args) + (r.exc_text or "") for r in caplog.records]
        + [d.reason for d in signed_app.broker.dead_letters(Q)]
    )
    assert "bad signature" in text and "unsigned message" in text
    for key in (KEY, OLD_KEY, OTHER_KEY):
        assert key not in text


@pytest.mark.parametrize("command", [["status"], ["send", "shop.pay", '"order-1"', "100"]])
def test_the_key_never_shows_in_cli_output(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = f"signing_app_{uuid.uuid4().hex[:8]}"
    broker = f"sqlite:///{tmp_path / 'queue.db'}"
    (tmp_path / f"{module}.py").write_text(
        "from conveyor import Conveyor\n\n"
        f"app = Conveyor('signed', broker={broker!r})\n\n\n"
        "@app.task(name='shop.pay')\n"
        "def pay(order: str, cents: int) -> str:\n"
        "    return order\n"
    )
    monkeypatch.syspath_prepend(tmp_path)
    monkeypatch.setenv("CONVEYOR_SIGNING_KEY", KEY)
    monkeypatch.setenv("CONVEYOR_VERIFY_KEYS", OLD_KEY)
    try:
        outcome = CliRunner().invoke(main, [command[0], f"{module}:app", *command[1:]])
        app = sys.modules[module].app
        assert app.signer is not None
        if command[0] == "send":
            [delivery] = app.broker.fetch([Q], 1)
            assert delivery.body.startswith(PREFIX), "conveyor send signs"
    finally:
        loaded = sys.modules.pop(module, None)
        if loaded is not None:
            loaded.app.close()
    assert outcome.exit_code == 0, outcome.output
    assert KEY not in outcome.output and OLD_KEY not in outcome.output
    monkeypatch.setenv("CONVEYOR_SIGNING_KEY", "too-short")
    outcome = CliRunner().invoke(main, [command[0], f"{module}:app", *command[1:]])
    assert outcome.exit_code != 0 and "shorter than 16 bytes" in outcome.output
    assert "too-short" not in outcome.output
    sys.modules.pop(module, None)
