"""Small batches on the durable embedded broker against the in-memory one: CPU per record.

``--record-bytes 786432 --compression none`` (or snappy, zstd) compares what the ingress's
compression costs and saves on each broker for SendGrid's largest batches.

What issue 16 measured end to end (2 KB SendGrid batches cost 3.0x the CPU per event on the
durable broker) comes from the broker's side of many small writes: tansu on SeaweedFS turns
every record batch it is sent into objects and requests of its storage. This drives the raw
topic the way the ingress does -- one 2 KB record per request, ``--concurrency`` requests in
flight, each awaiting its ``acks=all`` -- with the ingress's own producer (``create_producer``),
for each producer linger and raw-topic partition count asked for, on both storages of
``EmbeddedKafka``, and reads the topic back once as a consumer group that commits after each
poll (the processor's side). It prints the CPU (user + system, from ``/proc``) of tansu, of
SeaweedFS and of this process (the clients) per record, and the durable/in-memory ratio of the
total for each setting, all measured in the same run.

Run: ``.venv/bin/python -m bench.broker_small [--records N] [--lingers 5,20] [--partitions 6,1]``.
Asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.bench_hot_paths import synthetic_batch
from sgpipe.embedded.broker import EmbeddedKafka
from sgpipe.runtime.kafka import create_producer
from sgpipe.runtime.settings import EmbeddedSettings, KafkaSettings

RECORD_BYTES = 2 * 1024
CONCURRENCY = 32


@dataclass(frozen=True)
class Run:
    storage: str
    linger_ms: int
    partitions: int
    records: int
    tansu_us: float  # CPU per record, produce and consume
    weed_us: float
    client_us: float
    seconds: float

    @property
    def total_us(self) -> float:
        return self.tansu_us + self.weed_us + self.client_us


def cpu_seconds(pid: int | None) -> float:
    """utime + stime of a process and its reaped children (Linux ``/proc/<pid>/stat``)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(value) for value in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


async def produce_like_the_ingress(
    servers: str,
    topic: str,
    records: int,
    linger_ms: int,
    concurrency: int,
    compression: str,
    record_bytes: int = RECORD_BYTES,
) -> None:
    settings = KafkaSettings(
        bootstrap_servers=servers,
        linger_ms=linger_ms,
        compression_type=compression,  # type: ignore[arg-type]
    )
    producer = create_producer(settings)
    await producer.start()
    # SendGrid-like events (distinct ids, emails, reasons): compresses as real batches do.
    body = synthetic_batch(record_bytes, seed=1)
    remaining = records

    async def request() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            acknowledged = await producer.send(topic, body)
            await acknowledged

    try:
        await asyncio.gather(*(request() for _ in range(concurrency)))
    finally:
        await producer.stop()


async def consume_like_the_processor(servers: str, topic: str, records: int) -> None:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=servers,
        group_id=f"bench-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        received = 0
        while received < records:
            polled = await consumer.getmany(timeout_ms=1000, max_records=5_000)
            received += sum(len(batch) for batch in polled.values())
            if polled:
                await consumer.commit()
    finally:
        await consumer.stop()


async def one_run(
    kafka: EmbeddedKafka,
    storage: str,
    linger_ms: int,
    partitions: int,
    records: int,
    concurrency: int,
    compression: str,
    record_bytes: int,
) -> Run:
    servers = kafka.bootstrap_servers
    topic = f"raw-{linger_ms}-{partitions}-{uuid.uuid4().hex[:6]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()
    tansu_pid = kafka.broker.pid if kafka.broker is not None else None
    weed_pid = kafka.storage.pid if kafka.storage is not None else None
    before = (cpu_seconds(tansu_pid), cpu_seconds(weed_pid), time.process_time())
    began = time.perf_counter()
    await produce_like_the_ingress(
        servers, topic, records, linger_ms, concurrency, compression, record_bytes
    )
    await consume_like_the_processor(servers, topic, records)
    seconds = time.perf_counter() - began
    after = (cpu_seconds(tansu_pid), cpu_seconds(weed_pid), time.process_time())
    tansu, weed, client = (
        (later - earlier) / records * 1e6 for earlier, later in zip(before, after, strict=True)
    )
    return Run(storage, linger_ms, partitions, records, tansu, weed, client, seconds)


async def measure(
    records: int,
    lingers: list[int],
    partition_counts: list[int],
    concurrency: int,
    compression: str = KafkaSettings().compression_type,
    record_bytes: int = RECORD_BYTES,
) -> list[Run]:
    runs: list[Run] = []
    for storage in ("memory", "durable"):
        settings = EmbeddedSettings(kafka_port=0, broker_storage=storage)
        with tempfile.TemporaryDirectory(prefix="sgpipe-bench-") as directory:
            kafka = EmbeddedKafka(settings, Path(directory))
            await kafka.start()
            try:
                for linger_ms in lingers:
                    for partitions in partition_counts:
                        runs.append(
                            await one_run(
                                kafka,
                                storage,
                                linger_ms,
                                partitions,
                                records,
                                concurrency,
                                compression,
                                record_bytes,
                            )
                        )
            finally:
                await kafka.stop()
    return runs


def print_report(runs: list[Run]) -> None:
    memory = {(r.linger_ms, r.partitions): r for r in runs if r.storage == "memory"}
    print(
        f"{'storage':8} {'linger':>6} {'parts':>5} {'tansu':>8} {'weed':>8} {'client':>8} "
        f"{'total':>8} {'x memory':>9} {'x memory 5 ms/6':>16} {'seconds':>8}   (µs CPU/record)"
    )
    reference = memory.get((5, 6))
    for r in runs:
        same = memory[(r.linger_ms, r.partitions)]
        against_default = r.total_us / reference.total_us if reference else float("nan")
        print(
            f"{r.storage:8} {r.linger_ms:6} {r.partitions:5} {r.tansu_us:8.0f} {r.weed_us:8.0f} "
            f"{r.client_us:8.0f} {r.total_us:8.0f} {r.total_us / same.total_us:9.2f} "
            f"{against_default:16.2f} {r.seconds:8.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=5_000, help="2 KB records per run")
    parser.add_argument("--lingers", default="5,20", help="producer linger_ms values")
    parser.add_argument("--partitions", default="6,1", help="raw-topic partition counts")
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    parser.add_argument("--record-bytes", type=int, default=RECORD_BYTES)
    parser.add_argument(
        "--compression",
        choices=["none", "gzip", "snappy", "lz4", "zstd"],
        default=KafkaSettings().compression_type,
        help="the producer's compression (default: kafka.compression_type's default)",
    )
    arguments = parser.parse_args()
    runs = asyncio.run(
        measure(
            arguments.records,
            [int(value) for value in arguments.lingers.split(",")],
            [int(value) for value in arguments.partitions.split(",")],
            arguments.concurrency,
            arguments.compression,
            arguments.record_bytes,
        )
    )
    print_report(runs)


if __name__ == "__main__":
    main()
