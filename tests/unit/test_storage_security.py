"""The embedded storage's security.toml: mutual TLS for every gRPC component with a CA of the
data dir's own, fresh JWT keys at every start, every file 0600."""

from __future__ import annotations

import stat
import tomllib
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sgpipe.embedded.storage_security import (
    COMMON_NAME,
    GRPC_COMPONENTS,
    SECURITY_FILE,
    write_security_config,
)

JWT_SECTIONS = ("signing", "signing.read", "filer_signing", "filer_signing.read")


def jwt_keys(document: dict[str, object]) -> list[str]:
    jwt = document["jwt"]
    assert isinstance(jwt, dict)
    return [
        jwt["signing"]["key"],
        jwt["signing"]["read"]["key"],
        jwt["filer_signing"]["key"],
        jwt["filer_signing"]["read"]["key"],
    ]


def test_every_grpc_component_requires_our_certificate(tmp_path: Path) -> None:
    tls = write_security_config(tmp_path, tmp_path / "tls")
    document = tomllib.loads((tmp_path / SECURITY_FILE).read_text())

    grpc = document["grpc"]
    assert grpc["ca"] == str(tls.ca_certificate)
    for component in (*GRPC_COMPONENTS, "client"):
        assert grpc[component]["cert"] == str(tls.certificate)
        assert grpc[component]["key"] == str(tls.key)
    for component in GRPC_COMPONENTS:
        assert grpc[component]["allowed_commonNames"] == COMMON_NAME
    assert len(set(jwt_keys(document))) == len(JWT_SECTIONS)  # four distinct keys
    assert all(len(key) >= 40 for key in jwt_keys(document))
    assert document["filer"]["expose_directory_metadata"]["enabled"] is False


def test_the_certificate_is_signed_by_the_ca_and_matches_the_key(tmp_path: Path) -> None:
    tls = write_security_config(tmp_path, tmp_path / "tls")
    ca = x509.load_pem_x509_certificate(tls.ca_certificate.read_bytes())
    certificate = x509.load_pem_x509_certificate(tls.certificate.read_bytes())
    key = serialization.load_pem_private_key(tls.key.read_bytes(), password=None)

    certificate.verify_directly_issued_by(ca)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key() == certificate.public_key()
    names = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    assert [name.value for name in names] == [COMMON_NAME]


def test_files_are_private_and_renewed_at_every_start(tmp_path: Path) -> None:
    first = write_security_config(tmp_path, tmp_path / "tls")
    first_keys = jwt_keys(tomllib.loads((tmp_path / SECURITY_FILE).read_text()))
    first_ca = first.ca_certificate.read_bytes()

    second = write_security_config(tmp_path, tmp_path / "tls")

    assert second.ca_certificate.read_bytes() != first_ca
    renewed = jwt_keys(tomllib.loads((tmp_path / SECURITY_FILE).read_text()))
    assert set(renewed).isdisjoint(first_keys)
    for path in (tmp_path / SECURITY_FILE, second.ca_certificate, second.certificate, second.key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE((tmp_path / "tls").stat().st_mode) == 0o700
    assert sorted(path.name for path in (tmp_path / "tls").iterdir()) == [
        "ca.crt",
        "storage.crt",
        "storage.key",
    ]  # no temporary file left
