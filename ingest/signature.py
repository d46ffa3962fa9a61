"""SendGrid's Signed Event Webhook check.

SendGrid signs ``timestamp header bytes + raw body bytes`` with ECDSA P-256 / SHA-256 and sends
the base64 DER signature in ``X-Twilio-Email-Event-Webhook-Signature`` and the Unix-seconds
timestamp in ``X-Twilio-Email-Event-Webhook-Timestamp``. The body is verified exactly as
received: re-serializing the JSON (SendGrid puts ``\\r\\n`` between events) would break it.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key

SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"

_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


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


def verify_signature(
    keys: Sequence[ec.EllipticCurvePublicKey],
    signature_header: str | None,
    timestamp_header: str | None,
    body: bytes,
    *,
    now: float,
    tolerance_seconds: int,
) -> VerifiedSignature:
    """Accept if any key (several during a rotation) verifies; raise SignatureRejected if not.

    ``tolerance_seconds`` bounds |now - timestamp|; 0 disables that check.
    """
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
    signed = timestamp_header.encode("ascii") + body
    if not any(_verifies(key, signature, signed) for key in keys):
        raise SignatureRejected(
            "invalid_signature", "the signature does not match the body and timestamp"
        )
    # Checked after the signature so that an attacker learns nothing about the window.
    if tolerance_seconds and abs(now - timestamp) > tolerance_seconds:
        raise SignatureRejected(
            "stale_timestamp",
            f"signed timestamp {timestamp} is more than {tolerance_seconds}s from now",
        )
    return VerifiedSignature(timestamp=timestamp)


def _parse_timestamp(header: str) -> int:
    # Checked before anything strips it: the signed bytes are the header exactly as sent.
    text = header.strip()
    if not header.isascii() or not text.isdigit() or len(text) > 12:
        raise SignatureRejected(
            "malformed_timestamp", f"{TIMESTAMP_HEADER} must be Unix seconds, got {header[:32]!r}"
        )
    return int(text)


def _verifies(key: ec.EllipticCurvePublicKey, signature: bytes, signed: bytes) -> bool:
    try:
        key.verify(signature, signed, _ECDSA_SHA256)
    except InvalidSignature:
        return False
    # A non-DER signature makes cryptography raise ValueError: it is simply not valid.
    except ValueError:
        return False
    return True
