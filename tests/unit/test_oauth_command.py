"""`sgpipe oauth client create` and `sgpipe oauth key create`: what they print and write."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest
import yaml

from ingest.oauth import load_signing_keys, verify_client_secret
from sgpipe.cli import main
from sgpipe.runtime.settings import load_settings

CONFIG = """\
# sgpipe settings, kept as written
kafka:
  bootstrap_servers: "localhost:9092"   # the broker
webhooks:
  - name: main   # SendGrid's main account
    allow_unsigned: true
  - name: other
    allow_unsigned: true
ingest:
  port: 8443
"""


def test_client_create_adds_the_hash_to_the_file_and_prints_the_secret_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "sgpipe.yaml"
    config.write_text(CONFIG)
    config.chmod(0o640)

    code = main(
        ["oauth", "client", "create", "--webhook", "main", "--config", str(config), "--json"]
    )

    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"client_id", "client_secret", "token_url"}
    assert printed["token_url"] == "http://localhost:8443/oauth/token"
    text = config.read_text()
    assert printed["client_secret"] not in text
    # Everything that was in the file still is, comments and quoting included.
    for line in CONFIG.splitlines():
        assert line in text
    settings = load_settings(config, {})
    main_webhook = settings.webhook("main")
    assert main_webhook is not None
    (client,) = main_webhook.oauth_clients
    assert client.client_id == printed["client_id"]
    assert verify_client_secret(printed["client_secret"], client.secret_hash)
    other = settings.webhook("other")
    assert other is not None and other.oauth_clients == ()
    assert stat.S_IMODE(config.stat().st_mode) == 0o640


def test_client_create_without_config_prints_the_kubernetes_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "sgpipe.yaml"
    config.write_text(CONFIG)
    # The settings come from SGPIPE_CONFIG; only --config names a file to edit.
    monkeypatch.setenv("SGPIPE_CONFIG", str(config))
    url = "https://hooks.example/oauth/token"

    assert main(["oauth", "client", "create", "--webhook", "other", "--token-url", url]) == 0

    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[2] == f"token_url:     {url}"
    secret = lines[1].split()[-1]
    manifest = yaml.safe_load("\n".join(lines[3:]))
    assert manifest["kind"] == "Secret"
    clients = json.loads(base64.b64decode(manifest["data"]["oauth-clients"]))
    assert [client["client_id"] for client in clients] == [lines[0].split()[-1]]
    assert verify_client_secret(secret, clients[0]["secret_hash"])
    assert secret not in "\n".join(lines[3:])
    assert config.read_text() == CONFIG, "without --config the file is not touched"


def test_client_create_refuses_an_unknown_webhook(tmp_path: Path) -> None:
    config = tmp_path / "sgpipe.yaml"
    config.write_text(CONFIG)
    assert main(["oauth", "client", "create", "--webhook", "nope", "--config", str(config)]) == 2
    assert config.read_text() == CONFIG


def test_key_create_writes_a_private_signing_key(tmp_path: Path) -> None:
    out = tmp_path / "signing-key.pem"
    assert main(["oauth", "key", "create", "--out", str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    settings = load_settings(None, {}, {"ingest.oauth_signing_key_files": [str(out)]})
    (key,) = load_signing_keys(settings.ingest)
    assert key.kid
    assert main(["oauth", "key", "create", "--out", str(out)]) == 2, "never overwritten silently"


def test_key_create_force_replaces_the_key_in_one_step(tmp_path: Path) -> None:
    # Revoking a leaked key on a live data dir: a reader never sees half a file or a wider mode.
    out = tmp_path / "signing-key.pem"
    assert main(["oauth", "key", "create", "--out", str(out)]) == 0
    old_pem = out.read_text()
    with out.open() as reader_of_the_old_key:
        assert main(["oauth", "key", "create", "--out", str(out), "--force"]) == 0
        assert reader_of_the_old_key.read() == old_pem  # a new file, not the old one rewritten
    assert out.read_text() != old_pem
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["signing-key.pem"]  # no leftovers
    settings = load_settings(None, {}, {"ingest.oauth_signing_key_files": [str(out)]})
    (key,) = load_signing_keys(settings.ingest)
    assert key.kid
