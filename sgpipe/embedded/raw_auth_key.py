"""The raw-record HMAC key of `sgpipe up`, generated once per data dir.

``<data-dir>/raw-auth-key.json`` holds the key the embedded ingress signs raw records with and
the embedded processor verifies them with (``raw_auth``, docs/security.md#raw-records), used
when the configuration sets no ``raw_auth.keys``. It reaches the children through their config
files (mode 0600, ``sgpipe.up.configs``), never through a log line or the state file.

Created like the ClickHouse credentials next to it (``credentials``): ``O_CREAT | O_EXCL``,
mode 0600, written and fsynced under a temporary name, then linked into place; an existing
file other users can read or write is refused with a ``chmod`` hint.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Final

from pydantic import SecretStr

from sgpipe.runtime.secret_files import private_file_problem
from sgpipe.runtime.settings import RawAuthKeySettings, Settings

RAW_AUTH_KEY_FILE: Final = "raw-auth-key.json"
_FORMAT_VERSION: Final = 1
_SECRET_BYTES: Final = 32


class RawAuthKeyError(Exception):
    """The key file cannot be used (unsafe permissions, unreadable, malformed)."""


def raw_auth_key_file(data_dir: Path) -> Path:
    return data_dir / RAW_AUTH_KEY_FILE


def with_data_dir_raw_auth_key(settings: Settings, data_dir: Path) -> Settings:
    """``settings`` as they are when they set ``raw_auth.keys``; else with the data dir's key
    (created on first use). Raises RawAuthKeyError for an unsafe or broken key file."""
    if settings.raw_auth.keys:
        return settings
    raw_auth = settings.raw_auth.model_copy(
        update={"keys": (load_or_create_raw_auth_key(data_dir),)}
    )
    return settings.model_copy(update={"raw_auth": raw_auth})


def load_or_create_raw_auth_key(data_dir: Path) -> RawAuthKeySettings:
    data_dir.mkdir(parents=True, exist_ok=True)
    path = raw_auth_key_file(data_dir)
    if not path.exists():
        _create(path)
    return load_raw_auth_key(data_dir)


def load_raw_auth_key(data_dir: Path) -> RawAuthKeySettings:
    """The data dir's key (never creates it): FileNotFoundError when there is none."""
    path = raw_auth_key_file(data_dir)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise RawAuthKeyError(f"cannot open {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as handle:
        problem = private_file_problem(path, os.fstat(handle.fileno()))
        if problem is not None:
            raise RawAuthKeyError(problem)
        text = handle.read()
    try:
        document = json.loads(text)
        if document.get("version") != _FORMAT_VERSION:
            raise ValueError(f"unknown version {document.get('version')!r}")
        return RawAuthKeySettings(id=document["id"], secret=SecretStr(document["secret"]))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        # No excerpt of the file in the message: it holds the secret.
        raise RawAuthKeyError(
            f"{path} is not a valid raw auth key file ({type(exc).__name__})"
        ) from None


def _create(path: Path) -> None:
    document = {
        "version": _FORMAT_VERSION,
        # Random, so that a record signed for another data dir never names this key.
        "id": f"up-{secrets.token_hex(4)}",
        "secret": secrets.token_urlsafe(_SECRET_BYTES),
    }
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(temporary, flags, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), 0o600)  # whatever the umask
            json.dump(document, handle)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        # link(), unlike rename(), fails if the name exists: two starts at once share one key.
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    finally:
        temporary.unlink(missing_ok=True)
