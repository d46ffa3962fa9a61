"""Credentials of the embedded ClickHouse endpoint, generated once per data dir.

``<data-dir>/clickhouse-credentials.json`` holds two users:

* the **writer** (``sgpipe``): what sgpipe itself uses -- the sink, migrations, ``sgpipe
  query``, later ``forget`` and ``dlq``;
* the **reader** (``sgpipe_bi``): for BI tools; the server runs each of its requests with
  ``readonly = 2``, which the engine does not let a client lift.

The file is created on first start with ``O_CREAT | O_EXCL`` and mode 0600, fully written and
fsynced under a temporary name, then linked into place, so a reader never sees half a file
and two processes starting at once end up with the same credentials. An existing file that
other users can read or write is refused, as ssh refuses a private key anyone can read.
The passwords never appear in the state file or in a log line: ``EmbeddedUser`` keeps its
password out of ``repr``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

# Re-exported: the check lives below the stages (the ingress reads its signing keys with it).
from sgpipe.runtime.secret_files import private_file_problem as private_file_problem

CREDENTIALS_FILE: Final = "clickhouse-credentials.json"
WRITER_USER: Final = "sgpipe"
READER_USER: Final = "sgpipe_bi"
_FORMAT_VERSION: Final = 1
_PASSWORD_BYTES: Final = 32  # 256 bits: guessing is not an attack worth rate-limiting


class CredentialsError(Exception):
    """The credentials file cannot be used (unsafe permissions, unreadable, malformed)."""


@dataclass(frozen=True, slots=True)
class EmbeddedUser:
    name: str
    password: str = field(repr=False)
    # True: every request of this user runs with readonly = 2 (reads and SET only).
    readonly: bool


@dataclass(frozen=True, slots=True)
class EmbeddedCredentials:
    writer: EmbeddedUser
    reader: EmbeddedUser

    @property
    def users(self) -> tuple[EmbeddedUser, ...]:
        return (self.writer, self.reader)


def credentials_file(data_dir: Path) -> Path:
    return data_dir / CREDENTIALS_FILE


def load_or_create_credentials(data_dir: Path) -> EmbeddedCredentials:
    """The data dir's credentials, generated and stored (mode 0600) if there are none yet.

    Raises CredentialsError when an existing file is unsafe or unreadable.
    """
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # it holds this secret
    path = credentials_file(data_dir)
    if not path.exists():
        _create(path, _generate())
    return load_credentials(data_dir)


def load_credentials(data_dir: Path) -> EmbeddedCredentials:
    """The data dir's existing credentials (never creates them).

    Raises FileNotFoundError when there are none, CredentialsError when the file is unsafe
    (readable or writable by group or others, or owned by another user) or malformed.
    """
    path = credentials_file(data_dir)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise CredentialsError(f"cannot open {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as handle:
        _check_private(path, os.fstat(handle.fileno()))
        text = handle.read()
    try:
        document = json.loads(text)
        if document.get("version") != _FORMAT_VERSION:
            raise ValueError(f"unknown version {document.get('version')!r}")
        return EmbeddedCredentials(
            writer=_user(document["writer"], readonly=False),
            reader=_user(document["reader"], readonly=True),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        # No excerpt of the file in the message: it holds passwords.
        raise CredentialsError(
            f"{path} is not a valid credentials file ({type(exc).__name__})"
        ) from None


def _user(entry: object, *, readonly: bool) -> EmbeddedUser:
    if not isinstance(entry, dict):
        raise TypeError("user entry is not an object")
    name, password = entry["user"], entry["password"]
    if not isinstance(name, str) or not isinstance(password, str) or not name or not password:
        raise TypeError("user and password must be non-empty strings")
    return EmbeddedUser(name, password, readonly)


def _generate() -> EmbeddedCredentials:
    return EmbeddedCredentials(
        writer=EmbeddedUser(WRITER_USER, secrets.token_urlsafe(_PASSWORD_BYTES), readonly=False),
        reader=EmbeddedUser(READER_USER, secrets.token_urlsafe(_PASSWORD_BYTES), readonly=True),
    )


def _create(path: Path, credentials: EmbeddedCredentials) -> None:
    document = {
        "version": _FORMAT_VERSION,
        "writer": {"user": credentials.writer.name, "password": credentials.writer.password},
        "reader": {"user": credentials.reader.name, "password": credentials.reader.password},
    }
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    # O_EXCL: never write into a file someone else prepared (or a symlink they planted).
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(temporary, flags, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), 0o600)  # whatever the umask
            json.dump(document, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        # link(), unlike rename(), fails if the name exists: a process that started at the
        # same moment and won keeps its file, and both then read the same one.
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
        _fsync_directory(path.parent)
    finally:
        temporary.unlink(missing_ok=True)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_private(path: Path, status: os.stat_result) -> None:
    problem = private_file_problem(path, status)
    if problem is not None:
        raise CredentialsError(problem)
