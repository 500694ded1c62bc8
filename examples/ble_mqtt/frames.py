"""BLE advertisements as a scanner hands them over: iBeacon and Eddystone frames, byte-exact.

Advertising data is a run of AD structures, each `[length][AD type][data]`, where the length
counts the type byte and the data; a length of 0 ends the significant part early (Bluetooth Core
Specification, Vol 3, Part C, section 11). The two beacon formats built and decoded here:

    iBeacon    02 01 06                      flags: LE General Discoverable, no BR/EDR
               1A FF 4C 00 02 15 <UUID 16> <major 2> <minor 2> <measured power 1>
    Eddystone  02 01 06
               03 03 AA FE                   complete list of 16-bit service UUIDs: 0xFEAA
               LL 16 AA FE <frame type> ..   service data: UID 0x00, URL 0x10, TLM 0x20

Multi-byte beacon fields are big-endian; the Bluetooth company and service identifiers are
little-endian. `generate` makes a seeded, reproducible stream of readings from a population of
devices, some of them corrupted on purpose; `decode` turns a reading into a dict or raises
`MalformedFrame`, and nothing else, whatever the bytes.
"""

from __future__ import annotations

import random
import re
import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

AD_FLAGS = 0x01
AD_UUID16_COMPLETE = 0x03
AD_SERVICE_DATA16 = 0x16
AD_MANUFACTURER = 0xFF

APPLE = b"\x4c\x00"  # company identifier 0x004C, little-endian
IBEACON = 0x02  # Apple's advertisement type for iBeacon, followed by its length, 0x15
IBEACON_SIZE = 25  # manufacturer data: company 2, type 1, length 1, UUID 16, major, minor, power
EDDYSTONE = b"\xaa\xfe"  # service UUID 0xFEAA, little-endian
UID, URL, TLM, EID = 0x00, 0x10, 0x20, 0x30
UID_SIZE, TLM_SIZE, URL_MAX = 20, 14, 17  # frame bytes (from the frame type); encoded URL bytes
TEMPERATURE_UNKNOWN = -0x8000  # TLM's 0x8000: the beacon has no thermometer

URL_SCHEMES = ("http://www.", "https://www.", "http://", "https://")
# Expansion codes 0x00 to 0x0D: the first seven end with a slash.
URL_CODES = tuple(
    f".{tld}{slash}"
    for slash in ("/", "")
    for tld in ("com", "org", "edu", "net", "info", "biz", "gov")
)

FLAGS = bytes([2, AD_FLAGS, 0x06])
CORRUPTIONS = ("truncated", "bad_length", "unknown_type", "bad_mac")

_MAC = re.compile(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}")
_OTHER_APPLE_TYPES = (0x05, 0x07, 0x09, 0x0C, 0x10, 0x12)  # AirDrop, AirPods, ..., Find My
_RESERVED_EDDYSTONE_TYPES = tuple(range(0x40, 0x100, 0x10))


class MalformedFrame(ValueError):
    """A reading that cannot be decoded; `reason` names what is wrong, the same for every
    reading wrong in the same way, and `detail` says where."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason} ({detail})" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Reading:
    """One advertisement as a scanner heard it. `id` is unique within a run."""

    id: int
    mac: str  # "AA:BB:CC:DD:EE:FF"
    rssi: int  # dBm
    payload: bytes  # the advertising data, AD structures
    timestamp: float  # seconds since the epoch

    def to_dict(self) -> dict[str, Any]:
        """The reading as it travels in a task's arguments: JSON types, payload as hex."""
        return {
            "id": self.id,
            "mac": self.mac,
            "rssi": self.rssi,
            "payload": self.payload.hex(),
            "timestamp": self.timestamp,
        }

    @classmethod
    def from_dict(cls, raw: object) -> Reading:
        """The reading back from `to_dict`; `MalformedFrame` if a field is missing or ill-typed
        (the values themselves are checked by `decode`)."""
        if not isinstance(raw, Mapping):
            raise MalformedFrame("not a reading", type(raw).__name__)
        fields: dict[str, type | tuple[type, ...]] = {
            "id": int,
            "mac": str,
            "rssi": int,
            "payload": str,
            "timestamp": (int, float),
        }
        for name, kind in fields.items():
            value = raw.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise MalformedFrame("missing or ill-typed field", name)
        try:
            payload = bytes.fromhex(raw["payload"])
        except ValueError:
            raise MalformedFrame("payload is not hex") from None
        return cls(raw["id"], raw["mac"], raw["rssi"], payload, float(raw["timestamp"]))


