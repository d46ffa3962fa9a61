"""One log stream out of many processes: the children's lines on `sgpipe up`'s stderr.

Every child of `sgpipe up` logs JSON lines to a pipe (``logging.format: json``, whatever the
user chose); the supervisor reads them as they come and

* writes each to ``<data-dir>/logs/<child>.log`` (rotated to ``.1`` past 16 MiB),
* passes it on to its own stderr: as it came in JSON mode (so that every line of the stream
  parses, and keeps its ``stage``: one is added to lines that have none), rendered like the
  supervisor's own lines in console mode,
* and returns it parsed, for the supervisor to watch (ports, readiness, stop reports, errors).

A line that is not JSON (a library writing to stderr directly) becomes a JSON event with the
text as its ``event``. Lines are capped at ``MAX_LINE_BYTES``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import msgspec
import structlog

from sgpipe.embedded.child import LOG_ROTATE_BYTES

MAX_LINE_BYTES = 65_536
# The file of the supervisor's own lines, beside its children's.
OWN_LOG = "up"

_decode = msgspec.json.Decoder().decode


class RotatingLog:
    """Append-only lines to ``path``; moved to ``path.1`` (replacing it) once past the limit."""

    def __init__(self, path: Path, limit: int = LOG_ROTATE_BYTES) -> None:
        self._path = path
        self._limit = limit
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: BinaryIO = path.open("ab")
        self._size = self._file.tell()

    def write(self, line: bytes) -> None:
        if self._size + len(line) > self._limit and self._size:
            self._file.close()
            self._path.replace(self._path.with_name(self._path.name + ".1"))
            self._file = self._path.open("ab")
            self._size = 0
        self._file.write(line)
        self._file.flush()
        self._size += len(line)

    def close(self) -> None:
        self._file.close()


class LogStream:
    """Where the children's lines go; see the module docstring."""

    def __init__(self, log_dir: Path, stream: TextIO, *, json_output: bool) -> None:
        self._log_dir = log_dir
        self._stream = stream
        self._json = json_output
        self._files: dict[str, RotatingLog] = {}
        self._console = structlog.dev.ConsoleRenderer(colors=stream.isatty())

    @property
    def json_output(self) -> bool:
        return self._json

    def forward(self, child: str, stage: str, raw: bytes) -> dict[str, Any]:
        """Pass one line of ``child`` on (see the module docstring); returns it parsed.
        ``stage`` is added to a line that has none."""
        line = raw[:MAX_LINE_BYTES].rstrip(b"\r\n")
        entry = _parse(line)
        if entry is None:
            text = line.decode("utf-8", "replace").strip()
            entry = {"event": text, "level": "info", "logger": f"{child}.output", "stage": stage}
            line = json.dumps(entry).encode()
        elif "stage" not in entry:
            entry["stage"] = stage
            # Prepended rather than re-serialized: the line stays as the child wrote it.
            rest = line[1:].lstrip()
            separator = b"" if rest.startswith(b"}") else b", "
            line = b'{"stage": ' + json.dumps(stage).encode() + separator + rest
        self._file(child).write(line + b"\n")
        try:
            if self._json:
                self._stream.write(line.decode("utf-8", "replace") + "\n")
            else:
                level = str(entry.get("level", "info"))
                self._stream.write(str(self._console(None, level, dict(entry))) + "\n")
            self._stream.flush()
        except (OSError, ValueError):  # stderr gone (a closed terminal): the files still have it
            pass
        return entry

    def record_own(self, entry: dict[str, Any]) -> None:
        """Keep one of the supervisor's own events in ``<data-dir>/logs/up.log`` (the stream
        already has it), as a JSON line like the children's."""
        entry.setdefault("stage", "up")
        line = json.dumps(entry, default=str).encode()[:MAX_LINE_BYTES]
        self._file(OWN_LOG).write(line + b"\n")

    def close(self) -> None:
        for log in self._files.values():
            log.close()
        self._files.clear()

    def _file(self, child: str) -> RotatingLog:
        log = self._files.get(child)
        if log is None:
            log = self._files[child] = RotatingLog(self._log_dir / f"{child}.log")
        return log


def _parse(line: bytes) -> dict[str, Any] | None:
    if not line.startswith(b"{"):
        return None
    try:
        entry = _decode(line)
    except msgspec.DecodeError:
        return None
    return entry if isinstance(entry, dict) else None
