"""The signing key pair of a simulated SendGrid webhook.

SendGrid signs with an ECDSA P-256 private key it keeps and shows the public half as base64 DER
SubjectPublicKeyInfo; that string is what ``webhooks[].public_keys`` takes. The simulator plays
SendGrid, so it holds the private half in a PEM file that only its owner may read.
"""

from __future__ import annotations

import base64
import contextlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


class KeyFileError(Exception):
    """A key file cannot be written or read; the message is one line, fit for the user."""


def generate_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_key_base64(private_key: ec.EllipticCurvePrivateKey) -> str:
    """The public key as SendGrid shows it: base64 of the DER SubjectPublicKeyInfo."""
    der = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode("ascii")


def sign(private_key: ec.EllipticCurvePrivateKey, timestamp: str, body: bytes) -> str:
    """``X-Twilio-Email-Event-Webhook-Signature`` for this timestamp header and raw body:
    base64 of the DER ECDSA P-256/SHA-256 signature over ``timestamp + body``."""
    der = private_key.sign(timestamp.encode("ascii") + body, _ECDSA_SHA256)
    return base64.b64encode(der).decode("ascii")


def write_private_key(
    private_key: ec.EllipticCurvePrivateKey, path: Path, *, overwrite: bool = False
) -> None:
    """Write the key as unencrypted PKCS#8 PEM with mode 0600.

    Atomic: the PEM goes to a temporary file in the same directory first, so ``path`` never
    holds half a key. Without ``overwrite`` the final step is a hard link, which fails if
    ``path`` exists (the O_EXCL guarantee, race-free); with it, a rename replaces the file.
    """
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise KeyFileError(f"cannot write {path}: {exc.strerror}") from exc
    try:
        with os.fdopen(descriptor, "wb") as file:
            os.fchmod(file.fileno(), 0o600)  # the umask may only have narrowed it; be exact
            file.write(pem)
            file.flush()
            os.fsync(file.fileno())
        if overwrite:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)
    except FileExistsError:
        raise KeyFileError(f"{path} exists; pass --force to overwrite it") from None
    except OSError as exc:
        raise KeyFileError(f"cannot write {path}: {exc.strerror}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Read a PEM private key written by ``sgpipe keys generate`` (or any P-256 PEM key)."""
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise KeyFileError(f"{path} is not an ECDSA P-256 key (SendGrid signs with P-256)")
    return key
