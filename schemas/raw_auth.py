"""The HMAC that proves a raw-topic record was written by our ingress (docs/security.md).

The raw topic is the one door into ``email_events``: whatever the processor reads there becomes
an event. The broker's credentials do not say who wrote a record (any producer with write
rights on the topic could), so the ingress signs each raw batch with HMAC-SHA256 under a key
from ``raw_auth.keys`` and the processor verifies it before it trusts a byte of the record.

What is signed, so that nothing the processor reads can change without breaking the MAC:

* a domain tag and the key id (a MAC of this kind can never pass for another one);
* for every header the processor trusts (``TRUSTED_HEADERS``, a fixed order), the name, the
  number of times it occurs and each value (marked null or not: Kafka allows null header
  values), so a header added, dropped, repeated or moved between values changes the input;
* whether the record has a value, and the value (the body exactly as SendGrid sent it).

Each field is length-prefixed (8 bytes, big-endian): no boundary between a header and the body,
or between two headers, can be shifted to give the same input. Headers outside
``TRUSTED_HEADERS`` (``sgpipe-replay-of``, tracing headers a proxy adds) are not signed and
never reach an event.

The header is ``sgpipe-raw-hmac: v1:<key id>:<64 hex digits>``; the key id picks the key, so
that during a rotation records signed by the old and by the new key both verify.

Hand-written because it is twenty lines over stdlib ``hmac``: no library defines a canonical
encoding of Kafka headers, and the encoding is the part that must not be ambiguous.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from schemas.raw_batch import (
    AUTHENTICATED_BY_HEADER,
    CONTENT_TYPE_HEADER,
    FORMAT_HEADER,
    RECEIVED_AT_HEADER,
    REQUEST_ID_HEADER,
    SIGNATURE_TIMESTAMP_HEADER,
    WEBHOOK_HEADER,
    KafkaHeaders,
)

RAW_HMAC_HEADER: Final = "sgpipe-raw-hmac"
# Every header decode_raw_batch reads: what the processor trusts once the MAC verified.
TRUSTED_HEADERS: Final = (
    FORMAT_HEADER,
    WEBHOOK_HEADER,
    RECEIVED_AT_HEADER,
    REQUEST_ID_HEADER,
    AUTHENTICATED_BY_HEADER,
    SIGNATURE_TIMESTAMP_HEADER,
    CONTENT_TYPE_HEADER,
)
KEY_ID_PATTERN: Final = r"^[A-Za-z0-9._-]{1,64}$"
# 256 bits of a random key as text (secrets.token_urlsafe(32) gives 43 characters).
MIN_SECRET_CHARACTERS: Final = 32

_VERSION: Final = "v1"
_DOMAIN: Final = b"sgpipe raw record HMAC-SHA256 v1"
_KEY_ID = re.compile(KEY_ID_PATTERN)
_HEADER_VALUE = re.compile(rb"^v1:([A-Za-z0-9._-]{1,64}):([0-9a-f]{64})$")


@dataclass(frozen=True, slots=True)
class RawAuthKey:
    """One HMAC key: ``key_id`` travels in the header, ``secret`` never leaves the process."""

    key_id: str
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not _KEY_ID.match(self.key_id):
            raise ValueError(f"raw auth key id {self.key_id!r} must match {KEY_ID_PATTERN}")
        if not self.secret:
            raise ValueError(f"raw auth key {self.key_id!r} has an empty secret")


class UnauthenticatedRawRecord(ValueError):
    """The record carries no valid HMAC by a configured key: it was not written by our
    ingress, or was changed since. Deterministic: dead-letter it."""


def _length(size: int) -> bytes:
    return size.to_bytes(8, "big")


def _prefix(key_id: str, value: bytes | None, headers: Iterable[tuple[str, bytes]]) -> bytes:
    """The canonical input up to the value's own bytes (each field's 8-byte length, then its
    bytes): the MAC takes this, then the value as it is, never copied. Built in one list
    (the ingress signs every request: a generator per field cost more than the MAC of a
    2 KB body)."""
    received = list(headers)
    parts = [_length(len(_DOMAIN)), _DOMAIN]
    key = key_id.encode("ascii")
    parts += (_length(len(key)), key)
    for name in TRUSTED_HEADERS:
        values = [header_value for header_name, header_value in received if header_name == name]
        encoded_name = name.encode("ascii")
        parts += (_length(len(encoded_name)), encoded_name, _length(4))
        parts.append(len(values).to_bytes(4, "big"))
        for header_value in values:
            # Kafka allows a null header value (None here): distinct from an empty one.
            if header_value is None:
                parts += (_length(1), b"\x00")
            else:
                parts += (_length(1 + len(header_value)), b"\x01", header_value)
    parts += (_length(1), b"\x00") if value is None else (_length(1 + len(value)), b"\x01")
    return b"".join(parts)


def canonical_input(
    key_id: str, value: bytes | None, headers: Iterable[tuple[str, bytes]]
) -> bytes:
    """The exact bytes the MAC is computed over (see the module docstring)."""
    return _prefix(key_id, value, headers) + (value or b"")


def raw_record_mac(
    key: RawAuthKey, value: bytes | None, headers: Iterable[tuple[str, bytes]]
) -> str:
    """HMAC-SHA256 of the record under ``key``, in hex."""
    mac = hmac.new(key.secret, _prefix(key.key_id, value, headers), hashlib.sha256)
    if value:
        mac.update(value)
    return mac.hexdigest()


def sign_raw_record(
    key: RawAuthKey, value: bytes | None, headers: Sequence[tuple[str, bytes]]
) -> KafkaHeaders:
    """``headers`` without any ``sgpipe-raw-hmac`` they had, plus one signing ``value`` and
    them under ``key``."""
    kept = [(name, header_value) for name, header_value in headers if name != RAW_HMAC_HEADER]
    mac = raw_record_mac(key, value, kept)
    return [*kept, (RAW_HMAC_HEADER, f"{_VERSION}:{key.key_id}:{mac}".encode("ascii"))]


def verify_raw_record(
    keys: Sequence[RawAuthKey], value: bytes | None, headers: Sequence[tuple[str, bytes]]
) -> RawAuthKey:
    """The key whose MAC the record carries; UnauthenticatedRawRecord when there is no such
    header, more than one, a key id not among ``keys``, or a MAC that does not match."""
    macs = [header_value for name, header_value in headers if name == RAW_HMAC_HEADER]
    if not macs:
        raise UnauthenticatedRawRecord(f"the record has no {RAW_HMAC_HEADER} header")
    if len(macs) > 1:
        raise UnauthenticatedRawRecord(f"the record has {len(macs)} {RAW_HMAC_HEADER} headers")
    parsed = _HEADER_VALUE.match(macs[0]) if isinstance(macs[0], bytes) else None
    if parsed is None:
        raise UnauthenticatedRawRecord(f"the {RAW_HMAC_HEADER} header is malformed")
    key_id = parsed[1].decode("ascii")
    key = next((candidate for candidate in keys if candidate.key_id == key_id), None)
    if key is None:
        raise UnauthenticatedRawRecord(
            f"signed with key id {key_id!r}, which is not in raw_auth.keys (removed, or never ours)"
        )
    others = [(name, header_value) for name, header_value in headers if name != RAW_HMAC_HEADER]
    expected = raw_record_mac(key, value, others)
    if not hmac.compare_digest(expected.encode("ascii"), parsed[2]):
        raise UnauthenticatedRawRecord(
            f"the HMAC by key {key_id!r} does not match: the body or a header changed since the "
            "ingress signed it, or the record is forged"
        )
    return key
