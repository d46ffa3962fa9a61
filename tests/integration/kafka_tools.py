"""Test-side Kafka helpers: settings pointed at the test broker, and reading a topic back."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiokafka import AIOKafkaConsumer

from sgpipe.runtime.kafka import Record
from sgpipe.runtime.settings import Settings
from tests.raw_auth_support import RAW_AUTH_DOCUMENT

# Group joins on tansu take ~1 s with these instead of 5-18 s with Kafka's defaults.
FAST_GROUP_SETTINGS = {"session_timeout_ms": 1000, "heartbeat_interval_ms": 200}


def kafka_test_settings(bootstrap_servers: str, suffix: str, **sections: Any) -> Settings:
    kafka = {
        "bootstrap_servers": bootstrap_servers,
        **FAST_GROUP_SETTINGS,
        "topics": {
            "raw": f"raw-{suffix}",
            "events": f"events-{suffix}",
            "dead_letter": f"dlq-{suffix}",
            "partitions": 2,
        },
    }
    document: dict[str, Any] = {
        "kafka": kafka,
        "processor": {"group_id": f"processor-{suffix}"},
        "sink": {
            "group_id": f"sink-{suffix}",
            "dead_letter_group_id": f"dead-letters-{suffix}",
            "batch_max_seconds": 0.2,
        },
        # Stages refuse to start without a raw-record key (tests/raw_auth_support.py).
        "raw_auth": RAW_AUTH_DOCUMENT,
        **sections,
    }
    return Settings.model_validate(document)


async def read_topic(
    bootstrap_servers: str, topic: str, expected: int, timeout: float = 20.0
) -> list[Record]:
    """Read ``topic`` from the start until ``expected`` records arrived (or time ran out)."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    records: list[Record] = []
    try:
        deadline = time.monotonic() + timeout
        while len(records) < expected and time.monotonic() < deadline:
            polled = await consumer.getmany(timeout_ms=200)
            for batch in polled.values():
                records.extend(batch)
        # A little longer, to catch records beyond what was expected.
        await asyncio.sleep(0.3)
        for batch in (await consumer.getmany(timeout_ms=300)).values():
            records.extend(batch)
    finally:
        await consumer.stop()
    return records
