"""A rolling deploy: the events topic holds records written by the foundation's encoder (schema
v1, captured from commit 12ff45a) and by the current processor (v2); the current sink consumes
all of them from a real broker into the real engine, and every row is right."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.exceptions import DatabaseError
from fastavro import schemaless_reader

from schemas.email_event import EmailEventCodec, schema_versions
from sgpipe.runtime.kafka import OutgoingRecord, create_producer, ensure_topics, send_all
from sinks.stage import run_sink
from tests.golden import DEFAULTS, encoded_events, expected_record, iso, json_form, payload
from tests.integration.clickhouse_tools import clickhouse_client, select_rows, served_clickhouse
from tests.integration.kafka_tools import kafka_test_settings

pytest.importorskip("chdb")

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

ROOT = Path(__file__).resolve().parents[2]
FOUNDATION_RECORDS = ROOT / "tests" / "fixtures" / "avro" / "v1_records_from_foundation.json"
# Fixtures the foundation never saw: written only by the current processor.
V2_ONLY = [
    "quirk_asm_group_id_string", "quirk_duplicate_keys", "quirk_legacy_marketing_campaign",
    "quirk_missing_event", "quirk_missing_sg_event_id", "quirk_missing_timestamp",
    "quirk_send_at_string", "quirk_sg_event_id_long", "quirk_tls_cert_err_reseller",
    "quirk_uncoercible_values", "quirk_unicode_escapes",
]  # fmt: skip
LATER_MS = 1_700_000_200_000


def v1_row_expectation(value: bytes) -> dict[str, Any]:
    """A v1 record's row: its v1 fields as the foundation wrote them, the rest defaults."""
    v1 = schema_versions()[0]
    as_written = schemaless_reader(io.BytesIO(value[10:]), v1.schema, None)
    assert isinstance(as_written, dict)
    return json_form({**DEFAULTS, **as_written})


async def wait_for_rows(client: Any, sql: str, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            rows = await select_rows(client, sql)
        except DatabaseError:  # the sink has not created the table yet
            rows = []
        if rows and rows[0]["n"] >= count:
            return
        await asyncio.sleep(0.3)
    raise AssertionError(f"fewer than {count} rows after {timeout} s")


async def test_sink_consumes_v1_and_v2_records_into_correct_rows(
    kafka_bootstrap_servers: str, unique_name: str, tmp_path: Path
) -> None:
    settings = kafka_test_settings(
        kafka_bootstrap_servers, unique_name, clickhouse={"database": f"evo_{unique_name}"}
    )
    database = settings.clickhouse.database
    await ensure_topics(settings.kafka)
    codec = EmailEventCodec()
    v1_values = [
        base64.b64decode(entry["value"])
        for entry in json.loads(FOUNDATION_RECORDS.read_text())["records"]
    ]
    v2_values = encoded_events([payload(name) for name in V2_ONLY], codec)
    # A v2 copy of an event the foundation already wrote, received later: FINAL keeps it.
    redelivered = encoded_events([payload("bounce")], codec, received_at_ms=LATER_MS)
    interleaved = [v for pair in zip(v1_values, v2_values, strict=False) for v in pair]
    interleaved += v1_values[len(v2_values) :] + v2_values[len(v1_values) :] + redelivered
    producer = create_producer(settings.kafka)
    await producer.start()
    try:
        await send_all(
            producer, [OutgoingRecord(settings.kafka.topics.events, v) for v in interleaved]
        )
    finally:
        await producer.stop()

    async with served_clickhouse(tmp_path / "ch") as url, clickhouse_client(url) as client:
        stop = asyncio.Event()
        sink = asyncio.create_task(run_sink(settings, stop, clickhouse_url=url, health_port=None))
        try:
            # One row per distinct event (the redelivered bounce may already be collapsed).
            await wait_for_rows(
                client,
                f"SELECT count() AS n FROM {database}.email_events FINAL",
                len(v1_values) + len(v2_values),
            )
        finally:
            stop.set()
            await asyncio.wait_for(sink, timeout=60)

        rows = await select_rows(
            client, f"SELECT * EXCEPT (inserted_at) FROM {database}.email_events FINAL"
        )
    by_id = {row["sg_event_id"]: json_form(row) for row in rows}
    assert len(rows) == len(v1_values) + len(v2_values)

    bounce_id = json.loads(payload("bounce"))["sg_event_id"]
    for value in v1_values:
        expected = v1_row_expectation(value)
        if expected["sg_event_id"] == bounce_id:
            continue
        assert by_id[expected["sg_event_id"]] == expected
    for name in V2_ONLY:
        row = next(row for row in by_id.values() if row["raw"] == payload(name).decode())
        assert row == expected_record(name)
    later = iso(datetime.fromtimestamp(LATER_MS / 1000, UTC))
    assert by_id[bounce_id] == expected_record("bounce", received_at=later)
    assert by_id[bounce_id]["reason"] == "500 unknown recipient"
