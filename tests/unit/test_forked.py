"""The tests' `sgpipe` processes (tests/forked.py): forked from the tests' fork server, and
otherwise what ``subprocess.Popen`` gives -- the environment, working directory, pipes,
exit codes, signals and timeouts -- or exec'd where a fork cannot stand in."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import forked
from tests.up_support import parent_pid, wait_until

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="fork server: Linux only")

MISSING_STORE = ["query", "--data-dir", "no-such-dir", "SELECT 1"]


def name_of(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def emulator(tmp_path: Path, **options: Any) -> forked.Popen:
    """`sgpipe sendgrid-emulator`, once it listens: a command that runs until stopped."""
    process = forked.Popen(
        [*forked.SGPIPE, "sendgrid-emulator", "--port", "0", "--state", "state.json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **{"cwd": tmp_path, **options},
    )
    assert process.stdout is not None
    first_line = process.stdout.readline()
    if b"listening on" not in first_line:
        end(process)  # not left running by a failed test
        raise AssertionError(f"the emulator did not start: {first_line!r}")
    return process


def end(process: forked.Popen) -> None:
    process.kill()
    process.wait()
    for pipe in (process.stdin, process.stdout):
        if pipe is not None:
            pipe.close()


@pytest.fixture
def own_server() -> Iterator[None]:
    """A fork server of this test's own, killed after it (the shared one is left alone)."""
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(forked, "_started", None)
    try:
        yield
    finally:
        own = forked._started
        monkeypatch.undo()
        if own is not None and own.process is not None:
            own.process.kill()
            own.process.wait()


def test_a_sgpipe_command_is_forked_with_its_environment_and_pipes(tmp_path: Path) -> None:
    outputs = {}
    for output in ("console", "json"):
        process = forked.Popen(
            [*forked.SGPIPE, *MISSING_STORE],
            cwd=tmp_path,
            env={**os.environ, "SGPIPE_LOGGING__FORMAT": output},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert process.forked
        outputs[output] = process.communicate(timeout=60)
        assert process.returncode == 1

    # The environment it was given decides the format; stdout and stderr are kept apart.
    console_out, console_err = outputs["console"]
    json_out, json_err = outputs["json"]
    assert (console_out, json_out) == (b"", b"")
    assert console_err.decode().startswith("sgpipe: no ClickHouse store at no-such-dir")
    assert json.loads(json_err)["event"].startswith("no ClickHouse store at no-such-dir")


def test_a_forked_process_is_the_servers_child_and_signals_and_timeouts_work(
    tmp_path: Path,
) -> None:
    process = emulator(tmp_path)
    try:
        assert process.forked
        assert parent_pid(process.pid) != os.getpid()
        assert name_of(process.pid) == "sgpipe-sendgrid"
        assert os.readlink(f"/proc/{process.pid}/cwd") == str(tmp_path)
        assert process.poll() is None
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(timeout=0.2)
        with pytest.raises(subprocess.TimeoutExpired):
            process.communicate(timeout=0.2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0  # the emulator's clean stop
        process.send_signal(signal.SIGKILL)  # after its end: nothing, nobody else
    finally:
        end(process)

    killed = emulator(tmp_path)
    killed.kill()
    assert killed.wait(timeout=60) == -signal.SIGKILL
    end(killed)


def test_stdin_and_the_working_directory_are_the_callers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    process = emulator(tmp_path, cwd=None, stdin=subprocess.PIPE)
    try:
        assert process.forked
        assert process.stdin is not None
        ours = os.fstat(process.stdin.fileno()).st_ino
        assert os.stat(f"/proc/{process.pid}/fd/0").st_ino == ours  # the pipe given
        assert os.readlink(f"/proc/{process.pid}/cwd") == str(tmp_path)  # not the server's
    finally:
        end(process)


def test_other_commands_other_interpreters_and_exec_on_request_are_execd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = "import os; print(os.getppid())"
    other = forked.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert int(other.stdout) == os.getpid()

    # A PYTHON* variable acts as an interpreter starts: the server's start is not this one's.
    seeded = emulator(tmp_path, env={**os.environ, "PYTHONHASHSEED": "123"})
    try:
        assert not seeded.forked
        assert parent_pid(seeded.pid) == os.getpid()
    finally:
        end(seeded)
    with pytest.raises(FileNotFoundError):  # as Popen has it, not a child's traceback
        forked.Popen([*forked.SGPIPE, "--version"], cwd=tmp_path / "missing")

    monkeypatch.setenv(forked.EXEC_ALWAYS, "1")
    process = emulator(tmp_path)
    try:
        assert not process.forked
        assert parent_pid(process.pid) == os.getpid()
    finally:
        end(process)


@pytest.mark.usefixtures("own_server")
def test_the_server_outlives_the_thread_that_first_asked_for_it(tmp_path: Path) -> None:
    """The server dies with the thread that started it (its death signal): one started for a
    test running in a short-lived thread (asyncio.to_thread) must not take the next test's
    processes with it."""
    started: list[forked.Popen] = []
    try:
        asker = threading.Thread(target=lambda: started.append(emulator(tmp_path)))
        asker.start()
        asker.join()
        task = Path(f"/proc/self/task/{asker.native_id}")
        wait_until(lambda: not task.exists(), 30, "the asking thread's end", interval=0.01)
        first = started[0]
        server = parent_pid(first.pid)
        started.append(emulator(tmp_path))
        assert parent_pid(started[1].pid) == server, "the server died with the thread"
        assert first.poll() is None
    finally:
        for process in started:
            end(process)


@pytest.mark.usefixtures("own_server")
def test_a_lost_server_ends_its_children_and_the_next_command_gets_a_new_one(
    tmp_path: Path,
) -> None:
    first = emulator(tmp_path)
    try:
        server = forked._started
        assert server is not None and server.process is not None
        server.process.kill()
        assert first.wait(timeout=60) == -signal.SIGKILL  # its death signal, reported
        later = emulator(tmp_path)
        try:
            assert later.forked
            assert parent_pid(later.pid) != server.process.pid
        finally:
            end(later)
    finally:
        end(first)


@pytest.mark.usefixtures("own_server")
def test_a_server_that_cannot_start_means_exec_said_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Not a warning, which the suite would turn into this test's failure: the command is
    exec'd, and later ones too without trying again."""
    monkeypatch.setattr(forked, "_broken", False)
    monkeypatch.setattr(forked, "REPOSITORY", tmp_path / "missing")  # its start fails
    for _ in range(2):
        process = emulator(tmp_path)
        try:
            assert not process.forked
            assert parent_pid(process.pid) == os.getpid()
        finally:
            end(process)
    said = capfd.readouterr().err
    assert said.count("no fork server for the tests") == 1
