"""How long the ``sgpipe`` command takes to start, against ``python -c pass`` measured in the
same run (issue 21: ``--version`` and ``--help`` under 0.3 s, ``query`` under 0.6 s on a quiet
machine).

Each command runs as a user runs it (the installed ``sgpipe`` script, a new process), best of
``--repeat`` (5). ``query`` runs ``SELECT 1`` over HTTP against an embedded ClickHouse served by
this process, the way it reaches ``clickhouse.url`` or a running `sgpipe up`. Then, as evidence
of what the time goes to, ``python -X importtime`` of each command: its slowest imports
(cumulative microseconds).

Run: ``.venv/bin/python -m bench.cli_start [--repeat 5] [--top 8]``. Prints figures; asserts
nothing about time (tests/unit/test_cli.py checks which modules the CLI imports).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

SGPIPE = str(Path(sys.executable).with_name("sgpipe"))
# What each figure is compared to in the issue.
TARGETS = {"--version": 0.3, "--help": 0.3, "query": 0.6}


@contextmanager
def served_store() -> Iterator[str]:
    """An embedded ClickHouse on a free port in a background thread; yields its writer URL."""
    from sgpipe.embedded.clickhouse import EmbeddedClickHouse
    from sgpipe.embedded.credentials import load_or_create_credentials

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    with tempfile.TemporaryDirectory() as directory:
        credentials = load_or_create_credentials(Path(directory))
        store = EmbeddedClickHouse(Path(directory) / "store", credentials)
        url = asyncio.run_coroutine_threadsafe(store.start(port=0), loop).result(60)
        writer = credentials.writer
        create = urllib.request.Request(
            url,
            data=b"CREATE DATABASE sgpipe",
            headers={"X-ClickHouse-User": writer.name, "X-ClickHouse-Key": writer.password},
        )
        urllib.request.urlopen(create, timeout=60).close()
        try:
            yield url.replace("://", f"://{writer.name}:{writer.password}@", 1)
        finally:
            asyncio.run_coroutine_threadsafe(store.stop(), loop).result(60)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(60)


def best_seconds(command: list[str], environ: Mapping[str, str], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        done = subprocess.run(command, env=dict(environ), capture_output=True, check=False)
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"{command} failed ({done.returncode}):\n{done.stderr.decode()}")
        best = min(best, elapsed)
    return best


def slowest_imports(arguments: list[str], environ: Mapping[str, str], top: int) -> list[str]:
    """``python -X importtime -m sgpipe ...``: the ``top`` imports with the largest
    cumulative time, as ``microseconds module``."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "sgpipe", *arguments],
        env=dict(environ),
        capture_output=True,
        check=False,
    )
    rows = []
    for line in done.stderr.decode().splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line.removeprefix("import time:").split("|")
        rows.append((int(cumulative), name.rstrip()))
    rows.sort(reverse=True)
    return [f"{micros:>9} us {name}" for micros, name in rows[:top]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    environ = {**os.environ, "SGPIPE_LOGGING__FORMAT": "json"}
    load = os.getloadavg()[0]
    python = best_seconds([sys.executable, "-c", "pass"], environ, args.repeat)
    print(f"load average {load:.2f}; best of {args.repeat}; python -c pass: {python:.3f} s")
    with served_store() as url:
        query_environ = {**environ, "SGPIPE_CLICKHOUSE__URL": url}
        commands = {
            "--version": (["--version"], environ),
            "--help": (["--help"], environ),
            "query": (["query", "SELECT 1"], query_environ),
        }
        for name, (arguments, command_environ) in commands.items():
            seconds = best_seconds([SGPIPE, *arguments], command_environ, args.repeat)
            print(
                f"sgpipe {name:<10} {seconds:.3f} s ({seconds / python:.1f}x python -c pass; "
                f"issue 21's target {TARGETS[name]} s on a quiet machine)"
            )
            for line in slowest_imports(arguments, command_environ, args.top):
                print(f"    {line}")


if __name__ == "__main__":
    main()
