"""The tests' `sgpipe` processes (tests/forked.py): forked from the tests' fork server, and
otherwise what ``subprocess.Popen`` gives -- the environment, working directory, pipes,
``input``, exit codes, signals and timeouts -- or exec'd where a fork cannot stand in."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import forked

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="fork server: Linux only")

MISSING_STORE = ["query", "--data-dir", "no-such-dir", "SELECT 1"]


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def name_of(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def emulator(tmp_path: Path) -> forked.Popen:
    process = forked.Popen(
        [*forked.SGPIPE, "sendgrid-emulator", "--port", "0", "--state", "state.json"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert process.stdout is not None
    assert b"listening on" in process.stdout.readline()
    return process


def end(process: forked.Popen) -> None:
    process.kill()
    process.wait()
    if process.stdout is not None:
        process.stdout.close()


def test_a_sgpipe_command_is_forked_with_its_environment_and_pipes(tmp_path: Path) -> None:
    as_console = {**os.environ, "SGPIPE_LOGGING__FORMAT": "console"}
    console = forked.run(
        [*forked.SGPIPE, *MISSING_STORE], cwd=tmp_path, env=as_console, capture_output=True
    )
    as_json = {**os.environ, "SGPIPE_LOGGING__FORMAT": "json"}
    in_json = forked.run(
        [*forked.SGPIPE, *MISSING_STORE], cwd=tmp_path, env=as_json, capture_output=True
    )

    assert (console.returncode, in_json.returncode) == (1, 1)
    assert (console.stdout, in_json.stdout) == (b"", b"")
    # The environment it was given decides the format.
    assert console.stderr.decode().startswith("sgpipe: no ClickHouse store at no-such-dir")
    assert json.loads(in_json.stderr)["event"].startswith("no ClickHouse store at no-such-dir")


def test_a_forked_process_is_the_servers_child_and_signals_and_timeouts_work(
    tmp_path: Path,
) -> None:
    process = emulator(tmp_path)
    try:
        assert parent_of(process.pid) != os.getpid()  # forked by the server, not exec'd
        assert name_of(process.pid) == "sgpipe-sendgrid"
        assert os.readlink(f"/proc/{process.pid}/cwd") == str(tmp_path)
        assert process.poll() is None
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(timeout=0.2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0  # the emulator's clean stop
    finally:
        end(process)

    killed = emulator(tmp_path)
    killed.kill()
    assert killed.wait(timeout=60) == -signal.SIGKILL
    end(killed)


def test_input_reaches_a_forked_commands_stdin(tmp_path: Path) -> None:
    """`sgpipe forget` asks on stdin when it is a terminal only; `oauth` reads a secret from
    it: here the plain case, input given and the command's answer read back."""
    code = "import sys; print(sys.stdin.read().upper())"
    execd = forked.run([sys.executable, "-c", code], input=b"abc", capture_output=True)
    assert execd.stdout == b"ABC\n"
    version = forked.run([*forked.SGPIPE, "--version"], input=b"ignored", capture_output=True)
    assert version.returncode == 0
    assert version.stdout.startswith(b"sgpipe ")


def test_other_commands_and_exec_on_request_are_execd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = "import os; print(os.getppid())"
    other = forked.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert int(other.stdout) == os.getpid()

    monkeypatch.setenv(forked.EXEC_ALWAYS, "1")
    process = emulator(tmp_path)
    try:
        assert parent_of(process.pid) == os.getpid()
    finally:
        end(process)


def test_the_server_outlives_the_thread_that_first_asked_for_it(tmp_path: Path) -> None:
    """The server dies with the thread that started it (its death signal): one started for a
    test running in a short-lived thread (asyncio.to_thread) must not take the next test's
    processes with it."""
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(forked, "_started", None)  # a server of this test's own
    started: list[forked.Popen] = []
    try:
        asker = threading.Thread(target=lambda: started.append(emulator(tmp_path)))
        asker.start()
        asker.join()
        task = Path(f"/proc/self/task/{asker.native_id}")
        wait_until(lambda: not task.exists(), "the asking thread's end")
        first = started[0]
        server = parent_of(first.pid)
        started.append(emulator(tmp_path))
        assert parent_of(started[1].pid) == server, "the server died with the thread"
        assert first.poll() is None
    finally:
        own = forked._started
        monkeypatch.undo()
        for process in started:
            end(process)
        if own is not None and own.process is not None:
            own.process.kill()
            own.process.wait()


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not seen in {timeout} s"
        time.sleep(0.01)
