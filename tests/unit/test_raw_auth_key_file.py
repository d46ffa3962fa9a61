"""`sgpipe up`'s raw-record key: generated once per data dir in a private file, refused when
the file is not private, and handed to the ingress and the processor through their config
files (which the ingress signs with and the processor verifies with)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import yaml

from sgpipe.embedded.raw_auth_key import (
    RawAuthKeyError,
    load_or_create_raw_auth_key,
    raw_auth_key_file,
    with_data_dir_raw_auth_key,
)
from sgpipe.runtime.settings import Settings
from sgpipe.up.configs import stage_settings, write_config


def test_first_start_generates_a_key_in_a_private_file(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # the most permissive umask must not widen the file
    try:
        key = load_or_create_raw_auth_key(tmp_path / "data")
    finally:
        os.umask(old_umask)
    path = raw_auth_key_file(tmp_path / "data")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key.id.startswith("up-")
    assert len(key.secret.get_secret_value()) >= 40  # 32 random bytes, base64
    assert key.secret.get_secret_value() not in repr(key)
    # No temporary file is left behind; a later start reads the same key.
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [path.name]
    assert load_or_create_raw_auth_key(tmp_path / "data") == key


def test_two_data_dirs_have_two_keys(tmp_path: Path) -> None:
    first = load_or_create_raw_auth_key(tmp_path / "a")
    second = load_or_create_raw_auth_key(tmp_path / "b")
    assert first.secret != second.secret


def test_a_key_file_others_can_read_is_refused_with_a_chmod_hint(tmp_path: Path) -> None:
    load_or_create_raw_auth_key(tmp_path)
    raw_auth_key_file(tmp_path).chmod(0o644)
    with pytest.raises(RawAuthKeyError, match="run `chmod 600 "):
        load_or_create_raw_auth_key(tmp_path)


def test_a_broken_key_file_is_refused_without_its_content(tmp_path: Path) -> None:
    path = raw_auth_key_file(tmp_path)
    path.write_text(json.dumps({"version": 1, "id": "up-1", "secret": "too-short-secret"}))
    path.chmod(0o600)
    with pytest.raises(RawAuthKeyError, match="not a valid raw auth key file") as raised:
        load_or_create_raw_auth_key(tmp_path)
    assert "too-short-secret" not in str(raised.value)


def test_configured_keys_win_over_the_data_dir_key(tmp_path: Path) -> None:
    configured = Settings.model_validate(
        {"raw_auth": {"keys": [{"id": "mine", "secret": "m" * 32}]}}
    )
    assert with_data_dir_raw_auth_key(configured, tmp_path) is configured
    assert not raw_auth_key_file(tmp_path).exists()


def test_the_ingress_and_the_processor_get_the_key_in_their_private_config(
    tmp_path: Path,
) -> None:
    settings = with_data_dir_raw_auth_key(Settings(), tmp_path / "data")
    key = settings.raw_auth.keys[0]
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    for stage in ("ingest", "process"):
        path = write_config(run_dir, stage, stage_settings(settings, stage))
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        document = yaml.safe_load(path.read_text())
        assert document["raw_auth"]["keys"] == [
            {"id": key.id, "secret": key.secret.get_secret_value()}
        ]
