"""Finding and ending what a killed `sgpipe up` left running on its data dir: only processes
that are really ours (their command line names the data dir, or they run inside it), never a
PID since reused by something else, never while the recorded supervisor still runs."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sgpipe.up import leftovers
from sgpipe.up.layout import write_state
from sgpipe.up.leftovers import belongs_to, end_leftovers, find_leftovers

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "data"
    (directory / "broker").mkdir(parents=True)
    return directory


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen[bytes]]]:
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        process.kill()
        process.wait()


def spawn(
    processes: list[subprocess.Popen[bytes]], argv: list[str], cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(argv, cwd=cwd)
    processes.append(process)
    return process


def record(data_dir: Path, supervisor: int, **children: int) -> None:
    """A state file as `sgpipe up` writes it (sgpipe.up.supervisor._state)."""
    write_state(
        data_dir,
        {
            "pid": supervisor,
            "children": {name: {"pid": pid} for name, pid in children.items() if name != "tansu"},
            "broker": {"pid": children.get("tansu"), "storage_pid": None},
        },
    )


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_children_naming_the_data_dir_or_running_in_it_are_found(
    data_dir: Path, spawned: list[subprocess.Popen[bytes]]
) -> None:
    stage = spawn(spawned, [*SLEEPER, "--config", str(data_dir / "run" / "sink.yaml")])
    broker = spawn(spawned, SLEEPER, cwd=data_dir / "broker")  # tansu names no path
    record(data_dir, dead_pid(), sink=stage.pid, tansu=broker.pid)

    assert find_leftovers(data_dir) == sorted([stage.pid, broker.pid])


def test_forks_of_sgpipe_up_are_found_by_its_data_dir_argument(
    tmp_path: Path, spawned: list[subprocess.Popen[bytes]]
) -> None:
    """A forked child (sgpipe.up.forkserver) has the supervisor's command line, whose
    --data-dir may be relative to where it runs, or left out (the default)."""
    data_dir = tmp_path / "sgpipe-data"
    (data_dir / "broker").mkdir(parents=True)
    up = [*SLEEPER, "sgpipe", "up", "--config", "sgpipe.yaml"]
    forks = {
        "ingest": spawn(spawned, [*up, "--data-dir", "sgpipe-data"], cwd=tmp_path),
        "process": spawn(spawned, [*up, "--data-dir=./sgpipe-data"], cwd=tmp_path),
        "sink": spawn(spawned, [*up, "--data", "sgpipe-data"], cwd=tmp_path),  # argparse's
        "sink-2": spawn(spawned, up, cwd=tmp_path),  # the default
    }
    strangers = {
        "process-2": spawn(spawned, [*up, "--data-dir", "other"], cwd=tmp_path),
        "process-3": spawn(spawned, [*SLEEPER, "sgpipe", "query", "SELECT 1"], cwd=tmp_path),
        "process-4": spawn(spawned, [*SLEEPER, "make", "up"], cwd=tmp_path),  # PIDs reused
        "process-5": spawn(spawned, [*SLEEPER, "docker", "compose", "up"], cwd=tmp_path),
    }
    everyone = {**forks, **strangers}
    record(data_dir, dead_pid(), **{name: process.pid for name, process in everyone.items()})

    assert find_leftovers(data_dir) == sorted(process.pid for process in forks.values())
    # A new run's own fork server has the same command line: spared, should a PID collide.
    own_server = forks.pop("ingest").pid
    spared = find_leftovers(data_dir, spared=[own_server])
    assert spared == sorted(process.pid for process in forks.values())


def test_a_reused_pid_is_not_ours(
    data_dir: Path, tmp_path: Path, spawned: list[subprocess.Popen[bytes]]
) -> None:
    stranger = spawn(spawned, SLEEPER, cwd=tmp_path)  # the PID a dead child once had
    record(data_dir, dead_pid(), ingest=stranger.pid)

    assert not belongs_to(stranger.pid, data_dir)
    assert find_leftovers(data_dir) == []


def test_a_sibling_data_dir_with_a_longer_name_is_not_ours(
    data_dir: Path, tmp_path: Path, spawned: list[subprocess.Popen[bytes]]
) -> None:
    sibling = tmp_path / "data2"
    sibling.mkdir()
    other = spawn(spawned, SLEEPER, cwd=sibling)
    record(data_dir, dead_pid(), tansu=other.pid)

    assert find_leftovers(data_dir) == []


def test_nothing_is_touched_while_the_recorded_supervisor_runs(
    data_dir: Path, spawned: list[subprocess.Popen[bytes]]
) -> None:
    child = spawn(spawned, SLEEPER, cwd=data_dir / "broker")
    record(data_dir, dead_pid(), tansu=child.pid)
    assert find_leftovers(data_dir) == [child.pid]  # its supervisor is gone: an orphan

    # A live supervisor, its command line as `python -m sgpipe up` has it.
    supervisor = spawn(spawned, [*SLEEPER, "sgpipe", "up", "--data-dir", "elsewhere"])
    record(data_dir, supervisor.pid, tansu=child.pid)
    # Seen once under a loaded `make test`: read too early, /proc had not the command line yet.
    deadline = time.monotonic() + 10
    while b"up" not in Path(f"/proc/{supervisor.pid}/cmdline").read_bytes().split(b"\0"):
        assert time.monotonic() < deadline, "the supervisor's command line never showed"
        time.sleep(0.01)
    assert find_leftovers(data_dir) == []


def titled(title: list[str]) -> list[str]:
    """A process whose command line is one title, as a forked `sgpipe` process shows it
    (sgpipe.up.forkserver: setproctitle, shell-quoted)."""
    script = (
        "import setproctitle, shlex, sys, time; "
        "setproctitle.setproctitle(shlex.join(sys.argv[1:])); time.sleep(120)"
    )
    return [sys.executable, "-c", script, *title]


def wait_titled(pid: int, title: list[str]) -> None:
    """Until /proc shows the whole title: setproctitle clears, then writes, and a read in
    between sees an empty or a partial command line (seen under a loaded `make test`)."""
    whole = shlex.join(title).encode()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0") != whole:
        assert time.monotonic() < deadline, "the title never showed"
        time.sleep(0.01)


def test_a_forked_supervisor_or_child_is_read_from_its_title(
    tmp_path: Path, spawned: list[subprocess.Popen[bytes]]
) -> None:
    """A forked `sgpipe up` (a fork server's child, as the tests start it) still runs: its
    children are no leftovers. Once it is gone, a forked child is found by the data dir its
    title names, spaces and all."""
    data_dir = tmp_path / "data dir"
    (data_dir / "broker").mkdir(parents=True)
    up = ["python", "-m", "sgpipe", "up", "--config", "sgpipe.yaml", "--data-dir", "data dir"]
    stage = ["python", "-m", "sgpipe", "ingest", "--config", str(data_dir / "run" / "ingest.yaml")]
    supervisor = spawn(spawned, titled(up), cwd=tmp_path)
    child = spawn(spawned, titled(stage), cwd=tmp_path)
    wait_titled(supervisor.pid, up)
    wait_titled(child.pid, stage)
    assert leftovers.command_line(supervisor.pid) == up
    assert leftovers.command_line(child.pid) == stage

    record(data_dir, supervisor.pid, ingest=child.pid)
    assert find_leftovers(data_dir) == []  # its supervisor runs
    record(data_dir, dead_pid(), ingest=child.pid)
    assert find_leftovers(data_dir) == [child.pid]


def test_no_state_file_or_a_broken_one_finds_nothing(data_dir: Path) -> None:
    assert find_leftovers(data_dir) == []
    (data_dir / "sgpipe-up.json").write_text("{not json")
    assert find_leftovers(data_dir) == []
    (data_dir / "sgpipe-up.json").write_text(json.dumps([1, 2]))
    assert find_leftovers(data_dir) == []


async def test_leftovers_that_exit_by_themselves_are_waited_for_not_killed(
    data_dir: Path, spawned: list[subprocess.Popen[bytes]]
) -> None:
    # Exits a moment later, as a child signalled by PR_SET_PDEATHSIG does.
    dying = spawn(spawned, [sys.executable, "-c", "import time; time.sleep(0.5)"], data_dir)
    record(data_dir, dead_pid(), tansu=dying.pid)

    assert await end_leftovers(data_dir) == [dying.pid]
    assert dying.wait(timeout=10) == 0  # it ended on its own, not by SIGKILL


async def test_leftovers_that_linger_are_killed(
    data_dir: Path, spawned: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(leftovers, "EXIT_WAIT_SECONDS", 0.2)
    lingering = spawn(spawned, SLEEPER, cwd=data_dir / "broker")
    stranger = spawn(spawned, SLEEPER)
    record(data_dir, dead_pid(), tansu=lingering.pid, sink=stranger.pid)

    assert await end_leftovers(data_dir) == [lingering.pid]
    assert lingering.wait(timeout=10) == -9
    assert stranger.poll() is None  # not ours: left alone
