"""The token endpoint's signing key files are secrets files: checked like the ClickHouse
credentials and the raw-record key (``private_file_problem``) when the ingress reads them, since
whoever reads one can mint tokens the ingress accepts. `sgpipe up` refuses an unsafe one before
anything starts; a Kubernetes Secret volume's file (root-owned, readable by the pod's fsGroup)
is accepted."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import yaml

from ingest.oauth import generate_signing_key_pem, hash_client_secret, load_signing_keys
from sgpipe.runtime.secret_files import private_file_problem
from sgpipe.runtime.settings import ConfigError, IngestSettings
from sgpipe.up.oauth_key import OAUTH_SIGNING_KEY_FILE
from tests.unit.test_up_refusals import EXIT_CONFIG, busy_port, sgpipe, up

__all__ = ["busy_port"]  # the fixture, used by name

CLIENT = {"client_id": "sendgrid", "secret_hash": hash_client_secret("secret-0123456789")}


def key_file(path: Path, mode: int) -> Path:
    path.write_text(generate_signing_key_pem())
    path.chmod(mode)
    return path


def settings_for(*paths: Path) -> IngestSettings:
    return IngestSettings.model_validate({"oauth_signing_key_files": [str(p) for p in paths]})


def test_a_private_key_file_is_loaded_and_a_symlink_to_one_is_followed(tmp_path: Path) -> None:
    # A Secret volume's files are symlinks into its ..data directory.
    target = key_file(tmp_path / "current.pem", 0o600)
    link = tmp_path / "mounted.pem"
    link.symlink_to(target)

    (by_file,) = load_signing_keys(settings_for(target))
    (by_link,) = load_signing_keys(settings_for(link))
    assert by_file.kid == by_link.kid


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_key_file_others_can_read_is_refused_with_the_chmod_hint(
    tmp_path: Path, mode: int
) -> None:
    path = key_file(tmp_path / "key.pem", mode)
    with pytest.raises(ConfigError) as refused:
        load_signing_keys(settings_for(path))
    assert str(refused.value) == (
        f"ingest.oauth_signing_key_files: {path} is accessible by other users "
        f"(mode {mode:o}); run `chmod 600 {path}`"
    )


def test_a_key_path_that_is_not_a_regular_file_is_refused_without_blocking(
    tmp_path: Path,
) -> None:
    fifo = tmp_path / "key.pem"
    os.mkfifo(fifo, 0o600)  # opened for reading the usual way, this would wait for a writer
    with pytest.raises(ConfigError, match=f"{fifo} is not a regular file"):
        load_signing_keys(settings_for(fifo))
    with pytest.raises(ConfigError, match="Is a directory"):
        load_signing_keys(settings_for(tmp_path))


def test_a_missing_key_file_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ingest.oauth_signing_key_files: cannot read"):
        load_signing_keys(settings_for(tmp_path / "absent.pem"))


def status(*, uid: int, gid: int, mode: int) -> os.stat_result:
    return os.stat_result((stat.S_IFREG | mode, 0, 0, 1, uid, gid, 0, 0, 0, 0))


def test_a_kubernetes_secret_file_is_trusted_only_as_the_kubelet_makes_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The chart's pod: uid and gid 10001, fsGroup 10001 (helm/sgpipe/values.yaml).
    monkeypatch.setattr(os, "geteuid", lambda: 10001)
    monkeypatch.setattr(os, "getegid", lambda: 10001)
    monkeypatch.setattr(os, "getgroups", lambda: [10001])
    path = Path("/etc/sgpipe/oauth/current.pem")
    mounted = status(uid=0, gid=10001, mode=0o440)  # defaultMode 0400 + the fsGroup's read
    assert private_file_problem(path, mounted, kubernetes_secret=True) is None
    # Not for the files sgpipe writes itself (the data dir's): those must be this user's.
    assert private_file_problem(path, mounted) == f"{path} is owned by another user (uid 0)"
    assert private_file_problem(path, status(uid=10001, gid=10001, mode=0o600)) is None
    refused = {
        "readable by everyone": status(uid=0, gid=10001, mode=0o444),
        "writable by the group": status(uid=0, gid=10001, mode=0o460),
        "readable by another group": status(uid=0, gid=10002, mode=0o440),
        "another user's": status(uid=10002, gid=10001, mode=0o400),
    }
    for what, wrong in refused.items():
        assert private_file_problem(path, wrong, kubernetes_secret=True) is not None, what
    # A process running as root gets the plain rule: a group-readable file is refused.
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(os, "getegid", lambda: 0)
    monkeypatch.setattr(os, "getgroups", lambda: [0])
    assert private_file_problem(path, status(uid=0, gid=0, mode=0o440), kubernetes_secret=True) == (
        f"{path} is accessible by other users (mode 440); run `chmod 600 {path}`"
    )


def test_sgpipe_up_refuses_a_data_dir_key_others_can_read_before_anything_starts(
    tmp_path: Path, busy_port: int
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    data_dir.chmod(0o700)
    key = key_file(data_dir / OAUTH_SIGNING_KEY_FILE, 0o644)
    config = tmp_path / "sgpipe.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "embedded": {"kafka_port": 0, "clickhouse_http_port": 0},
                "webhooks": [{"name": "main", "auth": "token", "oauth_clients": [CLIENT]}],
            }
        )
    )

    code, err = sgpipe(up(tmp_path, data_dir, busy_port, config))

    path = key.resolve()
    assert code == EXIT_CONFIG
    assert err == (
        f"sgpipe: ingest.oauth_signing_key_files: {path} is accessible by other users "
        f"(mode 644); run `chmod 600 {path}`\n"
    )
    assert sorted(p.name for p in data_dir.iterdir()) == [OAUTH_SIGNING_KEY_FILE]