# building frames


def ad(ad_type: int, data: bytes) -> bytes:
    """One AD structure."""
    return bytes([len(data) + 1, ad_type]) + data


def ibeacon(proximity_uuid: uuid.UUID, major: int, minor: int, measured_power: int) -> bytes:
    """An iBeacon advertisement; `measured_power` is the RSSI at 1 m, in dBm."""
    data = APPLE + bytes([IBEACON, 0x15]) + proximity_uuid.bytes
    return FLAGS + ad(AD_MANUFACTURER, data + struct.pack(">HHb", major, minor, measured_power))


def eddystone_uid(namespace: bytes, instance: bytes, tx_power: int) -> bytes:
    """An Eddystone-UID frame: 10-byte namespace, 6-byte instance; `tx_power` is at 0 m."""
    if len(namespace) != 10 or len(instance) != 6:
        raise ValueError("an Eddystone UID is a 10-byte namespace and a 6-byte instance")
    return _eddystone(struct.pack(">Bb", UID, tx_power) + namespace + instance + b"\0\0")


def eddystone_url(url: str, tx_power: int) -> bytes:
    """An Eddystone-URL frame; `ValueError` if the URL does not fit its 17 bytes."""
    return _eddystone(struct.pack(">Bb", URL, tx_power) + encode_url(url))


def eddystone_tlm(
    battery_mv: int, temperature_c: float | None, adv_count: int, uptime_s: float
) -> bytes:
    """An unencrypted Eddystone-TLM frame: battery, temperature (8.8 fixed point), counters."""
    temperature = TEMPERATURE_UNKNOWN if temperature_c is None else round(temperature_c * 256)
    if temperature_c is not None and not TEMPERATURE_UNKNOWN < temperature <= 0x7FFF:
        raise ValueError("a TLM temperature is above -128 and below 128 degrees")
    sec_count = round(uptime_s * 10)  # in tenths of a second
    return _eddystone(struct.pack(">BBHhII", TLM, 0, battery_mv, temperature, adv_count, sec_count))


def _eddystone(frame: bytes) -> bytes:
    return FLAGS + ad(AD_UUID16_COMPLETE, EDDYSTONE) + ad(AD_SERVICE_DATA16, EDDYSTONE + frame)


def encode_url(url: str) -> bytes:
    """A URL in Eddystone's compressed form: a scheme byte, then text with expansion codes."""
    # The longest scheme that matches: "https://www." rather than "https://".
    schemes = [s for s in URL_SCHEMES if url.startswith(s)]
    if not schemes:
        raise ValueError(f"{url!r} starts with none of {', '.join(URL_SCHEMES)}")
    scheme = max(schemes, key=len)
    out = bytearray([URL_SCHEMES.index(scheme)])
    rest = url[len(scheme) :]
    while rest:
        code = next((i for i, text in enumerate(URL_CODES) if rest.startswith(text)), None)
        if code is not None:
            out.append(code)
            rest = rest[len(URL_CODES[code]) :]
        elif 0x21 <= ord(rest[0]) <= 0x7E:
            out.append(ord(rest[0]))
            rest = rest[1:]
        else:
            raise ValueError(f"{url!r} has a character an Eddystone URL cannot carry")
    if len(out) - 1 > URL_MAX:
        raise ValueError(f"{url!r} takes {len(out) - 1} bytes encoded; Eddystone allows 17")
    return bytes(out)


