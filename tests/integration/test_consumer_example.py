"""docs/consuming.md's example subscriber (examples/consumer.py) runs against a real broker and
reads what sgpipe writes: records of every schema version, each as its current-schema event."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from schemas.email_event import EmailEventCodec
from sgpipe.runtime.kafka import OutgoingRecord, create_producer, ensure_topics, send_all
from tests.golden import encoded_events, fixture_names, payload
from tests.integration.kafka_tools import kafka_test_settings

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[2]
FOUNDATION_RECORDS = ROOT / "tests" / "fixtures" / "avro" / "v1_records_from_foundation.json"


async def test_example_consumer_prints_every_event(
    kafka_bootstrap_servers: str, unique_name: str
) -> None:
    settings = kafka_test_settings(kafka_bootstrap_servers, unique_name)
    topic = settings.kafka.topics.events
    await ensure_topics(settings.kafka)
    codec = EmailEventCodec()
    v1_values = [
        base64.b64decode(entry["value"])
        for entry in json.loads(FOUNDATION_RECORDS.read_text())["records"][:5]
    ]
    v2_values = encoded_events([payload(name) for name in fixture_names()[:5]], codec)
    records = [
        OutgoingRecord(topic, value, key=f"key-{index}".encode())
        for index, value in enumerate(v1_values + v2_values)
    ]
    producer = create_producer(settings.kafka)
    await producer.start()
    try:
        await send_all(producer, records)
    finally:
        await producer.stop()

    command = [
        sys.executable,
        str(ROOT / "examples" / "consumer.py"),
        "--bootstrap-servers", kafka_bootstrap_servers,
        "--topic", topic,
        "--group", f"example-{unique_name}",
        "--schemas", str(ROOT / "schemas" / "avro"),
        "--max-records", str(len(records)),
    ]  # fmt: skip
    result = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, timeout=120, check=False
    )

    assert result.returncode == 0, result.stderr.decode()
    printed = [json.loads(line) for line in result.stdout.decode().splitlines()]

    def as_printed(record: OutgoingRecord) -> dict[str, Any]:
        event = {"key": (record.key or b"").decode(), **codec.decode(record.value)}
        document: dict[str, Any] = json.loads(json.dumps(event, default=str))
        return document

    # Partitions interleave; within the topic every record is printed exactly once.
    assert sorted(printed, key=lambda e: e["key"]) == sorted(
        (as_printed(record) for record in records), key=lambda e: e["key"]
    )
    assert {event["coercion_errors"] == [] for event in printed} == {True}
    # The same bounce from both writers: v1 kept its reason only in raw, v2 types it.
    bounces = sorted(e["reason"] for e in printed if e["sg_event_id"] == "6g4ZI7SA-xmRDv57GoPIPw==")
    assert bounces == ["", "500 unknown recipient"]
