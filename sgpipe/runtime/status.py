"""What a child of `sgpipe up` tells its supervisor: where it listens and that it is ready.

A supervised child (``sgpipe ingest|process|sink|serve-clickhouse --status-fd N``) writes one
JSON object per line to the inherited file descriptor ``N``, the write end of a pipe only its
supervisor reads::

    {"sgpipe_status": "listening", "service": "health", "port": 41233}
    {"sgpipe_status": "listening", "service": "ingress", "port": 8080}
    {"sgpipe_status": "listening", "service": "clickhouse", "port": 8123, "url": "http://..."}
    {"sgpipe_status": "consuming", "topic": "sendgrid.raw"}

Why a pipe of its own, not the log: a log line is written for people, and its wording (or its
level, or a logging setting) may change without anyone thinking of the supervisor, which then
would wait for a readiness that never comes. These messages are the contract: they are
written by ``report`` below, read by ``parse_status`` below, and nothing else. Why not a file
in ``<data-dir>/run/`` or a control socket: a pipe needs no polling and no cleanup, closes by
itself when the child dies (a stale "ready" cannot outlive the process that wrote it), and a
stage run by hand (Kubernetes, a test) simply has no ``--status-fd``: ``report`` does nothing.

The channel is opened once, by the command's entrypoint (as logging is configured once); the
places that learn a fact report it where they learn it: the health server where it binds
(``sgpipe.runtime.health.serve_health``), the ingress where it listens, the stage runner's
``ready`` event, the embedded ClickHouse where it serves.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import IO, Any, Literal, get_args

StatusKind = Literal["listening", "consuming"]
Service = Literal["health", "ingress", "clickhouse"]

# The key that marks a status line (and names its kind).
STATUS_KEY = "sgpipe_status"

_KINDS: dict[str, StatusKind] = {kind: kind for kind in get_args(StatusKind)}
_SERVICES: dict[str, Service] = {service: service for service in get_args(Service)}

_channel: IO[str] | None = None


def open_status_channel(fd: int | None) -> None:
    """Report to ``fd`` from now on (None: report nothing, a stage run by hand)."""
    global _channel
    if _channel is not None:
        _channel.close()
        _channel = None
    if fd is not None:
        os.set_inheritable(fd, False)  # ours alone: not passed on to what we may spawn
        _channel = os.fdopen(fd, "w", encoding="utf-8", buffering=1)


def report(kind: StatusKind, **fields: str | int) -> None:
    """Tell the supervisor ``kind`` with ``fields``; nothing without a channel. A supervisor
    that is gone (a broken pipe) is not this process's problem: it dies with it anyway."""
    if _channel is None:
        return
    with contextlib.suppress(BrokenPipeError, ValueError):
        _channel.write(json.dumps({STATUS_KEY: kind, **fields}) + "\n")


def report_listening(service: Service, port: int, **fields: str) -> None:
    report("listening", service=service, port=port, **fields)


@dataclass(frozen=True, slots=True)
class StatusMessage:
    """One line a child reported: its ``kind``, and for ``listening`` the service and where."""

    kind: StatusKind
    service: Service | None = None
    port: int | None = None
    url: str | None = None


def parse_status(line: bytes) -> StatusMessage | None:
    """The status message on ``line``, None for anything else (a child cannot make its
    supervisor fail: an unknown or malformed line is ignored)."""
    try:
        document: Any = json.loads(line)
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    kind = _KINDS.get(str(document.get(STATUS_KEY)))
    if kind is None:
        return None
    service = document.get("service")
    port = document.get("port")
    url = document.get("url")
    return StatusMessage(
        kind=kind,
        service=_SERVICES.get(str(service)),
        port=port if isinstance(port, int) and not isinstance(port, bool) else None,
        url=url if isinstance(url, str) else None,
    )
