"""The BLE example's frames: byte-exact iBeacon and Eddystone advertisements, seeded readings,
each kind of damage, and a decoder that rejects anything with `MalformedFrame` and nothing else."""

from __future__ import annotations

import contextlib
import json
import random
import uuid
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from examples.ble_mqtt.frames import (
    CORRUPTIONS,
    URL_MAX,
    MalformedFrame,
    Reading,
    ad_structures,
    corrupt,
    decode,
    eddystone_tlm,
    eddystone_uid,
    eddystone_url,
    encode_url,
    generate,
    ibeacon,
)

SETTINGS = settings(max_examples=300, deadline=None)
MAC = "C1:7F:04:53:9C:DF"
VENUE = uuid.UUID("f7826da6-4fa2-4e98-8024-bc5b71e0893e")


def reading(payload: bytes, mac: str = MAC, rssi: int = -70) -> Reading:
    return Reading(7, mac, rssi, payload, 1_735_689_600.25)


def fields(payload: bytes) -> dict[str, object]:
    """The beacon's own fields, without the reading's id, MAC, RSSI and time."""
    decoded = decode(reading(payload))
    for key in ("id", "mac", "rssi", "timestamp"):
        del decoded[key]
    return decoded


# byte-exact frames, checked against the published layouts


def test_ibeacon_bytes_are_apples_layout() -> None:
    payload = ibeacon(VENUE, major=1, minor=42, measured_power=-59)
    assert payload == bytes.fromhex(
        "020106"  # flags
        "1aff4c000215"  # 26 bytes of manufacturer data: Apple, iBeacon, 21 bytes follow
        "f7826da64fa24e988024bc5b71e0893e"  # proximity UUID
        "0001002ac5"  # major 1, minor 42, measured power -59 dBm
    )
    assert fields(payload) == {
        "kind": "ibeacon",
        "uuid": str(VENUE),
        "major": 1,
        "minor": 42,
        "measured_power": -59,
    }


def test_eddystone_uid_bytes() -> None:
    namespace, instance = bytes.fromhex("edd1ebeac04e5defa017"), bytes.fromhex("0badc0ffee01")
    payload = eddystone_uid(namespace, instance, tx_power=-18)
    assert payload == bytes.fromhex(
        "0201060303aafe1716aafe00eeedd1ebeac04e5defa0170badc0ffee010000"
    )
    assert fields(payload) == {
        "kind": "eddystone-uid",
        "tx_power": -18,
        "namespace": namespace.hex(),
        "instance": instance.hex(),
    }


def test_eddystone_url_bytes_use_the_scheme_and_expansion_codes() -> None:
    payload = eddystone_url("https://www.museum.org/exhibit/12", tx_power=-20)
    # scheme 0x01 (https://www.), "museum", 0x01 (.org/), "exhibit/12": 17 bytes, the most
    assert payload == bytes.fromhex("0201060303aafe1716aafe10ec01") + (b"museum\x01exhibit/12")
    assert fields(payload)["url"] == "https://www.museum.org/exhibit/12"
    assert encode_url("http://example.com") == b"\x02example\x07"
    assert encode_url("http://www.example.gov/") == b"\x00example\x06"


def test_eddystone_tlm_bytes_and_fixed_point_temperature() -> None:
    payload = eddystone_tlm(battery_mv=2950, temperature_c=23.5, adv_count=1000, uptime_s=3600.5)
    assert payload == bytes.fromhex("0201060303aafe1116aafe20000b861780000003e800008ca5")
    assert fields(payload) == {
        "kind": "eddystone-tlm",
        "battery_mv": 2950,
        "temperature_c": 23.5,
        "adv_count": 1000,
        "uptime_s": 3600.5,
    }
    below_zero = fields(eddystone_tlm(3000, -1.25, 0, 0))
    assert below_zero["temperature_c"] == -1.25
    assert fields(eddystone_tlm(3000, None, 0, 0))["temperature_c"] is None


def test_urls_that_do_not_fit_are_refused_when_built() -> None:
    with pytest.raises(ValueError, match="17"):
        encode_url("https://example.com/a-much-longer-path")
    with pytest.raises(ValueError, match="starts with none"):
        encode_url("ftp://example.com/")
    with pytest.raises(ValueError, match="cannot carry"):
        encode_url("https://exa mple.com/")


