"""STAC `file:checksum` (hex multihash) <-> WNM `integrity` (method + base64 digest)."""

from __future__ import annotations

import base64
import hashlib
import re

from wis2.notification import Integrity, IntegrityMethod

# multihash code -> (WNM integrity method, digest length in bytes)
METHODS: dict[int, tuple[IntegrityMethod, int]] = {
    0x12: ("sha256", 32),
    0x20: ("sha384", 48),
    0x13: ("sha512", 64),
    0x16: ("sha3-256", 32),
    0x15: ("sha3-384", 48),
    0x14: ("sha3-512", 64),
}
CODES: dict[str, int] = {method: code for code, (method, _) in METHODS.items()}
DIGEST_LENGTHS: dict[str, int] = {method: length for method, length in METHODS.values()}
# Well-known multihash codes that WNM does not allow, named in error messages.
OTHER_CODES = {
    0x00: "identity", 0x11: "sha1", 0xD5: "md5", 0x1B: "keccak-256", 0xB220: "blake2b-256",
}
_HASHLIB_NAMES = {
    "sha256": "sha256", "sha384": "sha384", "sha512": "sha512",
    "sha3-256": "sha3_256", "sha3-384": "sha3_384", "sha3-512": "sha3_512",
}
_HEX = re.compile(r"[0-9a-fA-F]*")


def _read_varint(data: bytes, offset: int) -> tuple[int, int]:
    value = shift = 0
    for index in range(offset, min(len(data), offset + 9)):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, index + 1
    raise ValueError("multihash varint never ends (continuation bit set on every byte)")


def decode_multihash(hex_value: str) -> tuple[IntegrityMethod, bytes]:
    """Decode a hex multihash into (WNM method, digest); ValueError says exactly what is wrong."""
    if not isinstance(hex_value, str) or not hex_value:
        raise ValueError("checksum is empty")
    if not _HEX.fullmatch(hex_value):
        raise ValueError("checksum is not hexadecimal")
    if len(hex_value) % 2:
        raise ValueError("checksum has an odd number of hex digits")
    raw = bytes.fromhex(hex_value)
    if len(raw) < 3:
        raise ValueError("checksum too short to be a multihash (code, length, digest)")
    code, offset = _read_varint(raw, 0)
    if code not in METHODS:
        name = OTHER_CODES.get(code)
        known = ", ".join(f"0x{c:02x} {m}" for c, (m, _) in METHODS.items())
        what = f"0x{code:02x} ({name})" if name else f"0x{code:02x}"
        if raw[0] & 0x80:
            what += f", a multi-byte varint code starting {raw[0]:#04x}"
        raise ValueError(f"multihash code {what} is not allowed by WNM; allowed: {known}")
    method, expected = METHODS[code]
    declared, offset = _read_varint(raw, offset)
    digest = raw[offset:]
    if declared != expected:
        raise ValueError(
            f"multihash declares a {declared}-byte digest but {method} digests are {expected} bytes"
        )
    if len(digest) != declared:
        raise ValueError(
            f"multihash {method} digest is {len(digest)} bytes, declared {declared}"
        )
    return method, digest


def integrity_from_multihash(hex_value: str) -> Integrity:
    """The WNM integrity object (base64 value) of a STAC `file:checksum`."""
    method, digest = decode_multihash(hex_value)
    return Integrity(method=method, value=base64.b64encode(digest).decode("ascii"))


def digest(data: bytes, method: IntegrityMethod) -> bytes:
    return hashlib.new(_HASHLIB_NAMES[method], data).digest()


def new_hasher(method: IntegrityMethod) -> hashlib._Hash:
    """An incremental hashlib object for a WNM integrity method (`update()` chunk by chunk)."""
    return hashlib.new(_HASHLIB_NAMES[method])


def multihash_of(data: bytes, method: IntegrityMethod = "sha3-256") -> str:
    """Hex multihash of `data` (as a file server would put in `file:checksum`)."""
    value = digest(data, method)
    return bytes([CODES[method], len(value)]).hex() + value.hex()


def integrity_of(data: bytes, method: IntegrityMethod = "sha512") -> Integrity:
    return Integrity(method=method, value=base64.b64encode(digest(data, method)).decode("ascii"))
