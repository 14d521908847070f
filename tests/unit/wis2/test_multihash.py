"""STAC `file:checksum` hex multihash -> WNM integrity (base64), and back."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fixtures.paths import BUFR_EVENT, NETCDF_EVENT
from wis2.multihash import (
    METHODS,
    decode_multihash,
    digest,
    integrity_from_multihash,
    integrity_of,
    multihash_of,
)
from wis2.notification import Integrity

BUFR_CHECKSUM = "1620f2ba024b0986ab8e7d3ec275505c59070d453f4764e48ad9eaad9559bf76b906"


def test_reference_bufr_checksum_gives_the_base64_sha3_256() -> None:
    assert integrity_from_multihash(BUFR_CHECKSUM) == Integrity(
        method="sha3-256", value="8roCSwmGq459PsJ1UFxZBw1FP0dk5IrZ6q2VWb92uQY="
    )


@pytest.mark.parametrize("path", [BUFR_EVENT, NETCDF_EVENT], ids=lambda p: p.stem)
def test_reference_event_checksums_decode(path) -> None:
    event = json.loads(path.read_text())
    for asset in event["data"]["assets"].values():
        integrity = integrity_from_multihash(asset["file:checksum"])
        assert integrity.method == "sha3-256"
        assert len(base64.b64decode(integrity.value, validate=True)) == 32


def test_methods_table() -> None:
    assert METHODS == {
        0x12: ("sha256", 32), 0x20: ("sha384", 48), 0x13: ("sha512", 64),
        0x16: ("sha3-256", 32), 0x15: ("sha3-384", 48), 0x14: ("sha3-512", 64),
    }


def test_known_digests() -> None:
    assert digest(b"abc", "sha256") == hashlib.sha256(b"abc").digest()
    assert multihash_of(b"abc", "sha256") == "1220" + hashlib.sha256(b"abc").hexdigest()
    assert multihash_of(b"abc") == "1620" + hashlib.sha3_256(b"abc").hexdigest()
    assert integrity_of(b"abc").method == "sha512"
    assert integrity_of(b"abc").value == base64.b64encode(hashlib.sha512(b"abc").digest()).decode()
    assert BUFR_CHECKSUM.upper() and integrity_from_multihash(BUFR_CHECKSUM.upper()).value == (
        "8roCSwmGq459PsJ1UFxZBw1FP0dk5IrZ6q2VWb92uQY="
    )


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("", ["empty"]),
        ("12zz-not-a-multihash", ["not hexadecimal"]),
        ("0x1220" + "00" * 32, ["not hexadecimal"]),
        ("1620" + "ab" * 32 + "\n", ["not hexadecimal"]),  # `$` once let a newline through
        ("162\n", ["not hexadecimal"]),
        ("1220" + "0" * 63, ["odd number"]),
        ("1620", ["too short"]),
        ("1114" + "00" * 20, ["0x11", "sha1", "not allowed"]),
        ("d520" + "00" * 16, ["0xd5", "varint"]),  # 0xd5 has the continuation bit set
        ("a0e40220" + "00" * 32, ["0xb220", "blake2b-256", "multi-byte varint"]),
        ("5520" + "00" * 32, ["0x55", "not allowed"]),
        ("ffffffff", ["varint never ends"]),
        ("1230" + "00" * 48, ["declares a 48-byte digest", "sha256 digests are 32 bytes"]),
        ("1620" + "00" * 31, ["sha3-256 digest is 31 bytes, declared 32"]),
        ("1340" + "00" * 65, ["sha512 digest is 65 bytes, declared 64"]),
    ],
)
def test_bad_multihash_is_refused_precisely(value: str, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        integrity_from_multihash(value)
    for word in words:
        assert word in str(info.value)


_METHOD_ITEMS = sorted(METHODS.items())


@settings(max_examples=200, deadline=None)
@given(entry=st.sampled_from(_METHOD_ITEMS), seed=st.binary(min_size=0, max_size=200))
def test_round_trip_for_every_method(entry, seed: bytes) -> None:
    code, (method, length) = entry
    value = multihash_of(seed, method)
    assert value.startswith(f"{code:02x}{length:02x}")
    assert integrity_from_multihash(value) == integrity_of(seed, method)
    assert decode_multihash(value) == (method, digest(seed, method))


@settings(max_examples=200, deadline=None)
@given(entry=st.sampled_from(_METHOD_ITEMS), data=st.data())
def test_random_digests_round_trip_and_wrong_lengths_are_refused(entry, data) -> None:
    code, (method, length) = entry
    raw = data.draw(st.binary(min_size=length, max_size=length))
    good = bytes([code, length]).hex() + raw.hex()
    integrity = integrity_from_multihash(good)
    assert (integrity.method, base64.b64decode(integrity.value)) == (method, raw)

    wrong = data.draw(st.integers(min_value=1, max_value=127).filter(lambda n: n != length))
    # a digest of the wrong length, declared honestly: refused on the declared length
    with pytest.raises(ValueError, match="declares"):
        integrity_from_multihash(bytes([code, wrong]).hex() + bytes(wrong).hex())
    # the right declared length but a truncated or padded digest: refused on the actual length
    actual = data.draw(st.integers(min_value=0, max_value=100).filter(lambda n: n != length))
    if 2 + actual >= 3:
        with pytest.raises(ValueError, match=f"digest is {actual} bytes, declared {length}"):
            integrity_from_multihash(bytes([code, length]).hex() + bytes(actual).hex())


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=80))
def test_any_text_is_an_integrity_or_a_value_error(text: str) -> None:
    try:
        integrity = integrity_from_multihash(text)
    except ValueError as exc:
        assert str(exc)
    else:
        assert integrity.method in {m for m, _ in METHODS.values()}


_KNOWN_CODES = set(METHODS)


@settings(max_examples=200, deadline=None)
@given(
    code=st.integers(min_value=0, max_value=2**21).filter(lambda c: c not in _KNOWN_CODES),
    raw=st.binary(min_size=1, max_size=64),
)
def test_unknown_codes_are_refused(code: int, raw: bytes) -> None:
    varint = bytearray()
    value = code
    while True:  # unsigned LEB128, as multihash encodes its code
        byte, value = value & 0x7F, value >> 7
        varint.append(byte | (0x80 if value else 0))
        if not value:
            break
    with pytest.raises(ValueError, match="not allowed by WNM") as info:
        integrity_from_multihash((bytes(varint) + bytes([len(raw)]) + raw).hex())
    assert f"0x{code:02x}" in str(info.value)
