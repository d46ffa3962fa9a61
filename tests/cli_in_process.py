"""Running the `sgpipe` command in the test process, through the entry point a shell runs
(``sgpipe.cli.main``), for the cases a subprocess adds nothing to: refusals to start (exit 2 and
one line) that come before any service, child or connection exists.

What a test sees is what a process would show: the exit code ``main`` returns (the one
``sys.exit`` passes on), stdout, and stderr -- logging writes to whatever ``sys.stderr`` is at
each write (sgpipe/runtime/logs.py), so redirecting it catches every line. The environment is
the test process's without its SGPIPE_* variables, plus the ones given, as a spawned process
would get it (the test's monkeypatch restores it), and the umask (`sgpipe up` sets 077) and
logging are restored after the run. The command's logging configuration caches no logger: a
logger cached during the run would keep its configuration for every later test of the worker
(`structlog.testing.capture_logs` would no longer see it).

A refusal that went missing must not start a pipeline inside the test process: tripwires stand
where a command would start running (a stage's run function, `sgpipe up` taking the data dir's
lock), and a run that reaches one fails the test naming it, with what the command printed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog

from sgpipe import preflight
from sgpipe.cli import main
from sgpipe.runtime import logs


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str


class _WentPastTheChecks(Exception):
    """Raised by a tripwire: the command started instead of refusing."""


def run_sgpipe_in_process(
    monkeypatch: pytest.MonkeyPatch, *argv: str, env: Mapping[str, str] | None = None
) -> CliResult:
    """``sgpipe <argv>`` in this process with SGPIPE_* variables ``env`` (and no others)."""
    for name in [name for name in os.environ if name.startswith("SGPIPE_")]:
        monkeypatch.delenv(name)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    reached: list[str] = []
    _set_tripwires(monkeypatch, reached)
    # Text streams over bytes, as a process's: a command may write to ``sys.stdout.buffer``.
    stdout, stderr = _output_stream(), _output_stream()
    umask = os.umask(0o022)
    os.umask(umask)
    saved_structlog = structlog.get_config()
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    configure = logs.configure_logging

    def configure_uncached(*args: Any, **kwargs: Any) -> None:
        configure(*args, **kwargs)
        structlog.configure(cache_logger_on_first_use=False)

    monkeypatch.setattr(logs, "configure_logging", configure_uncached)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = main(list(argv))
            except SystemExit as exit:  # argparse: a usage error (2), --help, --version (0)
                code = exit.code if isinstance(exit.code, int) else 1
    finally:
        os.umask(umask)
        # The test process's logging as it was (the redirected streams are gone after this).
        structlog.configure(**saved_structlog)
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_level)
    result = CliResult(code, _written(stdout), _written(stderr))
    if reached:
        raise AssertionError(
            f"sgpipe {' '.join(argv)} went past its start checks ({reached[0]}) instead of "
            f"refusing; exit {code}, stderr:\n{result.stderr}"
        )
    return result


def _output_stream() -> io.TextIOWrapper:
    return io.TextIOWrapper(io.BytesIO(), encoding="utf-8", newline="", write_through=True)


def _written(stream: io.TextIOWrapper) -> str:
    stream.flush()
    buffer = stream.buffer
    assert isinstance(buffer, io.BytesIO)
    return buffer.getvalue().decode("utf-8")


def _set_tripwires(monkeypatch: pytest.MonkeyPatch, reached: list[str]) -> None:
    """Until the test ends (monkeypatch undoes them), each records itself in ``reached``."""

    def tripwire(what: str) -> Callable[..., Any]:
        def reached_it(*args: Any, **kwargs: Any) -> Any:
            reached.append(what)
            raise _WentPastTheChecks(what)

        return reached_it

    # The stages' run functions, imported by the CLI when a command runs.
    monkeypatch.setattr("ingest.server.run_ingress", tripwire("the ingress started"))
    monkeypatch.setattr("processors.stage.run_processor", tripwire("the processor started"))
    monkeypatch.setattr("sinks.stage.run_sink", tripwire("the sink started"))

    # Never in a test process: a fork of it would run the test runner's code on (only the
    # `sgpipe` program forks itself for `sgpipe up`'s children, sgpipe.up.forkserver).
    monkeypatch.setattr("sgpipe.up.forkserver.start", tripwire("sgpipe up forked this process"))

    # `sgpipe up` locks its data dir once every check has passed, right before it starts
    # anything; a lock refused (held by another process) is still a refusal.
    def lock_data_dir(data_dir: Path, command: str) -> Any:
        lock = preflight.lock_data_dir(data_dir, command)
        lock.release()
        reached.append("sgpipe up took the data dir's lock")
        raise _WentPastTheChecks("sgpipe up took the data dir's lock")

    monkeypatch.setattr("sgpipe.up.supervisor.lock_data_dir", lock_data_dir)
