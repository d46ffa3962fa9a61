"""The durable embedded broker's throughput next to the in-memory one, measured in the same
run (issue 7's closing words need the figure; ``bench/broker.py`` is the full benchmark and
lends its produce/consume loops). The test asserts what it can stand behind -- every
acknowledged message is read back -- and reports the rates without asserting them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.broker import SMALL, consume, produce
from sgpipe.embedded.broker import EmbeddedKafka
from sgpipe.runtime.settings import EmbeddedSettings
from tests.promise_report import REPORT, BrokerThroughput

pytestmark = pytest.mark.kafka

MESSAGES = 20_000
TOPIC = "throughput"


async def produce_and_read_back(settings: EmbeddedSettings, data_dir: Path) -> float:
    """Produce MESSAGES of 1 KB with acks=all, read every one back; the produce rate."""
    kafka = EmbeddedKafka(settings, data_dir)
    servers = await kafka.start()
    try:
        admin = AIOKafkaAdminClient(bootstrap_servers=servers)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(TOPIC, 1, 1)])
        finally:
            await admin.close()
        rate = await produce(servers, TOPIC, SMALL, MESSAGES, 256 * 1024)
        # consume() returns once it has read MESSAGES records: a loss would hang it.
        await asyncio.wait_for(consume(servers, TOPIC, MESSAGES), timeout=120)
        return rate
    finally:
        await kafka.stop()


async def test_durable_broker_throughput_next_to_in_memory(tmp_path: Path) -> None:
    memory = await produce_and_read_back(
        EmbeddedSettings(kafka_port=0, broker_storage="memory"), tmp_path / "memory"
    )
    durable = await produce_and_read_back(EmbeddedSettings(kafka_port=0), tmp_path / "durable")
    REPORT.record_broker(BrokerThroughput(MESSAGES, memory, durable))
    print(
        f"\n1 KB acks=all: durable {durable:,.0f} msg/s, memory {memory:,.0f} msg/s "
        f"({durable / memory:.2f}x)"
    )
