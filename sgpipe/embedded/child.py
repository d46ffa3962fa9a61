"""Child processes of `sgpipe up` (the stages, the embedded broker, its storage, ClickHouse)
and their ports.

Every child runs in its own process group, so that a Ctrl-C in the terminal reaches `sgpipe up`
alone (which then stops its children in order), and asks Linux to signal it when `sgpipe up`
dies, even by SIGKILL (PR_SET_PDEATHSIG), so that no orphan keeps a port or a data directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import structlog

from sgpipe.runtime.settings import ENV_PATH_SEPARATOR, ENV_PREFIX, ConfigError

log = structlog.get_logger(__name__)


class RestartBackoff:
    """How long to wait before restarting a supervised process that died: 0.5 s, doubling up
    to 30 s, and 0.5 s again once it had stayed up for a minute. One policy for every process
    `sgpipe up` restarts: its children (``supervisor._watch``) and the embedded broker's
    (``EmbeddedKafka._supervise``)."""

    INITIAL_SECONDS = 0.5
    MAX_SECONDS = 30.0
    STABLE_SECONDS = 60.0

    def __init__(self) -> None:
        self._next = self.INITIAL_SECONDS

    def next_delay(self, up_seconds: float) -> float:
        """The delay before this restart, for a process that was up for ``up_seconds``."""
        if up_seconds > self.STABLE_SECONDS:
            self._next = self.INITIAL_SECONDS
        delay = self._next
        self._next = min(self._next * 2, self.MAX_SECONDS)
        return delay


# A log file of a child is rotated once (to ``.1``) at start when it grew past this.
LOG_ROTATE_BYTES = 16 * 1_048_576


class PortInUse(ConfigError):
    """A port an embedded service must listen on is taken: a start-up conflict (exit 2)."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on ``host:port`` now. SO_REUSEADDR as servers set it, so
    that connections of an earlier run lingering in TIME_WAIT do not count as a conflict."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def port_in_use(name: str, host: str, port: int) -> str:
    """What to tell about a taken port: for one a setting chose, that setting and its
    variable, as the up-front check (sgpipe.preflight) says it."""
    if "." not in name:  # an internal port sgpipe chose itself
        return f"embedded service port {name} {port} on {host} is in use"
    variable = ENV_PREFIX + name.upper().replace(".", ENV_PATH_SEPARATOR)
    return f"{name} {port} on {host} is in use; set {name} or {variable}"


def require_free_ports(host: str, ports: Mapping[str, int]) -> None:
    """Raise PortInUse naming every port (by its purpose or setting) that is taken."""
    busy = [
        port_in_use(name, host, port)
        for name, port in ports.items()
        if not port_is_free(host, port)
    ]
    if busy:
        raise PortInUse("; ".join(busy))


async def accepts_connections(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class ChildProcess:
    """One executable run as a child: its output appended to ``log_file`` (or, without one,
    to a pipe the parent reads: ``output``), its environment exactly ``env`` (nothing
    inherited: stray AWS_* or broker variables must not reach it)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        log_file: Path | None,
        cwd: Path | None = None,
        death_signal: signal.Signals = signal.SIGTERM,
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.name = name
        self._argv = list(argv)
        self._env = dict(env)
        self._log_file = log_file
        self._cwd = cwd
        self._death_signal = death_signal
        self._pass_fds = tuple(pass_fds)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._process.poll() if self._process else None

    @property
    def output(self) -> IO[bytes]:
        """The read end of the child's stdout and stderr (a child spawned without a log file)."""
        assert self._process is not None and self._process.stdout is not None, "no output pipe"
        return self._process.stdout

    def spawn(self) -> None:
        """Start it. Call from the thread that lives as long as `sgpipe up` (the event loop's):
        Linux sends the death signal when the *thread* that forked the child ends."""
        if self._log_file is None:
            self._process = self._popen(subprocess.PIPE, subprocess.STDOUT)
            widen_pipe(self.output.fileno())
            return
        self._log_file.parent.mkdir(parents=True, exist_ok=True)
        rotate_log(self._log_file)
        with self._log_file.open("ab") as output:
            self._process = self._popen(output, output)

    def _popen(self, stdout: Any, stderr: Any) -> subprocess.Popen[bytes]:
        death_signal = self._death_signal
        return subprocess.Popen(
            self._argv,
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            env=self._env,
            cwd=self._cwd,
            start_new_session=True,
            pass_fds=self._pass_fds,
            preexec_fn=lambda: exit_with_parent(death_signal),
        )

    def send_signal(self, signum: signal.Signals) -> None:
        """Signal the child's process group (nothing if it has exited)."""
        if self._process is not None and self._process.poll() is None:
            signal_group(self._process.pid, signum)

    async def terminate(self, timeout: float) -> None:
        """SIGTERM the child's process group, SIGKILL it after ``timeout`` seconds; returns
        once the child is reaped (so that its ports and files are free)."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            signal_group(process.pid, signal.SIGTERM)
            # A stopped (SIGSTOP) process acts on SIGTERM only once continued (as systemd does).
            signal_group(process.pid, signal.SIGCONT)
            try:
                await asyncio.to_thread(process.wait, timeout)
            except subprocess.TimeoutExpired:
                log.warning("child did not stop in time, killing it", child=self.name)
                signal_group(process.pid, signal.SIGKILL)
                await asyncio.to_thread(process.wait)
        # Whatever else is left in its group (nothing, for the binaries we run).
        signal_group(process.pid, signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests and fault injection)."""
        if self._process is not None and self._process.poll() is None:
            signal_group(self._process.pid, signal.SIGKILL)

    async def wait_exited(self) -> None:
        if self._process is not None:
            await asyncio.to_thread(self._process.wait)


# Bytes a child may write before it blocks while the parent is busy: Linux's default pipe is
# 64 KiB, about 300 log lines; 1 MiB (the unprivileged maximum) rides out a pause of seconds.
PIPE_BYTES = 1_048_576
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ, named there only from Python 3.10 on Linux


def widen_pipe(descriptor: int) -> None:
    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError):  # a lower /proc/sys/fs/pipe-max-size: keep the default
        fcntl.fcntl(descriptor, _F_SETPIPE_SZ, PIPE_BYTES)


class ServedChild:
    """A service run as one ChildProcess that counts as alive only once it serves: the
    accessors the embedded broker and storage share. Subclasses spawn ``_child`` and set
    ``_serving`` once their readiness check passed (and clear it before a respawn)."""

    def __init__(self) -> None:
        self._child: ChildProcess | None = None
        self._serving = False

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child else None

    def alive(self) -> bool:
        """Running and, since its last start, serving."""
        return self._serving and self._child is not None and self._child.running()

    @property
    def returncode(self) -> int | None:
        return self._child.returncode if self._child else None

    def kill(self) -> None:
        """SIGKILL the process, as a crash would (fault injection)."""
        if self._child is not None:
            self._child.kill()

    async def wait_exited(self) -> None:
        if self._child is not None:
            await self._child.wait_exited()


def rotate_log(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size > LOG_ROTATE_BYTES:
            path.replace(path.with_name(path.name + ".1"))


def is_running(pid: int) -> bool:
    """Whether ``pid`` exists and has not exited (a zombie holds no port: it has run). Linux
    (``/proc``); False elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def signal_group(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


def exit_with_parent(death_signal: signal.Signals) -> None:
    """In the child, before exec: ask Linux to send ``death_signal`` when `sgpipe up` dies,
    even by SIGKILL. No-op elsewhere."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, death_signal, 0, 0, 0)
