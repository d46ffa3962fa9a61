"""`sgpipe up` makes the token endpoint's signing key once per data dir, private."""

from __future__ import annotations

import stat
from pathlib import Path

from ingest.oauth import hash_client_secret, load_signing_keys
from sgpipe.runtime.settings import Settings
from sgpipe.up.oauth_key import OAUTH_SIGNING_KEY_FILE, with_oauth_signing_key

CLIENT = {"client_id": "sendgrid", "secret_hash": hash_client_secret("secret-0123456789")}


def test_a_key_is_made_once_per_data_dir_and_reused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    settings = Settings.model_validate(
        {"webhooks": [{"name": "main", "auth": "token", "oauth_clients": [CLIENT]}]}
    )

    first = with_oauth_signing_key(settings, data_dir)
    second = with_oauth_signing_key(settings, data_dir)

    path = data_dir / OAUTH_SIGNING_KEY_FILE
    assert first.ingest.oauth_signing_key_files == (path.resolve(),)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_signing_keys(first.ingest)[0].kid == load_signing_keys(second.ingest)[0].kid


def test_no_key_without_clients_or_with_a_configured_key(tmp_path: Path) -> None:
    plain = Settings.model_validate({"webhooks": [{"name": "main", "allow_unsigned": True}]})
    assert with_oauth_signing_key(plain, tmp_path) is plain
    configured = Settings.model_validate(
        {
            "webhooks": [{"name": "main", "auth": "token", "oauth_clients": [CLIENT]}],
            "ingest": {"oauth_signing_key_files": ["/etc/sgpipe/key.pem"]},
        }
    )
    assert with_oauth_signing_key(configured, tmp_path) is configured
    assert not (tmp_path / OAUTH_SIGNING_KEY_FILE).exists()