def test_a_zero_length_ends_the_data_early_and_padding_is_ignored() -> None:
    payload = ibeacon(VENUE, 1, 2, -60)
    assert decode(reading(payload + b"\x00" * 5))["minor"] == 2
    assert ad_structures(payload + b"\x00\xff\xff") == ad_structures(payload)


# round trips


@SETTINGS
@given(
    st.uuids(),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.integers(-128, 127),
)
def test_ibeacon_round_trip(proximity: uuid.UUID, major: int, minor: int, power: int) -> None:
    assert fields(ibeacon(proximity, major, minor, power)) == {
        "kind": "ibeacon",
        "uuid": str(proximity),
        "major": major,
        "minor": minor,
        "measured_power": power,
    }


@SETTINGS
@given(
    st.binary(min_size=10, max_size=10), st.binary(min_size=6, max_size=6), st.integers(-100, 20)
)
def test_eddystone_uid_round_trip(namespace: bytes, instance: bytes, power: int) -> None:
    decoded = fields(eddystone_uid(namespace, instance, power))
    assert (decoded["namespace"], decoded["instance"], decoded["tx_power"]) == (
        namespace.hex(),
        instance.hex(),
        power,
    )


url_text = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789-_/"), max_size=8)


@SETTINGS
@given(
    st.sampled_from(["http://", "https://", "http://www.", "https://www."]),
    url_text,
    st.sampled_from(["", ".com", ".org/", ".info", ".gov/", ".net"]),
    url_text,
)
def test_eddystone_url_round_trip(scheme: str, host: str, suffix: str, path: str) -> None:
    url = scheme + host + suffix + path
    if len(encode_url(url)) - 1 > URL_MAX:
        return
    assert fields(eddystone_url(url, -20))["url"] == url


@SETTINGS
@given(
    st.integers(0, 0xFFFF),
    st.integers(-128 * 256 + 1, 127 * 256).map(  # -128.0 is 0x8000: no thermometer
        lambda t: t / 256
    ),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1).map(lambda t: t / 10),
)
def test_eddystone_tlm_round_trip(battery: int, temperature: float, count: int, up: float) -> None:
    decoded = fields(eddystone_tlm(battery, temperature, count, up))
    assert (decoded["battery_mv"], decoded["adv_count"]) == (battery, count)
    assert (decoded["temperature_c"], decoded["uptime_s"]) == (temperature, up)


def test_readings_travel_as_json_and_come_back_equal() -> None:
    for item in generate(200, seed=3, malformed=0.1):
        assert Reading.from_dict(json.loads(json.dumps(item.to_dict()))) == item


# the generated stream


def test_generate_is_deterministic_with_a_seed() -> None:
    assert generate(500, seed=7, malformed=0.05) == generate(500, seed=7, malformed=0.05)
    assert generate(500, seed=7) != generate(500, seed=8)


def test_generate_makes_a_realistic_population() -> None:
    readings = generate(5000, seed=1)
    assert [r.id for r in readings] == list(range(5000))
    decoded = [decode(r) for r in readings]  # nothing corrupted: every reading decodes
    devices = {d["mac"] for d in decoded}
    assert 20 <= len(devices) <= 60, "a few dozen devices"
    kinds = Counter(d["kind"] for d in decoded)
    assert set(kinds) == {"ibeacon", "eddystone-uid", "eddystone-url", "eddystone-tlm"}
    assert all(int(mac[:2], 16) & 0xC0 == 0xC0 for mac in devices), "random static addresses"
    times = [r.timestamp for r in readings]
    assert times == sorted(times)
    for mac in devices:
        rssi = [d["rssi"] for d in decoded if d["mac"] == mac]
        mean = sum(rssi) / len(rssi)
        assert -100 <= mean <= -45, "each device has its own distance from the scanner"
        assert max(rssi) - min(rssi) >= 4, "and its RSSI jitters around it"
    tlm = [d for d in decoded if d["kind"] == "eddystone-tlm"]
    assert all(2000 <= d["battery_mv"] <= 3300 for d in tlm)
    assert all(10 <= d["temperature_c"] <= 35 for d in tlm)


@pytest.mark.parametrize("share", [0.0, 0.01, 0.25, 1.0])
def test_generate_corrupts_exactly_the_share_asked_for(share: float) -> None:
    readings = generate(1000, seed=5, malformed=share)
    bad = []
    for item in readings:
        try:
            decode(item)
        except MalformedFrame as exc:
            bad.append(exc)
    assert len(bad) == round(1000 * share)