# decoding


def decode(reading: Reading) -> dict[str, Any]:
    """What a reading says: its id, MAC, RSSI and time plus the beacon's fields.

    `kind` is "ibeacon", "eddystone-uid", "eddystone-url" or "eddystone-tlm". Anything else,
    and anything malformed, raises `MalformedFrame`.
    """
    if not isinstance(reading.mac, str) or not _MAC.fullmatch(reading.mac):
        raise MalformedFrame("bad MAC address", repr(reading.mac)[:40])
    if not -127 <= reading.rssi <= 20:
        raise MalformedFrame("RSSI out of range", f"{reading.rssi} dBm")
    found: dict[str, Any] | None = None
    for ad_type, data in ad_structures(reading.payload):
        if ad_type == AD_MANUFACTURER and data[:2] == APPLE:
            found = _ibeacon(data)
        elif ad_type == AD_SERVICE_DATA16 and data[:2] == EDDYSTONE:
            found = _eddystone_frame(data[2:])
    if found is None:
        raise MalformedFrame("neither iBeacon nor Eddystone")
    return {
        "id": reading.id,
        "mac": reading.mac.upper(),
        "rssi": reading.rssi,
        "timestamp": reading.timestamp,
        **found,
    }


def ad_structures(payload: bytes) -> list[tuple[int, bytes]]:
    """(AD type, data) of each AD structure; `MalformedFrame` if one overruns the payload."""
    out: list[tuple[int, bytes]] = []
    at = 0
    while at < len(payload):
        length = payload[at]
        if length == 0:
            break  # early end of the significant part: the rest is padding
        end = at + 1 + length
        if end > len(payload):
            detail = f"at byte {at}: claims {length} bytes, {len(payload) - at - 1} remain"
            raise MalformedFrame("AD structure overruns the payload", detail)
        out.append((payload[at + 1], payload[at + 2 : end]))
        at = end
    return out


def _ibeacon(data: bytes) -> dict[str, Any]:
    if len(data) < 4:
        raise MalformedFrame("Apple manufacturer data too short", f"{len(data)} bytes")
    if data[2] != IBEACON:
        raise MalformedFrame("Apple data is not an iBeacon", f"type 0x{data[2]:02X}")
    if data[3] != 0x15 or len(data) != IBEACON_SIZE:
        detail = f"{len(data)} bytes, length byte 0x{data[3]:02X}"
        raise MalformedFrame("iBeacon data of the wrong size", detail)
    major, minor, power = struct.unpack(">HHb", data[20:25])
    return {
        "kind": "ibeacon",
        "uuid": str(uuid.UUID(bytes=data[4:20])),
        "major": major,
        "minor": minor,
        "measured_power": power,
    }


def _eddystone_frame(frame: bytes) -> dict[str, Any]:
    kind = frame[0] if frame else None
    if kind == UID:
        if len(frame) != UID_SIZE:
            raise MalformedFrame("Eddystone-UID of the wrong size", f"{len(frame)} bytes")
        return {
            "kind": "eddystone-uid",
            "tx_power": struct.unpack(">b", frame[1:2])[0],
            "namespace": frame[2:12].hex(),
            "instance": frame[12:18].hex(),
        }
    if kind == URL:
        if not 3 <= len(frame) <= 3 + URL_MAX:
            raise MalformedFrame("Eddystone-URL of the wrong size", f"{len(frame)} bytes")
        return {
            "kind": "eddystone-url",
            "tx_power": struct.unpack(">b", frame[1:2])[0],
            "url": decode_url(frame[2:]),
        }
    if kind == TLM:
        if len(frame) != TLM_SIZE:
            raise MalformedFrame("Eddystone-TLM of the wrong size", f"{len(frame)} bytes")
        if frame[1] != 0:
            raise MalformedFrame("encrypted Eddystone-TLM", f"version {frame[1]}")
        _, _, battery, temperature, adv_count, sec_count = struct.unpack(">BBHhII", frame)
        return {
            "kind": "eddystone-tlm",
            "battery_mv": battery,
            "temperature_c": None if temperature == TEMPERATURE_UNKNOWN else temperature / 256,
            "adv_count": adv_count,
            "uptime_s": sec_count / 10,
        }
    if kind is None:
        raise MalformedFrame("empty Eddystone frame")
    name = "EID, unsupported" if kind == EID else "unknown"
    raise MalformedFrame("unknown Eddystone frame type", f"0x{kind:02X}, {name}")


