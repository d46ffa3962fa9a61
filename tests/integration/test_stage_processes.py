"""`sgpipe process` and `sgpipe sink` as real processes against a real broker (tansu) and the
real engine (chdb served over HTTP): health, readiness, metrics, poison, fatal errors."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from processors.pipeline import EncodedEvent
from schemas.email_event import EmailEventCodec
from schemas.raw_batch import RawBatch
from sgpipe.embedded.broker import EmbeddedBroker
from sgpipe.runtime.kafka import OutgoingRecord, create_producer, ensure_topics, send_all
from sgpipe.runtime.settings import KafkaSettings
from tests import forked
from tests.integration.kafka_tools import FAST_GROUP_SETTINGS
from tests.integration.processes import (
    ServedClickHouse,
    http_get,
    metric,
    served_clickhouse,
    start_sgpipe,
    wait_for_log_event,
    wait_for_status,
    write_config,
)
from tests.raw_auth_support import RAW_AUTH_DOCUMENT, signed_raw_batch_headers

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

EVENTS = [
    {"email": "a@example.com", "event": "delivered", "sg_event_id": "ev-1", "timestamp": 17e8},
    "not an event",
    {"email": "b@example.com", "event": "open", "sg_event_id": "ev-2", "timestamp": 1700000001},
]  # fmt: skip


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    """A broker of this test's own: the test stops it."""
    own = EmbeddedBroker()
    asyncio.run(own.start())
    try:
        yield own
    finally:
        asyncio.run(own.stop())


@pytest.fixture
def clickhouse(tmp_path: Path) -> Iterator[ServedClickHouse]:
    with served_clickhouse(tmp_path / "clickhouse") as served:
        yield served


def stage_config(
    tmp_path: Path, broker: EmbeddedBroker, clickhouse: ServedClickHouse, suffix: str
) -> tuple[Path, dict[str, Any]]:
    document: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": broker.bootstrap_servers,
            **FAST_GROUP_SETTINGS,
            "topics": {
                "raw": f"raw-{suffix}",
                "events": f"events-{suffix}",
                "dead_letter": f"dlq-{suffix}",
                "partitions": 2,
            },
        },
        "clickhouse": {"url": clickhouse.url, "database": f"db_{suffix}"},
        "processor": {
            "group_id": f"processor-{suffix}",
            "health_host": "127.0.0.1",
            "health_port": 0,
        },
        "sink": {
            "group_id": f"sink-{suffix}",
            "dead_letter_group_id": f"dead-letters-{suffix}",
            "batch_max_seconds": 0.2,
            "health_host": "127.0.0.1",
            "health_port": 0,
        },
        "logging": {"format": "json"},
        "raw_auth": RAW_AUTH_DOCUMENT,
    }
    return write_config(tmp_path / "sgpipe.yaml", document), document


async def produce_raw(kafka: KafkaSettings, body: bytes, request_id: str) -> None:
    batch = RawBatch("main", body, 1_700_000_010_000, request_id, None, "none")
    producer = create_producer(kafka)
    await producer.start()
    try:
        await send_all(
            producer,
            [OutgoingRecord(kafka.topics.raw, body, headers=signed_raw_batch_headers(batch))],
        )
    finally:
        await producer.stop()


async def committed(kafka: KafkaSettings, group_id: str, topic: str) -> list[int | None]:
    checker = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap_servers, group_id=group_id, enable_auto_commit=False
    )
    await checker.start()
    try:
        return [
            await checker.committed(TopicPartition(topic, partition))
            for partition in range(kafka.topics.partitions)
        ]
    finally:
        await checker.stop()


def wait_for_rows(clickhouse: ServedClickHouse, sql: str, expected: str, *stages: Any) -> None:
    deadline = time.monotonic() + 60
    last = ""
    while time.monotonic() < deadline:
        try:
            last = clickhouse.query(sql)
        except OSError as exc:
            last = repr(exc)
        if last == expected:
            return
        time.sleep(0.2)
    logs = "\n".join(stage.output() for stage in stages)
    raise AssertionError(f"{sql!r} gave {last!r}, expected {expected!r}\n{logs}")