# each kind of damage


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_each_corruption_is_rejected_with_its_reason(how: str) -> None:
    reasons = {
        "truncated": {"AD structure overruns the payload"},
        "bad_length": {
            "AD structure overruns the payload",
            "iBeacon data of the wrong size",
            "Eddystone-UID of the wrong size",
            "Eddystone-TLM of the wrong size",
        },
        "unknown_type": {"Apple data is not an iBeacon", "unknown Eddystone frame type"},
        "bad_mac": {"bad MAC address"},
    }[how]
    rng = random.Random(how)
    seen = set()
    for item in generate(2000, seed=11):
        with pytest.raises(MalformedFrame) as caught:
            decode(corrupt(item, how, rng))
        assert caught.value.reason in reasons, str(caught.value)
        seen.add(caught.value.reason)
    # Each way this damage shows up, over 2000 readings (a TLM cut short hardly ever shows).
    assert seen == reasons - {"Eddystone-TLM of the wrong size"}


ENCRYPTED_TLM = bytes(eddystone_tlm(3000, 20, 1, 1)[:12]) + b"\x01" + b"\x5a" * 12


def test_other_bad_values_are_rejected() -> None:
    good = ibeacon(VENUE, 1, 2, -60)
    cases = {
        "RSSI out of range": reading(good, rssi=40),
        "neither iBeacon nor Eddystone": reading(b"\x02\x01\x06\x05\x09beac"),  # a name only
        "Apple manufacturer data too short": reading(b"\x04\xff\x4c\x00\x02"),
        "empty Eddystone frame": reading(b"\x03\x16\xaa\xfe"),
        "encrypted Eddystone-TLM": reading(ENCRYPTED_TLM),
        "unknown Eddystone URL scheme": reading(b"\x06\x16\xaa\xfe\x10\xec\x09"),
        "reserved byte in an Eddystone URL": reading(b"\x07\x16\xaa\xfe\x10\xec\x03\x7f"),
        "Eddystone-URL of the wrong size": reading(b"\x05\x16\xaa\xfe\x10\xec"),
    }
    for reason, item in cases.items():
        with pytest.raises(MalformedFrame) as caught:
            decode(item)
        assert caught.value.reason == reason
    with pytest.raises(MalformedFrame, match="EID, unsupported"):
        decode(reading(b"\x0d\x16\xaa\xfe\x30\xec" + b"\x01" * 8))


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ([], "not a reading"),
        ({"id": 1}, "missing or ill-typed field"),
        ({"id": True, "mac": MAC, "rssi": -1, "payload": "", "timestamp": 0}, "missing or"),
        ({"id": 1, "mac": MAC, "rssi": "-1", "payload": "", "timestamp": 0}, "missing or"),
        ({"id": 1, "mac": MAC, "rssi": -1, "payload": "0g", "timestamp": 0}, "payload is not hex"),
    ],
)
def test_a_reading_that_is_not_one_is_malformed(raw: object, reason: str) -> None:
    with pytest.raises(MalformedFrame, match=reason):
        Reading.from_dict(raw)


# fuzz: nothing but MalformedFrame ever escapes


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=64), st.integers(-200, 200))
def test_decode_raises_only_malformed_frame_on_random_bytes(payload: bytes, rssi: int) -> None:
    try:
        decoded = decode(reading(payload, rssi=rssi))
    except MalformedFrame:
        return
    assert decoded["kind"] in {"ibeacon", "eddystone-uid", "eddystone-url", "eddystone-tlm"}


@settings(max_examples=1000, deadline=None)
@given(st.integers(0, 4999), st.data())
def test_decode_raises_only_malformed_frame_on_damaged_real_frames(
    index: int, data: st.DataObject
) -> None:
    payload = bytearray(FRAMES[index % len(FRAMES)].payload)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(payload) - 1))
        payload[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(payload)))
    with contextlib.suppress(MalformedFrame):
        decode(reading(bytes(payload[:cut])))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)


@SETTINGS
@given(
    st.dictionaries(
        st.sampled_from(["id", "mac", "rssi", "payload", "timestamp", "other"]), json_values
    )
    | json_values
)
def test_from_dict_and_decode_raise_only_malformed_frame_on_any_json(raw: object) -> None:
    with contextlib.suppress(MalformedFrame):
        decode(Reading.from_dict(raw))


FRAMES = generate(100, seed=2)
