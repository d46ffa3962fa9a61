"""The fork server `sgpipe up` forks its Python children from (sgpipe.up.forkserver): a forked
child has what an exec'd one had, its exit reaches the supervisor, and a lost server is
noticed (its children die with it, and the next child is exec'd)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sgpipe.up import forkserver

REPOSITORY = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="fork server: Linux only")


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def probe(scenario: str) -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, "-m", "tests.unit.forkserver_probe", scenario],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "NOT_FOR": "the children"},
    )
    assert completed.returncode == 0, completed.stderr
    result: dict[str, Any] = json.loads(completed.stdout.splitlines()[-1])
    return result


def test_a_forked_child_has_what_an_execd_child_had_and_its_exit_is_reported() -> None:
    seen = probe("children")
    described = seen["described"]
    assert described["argv"] == ["3", "two words", described["argv"][-1]]  # after `sgpipe`
    # `ps`, pgrep -f and leftovers see the command line it would have had exec'd.
    assert described["command_line"] == [*forkserver.COMMAND_PREFIX, *described["argv"]]
    # The server's objects are out of the child's collector's sight: its collections, and
    # the last at exit, do not walk (and copy) all the server imported.
    assert described["frozen"] > 10_000
    assert described["environment"] == {"ONLY": "this"}  # exactly what it was given
    assert described["own_session"]  # a terminal's Ctrl-C reaches the supervisor only
    # stdin, the output on 1 and 2, the status descriptor at the number its argv names.
    assert described["descriptors"] == sorted({0, 1, 2, int(described["argv"][-1])})
    assert described["stdin"] == "/dev/null"
    assert described["name"] == "probe-exits"
    assert described["sigterm_default"]
    assert seen["output"] == "a line on stdout\na line on stderr\n"
    assert seen["exit_code"] == 3
    assert seen["killed_code"] == -9
    assert seen["server_alive"], "SIGTERM and SIGINT are the supervisor's to act on"
    # An exit right after the spawn (one read may hold both answers) is not missed.
    assert seen["exited_at_once_code"] == 5
    # "spawned" comes once the child has its session and handlers: a SIGTERM sent at once
    # reaches its process group and ends it (not ignored as the server ignores it).
    assert seen["terminated_at_once_code"] == -15


def test_a_cancelled_spawn_leaves_no_child_behind() -> None:
    seen = probe("cancelled")
    assert seen["left"] == []
    assert seen["later_code"] == 7  # the server answers the next spawn as before


def test_a_lost_server_takes_its_children_and_the_next_spawn_is_refused() -> None:
    seen = probe("server_lost")
    assert seen["orphan_code"] == -9
    assert not running(seen["orphan_pid"])
    assert seen["late_spawn"] == "ForkServerLost"
