"""`sgpipe` processes for tests, forked from a server that has already imported sgpipe.

Why: the suite starts about two hundred ``python -m sgpipe ...`` processes (stages, `sgpipe up`,
`query`, `dlq`, `migrate`), and each spent 0.4-0.8 s of CPU importing aiohttp, aiokafka,
pydantic and our stages before doing anything: about 80 s of a CPU-bound suite on two cores.
`sgpipe up` already forks its children from a copy of itself made before it started
(sgpipe.up.forkserver); the tests use that same server, run in a process of its own per test
process (a test process has threads, and a fork keeps only the forking one), its modules
imported once.

``Popen`` is ``subprocess.Popen`` for any command line; one that runs ``python -m sgpipe`` (or
``sgpipe.cli``) with nothing a fork cannot give (another user, a preexec function, a shell) is
forked by that server instead of exec'd, and is otherwise the same object: pipes, ``input``,
``communicate``, ``wait(timeout)``, ``send_signal``, ``kill`` and ``returncode`` as Popen
has them. The forked process has what the exec'd one had (the environment it was given, its
working directory, its standard descriptors and ``pass_fds``, default signal handlers, its
command line in ``ps``), runs `sgpipe` as the ``sgpipe`` program does (`sgpipe up` forks its
own children in turn), and is in a session of its own. Where the server cannot be had or is
lost, commands are exec'd as before; ``TESTS_EXEC_SGPIPE=1`` execs every one.

What differs from an exec'd process, none of which a test here depends on: its parent is the
server (``os.getppid``; ``os.waitpid`` on it fails: wait with ``wait``), it is always in a session
of its own, it gets only 0, 1, 2 and ``pass_fds`` (``close_fds=False`` is not honoured), its
output is unbuffered, its interpreter started as the server's did -- so a command whose PYTHON*
variables differ from the suite's at its start is exec'd -- and the server's umask is the test
process's as it started. It is signalled through a pidfd: its PID is the server's to reap.

Why a ``subprocess.Popen`` subclass that replaces how the child is started (``_execute_child``)
and waited for (``_internal_poll``, ``_wait``): everything else Popen does (pipes, text mode,
``communicate``, timeouts) is then the standard library's, not a copy of it.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parents[1]
SGPIPE = [sys.executable, "-m", "sgpipe"]
# What the forked commands import beyond sgpipe.up.forkserver's own list (`sgpipe up`'s
# stages): the supervisor and the commands the tests run most (query, dlq, migrate, forget).
PRELOAD = (
    "sgpipe.cli",
    "sgpipe.up",
    "sgpipe.store",
    "sgpipe.migrate",
    "sgpipe.forget",
    "sgpipe.dlq.command",
    "sgpipe.runtime.clickhouse",
)
EXEC_ALWAYS = "TESTS_EXEC_SGPIPE"
# The server's environment: this process's as the suite began (before any test changed it).
# A command whose PYTHON* variables differ is exec'd: they act as an interpreter starts.
SERVER_ENVIRONMENT = dict(os.environ)
AS_THE_CHILD_SETS = {"PYTHONUNBUFFERED"}  # a forked child's output is unbuffered anyway
SPAWN_TIMEOUT = 120.0
MODULES = ("sgpipe", "sgpipe.cli")


# What Popen.__init__ passes its _execute_child (CPython 3.11 to 3.13, POSIX), in order.
_EXECUTE_CHILD_PARAMETERS = (
    "args",
    "executable",
    "preexec_fn",
    "close_fds",
    "pass_fds",
    "cwd",
    "env",
    "startupinfo",
    "creationflags",
    "shell",
    "p2cread",
    "p2cwrite",
    "c2pread",
    "c2pwrite",
    "errread",
    "errwrite",
    "restore_signals",
    "gid",
    "gids",
    "uid",
    "umask",
    "start_new_session",
    "process_group",
)
_PIPES = ("p2cread", "p2cwrite", "c2pread", "c2pwrite", "errread", "errwrite")


def forkable(args: Any) -> bool:
    """``python -m sgpipe ...`` (or ``sgpipe.cli``), as a list of strings or paths."""
    if isinstance(args, str | bytes) or not isinstance(args, Sequence) or len(args) < 3:
        return False
    head = [os.fsdecode(argument) for argument in args[:3]]
    return head[0] == sys.executable and head[1] == "-m" and head[2] in MODULES


class Popen(subprocess.Popen[Any]):
    """``subprocess.Popen``; ``python -m sgpipe`` forked (see the module docstring)."""

    _forked = False
    _pidfd: int | None = None

    def _execute_child(self, *arguments: Any) -> None:
        if len(arguments) != len(_EXECUTE_CHILD_PARAMETERS):  # another Python's Popen: exec
            super()._execute_child(*arguments)  # type: ignore[misc]
            return
        given = dict(zip(_EXECUTE_CHILD_PARAMETERS, arguments, strict=True))
        plain = (
            given["executable"] is None
            and given["preexec_fn"] is None
            and not given["shell"]
            and (given["gid"], given["gids"], given["uid"]) == (None, None, None)
            and given["umask"] < 0
            and given["process_group"] in (None, -1, 0)  # -1: none asked; it is in its own
        )
        cwd, env, args = given["cwd"], given["env"], given["args"]
        directory = os.path.abspath(os.fsdecode(cwd)) if cwd is not None else os.getcwd()
        environment = {
            os.fsdecode(name): os.fsdecode(value)
            for name, value in (os.environ if env is None else env).items()
        }
        server = None
        if plain and forkable(args) and os.path.isdir(directory) and _as_at_start(environment):
            server = _server()
        if server is not None:
            self._exited = threading.Event()
            self._signalling = threading.Lock()
            pipes = [given[name] for name in _PIPES]
            p2cread, _, _, c2pwrite, _, errwrite = pipes
            descriptors = {
                0: p2cread if p2cread != -1 else 0,
                1: c2pwrite if c2pwrite != -1 else 1,
                2: errwrite if errwrite != -1 else 2,
                **{number: number for number in given["pass_fds"]},
            }
            argv = [os.fsdecode(argument) for argument in args]
            pid = server.spawn(self, argv, environment, directory, descriptors)
            if pid is not None:
                self.pid = pid
                self._forked = True
                self._child_created = True
                self._close_pipe_fds(*pipes)  # type: ignore[attr-defined]
                return
        super()._execute_child(*arguments)  # type: ignore[misc]

    def _internal_poll(self, _deadstate: Any = None, **_: Any) -> int | None:
        if not self._forked:
            return super()._internal_poll(_deadstate)  # type: ignore[misc, no-any-return]
        return self.returncode

    def _wait(self, timeout: float | None) -> int:
        if not self._forked:
            return super()._wait(timeout)  # type: ignore[misc, no-any-return]
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        return int(self.returncode)

    @property
    def forked(self) -> bool:
        """Forked by the tests' fork server (else exec'd)."""
        return self._forked

    def send_signal(self, sig: int) -> None:
        """Through a pidfd: the server reaps the child before its exit is reported here, and
        its PID may be another process's by then."""
        if not self._forked:
            super().send_signal(sig)
            return
        with self._signalling, contextlib.suppress(ProcessLookupError):
            if self.returncode is not None:
                return
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, sig)
            else:  # a kernel without pidfds (before Linux 5.3): by PID, as Popen does
                os.kill(self.pid, sig)

    def spawned(self, pid: int) -> None:
        """Forked (from the server's reading thread, before its exit can be reported)."""
        try:
            self._pidfd = os.pidfd_open(pid)
        except OSError:  # gone already (its exit report follows), or no pidfds here
            self._pidfd = None

    def exited(self, code: int) -> None:
        """Its exit, as the server reported it (from the server's reading thread)."""
        with self._signalling:
            self.returncode = code
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None
        self._exited.set()

    def wait_gone(self, timeout: float = 60.0) -> int:
        """Its server died, and it with it (its death signal, SIGKILL): that code, once it is
        gone (or after ``timeout``)."""
        if self._pidfd is not None:
            select.select([self._pidfd], [], [], timeout)
        return -signal.SIGKILL


