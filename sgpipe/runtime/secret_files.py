"""Whether a secrets file may be trusted: the one check of ownership and mode that every secret
sgpipe reads from a file goes through (the embedded ClickHouse credentials, the raw-record key,
the OAuth token endpoint's signing keys), so that their refusals read the same.

Here, below the stages, because the ingress reads its signing keys itself."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def private_file_problem(
    path: Path, status: os.stat_result, *, kubernetes_secret: bool = False
) -> str | None:
    """Why the secrets file at ``path`` (``status`` from the open descriptor) may not be
    trusted: not a regular file, someone else's, or readable by others. None: it may.

    ``kubernetes_secret`` also trusts a file as a Kubernetes Secret volume shows it to a
    non-root pod with an ``fsGroup``: owned by root, its group one of this process's, readable
    by that group and nobody else (the kubelet adds group read to the volume's ``defaultMode``;
    root can read anything anyway). Only for files an operator mounts, never for those sgpipe
    writes; a process running as root gets the plain rule (its files are its own)."""
    if not stat.S_ISREG(status.st_mode):
        return f"{path} is not a regular file"
    if kubernetes_secret and _mounted_secret(status):
        return None
    if status.st_uid != os.geteuid():
        return f"{path} is owned by another user (uid {status.st_uid})"
    if status.st_mode & 0o077:
        return (
            f"{path} is accessible by other users (mode {stat.S_IMODE(status.st_mode):o}); "
            f"run `chmod 600 {path}`"
        )
    return None


def _mounted_secret(status: os.stat_result) -> bool:
    own_groups = {os.getegid(), *os.getgroups()}
    group_read_only = not status.st_mode & 0o037  # no group write or execute, nothing for others
    return (
        os.geteuid() != 0 and status.st_uid == 0 and status.st_gid in own_groups and group_read_only
    )
