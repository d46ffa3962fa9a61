"""The processor against a real Kafka-protocol broker (tansu): records in, records out,
offsets committed only for what was published."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from processors.stage import run_processor
from schemas.dead_letter import REASON_HEADER
from schemas.email_event import EmailEventCodec
from schemas.raw_batch import RawBatch
from sgpipe.embedded.broker import EmbeddedBroker, PortInUse
from sgpipe.runtime.kafka import OutgoingRecord, create_producer, ensure_topics, send_all
from sgpipe.runtime.metrics import REGISTRY
from tests.integration.kafka_tools import kafka_test_settings, read_topic
from tests.raw_auth_support import signed_raw_batch_headers

pytestmark = pytest.mark.kafka

EVENTS = [
    {"email": "a@example.com", "event": "delivered", "sg_event_id": "ev-1", "timestamp": 17e8},
    {"email": "b@example.com", "event": "open", "sg_event_id": "ev-2", "timestamp": "1700000001",
     "category": "welcome", "plan": "pro"},
    # No sg_event_id: kept with an id derived from its content, the same in every copy.
    {"email": "c@example.com", "event": "click", "timestamp": 1700000002, "attempt": "soon",
     "sg_message_id": "msg-3.filterdrecv-1"},
]  # fmt: skip


def raw_batch(body: bytes, request_id: str) -> RawBatch:
    return RawBatch(
        webhook="main",
        body=body,
        received_at_ms=1_700_000_010_000,
        request_id=request_id,
        signature_timestamp=1_700_000_009,
        authenticated_by="signature",
    )


async def test_processor_publishes_events_dead_letters_and_commits(
    kafka_bootstrap_servers: str, unique_name: str
) -> None:
    settings = kafka_test_settings(kafka_bootstrap_servers, unique_name)
    topics = settings.kafka.topics
    await ensure_topics(settings.kafka)
    body = ("[" + ",\r\n".join(json.dumps(event) for event in EVENTS) + "]\r\n").encode()
    batches = [raw_batch(body, "req-1"), raw_batch(body, "req-2"), raw_batch(b"not json", "req-3")]
    producer = create_producer(settings.kafka)
    await producer.start()
    try:
        await send_all(
            producer,
            [
                OutgoingRecord(topics.raw, b.body, headers=signed_raw_batch_headers(b))
                for b in batches
            ],
        )
    finally:
        await producer.stop()

    coercion_labels = {"stage": "process", "field": "attempt"}
    coercion_errors_before = REGISTRY.get_sample_value(
        "sgpipe_coercion_errors_total", coercion_labels
    )
    stop = asyncio.Event()
    worker = asyncio.create_task(run_processor(settings, stop, health_port=None))
    try:
        events = await read_topic(kafka_bootstrap_servers, topics.events, expected=3)
        dead = await read_topic(kafka_bootstrap_servers, topics.dead_letter, expected=1)
    finally:
        stop.set()
        await asyncio.wait_for(worker, timeout=30)

    codec = EmailEventCodec()
    decoded = sorted(
        (codec.decode(record.value) for record in events), key=lambda e: e["sg_event_id"]
    )
    # The second copy of the batch (a SendGrid retry) is absorbed by the dedup window.
    generated_id = decoded[2]["sg_event_id"]
    assert generated_id.startswith("sgpipe-")
    assert [(e["sg_event_id"], e["event"], e["email"]) for e in decoded] == [
        ("ev-1", "delivered", "a@example.com"),
        ("ev-2", "open", "b@example.com"),
        (generated_id, "click", "c@example.com"),
    ]
    assert decoded[1]["category"] == ["welcome"]
    assert decoded[1]["custom_args"] == {"plan": "pro"}
    assert (decoded[2]["sg_event_id_generated"], decoded[2]["coercion_errors"]) == (
        True,
        ["attempt"],
    )
    # Keyed by message id, else by event id.
    assert {record.key for record in events} == {b"ev-1", b"ev-2", b"msg-3.filterdrecv-1"}
    # Counted once per processed copy (the retry's copy is dropped later, by the dedup window).
    coercion_errors_after = REGISTRY.get_sample_value(
        "sgpipe_coercion_errors_total", coercion_labels
    )
    assert (coercion_errors_after or 0) - (coercion_errors_before or 0) == 2

    reasons = sorted(dict(record.headers)[REASON_HEADER] for record in dead)
    # Only the batch that is not JSON; every event object was kept.
    assert reasons == [b"invalid_json"]
    invalid_json = next(r for r in dead if dict(r.headers)[REASON_HEADER] == b"invalid_json")
    assert invalid_json.value == b"not json"
    assert dict(invalid_json.headers)["sgpipe-request-id"] == b"req-3"

    # Every raw record's offset was committed after its output was acknowledged.
    checker = AIOKafkaConsumer(
        bootstrap_servers=kafka_bootstrap_servers,
        group_id=settings.processor.group_id,
        enable_auto_commit=False,
    )
    await checker.start()
    try:
        committed = [
            await checker.committed(TopicPartition(topics.raw, partition))
            for partition in range(topics.partitions)
        ]
    finally:
        await checker.stop()
    assert sum(offset or 0 for offset in committed) == len(batches)


async def test_embedded_broker_refuses_a_port_already_in_use(kafka_bootstrap_servers: str) -> None:
    # Never mistake another broker (say, one orphaned by a crash) for the one we started.
    host, port = kafka_bootstrap_servers.split(":")
    with pytest.raises(
        PortInUse, match="is in use; set embedded.kafka_port or SGPIPE_EMBEDDED__KAFKA_PORT"
    ):
        await EmbeddedBroker(host, int(port)).start()