def run(
    args: Sequence[Any],
    *,
    input: str | bytes | None = None,  # noqa: A002 (subprocess.run's name)
    capture_output: bool = False,
    timeout: float | None = None,
    check: bool = False,
    **kwargs: Any,
) -> subprocess.CompletedProcess[Any]:
    """``subprocess.run`` with this module's ``Popen``."""
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    if capture_output:
        kwargs["stdout"] = subprocess.PIPE
        kwargs["stderr"] = subprocess.PIPE
    with Popen(args, **kwargs) as process:
        try:
            stdout, stderr = process.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
        except BaseException:
            process.kill()
            raise
        code = process.poll()
        assert code is not None
    if check and code:
        raise subprocess.CalledProcessError(code, process.args, output=stdout, stderr=stderr)
    return subprocess.CompletedProcess(process.args, code, stdout, stderr)


class _Spawn:
    def __init__(self, process: Popen) -> None:
        self.process = process
        self.answered = threading.Event()
        self.pid: int | None = None


class _Server:
    """This test process's end of its fork server: a thread reads the server's answers and
    its children's exits (sgpipe.up.forkserver's protocol)."""

    def __init__(self) -> None:
        self._channel, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # _sending orders requests as they are queued and sent (answers come in that order);
        # _lock guards what the reading thread shares, never held while the channel blocks.
        self._sending = threading.Lock()
        self._lock = threading.Lock()
        self._spawning: collections.deque[_Spawn] = collections.deque()
        self._children: dict[int, Popen] = {}
        self.lost = False
        self.answered_once = False
        # Started by the thread that reads it, which lives as long as the server: the server
        # dies with the *thread* that started it (its death signal), and a test may first ask
        # for a process from a short-lived thread (asyncio.to_thread).
        self.process: subprocess.Popen[bytes] | None = None
        ready = threading.Event()

        failed: list[OSError] = []

        def start_then_read() -> None:
            try:
                with theirs:
                    self.process = subprocess.Popen(
                        [sys.executable, "-m", "tests.forked", str(theirs.fileno())]
                        + [str(os.getpid())],
                        pass_fds=[theirs.fileno()],
                        cwd=REPOSITORY,
                        env=SERVER_ENVIRONMENT,
                        stdin=subprocess.DEVNULL,
                    )
            except OSError as exc:  # reported by the caller, not left to the thread's end
                failed.append(exc)
                return
            finally:
                ready.set()
            try:
                self._read()
            finally:
                self._lose()

        threading.Thread(target=start_then_read, name="sgpipe-forks", daemon=True).start()
        ready.wait()
        if failed:
            self._channel.close()
            raise OSError(f"the tests' fork server could not be started: {failed[0]}")

    def spawn(
        self,
        process: Popen,
        argv: list[str],
        env: dict[str, str],
        cwd: str,
        given: dict[int, int],
    ) -> int | None:
        """The forked child's PID; None where it cannot be forked (exec it instead)."""
        numbers = sorted(given)
        request = {"name": _name(argv), "argv": argv, "env": env, "cwd": cwd, "fds": numbers}
        message = json.dumps(request).encode()
        spawn = _Spawn(process)
        with self._sending:
            with self._lock:
                if self.lost:
                    return None
                self._spawning.append(spawn)
            try:
                socket.send_fds(self._channel, [message], [given[n] for n in numbers])
            except BaseException as exc:
                with self._lock:
                    if spawn in self._spawning:  # never sent: no answer will come for it
                        self._spawning.remove(spawn)
                if isinstance(exc, OSError):
                    return None
                raise
        if not spawn.answered.wait(SPAWN_TIMEOUT):
            raise RuntimeError(f"the tests' fork server did not answer in {SPAWN_TIMEOUT} s")
        return spawn.pid

    def _read(self) -> None:
        while True:
            try:
                message = self._channel.recv(1 << 20)
            except OSError:
                return
            if not message:
                return
            report = json.loads(message)
            with self._lock:
                if "exited" in report:
                    child = self._children.pop(report["exited"], None)
                    if child is not None:
                        child.exited(report["code"])
                    continue
                spawn = self._spawning.popleft()
                if "spawned" in report:
                    self.answered_once = True
                    spawn.pid = report["spawned"]
                    spawn.process.spawned(spawn.pid)
                    self._children[spawn.pid] = spawn.process
            spawn.answered.set()

    def _lose(self) -> None:
        """The server died: its children die with it (their death signal)."""
        self._channel.close()
        with self._lock:
            self.lost = True
            children, self._children = self._children, {}
            for spawn in self._spawning:
                spawn.answered.set()  # pid None: exec'd instead
            self._spawning.clear()
        for child in children.values():
            child.exited(child.wait_gone())
        if self.process is not None:
            with contextlib.suppress(ChildProcessError, subprocess.TimeoutExpired):
                self.process.wait(5)


