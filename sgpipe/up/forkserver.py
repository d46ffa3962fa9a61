"""`sgpipe up`'s Python children, forked from a copy of the supervisor made before it started.

Why: a child started as ``python -m sgpipe <command>`` spends 0.5-0.8 s of CPU importing
aiohttp, aiokafka, pydantic, clickhouse-connect and our stages before it does anything, and
`sgpipe up` starts three or more of them, again at every restart. The supervisor has imported
nearly all of it already (measured: 0.05 s more covers ingest, process and sink). So, before
`sgpipe up` has an event loop or a thread, it forks a *fork server*; each child is then a fork
of that server: its imports are done, its memory shared until written.

Why written here (small): the standard library's ``multiprocessing`` forkserver runs a
function, not a command line; it leaves its server in the caller's process group, without a
death signal, where a Ctrl-C or a SIGTERM meant for the supervisor kills it (and with it every
child, before the supervisor could stop them in order); and its children end with
``os._exit``, skipping the interpreter's shutdown. What is needed is ``fork``, ``waitpid`` and
``socket.send_fds``, and the bookkeeping below.

The protocol, on a SOCK_SEQPACKET socket pair (one message per datagram, descriptors riding
along): the supervisor sends ``{"name": ..., "argv": [...], "env": {...}, "fds": [...]}``, and
optionally ``"cwd"``, with one descriptor per number in ``fds``: each is placed at that number
(the output at 1 and 2, ``--status-fd`` and the like at theirs; 0 is /dev/null unless given);
the server forks and answers ``{"spawned": pid}``; when a child exits it sends
``{"exited": pid, "code": returncode}`` (negative: the signal).

The tests start their own `sgpipe` processes from such a server too (``serve``, run by
tests/forked.py in a process of its own), for the same CPU.

What a forked child gets, as an exec'd one did: its own session (a Ctrl-C in the terminal
reaches the supervisor only), SIGKILL when its parent dies (the server; the server gets SIGKILL
when the supervisor dies), exactly the environment it was given, stdin from /dev/null, no
descriptor it was not given, default signal handlers, unbuffered stdout and stderr, and the
command line it would have had exec'd (``ps``, ``pkill -f``: setproctitle) and the name it
has in `sgpipe up` (``ps -o comm``: ``ingest``, ``sink-2``; the server is ``sgpipe-up-forks``,
with the supervisor's command line).
Then it runs ``sgpipe.cli.main`` and exits as any ``sgpipe`` command does.

Where no server runs (``run_up`` called in-process, or the server died: its children die with
it and are restarted), children are exec'd as before (``sgpipe.embedded.child.ChildProcess``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import gc
import io
import json
import os
import select
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

import structlog

from sgpipe.embedded.child import exit_with_parent, is_running, signal_group, widen_pipe

log = structlog.get_logger(__name__)

# The start of every command line the server can run: ``python -m sgpipe <command> ...``.
COMMAND_PREFIX = (sys.executable, "-m", "sgpipe")
# Imported before the server is forked, so that every child has them: what the stage children
# import that the supervisor does not (not chdb: it starts threads at import, and a fork keeps
# only the thread that forked).
PRELOAD = ("ingest.server", "processors.stage", "sinks.stage")
# Process names (``/proc/<pid>/comm``, 15 bytes at most): the server's; a child's is its name
# in `sgpipe up` (``ingest``, ``process-2``: as in the state file, the logs and `sgpipe top`).
SERVER_NAME = "sgpipe-up-forks"
MAX_MESSAGE_BYTES = 1 << 20
MAX_FDS = 16
_PR_SET_NAME = 15


@dataclass(frozen=True, slots=True)
class ForkedChild:
    """Returned by ``start`` in a forked child: the ``sgpipe`` arguments it is to run."""

    argv: list[str]


def can_fork(argv: Sequence[str]) -> bool:
    return tuple(argv[: len(COMMAND_PREFIX)]) == COMMAND_PREFIX


def start(preload: Sequence[str] = PRELOAD) -> ForkServer | ForkedChild | None:
    """Fork the server. Call before any event loop or thread exists. In the caller: the
    ``ForkServer`` (None where fork is not available or not safe: another thread runs, as
    when `sgpipe up` is called in-process by a test runner); in a child the server forked
    later: the ``ForkedChild`` to run."""
    if sys.platform != "linux" or threading.active_count() > 1:
        return None
    for module in preload:
        __import__(module)
    if threading.active_count() > 1:  # an import started one
        return None
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    supervisor = os.getpid()
    # Nothing buffered may be written twice (by a child at its exit, and by us).
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        theirs.close()
        return ForkServer(ours, pid)
    ours.close()
    return serve(theirs, supervisor)


def serve(channel: socket.socket, supervisor: int) -> ForkedChild:
    """The server's loop, for ``supervisor`` (the process at the channel's other end: the
    server dies with it); returns only in a child it forked (the server itself exits)."""
    exit_with_parent(signal.SIGKILL)
    if os.getppid() != supervisor:  # the supervisor died before the death signal was set
        os._exit(1)
    # Every object so far out of the collector's sight (as the gc module's documentation
    # advises before forks): a child's collections, and its last one at exit, no longer walk
    # (and so copy) the pages of all it imported -- measured: 0.185 -> 0.041 s of CPU to exit.
    gc.freeze()
    os.setsid()
    _set_process_name(SERVER_NAME)
    # Signals meant for the supervisor (a terminal's Ctrl-C, a SIGTERM to the whole group)
    # are its to act on: the server goes when it does (death signal, or the channel's end).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    devnull = os.open(os.devnull, os.O_RDWR)
    for standard in (0, 1, 2):
        os.dup2(devnull, standard)
    os.close(devnull)
    _close_all_but({0, 1, 2, channel.fileno()})  # what the supervisor had open is not ours
    server = os.getpid()  # a child's parent, checked once its death signal is set
    wakeup_read, wakeup_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.set_wakeup_fd(wakeup_write)
    while True:
        readable, _, _ = select.select([channel.fileno(), wakeup_read], [], [])
        if wakeup_read in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(wakeup_read, 4096)
            _report_exits(channel)
        if channel.fileno() in readable:
            try:
                message, fds, _, _ = socket.recv_fds(channel, MAX_MESSAGE_BYTES, MAX_FDS)
            except OSError:
                os._exit(0)
            if not message:  # the supervisor is gone
                os._exit(0)
            # Closed by the child once it has its own session and signal handlers: "spawned"
            # is sent only then, so that a signal to its process group from then on reaches it.
            settled_read, settled_write = os.pipe2(os.O_CLOEXEC)
            try:
                pid = os.fork()
            except OSError as exc:  # EAGAIN, ENOMEM: this child cannot be forked, others can
                for descriptor in (*fds, settled_read, settled_write):
                    os.close(descriptor)
                _send(channel, {"failed": str(exc)})
                continue
            if pid == 0:
                os.close(settled_read)
                request = json.loads(message)
                return _become_child(request, fds, channel, settled_write, server)
            for descriptor in (*fds, settled_write):
                os.close(descriptor)
            os.read(settled_read, 1)  # the end of the pipe: settled, or dead
            os.close(settled_read)
            _send(channel, {"spawned": pid})


def _report_exits(channel: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send(channel, {"exited": pid, "code": os.waitstatus_to_exitcode(status)})


def _send(channel: socket.socket, message: Mapping[str, Any]) -> None:
    try:
        channel.send(json.dumps(message).encode())
    except OSError:
        os._exit(0)  # the supervisor is gone


def _become_child(
    request: Mapping[str, Any],
    fds: Sequence[int],
    channel: socket.socket,
    settled: int,
    server: int,
) -> ForkedChild:
    """In the forked child: what an exec'd child had (see the module docstring)."""
    exit_with_parent(signal.SIGKILL)
    if os.getppid() != server:  # the server died before the death signal was set
        os._exit(1)
    os.setsid()
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGCHLD, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.close(settled)
    channel.detach()  # closed below with the server's wakeup pipe and all it was not given
    targets: list[int] = list(request["fds"])
    _place_descriptors(list(fds), targets)
    if request.get("cwd") is not None:
        os.chdir(request["cwd"])
    argv: list[str] = list(request["argv"])
    # Before the environment is replaced: setproctitle takes over the memory of the process's
    # arguments and environment, which it finds through the environment as the process began.
    _set_command_line(argv)
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = argv
    # As PYTHONUNBUFFERED would have made them: every line reaches the supervisor at once.
    sys.stdout = _unbuffered(1)
    sys.stderr = _unbuffered(2)
    sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115 (fd 0, kept open)
    _set_process_name(request["name"])  # after setproctitle, which sets the name too
    return ForkedChild(argv[len(COMMAND_PREFIX) :])


