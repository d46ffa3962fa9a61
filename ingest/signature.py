"""SendGrid's Signed Event Webhook check.

SendGrid signs ``timestamp header bytes + raw body bytes`` with ECDSA P-256 / SHA-256 and sends
the base64 DER signature in ``X-Twilio-Email-Event-Webhook-Signature`` and the Unix-seconds
timestamp in ``X-Twilio-Email-Event-Webhook-Timestamp``. The body is verified exactly as
received: re-serializing the JSON (SendGrid puts ``\\r\\n`` between events) would break it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.serialization import load_der_public_key

SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"

_ECDSA_PREHASHED_SHA256 = ec.ECDSA(Prehashed(hashes.SHA256()))


class InvalidPublicKey(ValueError):
    """A configured key is not a base64 DER P-256 SubjectPublicKeyInfo."""


class SignatureRejected(Exception):
    """The request failed the signature check; ``code`` is a stable machine-readable reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class VerifiedSignature:
    timestamp: int  # the signed Unix-seconds timestamp, kept on the raw batch


def load_public_key(encoded: str) -> ec.EllipticCurvePublicKey:
    """Parse once at start (8 µs a parse is too much per request)."""
    try:
        der = base64.b64decode(encoded.strip(), validate=True)
        key = load_der_public_key(der)
    except (binascii.Error, ValueError, UnsupportedAlgorithm) as exc:
        raise InvalidPublicKey(f"not a base64 DER public key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise InvalidPublicKey("SendGrid keys are ECDSA P-256 (secp256r1) public keys")
    return key


@dataclass(frozen=True, slots=True)
class SignatureHeaders:
    """The two signature headers, checked for form before the body is read: a request that
    cannot possibly verify costs no body read, no decompression and no hashing."""

    timestamp: int
    timestamp_bytes: bytes  # exactly as sent: the first part of the signed message
    signature: bytes  # DER, decoded from base64


def parse_signature_headers(
    signature_header: str | None, timestamp_header: str | None
) -> SignatureHeaders:
    """Raise SignatureRejected (missing_*, malformed_*) unless both headers are well formed."""
    if not signature_header:
        raise SignatureRejected("missing_signature", f"{SIGNATURE_HEADER} header is missing")
    if not timestamp_header:
        raise SignatureRejected("missing_timestamp", f"{TIMESTAMP_HEADER} header is missing")
    timestamp = _parse_timestamp(timestamp_header)
    try:
        signature = base64.b64decode(signature_header.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureRejected(
            "malformed_signature", f"{SIGNATURE_HEADER} is not valid base64"
        ) from exc
    return SignatureHeaders(timestamp, timestamp_header.encode("ascii"), signature)


def signed_message_hash(headers: SignatureHeaders) -> hashlib._Hash:
    """SHA-256 over the timestamp so far; the caller feeds it the body (in slices if large)."""
    digest = hashlib.sha256()
    digest.update(headers.timestamp_bytes)
    return digest


def verify_digest(
    keys: Sequence[ec.EllipticCurvePublicKey],
    headers: SignatureHeaders,
    digest: bytes,
    *,
    now: float,
    tolerance_seconds: int,
) -> VerifiedSignature:
    """Accept if any key (several during a rotation) verifies ``digest`` (SHA-256 of timestamp +
    body); raise SignatureRejected if not. ``tolerance_seconds`` bounds |now - timestamp|; 0
    disables that check.

    Verifying a digest instead of the message lets the caller hash a 4 MB body in slices
    between event-loop turns, and hash it once however many keys there are.
    """
    if not any(_verifies(key, headers.signature, digest) for key in keys):
        raise SignatureRejected(
            "invalid_signature", "the signature does not match the body and timestamp"
        )
    # Checked after the signature so that an attacker learns nothing about the window.
    if tolerance_seconds and abs(now - headers.timestamp) > tolerance_seconds:
        raise SignatureRejected(
            "stale_timestamp",
            f"signed timestamp {headers.timestamp} is more than {tolerance_seconds}s from now",
        )
    return VerifiedSignature(timestamp=headers.timestamp)


def verify_signature(
    keys: Sequence[ec.EllipticCurvePublicKey],
    signature_header: str | None,
    timestamp_header: str | None,
    body: bytes,
    *,
    now: float,
    tolerance_seconds: int,
) -> VerifiedSignature:
    """The whole check in one call (headers, then the signature over timestamp + body).

    Raises SignatureRejected with a stable code. ``tolerance_seconds`` bounds
    |now - timestamp|; 0 disables that check.
    """
    headers = parse_signature_headers(signature_header, timestamp_header)
    digest = signed_message_hash(headers)
    digest.update(body)
    return verify_digest(
        keys, headers, digest.digest(), now=now, tolerance_seconds=tolerance_seconds
    )


def _parse_timestamp(header: str) -> int:
    # Checked before anything strips it: the signed bytes are the header exactly as sent.
    text = header.strip()
    if not header.isascii() or not text.isdigit() or len(text) > 12:
        raise SignatureRejected(
            "malformed_timestamp", f"{TIMESTAMP_HEADER} must be Unix seconds, got {header[:32]!r}"
        )
    return int(text)


def _verifies(key: ec.EllipticCurvePublicKey, signature: bytes, digest: bytes) -> bool:
    try:
        key.verify(signature, digest, _ECDSA_PREHASHED_SHA256)
    except InvalidSignature:
        return False
    # A non-DER signature makes cryptography raise ValueError: it is simply not valid.
    except ValueError:
        return False
    return True
