"""End to end: `sgpipe up` on its embedded defaults (durable broker, embedded ClickHouse) fed by
the simulator -- signed, SendGrid-shaped, with duplicates -- first at a fixed rate, then flat
out; next to a bare aiohttp server that only reads the body, fed by the same simulator in the
same run (the ingress ceiling: what one client and this machine can post at all).

Prints, per phase:

* sustained events/s end to end: distinct events stored in ClickHouse (through FINAL) divided
  by the time from the first POST until the last of them was visible; and events/s
  acknowledged by the ingress; each as a ratio of the bare server's events/s;
* latency from the ingress's 2xx to the row being visible in ClickHouse, p50/p99/max: one
  event of each acknowledged POST, polled every 100 ms through ClickHouse's HTTP interface as
  the read-only BI user (the sampler's own round trip is printed as its floor);
* the peak RSS of every process of `sgpipe up`'s tree (supervisor, ingest, process, sink,
  ClickHouse, broker, storage), sampled every ``--rss-every`` seconds.

Asserts nothing about time. Run: ``.venv/bin/python -m bench.e2e [--seconds S] [--rate R]``
(``--json`` prints the figures as one JSON object too).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec

from bench.soak import (
    PERCENTILES,
    TreeSamples,
    VisibilitySampler,
    clickhouse_url,
    percentile,
    sample_tree,
    start_up,
    stop_up,
    stored_events,
)
from sgpipe.embedded.broker import free_port
from sgpipe.embedded.credentials import load_credentials
from sgpipe.simulator.keys import generate_private_key, public_key_base64
from sgpipe.simulator.simulation import SimulationOptions, SimulationSummary, simulate

CONCURRENCY = 8
DRAIN_TIMEOUT = 300.0


@dataclass(frozen=True)
class Phase:
    name: str
    rate: float | None  # events/s offered, copies included; None: flat out
    posted_events_per_second: float  # acknowledged event objects per second (simulator's view)
    stored_events_per_second: float  # distinct events stored / (first POST -> last visible)
    stored: int
    acknowledged: int
    lost: int  # acknowledged, not stored: must be 0
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    latency_max_ms: float | None
    sampler_floor_ms: float | None  # the visibility query's own round trip, p50
    peak_rss_mib: dict[str, float]


def simulation_options(
    url: str,
    key: ec.EllipticCurvePrivateKey,
    seconds: float,
    rate: float | None,
    seed: int,
    duplicates: float,
) -> SimulationOptions:
    return SimulationOptions(
        url=url,
        private_key=key,
        events=None,
        duration_seconds=seconds,
        rate=rate,
        duplicates=duplicates,
        concurrency=CONCURRENCY,
        seed=seed,
        flush_interval_seconds=0.5,
        retry_for_seconds=600,
    )


def peak_rss(samples: TreeSamples) -> dict[str, float]:
    """The largest RSS each labelled process reached (MiB)."""
    peaks: dict[str, float] = {}
    for sample in samples.rss:
        for label, mib in sample.items():
            peaks[label] = max(peaks.get(label, 0.0), mib)
    return dict(sorted(peaks.items()))


def millis(values: list[float], pct: float) -> float | None:
    return round(percentile(values, pct) * 1000, 1) if values else None


async def bare_server_ceiling(seconds: float, seed: int, duplicates: float) -> float:
    """Events/s the simulator gets acknowledged by a server that reads the body and answers
    200: the most any ingress could be measured at here."""

    async def accept(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"status": "accepted"})

    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.router.add_post("/webhooks/{name}", accept)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        summary = await simulate(
            simulation_options(
                f"http://127.0.0.1:{port}/webhooks/bare",
                generate_private_key(),
                seconds,
                None,
                seed,
                duplicates,
            )
        )
    finally:
        await runner.cleanup()
    return summary.events_per_second


async def run_phase(
    name: str,
    rate: float | None,
    arguments: argparse.Namespace,
    webhook_url: str,
    key: ec.EllipticCurvePrivateKey,
    data_dir: Path,
    root_pid: int,
    seed: int,
) -> Phase:
    url = clickhouse_url(data_dir)
    reader = load_credentials(data_dir).reader
    before, _ = await asyncio.to_thread(stored_events, url, reader)
    sampler = VisibilitySampler(url, reader)
    samples = TreeSamples()
    began = time.monotonic()
    stop_sampling, stop_tree = asyncio.Event(), asyncio.Event()
    visibility = asyncio.create_task(sampler.run(stop_sampling))
    tree = asyncio.create_task(
        sample_tree(samples, root_pid, began, stop_tree, arguments.rss_every)
    )
    summary: SimulationSummary = await simulate(
        simulation_options(webhook_url, key, arguments.seconds, rate, seed, arguments.duplicates),
        on_acknowledged=sampler.on_acknowledged,
    )
    stop_sampling.set()
    await asyncio.wait_for(visibility, DRAIN_TIMEOUT)
    # Everything acknowledged in this phase is visible: the phase ends here.
    elapsed = time.monotonic() - began
    stored_now, _ = await asyncio.to_thread(stored_events, url, reader)
    stop_tree.set()
    await tree
    stored = stored_now - before
    return Phase(
        name=name,
        rate=rate,
        posted_events_per_second=round(summary.events_per_second, 1),
        stored_events_per_second=round(len(stored) / elapsed, 1),
        stored=len(stored),
        acknowledged=len(sampler.acknowledged),
        lost=len(sampler.acknowledged - stored_now),
        latency_p50_ms=millis(sampler.latencies, PERCENTILES[0]),
        latency_p99_ms=millis(sampler.latencies, 99),
        latency_max_ms=millis(sampler.latencies, 100),
        sampler_floor_ms=millis(sampler.round_trips, 50),
        peak_rss_mib=peak_rss(samples),
    )


def ratio(value: float, baseline: float) -> str:
    return f"{value / baseline:.3f}x" if baseline > 0 else "n/a"


def print_report(ceiling: float, phases: list[Phase]) -> None:
    print(f"\nbare aiohttp server (reads the body, answers 200): {ceiling:,.0f} events/s = 1x")
    for phase in phases:
        offered = "flat out" if phase.rate is None else f"{phase.rate:g} events/s offered"
        print(f"\n{phase.name} ({offered}):")
        print(
            f"  acknowledged by the ingress: {phase.posted_events_per_second:,.0f} events/s "
            f"({ratio(phase.posted_events_per_second, ceiling)} of bare)"
        )
        print(
            f"  stored end to end:           {phase.stored_events_per_second:,.0f} distinct "
            f"events/s ({ratio(phase.stored_events_per_second, ceiling)} of bare); "
            f"{phase.stored} stored, {phase.acknowledged} acknowledged, {phase.lost} lost"
        )
        print(
            f"  2xx -> visible in ClickHouse: p50 {phase.latency_p50_ms} ms, "
            f"p99 {phase.latency_p99_ms} ms, max {phase.latency_max_ms} ms "
            f"(the sampler's own query: {phase.sampler_floor_ms} ms)"
        )
        print(
            "  peak RSS (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in phase.peak_rss_mib.items())
        )


async def e2e(arguments: argparse.Namespace) -> None:
    print(
        f"sgpipe e2e: {arguments.seconds:g} s per phase; fixed rate {arguments.rate:g} events/s, "
        "then flat out",
        flush=True,
    )
    ceiling = await bare_server_ceiling(arguments.seconds, arguments.seed, arguments.duplicates)
    key = generate_private_key()
    phases: list[Phase] = []
    with tempfile.TemporaryDirectory(prefix="sgpipe-e2e-") as directory:
        # start_up's webhook is named "soak": the same `sgpipe up` set-up as bench/soak.py.
        running = start_up(Path(directory), public_key_base64(key))
        try:
            webhook_url = f"{running.base_url}/webhooks/soak"
            for offset, (name, rate) in enumerate(
                (("fixed rate", arguments.rate), ("flat out", None))
            ):
                phases.append(
                    await run_phase(
                        name,
                        rate,
                        arguments,
                        webhook_url,
                        key,
                        running.data_dir,
                        running.process.pid,
                        arguments.seed + offset,
                    )
                )
        finally:
            code, stop_seconds = stop_up(running)
    print_report(ceiling, phases)
    print(f"\nsgpipe up stopped with exit code {code} in {stop_seconds:.1f} s")
    if arguments.json:
        print(
            json.dumps(
                {"bare_events_per_second": round(ceiling, 1), "phases": [asdict(p) for p in phases]}
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    parser.add_argument("--rate", type=float, default=1000.0, help="fixed-rate phase, events/s")
    parser.add_argument("--duplicates", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rss-every", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("--json", action="store_true")
    asyncio.run(e2e(parser.parse_args()))


if __name__ == "__main__":
    main()
