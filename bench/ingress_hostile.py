"""What hostile traffic costs the ingress's /healthz, as ratios against an idle baseline
measured in the same run.

Starts a tansu broker and two `sgpipe ingest` processes — one with the hostile corpus's limits
(tests/ingress_corpus.py: 1 MiB bodies, 1 s timeouts), one with the production defaults (4 MiB
bodies, ratio 100) — and a /healthz prober in a process of its own (one keep-alive connection
per ingress, a probe every 5 ms), so that the load generator's own CPU work does not stall the
measurement. Phases, each against both ingresses' probes:

* idle: nothing but probes (the baseline);
* corpus: every hostile case at once, ``--rounds`` times (the connection-cap case alone);
* bombs: 16 unsigned gzip bombs (64 MiB of zeros in 64 KB) and 4 signed 4 MB bodies of
  2,000,000 zeros at once, ``--rounds`` times, against the production defaults — the
  requests that stalled the foundation for 9 s and a minute.

Prints p50/p99/max per phase and the ratios to idle. Asserts nothing about time.
Run: ``.venv/bin/python -m bench.ingress_hostile [--rounds N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gzip
import http.client
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.synchronize import Event as ProcessEvent
from pathlib import Path
from typing import Any

import yaml

from sgpipe.embedded.broker import EmbeddedBroker, free_port
from tests.ingress_corpus import (
    MAX_CONNECTIONS,
    WEBHOOKS,
    HostileCase,
    Target,
    hostile_cases,
    server_config,
    signed_headers,
)
from tests.raw_http import RawResponse, exchange, http_request

PROBE_INTERVAL_SECONDS = 0.005
IDLE_SECONDS = 3.0

Sample = tuple[int, float, float]  # (port, monotonic start, latency seconds)


def probe_healthz(ports: Sequence[int], stop: ProcessEvent, results: Any) -> None:
    """In its own process: GET /healthz on each port in turn over keep-alive connections."""
    connections = {
        port: http.client.HTTPConnection("127.0.0.1", port, timeout=60) for port in ports
    }
    samples: list[Sample] = []
    failures = 0
    while not stop.is_set():
        for port, connection in connections.items():
            started = time.monotonic()
            try:
                connection.request("GET", "/healthz")
                response = connection.getresponse()
                response.read()
                failures += response.status != 200
            except (OSError, http.client.HTTPException):
                failures += 1
                connection.close()
            samples.append((port, started, time.monotonic() - started))
        time.sleep(PROBE_INTERVAL_SECONDS)
    results.put((samples, failures))


@dataclass
class Phase:
    name: str
    ports: tuple[int, ...]
    started: float = 0.0
    ended: float = 0.0
    statuses: collections.Counter[int | None] | None = None


@contextlib.contextmanager
def ingress_process(config: dict[str, Any], directory: Path) -> Iterator[int]:
    port = free_port()
    path = directory / f"sgpipe-{port}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    log = (directory / f"ingest-{port}.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "sgpipe.cli", "ingest", "--config", str(path)]
        + ["--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sgpipe ingest did not start, see {log.name}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer,
            ):
                if answer.status == 200:
                    break
            time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        process.wait(30)
        log.close()


async def run_case(case: HostileCase, target: Target) -> int | None:
    response = await case.run(target, f"bench-{case.id}-{uuid.uuid4().hex[:6]}")
    return response.status


async def corpus_round(cases: Sequence[HostileCase], target: Target) -> collections.Counter[Any]:
    concurrent = [case for case in cases if case.id != "over-the-connection-cap"]
    alone = [case for case in cases if case.id == "over-the-connection-cap"]
    # Fewer at once than the corpus ingress's connection cap, so each case gets its own answer.
    slots = asyncio.Semaphore(MAX_CONNECTIONS // 2)

    async def limited(case: HostileCase) -> int | None:
        async with slots:
            return await run_case(case, target)

    statuses = await asyncio.gather(*(limited(case) for case in concurrent))
    statuses += [await run_case(case, target) for case in alone]
    expected = [case.status for case in concurrent + alone]
    return collections.Counter(
        "as expected" if got == want else f"{want} -> {got}"
        for got, want in zip(statuses, expected, strict=True)
    )


async def bombs_round(target: Target, bomb: bytes, zeros: bytes) -> collections.Counter[Any]:
    bomb_request = http_request("/webhooks/open", bomb, [("Content-Encoding", "gzip")])
    zeros_request = http_request("/webhooks/main", zeros, signed_headers(zeros))
    requests = [bomb_request] * 16 + [zeros_request] * 4
    responses: list[list[RawResponse]] = await asyncio.gather(
        *(exchange(target.host, target.port, [request]) for request in requests)
    )
    return collections.Counter(answer[0].status for answer in responses)


def summarize(samples: Sequence[Sample], phase: Phase) -> tuple[float, float, float, int]:
    latencies = sorted(
        latency
        for port, started, latency in samples
        if port in phase.ports and phase.started <= started <= phase.ended
    )
    if not latencies:
        return 0.0, 0.0, 0.0, 0
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return statistics.median(latencies), p99, latencies[-1], len(latencies)


async def run_phases(corpus_port: int, defaults_port: int, rounds: int) -> list[Phase]:
    cases = hostile_cases()
    bomb = gzip.compress(bytes(64 * 1_048_576))
    zeros = b"[" + b"0," * 1_999_999 + b"0]"
    both = (corpus_port, defaults_port)
    phases = [Phase("idle", both), Phase("corpus", (corpus_port,)), Phase("bombs", both)]

    phases[0].started = time.monotonic()
    await asyncio.sleep(IDLE_SECONDS)
    phases[0].ended = time.monotonic()

    phases[1].started = time.monotonic()
    outcomes: collections.Counter[Any] = collections.Counter()
    for _ in range(rounds):
        outcomes += await corpus_round(cases, Target("127.0.0.1", corpus_port))
    phases[1].ended = time.monotonic()
    phases[1].statuses = outcomes

    phases[2].started = time.monotonic()
    answers: collections.Counter[Any] = collections.Counter()
    for _ in range(rounds):
        answers += await bombs_round(Target("127.0.0.1", defaults_port), bomb, zeros)
    phases[2].ended = time.monotonic()
    phases[2].statuses = answers
    return phases


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    broker = EmbeddedBroker()
    servers = asyncio.run(broker.start())
    try:
        with tempfile.TemporaryDirectory() as temporary:
            directory = Path(temporary)
            corpus_config = server_config(servers, uuid.uuid4().hex[:8])
            defaults_config = server_config(servers, uuid.uuid4().hex[:8])
            defaults_config["ingest"] = {}  # production defaults
            defaults_config["webhooks"] = WEBHOOKS
            with (
                ingress_process(corpus_config, directory) as corpus_port,
                ingress_process(defaults_config, directory) as defaults_port,
            ):
                context = multiprocessing.get_context("spawn")
                stop = context.Event()
                results = context.Queue()
                prober = context.Process(
                    target=probe_healthz, args=((corpus_port, defaults_port), stop, results)
                )
                prober.start()
                time.sleep(1.0)  # the prober's interpreter starts
                phases = asyncio.run(run_phases(corpus_port, defaults_port, args.rounds))
                stop.set()
                samples, failures = results.get(timeout=120)
                prober.join(30)
    finally:
        asyncio.run(broker.stop())

    report(phases, samples, failures)


def report(phases: Sequence[Phase], samples: Sequence[Sample], failures: int) -> None:
    idle = summarize(samples, phases[0])
    print(f"/healthz latency, probe every {PROBE_INTERVAL_SECONDS * 1000:.0f} ms per ingress")
    print(
        f"{'phase':8} {'probes':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}  p99/idle  max/idle"
    )
    for phase in phases:
        p50, p99, worst, count = summarize(samples, phase)
        print(
            f"{phase.name:8} {count:7d} {p50 * 1000:8.2f} {p99 * 1000:8.2f} {worst * 1000:8.2f}"
            f"  {p99 / idle[1]:8.1f}  {worst / idle[2]:8.1f}"
        )
        if phase.statuses is not None:
            print(f"         outcomes: {dict(phase.statuses)}")
    print(f"probe failures: {failures}")


if __name__ == "__main__":
    main()
