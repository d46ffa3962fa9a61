"""A child process of `sgpipe up` that the supervisor watches: its output, its lines, its end.

Each child is an ``sgpipe`` command (``ingest``, ``process``, ``sink``, ``serve-clickhouse``),
forked by the fork server (``sgpipe.up.forkserver``) or, without one, run as a
``ChildProcess``: either way its own process group (a Ctrl-C in the terminal reaches the
supervisor only, which then stops the children in order) and ``PR_SET_PDEATHSIG`` (SIGKILL by
default: if the supervisor is killed, its children die with it at once, as one process would
have, and no orphan keeps a port or joins the next run's consumer groups).

Its stdout and stderr are one pipe, read on the supervisor's event loop as the lines come
(``LogStream`` passes them on): for people, plus the last error it logged before it exited and
its ``stop report``. What the supervisor acts on -- the ports it bound and that it is ready --
comes on a second pipe, the child's ``--status-fd`` (``sgpipe.runtime.status``): a structured
message, never a log line's wording. A child is ready when a message meets its
``ReadyCondition``; every incarnation starts unready with a fresh pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from sgpipe.embedded.child import ChildProcess
from sgpipe.runtime.status import Service, StatusKind, StatusMessage, parse_status
from sgpipe.up.forkserver import CannotFork, ForkedProcess, ForkServer, can_fork
from sgpipe.up.logstream import MAX_LINE_BYTES, LogStream

log = structlog.get_logger(__name__)

Entry = dict[str, Any]

# The stage children serve their health endpoints on loopback only (configs.CHILD_HEALTH_HOST).
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class ReadyCondition:
    """The status message that makes a child ready: ``kind`` (and ``service``, if set)."""

    kind: StatusKind
    service: Service | None = None

    def met_by(self, message: StatusMessage) -> bool:
        return message.kind == self.kind and (
            self.service is None or message.service == self.service
        )


class ChildExited(Exception):
    """The child exited while something waited for one of its lines."""

    def __init__(self, child: str, code: int | None, last_error: str | None) -> None:
        detail = f": {last_error}" if last_error else ""
        super().__init__(f"{child} exited with status {code}{detail}")
        self.child = child
        self.code = code
        self.last_error = last_error


class _Lines(asyncio.Protocol):
    """Splits the pipe's bytes into lines (capped), hands each to ``on_line``."""

    def __init__(self, on_line: Callable[[bytes], None], on_closed: Callable[[], None]) -> None:
        self._on_line = on_line
        self._on_closed = on_closed
        self._buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if b"\n" in data:
            *lines, rest = self._buffer.split(b"\n")
            self._buffer = bytearray(rest)
            for line in lines:
                self._on_line(bytes(line))
        if len(self._buffer) > MAX_LINE_BYTES:  # a runaway line: pass on what fits
            self._on_line(bytes(self._buffer))
            self._buffer.clear()

    def eof_received(self) -> bool:
        if self._buffer:
            self._on_line(bytes(self._buffer))
            self._buffer.clear()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_closed()