_started: _Server | None = None
_starting = threading.Lock()
_broken = False  # a server that could not start, or ended before its first answer


def _server() -> _Server | None:
    global _started, _broken
    if sys.platform != "linux" or os.environ.get(EXEC_ALWAYS) == "1" or _broken:
        return None
    with _starting:
        if _started is not None and _started.lost and not _started.answered_once:
            _broken = True  # it would fail again: exec from now on, once said
            _say("the tests' fork server ended at start: commands are exec'd")
            return None
        if _started is None or _started.lost:
            try:
                _started = _Server()
            except OSError as exc:
                _broken = True
                _say(f"no fork server for the tests ({exc}): commands are exec'd")
                return None
        return _started


def _say(problem: str) -> None:
    """Said on stderr, not as a warning: the suite turns warnings into errors, and the test
    that met the problem would fail instead of having its command exec'd."""
    print(f"tests/forked.py: {problem}", file=sys.stderr)


def _as_at_start(environment: Mapping[str, str]) -> bool:
    """Whether ``environment`` starts an interpreter as the server's started it."""

    def startup(variables: Mapping[str, str]) -> dict[str, str]:
        return {
            name: value
            for name, value in variables.items()
            if name.startswith("PYTHON") and name not in AS_THE_CHILD_SETS
        }

    return startup(environment) == startup(SERVER_ENVIRONMENT)


def _name(argv: list[str]) -> str:
    """The process name (``ps -o comm``): ``sgpipe-`` and the command."""
    command = next((a for a in argv[3:] if not a.startswith("-")), "")
    return f"sgpipe-{command}"[:15]


def _serve(channel: int, parent: int) -> int:
    """The server's process: imports, then serves; returns (an exit code) in a forked child,
    after running its command as the ``sgpipe`` program."""
    from sgpipe.up import forkserver

    for module in (*forkserver.PRELOAD, *PRELOAD):
        __import__(module)
    if threading.active_count() > 1:  # an import started a thread: a fork would lose it
        return 1  # the channel's end: the tests exec their commands
    forked = forkserver.serve(socket.socket(fileno=channel), parent)
    from sgpipe.cli import program

    return program(forked.argv)


if __name__ == "__main__":
    sys.exit(_serve(int(sys.argv[1]), int(sys.argv[2])))