def decode_url(encoded: bytes) -> str:
    """The URL from its Eddystone form (scheme byte first)."""
    if encoded[0] >= len(URL_SCHEMES):
        raise MalformedFrame("unknown Eddystone URL scheme", f"0x{encoded[0]:02X}")
    parts = [URL_SCHEMES[encoded[0]]]
    for byte in encoded[1:]:
        if byte < len(URL_CODES):
            parts.append(URL_CODES[byte])
        elif 0x21 <= byte <= 0x7E:
            parts.append(chr(byte))
        else:
            raise MalformedFrame("reserved byte in an Eddystone URL", f"0x{byte:02X}")
    return "".join(parts)


# a population of devices, and readings from it


NO_UUID = uuid.UUID(int=0)
URLS = (
    "https://example.com/",
    "https://www.example.org/",
    "https://example.com/room/7",
    "http://cafe.example.net/menu",
    "https://www.museum.org/exhibit/12",
)


@dataclass
class Device:
    """A beacon in the room: where it is (its mean RSSI at the scanner) and what it sends."""

    mac: str
    mean_rssi: float
    kind: str  # "ibeacon" or "eddystone"
    major: int = 0
    minor: int = 0
    power: int = -59  # iBeacon: RSSI at 1 m; Eddystone: at 0 m
    proximity_uuid: uuid.UUID = NO_UUID
    namespace: bytes = b"\0" * 10
    instance: bytes = b"\0" * 6
    url: str = URLS[0]
    battery_mv: float = 3000.0
    temperature_c: float = 21.0
    adv_count: int = 0
    booted_at: float = 0.0
    sent: int = 0

    def advertise(self, now: float, rng: random.Random) -> bytes:
        """The next advertisement. Eddystone beacons rotate UID, URL, and TLM every tenth."""
        self.sent += 1
        # Beacons advertise about ten times a second; a scanner catches only some of them.
        self.adv_count = min(self.adv_count + rng.randint(5, 15), 2**32 - 1)
        if self.kind == "ibeacon":
            return ibeacon(self.proximity_uuid, self.major, self.minor, self.power)
        if self.sent % 10 == 0:
            self.battery_mv = max(self.battery_mv - rng.uniform(0, 0.5), 2000.0)
            temperature = self.temperature_c + rng.gauss(0, 0.3)
            uptime = now - self.booted_at
            return eddystone_tlm(round(self.battery_mv), temperature, self.adv_count, uptime)
        if self.sent % 2:
            return eddystone_uid(self.namespace, self.instance, self.power)
        return eddystone_url(self.url, self.power)


