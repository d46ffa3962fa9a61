"""verify_signature and load_public_key against SendGrid's official vector and our own keys."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from ingest.signature import (
    InvalidPublicKey,
    SignatureRejected,
    VerifiedSignature,
    load_public_key,
    verify_signature,
)
from tests.sendgrid_vector import (
    BODY,
    PUBLIC_KEY,
    SIGNATURE,
    TIMESTAMP,
    new_key_pair,
    public_key_b64,
    sign,
)

VECTOR_TIME = int(TIMESTAMP)


@pytest.fixture(scope="module")
def vector_key() -> ec.EllipticCurvePublicKey:
    return load_public_key(PUBLIC_KEY)


@pytest.fixture(scope="module")
def other_key() -> ec.EllipticCurvePublicKey:
    _, encoded = new_key_pair()
    return load_public_key(encoded)


def rejection(
    keys: list[ec.EllipticCurvePublicKey],
    signature: str | None,
    timestamp: str | None,
    body: bytes,
    *,
    now: float = VECTOR_TIME,
    tolerance: int = 0,
) -> SignatureRejected:
    with pytest.raises(SignatureRejected) as caught:
        verify_signature(keys, signature, timestamp, body, now=now, tolerance_seconds=tolerance)
    return caught.value


def der_public_key(public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --- the official vector ---------------------------------------------------------------------


def test_vector_body_is_the_compact_sorted_json_followed_by_crlf() -> None:
    events = json.loads(BODY)
    canonical = json.dumps(events, separators=(",", ":"), sort_keys=True).encode()
    assert canonical + b"\r\n" == BODY
    assert events[0]["event"] == "dropped"


def test_official_vector_verifies(vector_key: ec.EllipticCurvePublicKey) -> None:
    verified = verify_signature(
        [vector_key], SIGNATURE, TIMESTAMP, BODY, now=1_900_000_000, tolerance_seconds=0
    )
    assert verified == VerifiedSignature(timestamp=1600112502)


def test_official_vector_verifies_inside_the_tolerance(
    vector_key: ec.EllipticCurvePublicKey,
) -> None:
    verified = verify_signature(
        [vector_key], SIGNATURE, TIMESTAMP, BODY, now=VECTOR_TIME + 30, tolerance_seconds=60
    )
    assert verified.timestamp == VECTOR_TIME


def test_surrounding_whitespace_in_headers_is_tolerated(
    vector_key: ec.EllipticCurvePublicKey,
) -> None:
    verified = verify_signature(
        [vector_key], f" {SIGNATURE} ", TIMESTAMP, BODY, now=0, tolerance_seconds=0
    )
    assert verified.timestamp == VECTOR_TIME


# --- tampering -------------------------------------------------------------------------------


def _flip_one_byte(body: bytes) -> bytes:
    index = body.index(b"hello@world.com")
    return body[:index] + b"j" + body[index + 1 :]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(_flip_one_byte(BODY), id="one-byte-changed"),
        pytest.param(BODY.removesuffix(b"\r\n"), id="without-trailing-crlf"),
        pytest.param(BODY + b"\r\n", id="extra-crlf"),
        pytest.param(json.dumps(json.loads(BODY)).encode() + b"\r\n", id="re-serialized"),
        pytest.param(
            json.dumps(json.loads(BODY), separators=(",", ":"), sort_keys=True).encode(),
            id="re-serialized-compact-without-crlf",
        ),
        pytest.param(b"", id="empty"),
    ],
)
def test_tampered_body_is_rejected(vector_key: ec.EllipticCurvePublicKey, body: bytes) -> None:
    assert body != BODY
    assert rejection([vector_key], SIGNATURE, TIMESTAMP, body).code == "invalid_signature"


def test_another_timestamp_is_rejected_even_without_tolerance(
    vector_key: ec.EllipticCurvePublicKey,
) -> None:
    # The timestamp is part of the signed message: changing it breaks the signature.
    assert rejection([vector_key], SIGNATURE, "1600112503", BODY).code == "invalid_signature"


def test_leading_zero_in_timestamp_is_a_different_signed_message(
    vector_key: ec.EllipticCurvePublicKey,
) -> None:
    assert rejection([vector_key], SIGNATURE, "0" + TIMESTAMP, BODY).code == "invalid_signature"


def test_signature_of_another_message_is_rejected(vector_key: ec.EllipticCurvePublicKey) -> None:
    private_key, _ = new_key_pair()
    foreign = sign(private_key, TIMESTAMP, BODY)
    assert rejection([vector_key], foreign, TIMESTAMP, BODY).code == "invalid_signature"


# --- keys and rotation -----------------------------------------------------------------------


def test_wrong_key_is_rejected(other_key: ec.EllipticCurvePublicKey) -> None:
    assert rejection([other_key], SIGNATURE, TIMESTAMP, BODY).code == "invalid_signature"


def test_no_keys_rejects(vector_key: ec.EllipticCurvePublicKey) -> None:
    assert rejection([], SIGNATURE, TIMESTAMP, BODY).code == "invalid_signature"


def test_rotation_wrong_key_then_right_key_verifies(
    vector_key: ec.EllipticCurvePublicKey, other_key: ec.EllipticCurvePublicKey
) -> None:
    verified = verify_signature(
        [other_key, vector_key], SIGNATURE, TIMESTAMP, BODY, now=0, tolerance_seconds=0
    )
    assert verified.timestamp == VECTOR_TIME


def test_rotation_right_key_first_verifies(
    vector_key: ec.EllipticCurvePublicKey, other_key: ec.EllipticCurvePublicKey
) -> None:
    verified = verify_signature(
        (vector_key, other_key), SIGNATURE, TIMESTAMP, BODY, now=0, tolerance_seconds=0
    )
    assert verified.timestamp == VECTOR_TIME


def test_fresh_key_over_realistic_multi_event_body_verifies() -> None:
    events = [
        {"email": "a@example.com", "event": "processed", "sg_event_id": "cHJvY2Vzc2VkLTE",
         "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0",
         "smtp-id": "<14c5d75ce93.dfd.64b469@ismtpd-555>", "timestamp": 1700000000,
         "category": ["cat facts"]},
        {"email": "a@example.com", "event": "delivered", "sg_event_id": "ZGVsaXZlcmVkLTE",
         "response": "250 OK", "timestamp": 1700000003, "tls": 1, "ip": "168.1.1.1"},
        {"email": "a@example.com", "event": "open", "sg_event_id": "b3Blbi0x",
         "sg_machine_open": False, "timestamp": 1700000100, "useragent": "Mozilla/5.0 ☃"},
    ]  # fmt: skip
    body = (
        "[" + ",\r\n".join(json.dumps(e, ensure_ascii=False) for e in events) + "]\r\n"
    ).encode()
    private_key, public_key = new_key_pair()
    timestamp = "1700000200"
    signature = sign(private_key, timestamp, body)

    verified = verify_signature(
        [load_public_key(public_key)],
        signature,
        timestamp,
        body,
        now=1_700_000_260,
        tolerance_seconds=300,
    )

    assert verified == VerifiedSignature(timestamp=1_700_000_200)
    # The same events with "\n" instead of "\r\n" between them are another message.
    relaxed = body.replace(b",\r\n", b",\n")
    rejected = rejection(
        [load_public_key(public_key)], signature, timestamp, relaxed, now=1_700_000_260
    )
    assert rejected.code == "invalid_signature"


# --- the replay window -----------------------------------------------------------------------


def test_stale_timestamp_is_rejected_with_tolerance(vector_key: ec.EllipticCurvePublicKey) -> None:
    rejected = rejection(
        [vector_key], SIGNATURE, TIMESTAMP, BODY, now=VECTOR_TIME + 601, tolerance=600
    )
    assert rejected.code == "stale_timestamp"
    assert "600" in rejected.message


def test_future_timestamp_is_rejected_with_tolerance(vector_key: ec.EllipticCurvePublicKey) -> None:
    rejected = rejection(
        [vector_key], SIGNATURE, TIMESTAMP, BODY, now=VECTOR_TIME - 601, tolerance=600
    )
    assert rejected.code == "stale_timestamp"


@pytest.mark.parametrize("offset", [-600, 0, 600])
def test_timestamp_at_the_edge_of_the_tolerance_verifies(
    vector_key: ec.EllipticCurvePublicKey, offset: int
) -> None:
    verified = verify_signature(
        [vector_key], SIGNATURE, TIMESTAMP, BODY, now=VECTOR_TIME + offset, tolerance_seconds=600
    )
    assert verified.timestamp == VECTOR_TIME


@pytest.mark.parametrize("now", [0.0, VECTOR_TIME + 10**9, float(VECTOR_TIME - 10**9)])
def test_tolerance_zero_disables_the_window(
    vector_key: ec.EllipticCurvePublicKey, now: float
) -> None:
    verified = verify_signature(
        [vector_key], SIGNATURE, TIMESTAMP, BODY, now=now, tolerance_seconds=0
    )
    assert verified.timestamp == VECTOR_TIME


def test_stale_and_forged_reports_the_signature_not_the_window(
    other_key: ec.EllipticCurvePublicKey,
) -> None:
    # The window is checked after the signature: a forger learns nothing about it.
    rejected = rejection([other_key], SIGNATURE, TIMESTAMP, BODY, now=10**10, tolerance=60)
    assert rejected.code == "invalid_signature"


# --- malformed headers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signature", "timestamp", "code"),
    [
        pytest.param(None, TIMESTAMP, "missing_signature", id="no-signature"),
        pytest.param("", TIMESTAMP, "missing_signature", id="empty-signature"),
        pytest.param(SIGNATURE, None, "missing_timestamp", id="no-timestamp"),
        pytest.param(SIGNATURE, "", "missing_timestamp", id="empty-timestamp"),
        pytest.param(None, None, "missing_signature", id="neither"),
        pytest.param("not base64!!", TIMESTAMP, "malformed_signature", id="non-base64"),
        pytest.param("MEUCIGHQ", TIMESTAMP, "invalid_signature", id="truncated-der"),
        pytest.param(
            base64.b64encode(b"definitely not an ASN.1 DER signature").decode(),
            TIMESTAMP,
            "invalid_signature",
            id="base64-of-garbage",
        ),
        pytest.param(SIGNATURE, "abc", "malformed_timestamp", id="non-numeric-timestamp"),
        pytest.param(SIGNATURE, "-1600112502", "malformed_timestamp", id="negative-timestamp"),
        pytest.param(SIGNATURE, "1600112502.5", "malformed_timestamp", id="fractional-timestamp"),
        pytest.param(SIGNATURE, "1" * 13, "malformed_timestamp", id="huge-timestamp"),
        pytest.param(SIGNATURE, "9" * 400, "malformed_timestamp", id="absurd-timestamp"),
        pytest.param(SIGNATURE, "١٦٠٠١١٢٥٠٢", "malformed_timestamp", id="non-ascii-digits"),
        pytest.param(SIGNATURE, "   ", "malformed_timestamp", id="blank-timestamp"),
    ],
)
def test_malformed_headers_are_rejected_with_their_code(
    vector_key: ec.EllipticCurvePublicKey, signature: str | None, timestamp: str | None, code: str
) -> None:
    assert rejection([vector_key], signature, timestamp, BODY).code == code


def test_rejection_message_names_the_header(vector_key: ec.EllipticCurvePublicKey) -> None:
    rejected = rejection([vector_key], None, TIMESTAMP, BODY)
    assert "X-Twilio-Email-Event-Webhook-Signature" in rejected.message
    assert str(rejected) == rejected.message


# Found by this suite: U+00A0 passed the digit check after str.strip() and then broke
# timestamp_header.encode("ascii") with UnicodeEncodeError (a 500 from the ingress).
@pytest.mark.parametrize(
    "timestamp", ["\u00a0" + TIMESTAMP, TIMESTAMP + "\u3000", TIMESTAMP + "\udca0"]
)
def test_non_ascii_whitespace_around_timestamp_is_rejected(
    vector_key: ec.EllipticCurvePublicKey, timestamp: str
) -> None:
    assert rejection([vector_key], SIGNATURE, timestamp, BODY).code == "malformed_timestamp"


# --- load_public_key -------------------------------------------------------------------------


def test_load_public_key_returns_the_p256_key() -> None:
    key = load_public_key(PUBLIC_KEY)
    assert isinstance(key.curve, ec.SECP256R1)
    assert base64.b64encode(der_public_key(key)).decode() == PUBLIC_KEY


def test_load_public_key_tolerates_surrounding_whitespace() -> None:
    key = load_public_key(f"  {PUBLIC_KEY}\n")
    assert base64.b64encode(der_public_key(key)).decode() == PUBLIC_KEY


def test_load_public_key_round_trips_a_fresh_key() -> None:
    private_key, encoded = new_key_pair()
    key = load_public_key(encoded)
    assert key.public_numbers() == private_key.public_key().public_numbers()
    assert encoded == public_key_b64(private_key)


@pytest.mark.parametrize(
    ("encoded", "message"),
    [
        pytest.param("not base64 at all!", "not a base64 DER public key", id="non-base64"),
        pytest.param(PUBLIC_KEY[:-4], "not a base64 DER public key", id="truncated-base64"),
        pytest.param(
            base64.b64encode(b"garbage, not DER").decode(),
            "not a base64 DER public key",
            id="non-der",
        ),
        pytest.param(
            base64.b64encode(base64.b64decode(PUBLIC_KEY)[:-10]).decode(),
            "not a base64 DER public key",
            id="truncated-der",
        ),
        pytest.param("", "not a base64 DER public key", id="empty"),
    ],
)
def test_load_public_key_rejects_malformed_input(encoded: str, message: str) -> None:
    with pytest.raises(InvalidPublicKey, match=message):
        load_public_key(encoded)


def test_load_public_key_rejects_rsa() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    encoded = base64.b64encode(der_public_key(key.public_key())).decode()
    with pytest.raises(InvalidPublicKey, match="P-256"):
        load_public_key(encoded)


@pytest.mark.parametrize("curve", [ec.SECP384R1(), ec.SECP256K1()], ids=["p384", "secp256k1"])
def test_load_public_key_rejects_other_curves(curve: ec.EllipticCurve) -> None:
    key = ec.generate_private_key(curve)
    encoded = base64.b64encode(der_public_key(key.public_key())).decode()
    with pytest.raises(InvalidPublicKey, match="P-256"):
        load_public_key(encoded)


def test_load_public_key_rejects_ed25519() -> None:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(InvalidPublicKey, match="P-256"):
        load_public_key(base64.b64encode(der).decode())


def test_load_public_key_rejects_a_private_key() -> None:
    private_key, _ = new_key_pair()
    der = private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(InvalidPublicKey):
        load_public_key(base64.b64encode(der).decode())


# Found by this suite: cryptography's UnsupportedAlgorithm escaped load_public_key (and
# create_app) instead of InvalidPublicKey/ConfigError.
def test_load_public_key_rejects_an_unsupported_curve_oid() -> None:
    der = base64.b64decode(PUBLIC_KEY)
    prime256v1 = bytes.fromhex("2a8648ce3d030107")  # OID 1.2.840.10045.3.1.7
    unknown = bytes.fromhex("2a8648ce3d030109")  # OID 1.2.840.10045.3.1.9, same length
    assert der.count(prime256v1) == 1
    with pytest.raises(InvalidPublicKey, match="not a base64 DER public key"):
        load_public_key(base64.b64encode(der.replace(prime256v1, unknown)).decode())
