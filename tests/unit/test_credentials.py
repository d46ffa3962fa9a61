"""The embedded store's credentials file: generated once, private, refused when it is not."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest

from sgpipe.embedded.credentials import (
    READER_USER,
    WRITER_USER,
    CredentialsError,
    credentials_file,
    load_credentials,
    load_or_create_credentials,
)


def test_first_start_generates_two_users_in_a_private_file(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # the most permissive umask must not widen the file
    try:
        credentials = load_or_create_credentials(tmp_path / "data")
    finally:
        os.umask(old_umask)
    path = credentials_file(tmp_path / "data")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (credentials.writer.name, credentials.reader.name) == (WRITER_USER, READER_USER)
    assert (credentials.writer.readonly, credentials.reader.readonly) == (False, True)
    assert len({credentials.writer.password, credentials.reader.password}) == 2
    assert len(credentials.writer.password) >= 40  # 32 random bytes, base64
    # No temporary file is left behind.
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [path.name]


def test_later_starts_read_the_same_credentials(tmp_path: Path) -> None:
    first = load_or_create_credentials(tmp_path)
    assert load_or_create_credentials(tmp_path) == first
    assert load_credentials(tmp_path) == first


def test_two_processes_starting_at_once_agree(tmp_path: Path) -> None:
    results = []
    barrier = threading.Barrier(8)

    def start() -> None:
        barrier.wait()
        results.append(load_or_create_credentials(tmp_path))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8
    assert all(result == results[0] for result in results)


def test_passwords_stay_out_of_repr(tmp_path: Path) -> None:
    credentials = load_or_create_credentials(tmp_path)
    text = repr(credentials) + str(credentials.writer)
    assert credentials.writer.password not in text
    assert credentials.reader.password not in text


def test_a_file_others_can_read_is_refused(tmp_path: Path) -> None:
    load_or_create_credentials(tmp_path)
    path = credentials_file(tmp_path)
    for mode in (0o644, 0o640, 0o604, 0o620):
        path.chmod(mode)
        with pytest.raises(CredentialsError, match="chmod 600"):
            load_or_create_credentials(tmp_path)
    path.chmod(0o600)
    load_credentials(tmp_path)


def test_a_symlink_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    load_or_create_credentials(elsewhere)
    data = tmp_path / "data"
    data.mkdir()
    credentials_file(data).symlink_to(credentials_file(elsewhere))
    with pytest.raises(CredentialsError):
        load_credentials(data)


def test_a_malformed_file_is_refused_without_quoting_it(tmp_path: Path) -> None:
    path = credentials_file(tmp_path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump({"version": 1, "writer": {"user": "sgpipe", "password": "hunter2"}}, handle)
    with pytest.raises(CredentialsError) as refused:
        load_credentials(tmp_path)
    assert "hunter2" not in str(refused.value)


def test_no_file_means_none_for_readers(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_credentials(tmp_path)
