"""The whole processor stage (consume -> process -> produce -> commit) against its core function,
CPU per event, measured in the same run.

The stage: ``run_processor`` with the default settings (lz4, linger 5 ms, 6 partitions, the
dedup window) against a tansu broker on ``memory://`` (the session-style broker of the tests),
draining a raw topic of SendGrid-sized batches (768 KB, distinct events); per event of a running
stage, i.e. the CPU of a run of 12 batches minus that of a run of 2 (what starting the clients,
joining the group and stopping cost, ~0.1 s, is not per event), over the events in between
(the whole run's figure, start-up included, is printed too). The baseline:
``process_raw_record`` of the same raw records in the same process (split, parse, normalize,
encode: what any processor must do). Both are CPU time of this process (``time.process_time``:
the broker's own CPU and other processes competing for the cores do not count), the stage and
the baseline taking turns, the median of the rounds kept. Issue 16's target: stage <= 1.5x core.

Run: ``.venv/bin/python -m bench.processor_stage [--batches N] [--rounds N]``. Prints figures;
asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from dataclasses import dataclass

from bench.bench_hot_paths import SENDGRID_MAX_BATCH_BYTES, synthetic_batch
from processors.pipeline import process_raw_record
from processors.stage import run_processor
from schemas.email_event import EmailEventCodec
from schemas.raw_auth import RawAuthKey, sign_raw_record
from schemas.raw_batch import RawBatch, raw_batch_headers
from sgpipe.embedded.broker import EmbeddedBroker
from sgpipe.runtime.kafka import OutgoingRecord, create_producer, ensure_topics, send_all
from sgpipe.runtime.messages import Message
from sgpipe.runtime.metrics import REGISTRY, STAGE_PROCESS
from sgpipe.runtime.settings import Settings

BATCHES = 12
ROUNDS = 3
# The stage verifies each raw record's HMAC (raw_auth) before reading it, as in production.
RAW_AUTH_KEY = RawAuthKey("bench", b"bench-raw-auth-secret-0123456789abcdef")


# The short run whose cost is subtracted: what starting, joining and stopping a stage costs.
SHORT_BATCHES = 2


@dataclass(frozen=True)
class StageFigures:
    events: int
    stage_us_per_event: float  # per event of a running stage: (long run - short run) / events
    whole_run_us_per_event: float  # the long run's CPU / its events, start-up included
    core_us_per_event: float
    stage_events_per_second: float  # wall clock of the long run (depends on the machine's load)
    # The same stage with CPython's default collector thresholds and nothing frozen
    # (run_processor(tune_collector=False)), in the same rounds.
    untuned_stage_us_per_event: float

    @property
    def ratio(self) -> float:
        return self.stage_us_per_event / self.core_us_per_event

    @property
    def untuned_ratio(self) -> float:
        return self.untuned_stage_us_per_event / self.core_us_per_event


def raw_batches(count: int) -> list[RawBatch]:
    return [
        RawBatch(
            "bench",
            synthetic_batch(SENDGRID_MAX_BATCH_BYTES, seed=100 + index),
            1_700_000_000_000,
            f"req-{index}",
            1_700_000_000,
            "signature",
        )
        for index in range(count)
    ]


def signed_headers(batch: RawBatch) -> list[tuple[str, bytes]]:
    return sign_raw_record(RAW_AUTH_KEY, batch.body, raw_batch_headers(batch))


def stage_settings(servers: str, compression: str | None = None) -> Settings:
    suffix = uuid.uuid4().hex[:10]
    chosen = {"compression_type": compression} if compression else {}
    return Settings.model_validate(
        {
            "kafka": {
                "bootstrap_servers": servers,
                "session_timeout_ms": 1000,
                "heartbeat_interval_ms": 200,
                **chosen,
                "topics": {
                    "raw": f"raw-{suffix}",
                    "events": f"events-{suffix}",
                    "dead_letter": f"dlq-{suffix}",
                },
            },
            "processor": {"group_id": f"processor-{suffix}"},
            "raw_auth": {
                "keys": [{"id": RAW_AUTH_KEY.key_id, "secret": RAW_AUTH_KEY.secret.decode("ascii")}]
            },
        }
    )


def produced_events() -> float:
    return (
        REGISTRY.get_sample_value(
            "sgpipe_records_produced_total", {"stage": STAGE_PROCESS, "output": "events"}
        )
        or 0.0
    )


async def stop_once_produced(stop: asyncio.Event, expected: float) -> None:
    while produced_events() < expected:
        await asyncio.sleep(0.05)
    stop.set()


async def one_stage_run(
    servers: str,
    batches: list[RawBatch],
    events: int,
    compression: str | None = None,
    *,
    tune_collector: bool = True,
) -> tuple[float, float]:
    """CPU seconds of this process while the stage turns a fresh raw topic of ``batches`` into
    ``events`` acknowledged events, then drains and commits; and the wall-clock seconds."""
    settings = stage_settings(servers, compression)
    await ensure_topics(settings.kafka)
    producer = create_producer(settings.kafka)
    await producer.start()
    try:
        await send_all(
            producer,
            [
                OutgoingRecord(settings.kafka.topics.raw, b.body, headers=signed_headers(b))
                for b in batches
            ],
        )
    finally:
        await producer.stop()
    stop = asyncio.Event()
    watcher = asyncio.create_task(stop_once_produced(stop, produced_events() + events))
    started, wall = time.process_time(), time.perf_counter()
    try:
        await run_processor(
            settings, stop, drain=True, health_port=None, tune_collector=tune_collector
        )
    finally:
        watcher.cancel()
    return time.process_time() - started, time.perf_counter() - wall


def one_core_run(messages: list[Message], codec: EmailEventCodec) -> tuple[float, int]:
    started = time.process_time()
    events = sum(len(process_raw_record(message, codec).events) for message in messages)
    return time.process_time() - started, events


async def measure(
    batches: int = BATCHES, rounds: int = ROUNDS, compression: str | None = None
) -> StageFigures:
    """``compression``: kafka.compression_type for the run (default: the setting's default)."""
    raw = raw_batches(batches)
    messages = [
        Message("raw", 0, offset, 0, None, b.body, raw_batch_headers(b))
        for offset, b in enumerate(raw)
    ]
    codec = EmailEventCodec()
    broker = EmbeddedBroker()
    servers = await broker.start()
    try:
        marginal, untuned, whole, core, walls = [], [], [], [], []
        events = 0
        for _ in range(rounds):
            core_seconds, events = one_core_run(messages, codec)
            core.append(core_seconds / events)
            _, short_events = one_core_run(messages[:SHORT_BATCHES], codec)
            for tune_collector in (True, False):
                short_cpu, _ = await one_stage_run(
                    servers,
                    raw[:SHORT_BATCHES],
                    short_events,
                    compression,
                    tune_collector=tune_collector,
                )
                long_cpu, wall = await one_stage_run(
                    servers, raw, events, compression, tune_collector=tune_collector
                )
                per_event = (long_cpu - short_cpu) / (events - short_events)
                if tune_collector:
                    marginal.append(per_event)
                    whole.append(long_cpu / events)
                    walls.append(wall)
                else:
                    untuned.append(per_event)
    finally:
        await broker.stop()
    # Medians: the machine is shared, and a round can be unlucky either way.
    return StageFigures(
        events,
        statistics.median(marginal) * 1e6,
        statistics.median(whole) * 1e6,
        statistics.median(core) * 1e6,
        events / statistics.median(walls),
        statistics.median(untuned) * 1e6,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=BATCHES, help="768 KB raw batches")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument(
        "--compression",
        choices=["none", "gzip", "snappy", "lz4", "zstd"],
        help="kafka.compression_type (default: the setting's default)",
    )
    arguments = parser.parse_args()
    figures = asyncio.run(measure(arguments.batches, arguments.rounds, arguments.compression))
    print(f"{figures.events:,} events in {arguments.batches} raw batches of 768 KB")
    print(f"core (process_raw_record): {figures.core_us_per_event:6.1f} µs CPU/event = 1x")
    print(
        f"whole processor stage:     {figures.stage_us_per_event:6.1f} µs CPU/event = "
        f"{figures.ratio:.2f}x (target <= 1.5x)"
    )
    print(
        f"  with CPython's default GC thresholds:     {figures.untuned_stage_us_per_event:6.1f} "
        f"µs CPU/event = {figures.untuned_ratio:.2f}x"
    )
    print(
        f"  the run with its start-up, group join and stop: {figures.whole_run_us_per_event:.1f} "
        "µs CPU/event"
    )
    print(
        f"wall clock (group join and drain included): {figures.stage_events_per_second:,.0f} "
        "events/s"
    )


if __name__ == "__main__":
    main()
