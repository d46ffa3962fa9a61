"""A supervisor in miniature for tests/unit/test_forkserver.py, run as its own process (the
server is a fork of its caller: never of a pytest worker and its threads).

``python -m tests.unit.forkserver_probe SCENARIO``: starts the fork server, forks children
that describe themselves instead of running ``sgpipe`` (the ``ForkedChild`` branch below), and
prints one JSON line of what it saw.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from sgpipe.up import forkserver, leftovers

PREFIX = list(forkserver.COMMAND_PREFIX)


def _open(descriptor: int) -> bool:
    try:
        os.fstat(descriptor)
    except OSError:
        return False
    return True


def describe_self(argv: list[str]) -> int:
    """In a forked child: write what it has to its status descriptor, then act on argv."""
    action, status_fd = argv[0], int(argv[-1])
    if action == "now":  # exits before anything: its exit may share a read with its spawn
        return 5
    described = {
        "argv": argv,
        "environment": dict(os.environ),
        "own_session": os.getsid(0) == os.getpid(),
        # Those still open once listed (listing opens one of its own for a moment).
        "descriptors": sorted(
            int(name)
            for name in os.listdir("/proc/self/fd")
            if os.path.lexists(f"/proc/self/fd/{name}") and _open(int(name))
        ),
        "stdin": os.readlink("/proc/self/fd/0"),
        "name": open("/proc/self/comm").read().strip(),  # noqa: SIM115, PTH123
        "sigterm_default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
        # Its command line as `ps` and leftovers read it (one title, split back).
        "command_line": leftovers.command_line(os.getpid()),
        # What the server had when it forked, out of the collector's sight.
        "frozen": gc.get_freeze_count(),
    }
    os.write(status_fd, json.dumps(described).encode() + b"\n")
    os.close(status_fd)
    print("a line on stdout")
    print("a line on stderr", file=sys.stderr)
    if action == "wait":
        signal.pause()
    return int(action) if action.isdigit() else 0


async def spawn(server: forkserver.ForkServer, name: str, action: str) -> dict[str, Any]:
    status_read, status_write = os.pipe()
    process = await server.spawn(
        name, [*PREFIX, action, "two words", str(status_write)], {"ONLY": "this"}, [status_write]
    )
    os.close(status_write)
    loop = asyncio.get_running_loop()
    with os.fdopen(status_read, "rb") as status:
        described = json.loads(await loop.run_in_executor(None, status.readline))
    output = b""
    if action != "wait":
        output = await loop.run_in_executor(None, process.output.read)
    return {"process": process, "described": described, "output": output.decode()}


async def spawn_only(server: forkserver.ForkServer, name: str, action: str) -> Any:
    """Spawned, not waited for: the status pipe's read end is left open for it."""
    status_read, status_write = os.pipe()
    try:
        return await server.spawn(name, [*PREFIX, action, str(status_write)], {}, [status_write])
    finally:
        os.close(status_write)


async def terminated_at_once(server: forkserver.ForkServer) -> int | None:
    """A SIGTERM the moment spawn returns reaches the child, with the default action."""
    process = await spawn_only(server, "probe-term", "wait")
    process.send_signal(signal.SIGTERM)
    return await wait_code(process)


def children_named(parent: int, name: str) -> list[int]:
    """The running children of ``parent`` whose name starts with ``name``."""
    try:
        pids = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except OSError:
        return []
    found = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z" and Path(f"/proc/{pid}/comm").read_text().startswith(name):
                found.append(int(pid))
        except OSError:
            continue
    return found


async def wait_code(process: forkserver.ForkedProcess) -> int | None:
    for _ in range(1000):
        if process.returncode is not None:
            return process.returncode
        await asyncio.sleep(0.01)
    return None


async def scenario(server: forkserver.ForkServer, name: str) -> dict[str, Any]:
    if name == "children":
        exits = await spawn(server, "probe-exits", "3")
        killed = await spawn(server, "probe-killed", "wait")
        # Signals for the supervisor's process group or meant to stop it leave the server be.
        os.kill(server.pid, signal.SIGTERM)
        os.kill(server.pid, signal.SIGINT)
        killed["process"].kill()
        return {
            "exited_at_once_code": await wait_code(await spawn_only(server, "probe-now", "now")),
            "terminated_at_once_code": await terminated_at_once(server),
            "described": exits["described"],
            "output": exits["output"],
            "exit_code": await wait_code(exits["process"]),
            "killed_code": await wait_code(killed["process"]),
            "server_alive": os.waitpid(server.pid, os.WNOHANG) == (0, 0),
        }
    if name == "cancelled":
        spawning = asyncio.create_task(spawn_only(server, "probe-cancelled", "wait"))
        await asyncio.sleep(0)  # sent, not answered
        spawning.cancel()
        await asyncio.gather(spawning, return_exceptions=True)
        for _ in range(1000):  # it is forked all the same, then killed when its answer comes
            named = children_named(server.pid, "probe-cancelled")
            if named == [] and children_named(server.pid, "") == []:
                break
            await asyncio.sleep(0.01)
        later = await spawn(server, "probe-later", "7")
        return {
            "left": children_named(server.pid, "probe-cancelled"),
            "later_code": await wait_code(later["process"]),
        }
    if name == "server_lost":
        child = await spawn(server, "probe-orphan", "wait")
        os.kill(server.pid, signal.SIGKILL)
        code = await wait_code(child["process"])
        try:
            await spawn(server, "probe-late", "0")
            late = "spawned"
        except forkserver.ForkServerLost:
            late = "ForkServerLost"
        return {"orphan_code": code, "orphan_pid": child["process"].pid, "late_spawn": late}
    raise SystemExit(f"unknown scenario {name}")


def main() -> int:
    server = forkserver.start(preload=())
    if isinstance(server, forkserver.ForkedChild):
        return describe_self(server.argv)
    assert server is not None
    print(json.dumps(asyncio.run(scenario(server, sys.argv[1]))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
