"""Message signing: an HMAC-SHA256 of the exact envelope bytes, carried in the message body.

A signed body is one ASCII line, `hmac-sha256:` and the 64 lowercase hex digits of
HMAC-SHA256(key, envelope), then the envelope bytes exactly as they were encoded:

    hmac-sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
    {"v":1,"id":"01a1ff6a10c4...","task":"shop.tasks.resize",...}

The signature travels in the body, not in broker properties, so every broker (memory, SQLite,
RabbitMQ) and everything that copies a body as it is (delay queues, redeliveries, dead letters)
carries it unchanged. An envelope is a JSON object and starts with `{`, so the first bytes tell a
signed body from an unsigned one, and a worker checks the signature before any JSON is parsed:
an unsigned or altered message never reaches the parser. Hex rather than base64 keeps the line
readable in a dead-letter queue and free of characters any tool might escape.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from conveyor.errors import DecodeError
from conveyor.reasons import DeadLetterReason as Why
from conveyor.settings import Secret

PREFIX = b"hmac-sha256:"
_DIGITS = 64
_HEADER = len(PREFIX) + _DIGITS + 1  # the prefix, the hex digest and the newline


class Signer:
    """Signs envelopes with one key; accepts signatures made with it or an `accepted` key.

    `accepted` keys verify but never sign, so a key can be rotated without rejecting a message
    in flight (see docs/signing.md). The repr says how many keys there are, never what they are.
    """

    __slots__ = ("_macs",)

    def __init__(self, key: Secret, accepted: Sequence[Secret] = ()) -> None:
        keys = dict.fromkeys(k.reveal().encode() for k in (key, *accepted))
        # Keyed once, copied per message: a copy costs half of keying again (OpenSSL 3).
        self._macs = tuple(hmac.new(k, digestmod=hashlib.sha256) for k in keys)

    def __repr__(self) -> str:
        return f"<Signer hmac-sha256, {len(self._macs)} keys accepted>"

    def sign(self, envelope: bytes) -> bytes:
        """The body to send for an encoded envelope: the signature line, then the envelope."""
        return b"".join((PREFIX, _hex_mac(self._macs[0], envelope), b"\n", envelope))

    def verify(self, body: bytes) -> bytes:
        """The envelope bytes of a signed body, or `DecodeError` saying why not."""
        if not body.startswith(PREFIX):
            raise DecodeError(
                Why.UNSIGNED, "this worker has a signing_key and accepts only signed messages"
            )
        if len(body) < _HEADER or body[_HEADER - 1 : _HEADER] != b"\n":
            raise DecodeError(
                Why.BAD_SIGNATURE,
                f"the line after {PREFIX.decode()} is not {_DIGITS} hex digits and a newline",
            )
        claimed, envelope = body[len(PREFIX) : _HEADER - 1], body[_HEADER:]
        for mac in self._macs:
            if hmac.compare_digest(_hex_mac(mac, envelope), claimed):
                return envelope
        raise DecodeError(
            Why.BAD_SIGNATURE,
            "the message was changed after it was signed, or signed with a key "
            "this worker does not accept (neither signing_key nor one of verify_keys)",
        )


def _hex_mac(keyed: hmac.HMAC, envelope: bytes) -> bytes:
    mac = keyed.copy()
    mac.update(envelope)
    return mac.hexdigest().encode("ascii")


# Why a worker without a key rejects a signed body (rather than call it malformed JSON).
NO_KEY = (
    "the message is signed, but this worker has no signing_key: set signing_key "
    "(CONVEYOR_SIGNING_KEY) to the key its senders use"
)
