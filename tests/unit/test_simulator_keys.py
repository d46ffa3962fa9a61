"""`sgpipe keys generate` and the simulator's signatures, checked with the ingress's verifier
against SendGrid's official test vector."""

from __future__ import annotations

import base64
import json
import stat
from itertools import islice
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from ingest.signature import SignatureRejected, load_public_key, verify_signature
from sgpipe.simulator.batches import PostPlanner
from sgpipe.simulator.events import EventStream
from sgpipe.simulator.keys import (
    KeyFileError,
    generate_private_key,
    load_private_key,
    public_key_base64,
    sign,
)
from tests import sendgrid_vector
from tests.simulator_support import run_sgpipe


def test_keys_generate_writes_a_private_key_only_its_owner_can_read(tmp_path: Path) -> None:
    out = tmp_path / "webhook.pem"

    result = run_sgpipe(["keys", "generate", "--out", str(out)])

    assert result.returncode == 0, result.stderr
    printed = result.stdout.strip()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    private_key = load_private_key(out)
    # stdout is exactly the public key, in the format webhooks[].public_keys takes.
    assert printed == public_key_base64(private_key)
    public_key = load_public_key(printed)
    assert public_key.public_numbers() == private_key.public_key().public_numbers()
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_keys_generate_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    out = tmp_path / "webhook.pem"
    assert run_sgpipe(["keys", "generate", "--out", str(out)]).returncode == 0
    first = out.read_bytes()

    refused = run_sgpipe(["keys", "generate", "--log-format", "console", "--out", str(out)])

    assert refused.returncode == 2
    assert refused.stdout == ""
    assert refused.stderr == f"sgpipe: {out} exists; pass --force to overwrite it\n"
    assert out.read_bytes() == first
    # In JSON mode the same one line is a JSON event.
    refused = run_sgpipe(["keys", "generate", "--log-format", "json", "--out", str(out)])
    assert refused.returncode == 2
    line = json.loads(refused.stderr)
    assert line["event"] == f"{out} exists; pass --force to overwrite it"
    assert line["exit_code"] == 2
    assert out.read_bytes() == first

    forced = run_sgpipe(["keys", "generate", "--out", str(out), "--force"])
    assert forced.returncode == 0
    assert out.read_bytes() != first
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert forced.stdout.strip() == public_key_base64(load_private_key(out))


def test_keys_generate_fails_cleanly_in_a_missing_directory(tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere" / "k.pem")
    result = run_sgpipe(["keys", "generate", "--log-format", "console", "--out", missing])
    assert result.returncode == 2
    assert result.stderr.startswith("sgpipe: cannot write") and result.stderr.count("\n") == 1


def test_a_key_that_is_not_p256_is_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    other = ec.generate_private_key(ec.SECP384R1())
    path = tmp_path / "p384.pem"
    path.write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(KeyFileError, match="P-256"):
        load_private_key(path)


def test_the_official_vector_verifies_with_the_ingress_algorithm() -> None:
    # The reference point: SendGrid's own signature over its own body.
    verified = verify_signature(
        [load_public_key(sendgrid_vector.PUBLIC_KEY)],
        sendgrid_vector.SIGNATURE,
        sendgrid_vector.TIMESTAMP,
        sendgrid_vector.BODY,
        now=0,
        tolerance_seconds=0,
    )
    assert verified.timestamp == int(sendgrid_vector.TIMESTAMP)


def test_a_simulator_signature_verifies_like_sendgrids() -> None:
    private_key = generate_private_key()
    keys = [load_public_key(public_key_base64(private_key))]

    # The vector's own body and timestamp, signed by the simulator instead of SendGrid.
    signature = sign(private_key, sendgrid_vector.TIMESTAMP, sendgrid_vector.BODY)
    verify_signature(
        keys, signature, sendgrid_vector.TIMESTAMP, sendgrid_vector.BODY, now=0, tolerance_seconds=0
    )
    # What was signed is timestamp + body, as DER ECDSA P-256/SHA-256 in base64.
    private_key.public_key().verify(
        base64.b64decode(signature),
        sendgrid_vector.TIMESTAMP.encode() + sendgrid_vector.BODY,
        ec.ECDSA(hashes.SHA256()),
    )

    # And a simulated body, CRLF separators and trailing CRLF included.
    post = next(iter(PostPlanner(islice(EventStream(1, 1_700_000_000, 1.0), 50), seed=1)))
    assert b"},\r\n{" in post.body
    signature = sign(private_key, "1700000000", post.body)
    verify_signature(keys, signature, "1700000000", post.body, now=0, tolerance_seconds=0)

    # Any change to the body or the timestamp breaks it.
    with pytest.raises(SignatureRejected):
        verify_signature(keys, signature, "1700000000", post.body[:-2], now=0, tolerance_seconds=0)
    with pytest.raises(SignatureRejected):
        verify_signature(keys, signature, "1700000001", post.body, now=0, tolerance_seconds=0)