def population(rng: random.Random, size: int = 36, start: float = 0.0) -> list[Device]:
    """A venue's beacons: two thirds iBeacons sharing one UUID (major = floor, minor = spot),
    the rest Eddystone beacons of one namespace; each at its own distance from the scanner."""
    venue = uuid.UUID(int=rng.getrandbits(128), version=4)
    namespace = rng.randbytes(10)
    devices = []
    for n in range(size):
        # Random static addresses: the two top bits of the first octet are set.
        octets = [rng.getrandbits(8) | (0xC0 if i == 0 else 0) for i in range(6)]
        mac = ":".join(f"{o:02X}" for o in octets)
        mean_rssi = rng.uniform(-95, -50)
        if n % 3 != 2:
            device = Device(mac, mean_rssi, "ibeacon", major=1 + n // 12, minor=n + 1)
            device.proximity_uuid, device.power = venue, rng.randint(-65, -55)
        else:
            device = Device(mac, mean_rssi, "eddystone", power=rng.randint(-22, -12))
            device.namespace, device.instance = namespace, rng.randbytes(6)
            device.url = rng.choice(URLS)
            device.battery_mv = rng.uniform(2700, 3200)
            device.temperature_c = rng.uniform(18, 26)
            device.adv_count = rng.randrange(10**6)
            device.booted_at = start - rng.uniform(3600, 30 * 86400)
        devices.append(device)
    return devices


def generate(
    n: int,
    seed: int = 0,
    malformed: float = 0.0,
    *,
    devices: int = 36,
    start: float = 1_735_689_600.0,  # 2025-01-01, so a seed gives the same readings every day
) -> list[Reading]:
    """`n` readings, ids 0 to n-1, of which `round(n * malformed)` are corrupted, each in one
    of the `CORRUPTIONS` ways. The same arguments give the same readings."""
    if not 0.0 <= malformed <= 1.0:
        raise ValueError("malformed is a share, from 0.0 to 1.0")
    rng = random.Random(seed)
    beacons = population(rng, devices, start)
    # Corrupted positions are random; the kinds of damage take turns, so each shows up.
    damaged = sorted(rng.sample(range(n), round(n * malformed)))
    corruption = {at: CORRUPTIONS[k % len(CORRUPTIONS)] for k, at in enumerate(damaged)}
    now = start
    readings = []
    for i in range(n):
        now += rng.expovariate(50.0)  # the scanner hears about 50 advertisements a second
        device = rng.choice(beacons)
        rssi = max(-110, min(-20, round(rng.gauss(device.mean_rssi, 4))))
        reading = Reading(i, device.mac, rssi, device.advertise(now, rng), round(now, 3))
        if i in corruption:
            reading = corrupt(reading, corruption[i], rng)
        readings.append(reading)
    return readings


def corrupt(reading: Reading, how: str, rng: random.Random) -> Reading:
    """A good reading damaged in one of the `CORRUPTIONS` ways, so `decode` rejects it."""
    payload = bytearray(reading.payload)
    last = _last_structure(reading.payload)  # the beacon's own data, in every frame built here
    if how == "truncated":
        del payload[rng.randrange(last + 2, len(payload)) :]
    elif how == "bad_length":
        # A fixed-size frame is caught too short or too long; a URL only too long.
        url = decode(reading)["kind"] == "eddystone-url"
        payload[last] += rng.randint(1, 3) if url else rng.choice((-3, -2, -1, 1, 2, 3))
    elif how == "unknown_type":
        if payload[last + 1] == AD_MANUFACTURER:
            payload[last + 4] = rng.choice(_OTHER_APPLE_TYPES)
        else:
            payload[last + 4] = rng.choice(_RESERVED_EDDYSTONE_TYPES)
    elif how == "bad_mac":
        octets = reading.mac.split(":")
        return replace(
            reading,
            mac=rng.choice(
                (
                    ":".join(octets[:5]),  # an octet short
                    ":".join([*octets, "00"]),  # one too many
                    reading.mac[:-1] + "G",  # not hex
                    reading.mac.replace(":", ""),  # no separators
                )
            ),
        )
    else:
        raise ValueError(f"unknown corruption {how!r}: one of {', '.join(CORRUPTIONS)}")
    return replace(reading, payload=bytes(payload))


def _last_structure(payload: bytes) -> int:
    at = last = 0
    while at < len(payload) and payload[at]:
        last, at = at, at + 1 + payload[at]
    return last
