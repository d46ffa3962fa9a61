"""A child of `sgpipe up`, watched: its lines reach the stream and the supervisor, its port and
readiness come from its status pipe (never from its log), its exit is reaped, and a stop holds
its deadline even for a child that ignores SIGTERM."""

from __future__ import annotations

import asyncio
import io
import signal
import sys
from pathlib import Path
from typing import Any

from sgpipe.up.children import ReadyCondition, SupervisedChild
from sgpipe.up.logstream import LogStream

IGNORES_SIGTERM = """
import json, os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
assert sys.argv[1] == "--status-fd"
status = os.fdopen(int(sys.argv[2]), "w", buffering=1)
# A log line that looks like readiness is not: only the status pipe counts.
print(json.dumps({"event": "consuming", "port": 1}), flush=True)
print(json.dumps({"event": "oops", "level": "error", "error": "the cause"}), flush=True)
print("not json", flush=True)
status.write("not json either\\n")
status.write(json.dumps({"sgpipe_status": "listening", "service": "health", "port": 1234}) + "\\n")
status.write(json.dumps({"sgpipe_status": "consuming"}) + "\\n")
time.sleep(120)
"""


async def test_a_child_that_ignores_sigterm_is_killed_after_its_grace(tmp_path: Path) -> None:
    out = io.StringIO()
    seen: list[dict[str, Any]] = []
    stream = LogStream(tmp_path, out, json_output=True)
    child = SupervisedChild(
        "stubborn",
        "process",
        lambda: [sys.executable, "-c", IGNORES_SIGTERM],
        env={},
        stream=stream,
        ready=ReadyCondition("consuming"),
    )
    child.on_entry = seen.append
    await child.start()
    await asyncio.wait_for(child.ever_ready.wait(), 30)
    assert child.ready_now and child.running and child.pid is not None
    assert (child.port, child.url) == (1234, "http://127.0.0.1:1234")

    # Completes (the child would sleep for two minutes).
    code = await asyncio.wait_for(child.stop(grace=0.5), 30)
    stream.close()

    assert code == -signal.SIGKILL
    assert not child.running and child.stop_requested
    assert [entry["event"] for entry in seen] == ["consuming", "oops", "not json"]
    assert child.last_error == "the cause"
    assert (tmp_path / "stubborn.log").read_text().count("\n") == 3
    assert '"stage": "process"' in out.getvalue()


async def test_a_waiter_learns_that_the_child_exited(tmp_path: Path) -> None:
    stream = LogStream(tmp_path, io.StringIO(), json_output=True)
    child = SupervisedChild(
        "short",
        "sink",
        lambda: [sys.executable, "-c", 'import sys; print(\'{"event": "bye"}\'); sys.exit(3)'],
        env={},
        stream=stream,
        ready=ReadyCondition("consuming"),
    )
    waiting = child.wait_for("consuming")
    await child.start()
    assert await child.wait_exited() == 3
    stream.close()
    assert not child.ever_ready.is_set()
    exited = waiting.exception()
    assert exited is not None and "short exited with status 3" in str(exited)