def _place_descriptors(received: list[int], targets: list[int]) -> None:
    """Each received descriptor on its target number, /dev/null on 0 unless one was given;
    every other descriptor closed. Received ones are first moved above every target, so that
    none is overwritten before it is placed."""
    above = max([2, *targets]) + 1
    moved = [fcntl.fcntl(descriptor, fcntl.F_DUPFD_CLOEXEC, above) for descriptor in received]
    if 0 not in targets:
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
    for target, descriptor in zip(targets, moved, strict=True):
        os.dup2(descriptor, target)  # dup2 leaves the target inheritable, as pass_fds does
    _close_all_but({0, 1, 2, *targets})


def _close_all_but(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        descriptor = int(name)
        if descriptor not in keep:
            with contextlib.suppress(OSError):
                os.close(descriptor)


def _unbuffered(descriptor: int) -> io.TextIOWrapper:
    raw = io.FileIO(descriptor, "w", closefd=False)
    return io.TextIOWrapper(
        raw, encoding="utf-8", errors="backslashreplace", line_buffering=True, write_through=True
    )


def _set_command_line(argv: Sequence[str]) -> None:
    """The command line ``ps``, ``pgrep -f``/``pkill -f`` and leftovers (it names the data
    dir) read: the one the child would have had exec'd, not the supervisor's. setproctitle
    rewrites the process's argument area; it comes with the ``embedded`` extra, which
    `sgpipe up` needs anyway (without it the supervisor's line stays)."""
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.setproctitle(shlex.join(argv))  # one title: leftovers split it back


def _set_process_name(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


class ForkServer:
    """The supervisor's end of the server: ``spawn`` a command, learn when it exits."""

    def __init__(self, channel: socket.socket, pid: int) -> None:
        self._channel = channel
        self.pid = pid
        # One entry per request sent, answered in order: (name, output's read end, future).
        self._spawning: list[tuple[str, int, asyncio.Future[ForkedProcess]]] = []
        self._children: dict[int, ForkedProcess] = {}
        self._attached = False
        self.lost = False

    def _attach(self) -> None:
        if not self._attached:
            self._channel.setblocking(False)
            asyncio.get_running_loop().add_reader(self._channel, self._on_message)
            self._attached = True

    async def spawn(
        self, name: str, argv: Sequence[str], env: Mapping[str, str], pass_fds: Sequence[int]
    ) -> ForkedProcess:
        """Fork ``argv`` (``can_fork``) with output on a new pipe and ``pass_fds`` at their
        numbers. Raises CannotFork when this child cannot be forked (ForkServerLost: nor any
        other); then exec it instead."""
        if self.lost:
            raise ForkServerLost("the fork server is gone")
        self._attach()
        output_read, output_write = os.pipe2(os.O_CLOEXEC)
        widen_pipe(output_read)
        request = {"name": name, "argv": list(argv), "env": dict(env), "fds": [1, 2, *pass_fds]}
        spawned: asyncio.Future[ForkedProcess] = asyncio.get_running_loop().create_future()
        try:
            message = json.dumps(request).encode()
            socket.send_fds(self._channel, [message], [output_write, output_write, *pass_fds])
        except (BrokenPipeError, ConnectionError, OSError) as exc:
            os.close(output_read)
            if isinstance(exc, BrokenPipeError | ConnectionError) or exc.errno == errno.EBADF:
                self._lose()
                raise ForkServerLost(f"the fork server is gone: {exc}") from exc
            raise CannotFork(f"could not ask the fork server: {exc}") from exc
        finally:
            os.close(output_write)
        # From here the entry owns the read end: handed over with the process, or closed
        # (a cancelled spawn's child is killed when its answer comes; a lost server's die).
        self._spawning.append((name, output_read, spawned))
        return await spawned

    def _on_message(self) -> None:
        while True:
            try:
                message = self._channel.recv(MAX_MESSAGE_BYTES)
            except BlockingIOError:
                return
            except OSError:
                message = b""
            if not message:
                self._lose()
                return
            report = json.loads(message)
            if "exited" in report:
                child = self._children.pop(report["exited"], None)
                if child is not None:
                    child.returncode = report["code"]
            elif self._spawning:
                self._on_answer(report, *self._spawning.pop(0))

    def _on_answer(
        self,
        report: Mapping[str, Any],
        name: str,
        output_read: int,
        spawned: asyncio.Future[ForkedProcess],
    ) -> None:
        """A spawn's answer: the process is registered at once, so that its exit, which may be
        the very next message, is never missed."""
        if "spawned" not in report:
            os.close(output_read)
            if not spawned.done():
                spawned.set_exception(CannotFork(f"the fork server could not fork: {report}"))
            return
        process = ForkedProcess(name, report["spawned"], os.fdopen(output_read, "rb"))
        self._children[process.pid] = process
        if spawned.done():  # the spawn was cancelled: nobody will watch this child
            process.kill()
            process.output.close()
        else:
            spawned.set_result(process)

    def _lose(self) -> None:
        """The server died (its children die with it: their death signal)."""
        if self.lost:
            return
        self.lost = True
        log.warning("the fork server is gone; children are started as new processes")
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, os.WNOHANG)  # no zombie of it while `sgpipe up` runs on
        with contextlib.suppress(RuntimeError, ValueError):
            asyncio.get_running_loop().remove_reader(self._channel)
        self._channel.close()
        for _, output_read, future in self._spawning:
            os.close(output_read)
            if not future.done():
                future.set_exception(ForkServerLost("the fork server is gone"))
        self._spawning.clear()
        children, self._children = self._children, {}
        for child in children.values():
            child.orphaned()

    def close(self, timeout: float = 2.0) -> None:
        """End the channel; the server exits once it reads that, and is reaped here (up to
        ``timeout`` seconds), so that `sgpipe up` ends after its whole tree."""
        self.lost = True
        self._channel.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if os.waitpid(self.pid, os.WNOHANG) != (0, 0):
                    return
            except ChildProcessError:
                return
            time.sleep(0.01)


class CannotFork(RuntimeError):
    """This child cannot be forked: start it as a new process."""


class ForkServerLost(CannotFork):
    """The fork server is gone: start this child, and every later one, as a new process."""


class ForkedProcess:
    """A child forked by the server, as ``SupervisedChild`` uses a ``ChildProcess``: its PID,
    its output pipe, its process group to signal, its return code once the server reaped it."""

    def __init__(self, name: str, pid: int, output: IO[bytes]) -> None:
        self.name = name
        self.pid = pid
        self.output = output
        self.returncode: int | None = None
        self._waiting: asyncio.Task[None] | None = None

    def send_signal(self, signum: signal.Signals) -> None:
        if self.returncode is None:
            signal_group(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def orphaned(self) -> None:
        """Its server died: it gets SIGKILL (its death signal); its code is that, once it is
        gone (so that its ports are free when it is restarted)."""

        async def wait_gone() -> None:
            while is_running(self.pid):
                await asyncio.sleep(0.02)
            self.returncode = -signal.SIGKILL

        self._waiting = asyncio.get_running_loop().create_task(wait_gone())


__all__ = [
    "CannotFork",
    "ForkServer",
    "ForkServerLost",
    "ForkedChild",
    "ForkedProcess",
    "can_fork",
    "serve",
    "start",
]
