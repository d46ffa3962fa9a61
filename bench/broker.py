"""The durable embedded broker (tansu on SeaweedFS) against the in-memory one, same run.

For each storage (memory, durable, durable without GOMEMLIMIT): start through
``EmbeddedKafka`` (timed), produce 1 KB and 768 KB messages with ``acks=all`` (aiokafka,
linger 5 ms, 256 KB batches for the small ones), consume them back, record the RSS of tansu
and weed, then kill -9 the storage and time the supervised restart. Prints figures and
durable/memory ratios; asserts nothing about time.

Run: ``.venv/bin/python -m bench.broker [--small N] [--large N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from sgpipe.embedded.broker import EmbeddedKafka
from sgpipe.runtime.settings import EmbeddedSettings

SMALL = 1024
LARGE = 768 * 1024


@dataclass
class Figures:
    label: str
    start_seconds: float = 0.0
    small_produce_per_second: float = 0.0
    large_produce_per_second: float = 0.0
    small_consume_per_second: float = 0.0
    restart_seconds: float = 0.0
    rss_mib: dict[str, float] = field(default_factory=dict)


def rss_mib(pid: int | None) -> float:
    if pid is None:
        return 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def produce(servers: str, topic: str, size: int, count: int, batch_size: int) -> float:
    producer = AIOKafkaProducer(
        bootstrap_servers=servers,
        acks="all",
        linger_ms=5,
        max_batch_size=batch_size,
        max_request_size=4 * 1_048_576,
    )
    await producer.start()
    payload = b"x" * size
    try:
        began = time.perf_counter()
        pending = [await producer.send(topic, payload) for _ in range(count)]
        await asyncio.gather(*pending)
        return count / (time.perf_counter() - began)
    finally:
        await producer.stop()


async def consume(servers: str, topic: str, count: int) -> float:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=servers,
        group_id=None,
        auto_offset_reset="earliest",
        fetch_max_bytes=16 * 1_048_576,
    )
    await consumer.start()
    try:
        received = 0
        began = time.perf_counter()
        while received < count:
            polled = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            received += sum(len(batch) for batch in polled.values())
        return count / (time.perf_counter() - began)
    finally:
        await consumer.stop()


async def measure(label: str, settings: EmbeddedSettings, small: int, large: int) -> Figures:
    figures = Figures(label)
    with tempfile.TemporaryDirectory(prefix="sgpipe-bench-") as directory:
        kafka = EmbeddedKafka(settings, Path(directory))
        began = time.perf_counter()
        servers = await kafka.start()
        figures.start_seconds = time.perf_counter() - began
        try:
            admin = AIOKafkaAdminClient(bootstrap_servers=servers)
            await admin.start()
            await admin.create_topics([NewTopic("small", 1, 1), NewTopic("large", 1, 1)])
            await admin.close()
            figures.small_produce_per_second = await produce(
                servers, "small", SMALL, small, 256 * 1024
            )
            figures.large_produce_per_second = await produce(
                servers, "large", LARGE, large, LARGE + 4096
            )
            figures.small_consume_per_second = await consume(servers, "small", small)
            assert kafka.broker is not None
            figures.rss_mib["tansu"] = rss_mib(kafka.broker.pid)
            if kafka.storage is not None:
                figures.rss_mib["weed"] = rss_mib(kafka.storage.pid)
                # Crash the storage and time until the supervisor has it serving again.
                crashed = time.perf_counter()
                kafka.storage.kill()
                await kafka.storage.wait_exited()
                while not (kafka.alive() and kafka.restarts()["storage"] == 1):
                    await asyncio.sleep(0.05)
                figures.restart_seconds = time.perf_counter() - crashed
        finally:
            await kafka.stop()
    return figures


async def measure_all(small: int, large: int, memory_limits: list[int]) -> list[Figures]:
    """In-memory first (the baseline), then durable with each GOMEMLIMIT."""
    runs = [("memory", EmbeddedSettings(kafka_port=0, broker_storage="memory"))]
    for limit in memory_limits:
        label = f"durable, GOMEMLIMIT {limit} MiB" if limit else "durable, no GOMEMLIMIT"
        runs.append((label, EmbeddedSettings(kafka_port=0, storage_memory_limit_mib=limit)))
    return [await measure(label, settings, small, large) for label, settings in runs]


async def main(small: int, large: int, memory_limits: list[int]) -> None:
    results = await measure_all(small, large, memory_limits)
    baseline = results[0]
    print(f"{small} messages of 1 KB, {large} of 768 KB, acks=all, one partition each")
    print("ratios against memory:// measured in the same run")
    for figures in results:
        rss = ", ".join(f"{name} {value:.0f} MiB" for name, value in figures.rss_mib.items())
        print(
            f"{figures.label:28} start {figures.start_seconds:5.2f} s | "
            f"1 KB produce {figures.small_produce_per_second:8.0f}/s "
            f"({figures.small_produce_per_second / baseline.small_produce_per_second:.2f}x) | "
            f"768 KB produce {figures.large_produce_per_second:6.1f}/s "
            f"({figures.large_produce_per_second / baseline.large_produce_per_second:.2f}x) | "
            f"1 KB consume {figures.small_consume_per_second:8.0f}/s "
            f"({figures.small_consume_per_second / baseline.small_consume_per_second:.2f}x) | "
            f"RSS {rss}"
            + (
                f" | storage kill -9 -> serving {figures.restart_seconds:.2f} s"
                if figures.restart_seconds
                else ""
            )
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=50_000)
    parser.add_argument("--large", type=int, default=150)
    parser.add_argument(
        "--memory-limits",
        default=f"{EmbeddedSettings().storage_memory_limit_mib},0",
        help="comma-separated GOMEMLIMIT values (MiB) for SeaweedFS, 0 = none; default: "
        "the configured default, then none",
    )
    arguments = parser.parse_args()
    limits = [int(value) for value in arguments.memory_limits.split(",")]
    asyncio.run(main(arguments.small, arguments.large, limits))
