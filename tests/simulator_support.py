"""Support for the simulator's tests: a real HTTP server (an aiohttp app on a free port, served
from a background thread so that tests can run the CLI, which runs its own event loop, against
it), and the CLI run through its entry point."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from aiohttp import web

from tests.cli_in_process import CliResult, run_sgpipe_in_process


@dataclass(frozen=True)
class ReceivedRequest:
    path: str
    headers: dict[str, str]
    body: bytes


@contextmanager
def serve(app: web.Application) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 (a free port) until the block ends; yields the base URL."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None)
    started = threading.Event()
    base_url: list[str] = []

    async def start() -> None:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        base_url.append(f"http://{host}:{port}")

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        started.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=run, name="webhook-receiver", daemon=True)
    thread.start()
    started.wait(10)
    try:
        yield base_url[0]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


async def record(request: web.Request, into: list[ReceivedRequest]) -> ReceivedRequest:
    received = ReceivedRequest(request.path, dict(request.headers), await request.read())
    into.append(received)
    return received


def run_sgpipe(argv: list[str]) -> CliResult:
    """``sgpipe ARGV`` through the entry point a shell runs, in this process
    (tests/cli_in_process.py: its exit code, stdout and stderr, the test process's logging
    restored after): a child process would only add an interpreter start per run."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return run_sgpipe_in_process(monkeypatch, *argv)
