"""How long `sgpipe up` takes to start and to stop, with each broker storage, against the cost
of starting one `sgpipe` process (``sgpipe --version``) measured in the same run.

For ``memory`` and ``durable``, ``--runs`` times on the same data dir (the first durable run
creates the store): seconds from launch until the ingress answers ``/healthz`` (it takes
webhooks), until the whole pipeline is ready (``/readyz`` 200 on the ingress port), and from
SIGTERM until `sgpipe up` exited (idle: nothing to drain). Asserts nothing about time.
Run: ``.venv/bin/python -m bench.up_lifecycle [--runs N]``.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from sgpipe.embedded.broker import free_port
from tests.up_support import get


def answers(url: str) -> bool:
    try:
        return get(url, timeout=2)[0] == 200
    except OSError:
        return False


def one_run(directory: Path, storage: str) -> tuple[float, float, float]:
    port = free_port()
    config = directory / f"{storage}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "webhooks": [{"name": "main", "allow_unsigned": True}],
                "ingest": {"port": port},
                "embedded": {"kafka_port": 0, "clickhouse_http_port": 0, "broker_storage": storage},
                "kafka": {"session_timeout_ms": 1000, "heartbeat_interval_ms": 200},
                "logging": {"format": "json"},
            }
        )
    )
    base = f"http://127.0.0.1:{port}"
    launched = time.monotonic()
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "sgpipe", "up", "--config", str(config)),
            *("--data-dir", str(directory / storage)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while not answers(f"{base}/healthz"):
            time.sleep(0.02)
        serving = time.monotonic() - launched
        while not answers(f"{base}/readyz"):
            time.sleep(0.05)
        ready = time.monotonic() - launched
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=180)
        stopped = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return serving, ready, stopped


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    baseline = []
    for _ in range(args.runs):
        started = time.monotonic()
        subprocess.run(
            [sys.executable, "-m", "sgpipe", "--version"], capture_output=True, check=True
        )
        baseline.append(time.monotonic() - started)
    one_process = statistics.median(baseline)
    print(f"one `sgpipe --version` process: {one_process:.2f} s (median of {args.runs})")
    with tempfile.TemporaryDirectory(prefix="sgpipe-up-lifecycle-") as temporary:
        for storage in ("memory", "durable"):
            for run in range(args.runs):
                serving, ready, stopped = one_run(Path(temporary), storage)
                print(
                    f"{storage:7s} run {run + 1}: serving {serving:5.2f} s "
                    f"({serving / one_process:4.1f}x), all ready {ready:5.2f} s "
                    f"({ready / one_process:4.1f}x), stop {stopped:5.2f} s "
                    f"({stopped / one_process:4.1f}x)"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