def test_stages_serve_health_readiness_and_metrics_as_records_flow(
    tmp_path: Path, broker: EmbeddedBroker, clickhouse: ServedClickHouse, unique_name: str
) -> None:
    config, document = stage_config(tmp_path, broker, clickhouse, unique_name)
    kafka = KafkaSettings.model_validate(document["kafka"])
    processor = start_sgpipe(["process"], config, tmp_path / "process.log")
    sink = start_sgpipe(["sink"], config, tmp_path / "sink.log")
    # Port 0: each binds a free port (no race with other tests) and logs it.
    process_port = wait_for_log_event(processor, "serving health endpoints")["port"]
    sink_port = wait_for_log_event(sink, "serving health endpoints")["port"]
    process_url = f"http://127.0.0.1:{process_port}"
    sink_url = f"http://127.0.0.1:{sink_port}"
    try:
        assert wait_for_status(f"{process_url}/healthz", 200, processor)["stage"] == "process"
        assert wait_for_status(f"{sink_url}/healthz", 200, sink)["stage"] == "sink"
        ready = wait_for_status(f"{process_url}/readyz", 200, processor)
        assert ready["checks"]["process.kafka"]["ok"] is True
        wait_for_status(f"{sink_url}/readyz", 200, sink)

        body = ("[" + ",\r\n".join(json.dumps(e) for e in EVENTS) + "]\r\n").encode()
        asyncio.run(produce_raw(kafka, body, "req-1"))
        asyncio.run(produce_raw(kafka, b"not json at all", "req-2"))
        database = document["clickhouse"]["database"]
        wait_for_rows(
            clickhouse,
            f"SELECT sg_event_id FROM {database}.email_events FINAL ORDER BY sg_event_id",
            "ev-1\nev-2\n",
            processor,
            sink,
        )

        # The poison element and the poison batch were dead-lettered; the valid events landed.
        _, process_metrics = http_get(f"{process_url}/metrics")
        assert metric(process_metrics, "sgpipe_records_consumed_total", stage="process") == 2
        produced = metric(
            process_metrics, "sgpipe_records_produced_total", stage="process", output="events"
        )
        assert produced == 2
        dead = {
            reason: metric(
                process_metrics, "sgpipe_dead_letters_total", stage="process", reason=reason
            )
            for reason in ("not_an_object", "invalid_json")
        }
        assert dead == {"not_an_object": 1, "invalid_json": 1}
        assert metric(process_metrics, "sgpipe_last_commit_timestamp_seconds", stage="process") > 0
        deadline = time.monotonic() + 10
        inserted = 0.0
        while inserted < 2 and time.monotonic() < deadline:
            _, sink_metrics = http_get(f"{sink_url}/metrics")
            inserted = metric(
                sink_metrics,
                "sgpipe_clickhouse_inserted_rows_total",
                stage="sink",
                table="email_events",
            )
        assert inserted == 2
        assert metric(sink_metrics, "sgpipe_records_consumed_total", stage="sink") == 2

        # `sgpipe sink` also runs the dead-letter sink: both dead letters are in ClickHouse,
        # and its readiness is part of the sink's.
        wait_for_rows(
            clickhouse,
            f"SELECT reason, stage, event_index, request_id FROM {database}.dead_letters FINAL "
            "ORDER BY reason",
            "invalid_json\tprocess\t-1\treq-2\nnot_an_object\tprocess\t1\treq-1\n",
            processor,
            sink,
        )
        checks = wait_for_status(f"{sink_url}/readyz", 200, sink)["checks"]
        assert {name for name in checks if name.startswith("dead_letters.")} == {
            "dead_letters.kafka",
            "dead_letters.assigned",
            "dead_letters.destination",
            "dead_letters.progress",
            "dead_letters.dead_letter_limit",
        }
        _, sink_metrics = http_get(f"{sink_url}/metrics")
        assert metric(sink_metrics, "sgpipe_records_consumed_total", stage="dead_letters") == 2

        # Readiness drops when the broker goes away; the processes stay alive.
        asyncio.run(broker.stop())
        not_ready = wait_for_status(f"{process_url}/readyz", 503, processor, timeout=40)
        assert not_ready["checks"]["process.kafka"]["ok"] is False
        assert not_ready["status"] == "not_ready"
        wait_for_status(f"{sink_url}/readyz", 503, sink, timeout=40)
        assert http_get(f"{process_url}/healthz")[0] == 200
    finally:
        # A stop is prompt even with the broker gone.
        assert processor.stop() == 0, processor.output()
        assert sink.stop() == 0, sink.output()


def test_an_incompatible_table_stops_the_sink_with_a_clear_message_and_no_commit(
    tmp_path: Path, broker: EmbeddedBroker, clickhouse: ServedClickHouse, unique_name: str
) -> None:
    config, document = stage_config(tmp_path, broker, clickhouse, unique_name)
    kafka = KafkaSettings.model_validate(document["kafka"])
    database = document["clickhouse"]["database"]
    # The schema as `sgpipe migrate` leaves it, then a botched manual change: a column that
    # cannot hold what the sink writes. The migrations are all applied (their checksums hold),
    # so only the start-up comparison with the contract can catch it.
    migrate = forked.run(
        [sys.executable, "-m", "sgpipe", "migrate", "--config", str(config)],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert migrate.returncode == 0, migrate.stderr.decode()
    clickhouse.query(f"ALTER TABLE {database}.email_events MODIFY COLUMN attempt String")
    event = {
        "webhook": "main", "event": "open", "sg_event_id": "ev-1",
        "event_time": 1_700_000_000_000, "email": "a@example.com",
        "received_at": 1_700_000_010_000, "request_id": "req-1", "raw": "{}",
    }  # fmt: skip
    encoded = EncodedEvent("ev-1", "open", EmailEventCodec().encode(event), b"ev-1")

    async def produce_event() -> None:
        await ensure_topics(kafka)
        producer = create_producer(kafka)
        await producer.start()
        try:
            await send_all(producer, [OutgoingRecord(kafka.topics.events, encoded.value)])
        finally:
            await producer.stop()

    asyncio.run(produce_event())
    sink = start_sgpipe(["sink"], config, tmp_path / "sink.log")
    try:
        returncode = sink.process.wait(timeout=90)
    finally:
        sink.stop()
    output = sink.output()
    assert returncode == 3, output
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    fatal = [line for line in lines if line["event"] == "stage stopped on a fatal error"]
    assert fatal, output
    # Found at start, before any record is read: nothing written, nothing committed.
    assert fatal[-1]["error"] == (
        f"sink: table {database}.email_events does not match what this version writes: "
        "column attempt is String, expected UInt32; apply the migrations "
        "(`sgpipe migrate`) or fix the table"
    )
    assert "Traceback" not in output
    assert clickhouse.query(f"SELECT count() FROM {database}.email_events") == "0\n"
    group = document["sink"]["group_id"]
    assert asyncio.run(committed(kafka, group, kafka.topics.events)) == [None, None]
