"""A record the Kafka client cannot read (a header key that is not UTF-8) is dead-lettered and
stepped over, on the real broker with the real client: before, aiokafka raised
UnicodeDecodeError out of every poll at that record, and the stage stopped (exit 3) at every
restart. Any producer can write such a key, so it is record content, never fatal."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

import pytest
from aiokafka.admin import NewTopic

from processors.stage import run_processor
from schemas.dead_letter import ORIGINAL_OFFSET_HEADER, REASON_HEADER
from schemas.raw_batch import RawBatch
from sgpipe.runtime.kafka import create_admin
from tests.integration.kafka_tools import kafka_test_settings, read_topic
from tests.raw_auth_support import signed_raw_batch_headers

pytestmark = pytest.mark.kafka

# aiokafka's own producer encodes header keys itself; its pure-Python record builder is given a
# key whose encoding is not UTF-8 here, as another client (or a hand-built request) could send.
PRODUCE = r"""
import asyncio, json, sys
from aiokafka import AIOKafkaProducer

class NotUtf8(str):
    def encode(self, *args, **kwargs):
        return b"\xff\xfe-key"

async def main():
    servers, topic, good = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    signed = {
        which: [(n, v.encode()) for n, v in good[f"{which}_headers"]]
        for which in ("first", "after")
    }
    producer = AIOKafkaProducer(bootstrap_servers=servers)
    await producer.start()
    try:
        await producer.send_and_wait(
            topic, good["first"].encode(), headers=signed["first"], partition=0
        )
        await producer.send_and_wait(
            topic, b"unreadable", headers=[(NotUtf8("k"), b"v")], partition=0
        )
        await producer.send_and_wait(
            topic, good["after"].encode(), headers=signed["after"], partition=0
        )
    finally:
        await producer.stop()

asyncio.run(main())
"""


def body(event_id: str) -> str:
    return f'[{{"event":"open","sg_event_id":"{event_id}","email":"a@example.com"}}]'


async def test_a_record_with_a_header_key_that_is_not_utf8_is_dead_lettered_and_stepped_over(
    kafka_bootstrap_servers: str, unique_name: str
) -> None:
    settings = kafka_test_settings(kafka_bootstrap_servers, unique_name)
    topics = settings.kafka.topics
    admin = create_admin(settings.kafka)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(name, 1, 1) for name in (topics.raw, topics.events, topics.dead_letter)]
        )
    finally:
        await admin.close()
    good: dict[str, Any] = {"first": body("before"), "after": body("after")}
    for which in ("first", "after"):
        # Signed as the ingress would: the processor verifies each record's HMAC first.
        headers = signed_raw_batch_headers(
            RawBatch("main", good[which].encode(), 1_700_000_000_000, "req", None, "signature")
        )
        good[which + "_headers"] = [(name, value.decode()) for name, value in headers]
    produced = subprocess.run(
        [sys.executable, "-c", PRODUCE, kafka_bootstrap_servers, topics.raw, json.dumps(good)],
        env={**os.environ, "AIOKAFKA_NO_EXTENSIONS": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert produced.returncode == 0, produced.stderr

    stop = asyncio.Event()
    processor = asyncio.create_task(run_processor(settings, stop, health_port=None))
    try:
        events = await read_topic(kafka_bootstrap_servers, topics.events, expected=2, timeout=60)
        letters = await read_topic(kafka_bootstrap_servers, topics.dead_letter, expected=1)
        assert not processor.done(), processor
    finally:
        stop.set()
        await asyncio.wait_for(processor, timeout=60)
    assert sorted(record.key for record in events) == [b"after", b"before"]
    (letter,) = letters
    letter_headers = dict(letter.headers)
    assert letter_headers[REASON_HEADER] == b"unreadable_record"
    assert letter_headers[ORIGINAL_OFFSET_HEADER] == b"1"
    assert letter.value == b""
