"""SeaweedFS's own locks for the embedded broker's storage: ``security.toml``, per data dir.

Without it, every internal port of `weed mini` takes any local client: ``weed shell`` pointed at
the master and filer listed, read and deleted the broker's objects as any user (measured),
and deleting unconsumed batches or group offsets silently loses acknowledged events. With it
(the template is ``weed scaffold -config=security``):

- **gRPC, mutual TLS**: a CA and one certificate for every component (SeaweedFS does not check
  host names; ``allowed_commonNames`` admits only ours), so a client must present a
  certificate signed by this data dir's CA. ``weed shell`` without it gets nowhere (measured,
  tests/integration/test_up_lockdown.py).
- **JWT signing** of volume-server writes and reads (``jwt.signing``, ``jwt.signing.read``) and
  of filer HTTP writes and reads and the filer's IAM gRPC (``jwt.filer_signing``): a client
  that finds a volume's HTTP port cannot write or read a needle without a token the master
  issues over the mutual-TLS gRPC.
- the filer's directory listing and the volume UI over HTTP are off (the filer and master HTTP
  APIs are off anyway: ``-disableHttp``).

S3, what tansu uses, keeps its own signed-request credentials (``credentials.json``).

Everything is generated again at every start of the storage (EC P-256 keys with the
``cryptography`` package, milliseconds): only the `weed` process that starts next reads it,
and all its components restart together, so nothing needs to outlive a run -- no rotation, no
expiry to manage. The files are written 0600 in 0700 directories: anyone who could read them
could already read the data itself.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SECURITY_FILE = "security.toml"
COMMON_NAME = "sgpipe-embedded-storage"
# Every server component `weed mini` may run; each gets the same certificate.
GRPC_COMPONENTS = (
    "master",
    "volume",
    "filer",
    "s3",
    "admin",
    "worker",
    "msg_broker",
    "msg_agent",
    "mq",
)
# A JWT lives this long; SeaweedFS's default (the master issues one per write).
JWT_SECONDS = 10
_VALID_FOR = datetime.timedelta(days=3650)  # regenerated at every start anyway


@dataclass(frozen=True)
class StorageTls:
    """Where the CA certificate and the components' certificate and key are."""

    ca_certificate: Path
    certificate: Path
    key: Path


def write_security_config(config_dir: Path, tls_dir: Path) -> StorageTls:
    """Generate the CA, the certificate and the JWT keys, write them to ``tls_dir`` and
    ``config_dir/security.toml`` (all 0600), and return where the certificates are."""
    tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    tls_dir.chmod(0o700)
    tls = StorageTls(tls_dir / "ca.crt", tls_dir / "storage.crt", tls_dir / "storage.key")
    ca_key, ca_certificate = _certificate_authority()
    key, certificate = _component_certificate(ca_key, ca_certificate)
    _write_private(tls.ca_certificate, ca_certificate.public_bytes(serialization.Encoding.PEM))
    _write_private(tls.certificate, certificate.public_bytes(serialization.Encoding.PEM))
    _write_private(
        tls.key,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    _write_private(config_dir / SECURITY_FILE, security_toml(tls).encode())
    return tls


def security_toml(tls: StorageTls) -> str:
    """The ``security.toml`` for ``tls``, with fresh JWT signing keys."""
    sections = [
        *(
            f"[{section}]\nkey = {_quote(secrets.token_urlsafe(32))}\n"
            f"expires_after_seconds = {JWT_SECONDS}\n"
            for section in (
                "jwt.signing",
                "jwt.signing.read",
                "jwt.filer_signing",
                "jwt.filer_signing.read",
            )
        ),
        "[access]\nui = false\n",
        "[filer.expose_directory_metadata]\nenabled = false\n",
        f"[grpc]\nca = {_quote(str(tls.ca_certificate))}\n",
        *(
            f"[grpc.{component}]\ncert = {_quote(str(tls.certificate))}\n"
            f"key = {_quote(str(tls.key))}\nallowed_commonNames = {_quote(COMMON_NAME)}\n"
            for component in GRPC_COMPONENTS
        ),
        # What a component presents when it dials another (the S3 gateway, the filer).
        f"[grpc.client]\ncert = {_quote(str(tls.certificate))}\nkey = {_quote(str(tls.key))}\n",
    ]
    return "# Written by sgpipe at every start of the storage; see docs/security.md.\n" + (
        "\n".join(sections)
    )


def _quote(value: str) -> str:
    # TOML basic string; our values are paths and URL-safe tokens, but never trust that.
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _certificate_authority() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{COMMON_NAME} CA")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALID_FOR)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def _component_certificate(
    ca_key: ec.EllipticCurvePrivateKey, ca_certificate: x509.Certificate
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, COMMON_NAME)]))
        .issuer_name(ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALID_FOR)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        # Each component is a server to some and a client of others.
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, certificate


def _write_private(path: Path, content: bytes) -> None:
    """Replace ``path`` with ``content``, mode 0600 from the first byte (a temporary file
    created 0600, then renamed over it)."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as output:
            output.write(content)
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)
