"""How much a huge signed batch delays the ingress of `sgpipe up`, as ratios against an idle
baseline measured in the same run.

Starts `sgpipe up` (in-memory broker, embedded ClickHouse, dead-letter limits off so that the
processor works through everything) and a prober in a process of its own (one keep-alive
connection per target, a probe every 5 ms) on the ingress's ``/healthz`` and on the
supervisor's own. Phases:

* idle: nothing but probes (the baseline);
* tiny: one signed 4 MB batch of ~45,000 tiny events, until all its rows are in ClickHouse;
* zeros: one signed 4 MB batch of 2,000,000 zeros (2,000,000 dead letters), for
  ``--zeros-seconds`` while the processor works on it -- the batch that blocked the
  single-process `sgpipe up` of the foundation for about a minute.

In every phase a small signed batch is posted every 0.5 s and its acknowledgement timed. Prints
p50/p99/max per phase and target, and the ratios to idle. Asserts nothing about time.
Run: ``.venv/bin/python -m bench.up_isolation [--zeros-seconds S]``.
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event as ProcessEvent
from pathlib import Path
from typing import Any

import yaml

from sgpipe.embedded.broker import free_port
from tests.up_support import (
    WebhookKey,
    events_body,
    get,
    post,
    read_state,
    tiny_events_body,
    wait_until,
    zeros_body,
)

PROBE_INTERVAL_SECONDS = 0.005
IDLE_SECONDS = 5.0
SMALL_BATCH_INTERVAL_SECONDS = 0.5

Sample = tuple[str, float, float]  # (target, monotonic start, latency seconds)


def probe(targets: dict[str, int], stop: ProcessEvent, results: Any) -> None:
    """In its own process: GET /healthz on each target in turn over keep-alive connections."""
    connections = {
        name: http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        for name, port in targets.items()
    }
    samples: list[Sample] = []
    failures = 0
    while not stop.is_set():
        for name, connection in connections.items():
            started = time.monotonic()
            try:
                connection.request("GET", "/healthz")
                response = connection.getresponse()
                response.read()
                failures += response.status != 200
            except (OSError, http.client.HTTPException):
                failures += 1
                connection.close()
            samples.append((name, started, time.monotonic() - started))
        time.sleep(PROBE_INTERVAL_SECONDS)
    results.put((samples, failures))


@dataclass
class Phase:
    name: str
    started: float = 0.0
    ended: float = 0.0
    acknowledgements: list[float] = field(default_factory=list)


class SmallBatches:
    """A small signed batch every 0.5 s from a thread; acknowledgement latencies per phase."""

    def __init__(self, url: str, key: WebhookKey) -> None:
        self._url = url
        self._key = key
        self.phase: Phase | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        number = 0
        while not self._stop.is_set():
            number += 1
            body = events_body(f"small-{number}", 2)
            started = time.monotonic()
            status = post(self._url, body, self._key.headers(body), timeout=120)
            if self.phase is not None and status == 200:
                self.phase.acknowledgements.append(time.monotonic() - started)
            self._stop.wait(SMALL_BATCH_INTERVAL_SECONDS)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(150)


def percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def summary(values: Sequence[float]) -> str:
    if not values:
        return "no samples"
    return (
        f"n={len(values):5d} p50={statistics.median(values) * 1000:7.1f} ms "
        f"p99={percentile(values, 0.99) * 1000:7.1f} ms max={max(values) * 1000:8.1f} ms"
    )


def start_up(directory: Path, key: WebhookKey) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = free_port()
    config = directory / "sgpipe.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "webhooks": key.webhooks,
                "ingest": {"port": port},
                "embedded": {
                    "kafka_port": 0,
                    "clickhouse_http_port": 0,
                    "broker_storage": "memory",
                },
                "kafka": {"session_timeout_ms": 1000, "heartbeat_interval_ms": 200},
                "processor": {"dead_letters": {"max_count": 0, "max_ratio": 1.0}},
                "logging": {"format": "json"},
            }
        )
    )
    log = directory / "sgpipe-up.log"
    data_dir = directory / "data"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sgpipe",
                "up",
                "--config",
                str(config),
                "--data-dir",
                str(data_dir),
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
        )

    def ready() -> bool:
        try:
            return get(f"http://127.0.0.1:{port}/readyz")[0] == 200
        except OSError:
            return False

    wait_until(ready, 120, "sgpipe up")
    return process, port, data_dir


def rows(config_dir: Path, data_dir: Path) -> int:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sgpipe",
            "query",
            "--config",
            str(config_dir / "sgpipe.yaml"),
            "--data-dir",
            str(data_dir),
            "SELECT count() FROM email_events FINAL",
        ],
        capture_output=True,
        check=False,
    )
    return int(result.stdout or 0) if result.returncode == 0 else -1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--zeros-seconds", type=float, default=15.0)
    args = parser.parse_args(argv)
    key = WebhookKey.generate()
    with tempfile.TemporaryDirectory(prefix="sgpipe-up-isolation-") as temporary:
        directory = Path(temporary)
        process, port, data_dir = start_up(directory, key)
        state = read_state(data_dir)
        supervisor_port = int(str(state["health_url"]).rsplit(":", 1)[1])
        url = f"http://127.0.0.1:{port}/webhooks/main"
        stop = multiprocessing.Event()
        results: Any = multiprocessing.Queue()
        prober = multiprocessing.Process(
            target=probe,
            args=({"ingress": port, "supervisor": supervisor_port}, stop, results),
        )
        prober.start()
        small = SmallBatches(url, key)
        phases = [Phase("idle"), Phase("tiny"), Phase("zeros")]
        try:
            idle, tiny_phase, zeros_phase = phases
            idle.started = time.monotonic()
            small.phase = idle
            time.sleep(IDLE_SECONDS)
            idle.ended = time.monotonic()

            tiny, events = tiny_events_body("bench", 4_000_000)
            before = rows(directory, data_dir)
            tiny_phase.started = time.monotonic()
            small.phase = tiny_phase
            assert post(url, tiny, key.headers(tiny), timeout=120) == 200
            wait_until(lambda: rows(directory, data_dir) >= before + events, 300, "tiny rows", 1.0)
            tiny_phase.ended = time.monotonic()

            zeros = zeros_body()
            zeros_phase.started = time.monotonic()
            small.phase = zeros_phase
            assert post(url, zeros, key.headers(zeros), timeout=120) == 200
            time.sleep(args.zeros_seconds)
            zeros_phase.ended = time.monotonic()
        finally:
            small.phase = None
            small.close()
            stop.set()
            samples, failures = results.get(timeout=60)
            prober.join(30)
            # Stop at once: the processor may still be busy with the zeros.
            process.send_signal(signal.SIGTERM)
            process.send_signal(signal.SIGINT)
            process.wait(timeout=120)

        print(f"sgpipe up isolation ({os.cpu_count()} cores); /healthz probes failed: {failures}")
        print(f"tiny batch: {len(tiny):,} bytes, {events:,} events; zeros: {len(zeros):,} bytes")
        worst: dict[tuple[str, str], float] = {}
        for phase in phases:
            print(f"\n{phase.name} ({phase.ended - phase.started:.1f} s)")
            for target in ("ingress", "supervisor"):
                latencies = [
                    latency
                    for name, started, latency in samples
                    if name == target and phase.started <= started < phase.ended
                ]
                worst[(phase.name, target)] = max(latencies, default=float("nan"))
                print(f"  /healthz {target:10s} {summary(latencies)}")
            print(f"  small batch ack     {summary(phase.acknowledgements)}")
        print("\nworst /healthz under load / worst idle:")
        for target in ("ingress", "supervisor"):
            for loaded in ("tiny", "zeros"):
                ratio = worst[(loaded, target)] / worst[("idle", target)]
                print(
                    f"  {target:10s} {loaded:5s} {worst[(loaded, target)] * 1000:8.1f} ms "
                    f"= {ratio:5.1f}x idle ({worst[('idle', target)] * 1000:.1f} ms)"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
