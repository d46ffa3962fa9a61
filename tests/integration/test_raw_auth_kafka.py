"""Forged raw records through the real broker and the real processor stage: a producer with
write rights on the raw topic (the test broker asks for no credentials, so any producer has
them, like one holding the broker's own) cannot turn a raw batch into events without the
ingress's key. Every forged record is dead-lettered as ``unauthenticated_raw_record``; records
signed by a key in ``raw_auth.keys`` (the new one, or the old one during a rotation) become
events."""

from __future__ import annotations

import asyncio
import json

import pytest

from processors.authenticate import UNAUTHENTICATED_RAW_RECORD
from processors.stage import run_processor
from schemas.dead_letter import REASON_HEADER
from schemas.email_event import EmailEventCodec
from schemas.raw_auth import RAW_HMAC_HEADER, RawAuthKey, sign_raw_record
from schemas.raw_batch import RawBatch, raw_batch_headers
from sgpipe.runtime.kafka import OutgoingRecord, create_producer, ensure_topics, send_all
from tests.integration.kafka_tools import kafka_test_settings, read_topic

pytestmark = pytest.mark.kafka

NEW_KEY = RawAuthKey("k2", b"new-secret-" + b"n" * 32)
OLD_KEY = RawAuthKey("k1", b"old-secret-" + b"o" * 32)
REMOVED_KEY = RawAuthKey("k0", b"removed-secret-" + b"r" * 32)


def batch(name: str) -> RawBatch:
    event = {"event": "delivered", "sg_event_id": f"ev-{name}", "email": f"{name}@example.com"}
    body = json.dumps([{**event, "timestamp": 1_700_000_000}]).encode()
    return RawBatch("main", body, 1_700_000_010_000, f"req-{name}", 1_700_000_009, "signature")


def record(topic: str, name: str, headers: list[tuple[str, bytes]]) -> OutgoingRecord:
    return OutgoingRecord(topic, batch(name).body, headers=headers)


def signed(key: RawAuthKey, name: str) -> list[tuple[str, bytes]]:
    return sign_raw_record(key, batch(name).body, raw_batch_headers(batch(name)))


def forged_records(topic: str) -> list[OutgoingRecord]:
    """One raw record per case, named by its request id."""
    wrong = [
        (n, b"v1:k2:" + b"0" * 64 if n == RAW_HMAC_HEADER else v)
        for n, v in signed(NEW_KEY, "wrong")
    ]
    # Signed for webhook "main", then relabelled: the MAC covers the header.
    tampered = [
        (n, b"other" if n == "sgpipe-webhook" else v) for n, v in signed(NEW_KEY, "tampered")
    ]
    return [
        record(topic, "new", signed(NEW_KEY, "new")),
        record(topic, "old", signed(OLD_KEY, "old")),
        # What the issue did: the right headers, no HMAC.
        record(topic, "unsigned", raw_batch_headers(batch("unsigned"))),
        record(topic, "wrong", wrong),
        record(topic, "tampered", tampered),
        record(topic, "removed", signed(REMOVED_KEY, "removed")),
    ]


async def test_only_records_signed_by_a_configured_key_become_events(
    kafka_bootstrap_servers: str, unique_name: str
) -> None:
    keys = [{"id": key.key_id, "secret": key.secret.decode()} for key in (NEW_KEY, OLD_KEY)]
    settings = kafka_test_settings(kafka_bootstrap_servers, unique_name, raw_auth={"keys": keys})
    topics = settings.kafka.topics
    await ensure_topics(settings.kafka)
    producer = create_producer(settings.kafka)
    await producer.start()
    try:
        await send_all(producer, forged_records(topics.raw))
    finally:
        await producer.stop()

    stop = asyncio.Event()
    worker = asyncio.create_task(run_processor(settings, stop, health_port=None))
    try:
        dead = await read_topic(kafka_bootstrap_servers, topics.dead_letter, expected=4)
        events = await read_topic(kafka_bootstrap_servers, topics.events, expected=2)
    finally:
        stop.set()
        await asyncio.wait_for(worker, timeout=30)

    codec = EmailEventCodec()
    assert sorted(codec.decode(r.value)["sg_event_id"] for r in events) == ["ev-new", "ev-old"]
    letters = sorted(
        (dict(r.headers)["sgpipe-request-id"], dict(r.headers)[REASON_HEADER], r.value)
        for r in dead
    )
    assert letters == sorted(
        (f"req-{name}".encode(), UNAUTHENTICATED_RAW_RECORD.encode(), batch(name).body)
        for name in ("unsigned", "wrong", "tampered", "removed")
    )