class SupervisedChild:
    """One child of `sgpipe up`: spawned, read, waited for, stopped; see the module docstring.

    ``argv`` is called at every (re)start, so that a restart can run with new arguments.
    """

    def __init__(
        self,
        name: str,
        stage: str,
        argv: Callable[[], Sequence[str]],
        *,
        env: Mapping[str, str],
        stream: LogStream,
        ready: ReadyCondition,
        pass_fds: Sequence[int] = (),
        fork_server: ForkServer | None = None,
    ) -> None:
        self.name = name
        self.stage = stage
        self.ready = ready
        self._argv = argv
        self._env = dict(env)
        self._stream = stream
        self._pass_fds = tuple(pass_fds)
        self._fork_server = fork_server
        self._process: ChildProcess | ForkedProcess | None = None
        self._exited = asyncio.Event()
        self._waiters: list[tuple[Callable[[Entry], bool], asyncio.Future[Entry]]] = []
        self._reaper: asyncio.Task[None] | None = None
        self.restarts = 0
        self.started_at = 0.0
        # Set by whoever asks it to stop: its exit is then expected, not a crash.
        self.stop_requested = False
        self.exit_code: int | None = None
        self.last_error: str | None = None
        self.stop_report: Entry | None = None
        # What it reported on its status pipe: the port it listens on, a URL. Kept across
        # restarts until the new incarnation reports (a restarted ClickHouse keeps its URL).
        self.port: int | None = None
        self.url: str | None = None
        # Called with every line it writes, parsed (before waiters are woken).
        self.on_entry: Callable[[Entry], None] | None = None
        # A status message met ``ready``: in this incarnation; in any incarnation.
        self.ready_now = False
        self.ever_ready = asyncio.Event()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and not self._exited.is_set()

    async def start(self) -> None:
        """Spawn it (again) and start reading its output. Call on the event loop's thread
        (the death signal is tied to the thread that forks)."""
        self._exited = asyncio.Event()
        self.exit_code = None
        self.last_error = None
        self.stop_report = None
        self.url = None
        self.ready_now = False
        self.stop_requested = False
        status_read, status_write = os.pipe()
        try:
            self._process = await self._spawn(
                [*self._argv(), "--status-fd", str(status_write)], (*self._pass_fds, status_write)
            )
        except BaseException:
            os.close(status_read)
            raise
        finally:
            # Only the child holds the write end: the pipe ends when the child does.
            os.close(status_write)
        self.started_at = time.monotonic()
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(
            lambda: _Lines(self._on_status, lambda: None), os.fdopen(status_read, "rb")
        )
        await loop.connect_read_pipe(
            lambda: _Lines(self._on_line, self._on_closed), self._process.output
        )

    async def _spawn(
        self, argv: Sequence[str], pass_fds: Sequence[int]
    ) -> ChildProcess | ForkedProcess:
        """Forked by the fork server when there is one, else exec'd (sgpipe.up.forkserver)."""
        server = self._fork_server
        if server is not None and not server.lost and can_fork(argv):
            with contextlib.suppress(CannotFork):
                return await server.spawn(self.name, argv, self._env, pass_fds)
        process = ChildProcess(
            self.name,
            argv,
            env=self._env,
            log_file=None,
            death_signal=signal.SIGKILL,
            pass_fds=pass_fds,
        )
        process.spawn()
        return process

    def wait_for(self, event: str, **fields: Any) -> asyncio.Future[Entry]:
        """The child's next line whose ``event`` (and ``fields``) match; fails with
        ChildExited if the child exits first."""
        future: asyncio.Future[Entry] = asyncio.get_running_loop().create_future()
        if self._exited.is_set():
            future.set_exception(ChildExited(self.name, self.exit_code, self.last_error))
            return future

        def matches(entry: Entry) -> bool:
            return entry.get("event") == event and all(
                entry.get(key) == value for key, value in fields.items()
            )

        self._waiters.append((matches, future))
        return future

    async def wait_exited(self) -> int | None:
        await self._exited.wait()
        return self.exit_code

    def send(self, *signals: signal.Signals) -> None:
        """Signal its process group, each signal in turn (two distinct signals are two
        deliveries: the child's second-signal path, "stop at once")."""
        if self._process is not None and self.running:
            for signum in signals:
                self._process.send_signal(signum)

    async def stop(
        self, grace: float, signals: Sequence[signal.Signals] = (signal.SIGTERM,)
    ) -> int | None:
        """Ask it to stop with ``signals``; SIGKILL after ``grace`` seconds. Returns its exit
        status (negative: the signal that ended it), once it is reaped."""
        self.stop_requested = True
        if not self.running:
            return self.exit_code
        log.info("stopping child", child=self.name, signals=[s.name for s in signals], grace=grace)
        # SIGCONT: a stopped (SIGSTOP) child acts on its signals only once continued.
        self.send(*signals, signal.SIGCONT)
        try:
            await asyncio.wait_for(self._exited.wait(), grace)
        except TimeoutError:
            log.warning("child did not stop in time, killing it", child=self.name, grace=grace)
            self.kill()
            await self._exited.wait()
        return self.exit_code

    def kill(self) -> None:
        if self._process is not None:
            self._process.kill()

    def _on_line(self, raw: bytes) -> None:
        entry = self._stream.forward(self.name, self.stage, raw)
        if entry.get("level") in ("error", "critical"):
            self.last_error = str(entry.get("error") or entry.get("event"))
        if entry.get("event") == "stop report":
            self.stop_report = entry
        if self.on_entry is not None:
            self.on_entry(entry)
        if self._waiters:
            waiting = []
            for matches, future in self._waiters:
                if future.done():
                    continue
                if matches(entry):
                    future.set_result(entry)
                else:
                    waiting.append((matches, future))
            self._waiters = waiting

    def _on_status(self, raw: bytes) -> None:
        message = parse_status(raw)
        if message is None:
            return
        if message.kind == "listening" and message.port is not None:
            self.port = message.port
            self.url = message.url or f"http://{LOOPBACK}:{message.port}"
        if self.ready.met_by(message):
            self.ready_now = True
            self.ever_ready.set()

    def _on_closed(self) -> None:
        # The pipe closes when the child exits (nothing else holds its write end).
        self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        process = self._process
        assert process is not None
        delay = 0.005
        while process.returncode is None:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)
        self.exit_code = process.returncode
        self._exited.set()
        waiters, self._waiters = self._waiters, []
        for _, future in waiters:
            if not future.done():
                future.set_exception(ChildExited(self.name, self.exit_code, self.last_error))
                # Retrieved here, so that an abandoned waiter does not log "never retrieved".
                future.exception()
