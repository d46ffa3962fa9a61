"""Children a killed `sgpipe up` left behind on its data dir, ended before a new one starts.

When `sgpipe up` is killed (kill -9, an OOM kill), Linux signals its children through
PR_SET_PDEATHSIG, but they take a moment to go: tansu, sent SIGTERM, holds its port for about
3 s (measured). A restart 0.2 s later would find `embedded.kafka_port` taken and stop with exit
2, "fix your configuration" -- wrong, and fatal under systemd's ``RestartPreventExitStatus=2``.

So before its port checks, `sgpipe up` reads the PIDs the previous run recorded in its state
file (``sgpipe-up.json``: the supervisor, every child, the broker and its storage), keeps those
that are still running *and are ours* -- the process's command line names the data dir, or
its working directory is inside it (tansu's command line names no path, so it runs in
``<data-dir>/broker``), or it is `sgpipe up` on the data dir by its ``--data-dir``, resolved
against its working directory (the fork server, sgpipe.up.forkserver, has the supervisor's
command line; so would a forked child without setproctitle) -- which survives PID reuse,
waits a moment for them to finish dying, then SIGKILLs what is left (every child is
kill-safe: docs/embedded.md) and waits until they are gone. A port held by anything else is
still a configuration problem (exit 2).

Nothing is done while the recorded supervisor itself still runs: that is another `sgpipe up`
on this data dir, which the data-dir lock reports.

Linux only (``/proc``); elsewhere nothing is found and the port check decides, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import time
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

import structlog

from sgpipe.embedded.child import is_running
from sgpipe.up.layout import DEFAULT_DATA_DIR, state_file

log = structlog.get_logger(__name__)

# How long leftovers get to exit by themselves (they were signalled when their parent died),
# then how long a SIGKILL may take to be delivered and reaped by init.
EXIT_WAIT_SECONDS = 5.0
KILL_WAIT_SECONDS = 10.0
_POLL_SECONDS = 0.05


def recorded_pids(state: dict[str, Any]) -> tuple[int | None, list[int]]:
    """The supervisor's PID and every child PID a state file records."""
    children: list[int] = []
    for child in (state.get("children") or {}).values():
        if isinstance(child, dict) and isinstance(child.get("pid"), int):
            children.append(child["pid"])
    broker = state.get("broker")
    if isinstance(broker, dict):
        children.extend(
            pid for key in ("pid", "storage_pid") if isinstance(pid := broker.get(key), int)
        )
    supervisor = state.get("pid")
    return (supervisor if isinstance(supervisor, int) else None), children


def belongs_to(pid: int, data_dir: Path) -> bool:
    """Whether process ``pid`` runs now and is one of ours on ``data_dir``: its command line
    names the data dir, or it works inside it. False for a PID since reused by anything else,
    and for a zombie (it holds no port any more)."""
    proc = Path(f"/proc/{pid}")
    root = str(data_dir.resolve())
    if not is_running(pid):
        return False
    try:
        arguments = command_line(pid)
        cwd = os.readlink(proc / "cwd")
    except OSError:
        return False
    if any(root in argument for argument in arguments):
        return True
    # A fork of `sgpipe up` with its command line (sgpipe.up.forkserver): the data dir may be
    # relative to where it ran (`make up`: --data-dir sgpipe-data), or left out.
    if any(
        os.path.realpath(os.path.join(cwd, named)) == root
        for named in data_dir_arguments(arguments)
    ):
        return True
    return cwd == root or cwd.startswith(root + os.sep)


def data_dir_arguments(arguments: list[str]) -> list[str]:
    """The data dirs an `sgpipe up` command line names (``--data-dir D``, ``--data-dir=D``, or
    an abbreviation argparse takes, ``--data D``; the default without one); none for any other
    command line."""
    after_up = _after_sgpipe_up(arguments)
    if after_up is None:
        return []
    named = []
    for index, argument in enumerate(after_up):
        option, equals, value = argument.partition("=")
        if len(option) >= len("--da") and "--data-dir".startswith(option):
            if equals:
                named.append(value)
            elif index + 1 < len(after_up):
                named.append(after_up[index + 1])
    return named or [str(DEFAULT_DATA_DIR)]


def _after_sgpipe_up(arguments: list[str]) -> list[str] | None:
    """The arguments after ``sgpipe up`` (``python -m sgpipe up``, ``.../bin/sgpipe up``), or
    None when the command line is not `sgpipe up`'s."""
    for index, argument in enumerate(arguments[:-1]):
        if (argument == "sgpipe" or argument.endswith("/sgpipe")) and arguments[index + 1] == "up":
            return arguments[index + 2 :]
    return None


def find_leftovers(data_dir: Path, spared: Collection[int] = ()) -> list[int]:
    """PIDs of our processes a previous, dead `sgpipe up` on ``data_dir`` left running, never
    ours nor ``spared`` (this run's fork server, which has our command line). Empty if there
    is no state file, or its supervisor is still running."""
    try:
        state = json.loads(state_file(data_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(state, dict):
        return []
    supervisor, children = recorded_pids(state)
    if supervisor is not None and supervisor != os.getpid() and _is_sgpipe_up(supervisor):
        # Still running (or its PID went to another `sgpipe up`): its children are no
        # orphans; the data-dir lock and the port check report the conflict.
        return []
    ours = {os.getpid(), *spared}
    return sorted({pid for pid in children if pid not in ours and belongs_to(pid, data_dir)})


def _is_sgpipe_up(pid: int) -> bool:
    """A running `sgpipe up` (``sgpipe up ...`` or ``python -m sgpipe up ...``)."""
    if not is_running(pid):
        return False
    try:
        return _after_sgpipe_up(command_line(pid)) is not None
    except OSError:
        return False


def command_line(pid: int) -> list[str]:
    """Process ``pid``'s arguments. A forked `sgpipe` process (sgpipe.up.forkserver) shows its
    command line as one title, shell-quoted (setproctitle): split as a shell would."""
    words = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    arguments = [word.decode(errors="replace") for word in words]
    if len(arguments) == 1:
        with contextlib.suppress(ValueError):
            return shlex.split(arguments[0])
    return arguments


async def end_leftovers(data_dir: Path, spared: Collection[int] = ()) -> list[int]:
    """End what a killed `sgpipe up` left running on ``data_dir`` (see the module docstring);
    returns their PIDs. Raises nothing: whatever still holds a port after this is reported by
    the port check."""
    leftovers = find_leftovers(data_dir, spared)
    if not leftovers:
        return []
    log.warning(
        "processes of a previous sgpipe up on this data dir are still running; ending them",
        pids=leftovers,
    )
    remaining = await _wait_gone(leftovers, data_dir, EXIT_WAIT_SECONDS)
    if remaining:
        for pid in remaining:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        remaining = await _wait_gone(remaining, data_dir, KILL_WAIT_SECONDS)
    if remaining:
        log.error("leftover processes did not exit", pids=remaining)
    else:
        log.info("leftover processes exited", pids=leftovers)
    return leftovers


async def _wait_gone(pids: Iterable[int], data_dir: Path, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        remaining = [pid for pid in pids if belongs_to(pid, data_dir)]
        if not remaining or time.monotonic() >= deadline:
            return remaining
        await asyncio.sleep(_POLL_SECONDS)
