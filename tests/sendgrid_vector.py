"""SendGrid's official Signed Event Webhook test vector, and helpers to sign our own bodies.

The vector comes from sendgrid-python's unit tests (see docs/sendgrid-event-webhook.md): the
body is the compact, key-sorted JSON array followed by ``\\r\\n``, exactly as signed.
"""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

PUBLIC_KEY = (
    "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE83T4O/n84iotIvIW4mdBgQ/7dAfSmpqIM8kF9mN1flpVKS3G"
    "Rqe62gw+2fNNRaINXvVpiglSI8eNEc6wEA3F+g=="
)
TIMESTAMP = "1600112502"
SIGNATURE = (
    "MEUCIGHQVtGj+Y3LkG9fLcxf3qfI10QysgDWmMOVmxG0u6ZUAiEAyBiXDWzM+uOe5W0JuG+luQAbPIqHh89M15Tl"
    "uLtEZtM="
)
BODY = (
    b'[{"email":"hello@world.com","event":"dropped","reason":"Bounced Address",'
    b'"sg_event_id":"ZHJvcC0xMDk5NDkxOS1MUnpYbF9OSFN0T0doUTRrb2ZTbV9BLTA",'
    b'"sg_message_id":"LRzXl_NHStOGhQ4kofSm_A.filterdrecv-p3mdw1-756b745b58-kmzbl-18-5F5FC76C-9.0",'
    b'"smtp-id":"<LRzXl_NHStOGhQ4kofSm_A@ismtpd0039p1iad1.sendgrid.net>",'
    b'"timestamp":1600112492}]\r\n'
)


def sign(private_key: ec.EllipticCurvePrivateKey, timestamp: str, body: bytes) -> str:
    """The X-Twilio-Email-Event-Webhook-Signature SendGrid would send for this request."""
    der = private_key.sign(timestamp.encode("ascii") + body, ec.ECDSA(hashes.SHA256()))
    return base64.b64encode(der).decode("ascii")


def public_key_b64(private_key: ec.EllipticCurvePrivateKey) -> str:
    """The base64 DER SubjectPublicKeyInfo, as SendGrid shows a webhook's public key."""
    der = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode("ascii")


def new_key_pair() -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A fresh P-256 key pair: the private key and its base64 DER public key."""
    private_key = ec.generate_private_key(ec.SECP256R1())
    return private_key, public_key_b64(private_key)
