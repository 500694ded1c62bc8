"""Let message properties whose names or short strings are not UTF-8 reach conveyor.

pamqp decodes field-table names and short strings as strict UTF-8. RabbitMQ does not check
them, so one message published with other bytes there makes aiormq drop the consumer's whole
connection on every delivery, and the message comes back forever. With this module imported,
such bytes decode with `surrogateescape` instead: the message arrives, `has_raw_text` spots
it, and the broker dead-letters it with a reason. Valid UTF-8 decodes exactly as before.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from pamqp import common, decode

Decoder = Callable[[bytes], tuple[int, Any]]


def _lenient_short_str(value: bytes) -> tuple[int, str]:
    try:
        length = common.Struct.byte.unpack(value[0:1])[0]
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack short string value") from err
    return length + 1, value[1 : length + 1].decode("utf-8", "surrogateescape")


def _lenient_field_table(value: bytes) -> tuple[int, common.FieldTable]:
    try:
        (length,) = common.Struct.integer.unpack(value[0:4])
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack data") from err
    end = 4 + length
    if end > len(value):
        raise ValueError("Field table length exceeds available data")
    table: dict[str, common.FieldValue] = {}
    offset = 4
    while offset < end:
        name_length = value[offset]
        offset += 1
        if offset + name_length > end:
            raise ValueError("Field table key length exceeds data")
        name = value[offset : offset + name_length].decode("utf-8", "surrogateescape")
        offset += name_length
        consumed, table[name] = decode.embedded_value(value[offset:])
        offset += consumed
    return end, table


def _strict_first(strict: Decoder, lenient: Decoder) -> Decoder:
    def decoder(value: bytes) -> tuple[int, Any]:
        try:
            return strict(value)
        except UnicodeDecodeError:
            return lenient(value)

    decoder.__wrapped__ = strict  # type: ignore[attr-defined]
    return decoder


def install() -> None:
    """Make pamqp's decoders lenient for names and short strings (once per process)."""
    if hasattr(decode.field_table, "__wrapped__"):
        return
    table = _strict_first(decode.field_table, _lenient_field_table)
    short = _strict_first(decode.short_str, _lenient_short_str)
    decode.field_table = table  # type: ignore[assignment]
    decode.short_str = short  # type: ignore[assignment]
    decode.METHODS["table"] = table
    decode.METHODS["shortstr"] = short
    decode.TABLE_MAPPING[b"F"] = table


def has_raw_text(value: object) -> bool:
    """True when a decoded property holds text that is not UTF-8 (anywhere inside it).

    Names and short strings arrive with surrogates (see above); a long string that is not
    UTF-8 arrives from pamqp as bytes.
    """
    if isinstance(value, bytes | bytearray):
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            return True
        return False
    if isinstance(value, str):
        return not value.isascii() and any("\udc80" <= c <= "\udcff" for c in value)
    if isinstance(value, dict):
        return any(has_raw_text(k) or has_raw_text(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(has_raw_text(v) for v in value)
    return False
