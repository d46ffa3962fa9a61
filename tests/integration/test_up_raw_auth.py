"""The issue's forgery under a real `sgpipe up`: raw batches produced straight to the embedded
broker with the ingress's headers (`sgpipe-webhook: main`, `sgpipe-authenticated-by:
signature`) but without the data dir's HMAC key end in `dead_letters` as
`unauthenticated_raw_record`, never in `email_events`; a batch posted to the ingress is stored."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from schemas.raw_auth import RAW_HMAC_HEADER, RawAuthKey, sign_raw_record
from schemas.raw_batch import RawBatch, raw_batch_headers
from sgpipe.runtime.kafka import OutgoingRecord, create_producer, send_all
from sgpipe.runtime.settings import KafkaSettings
from tests.integration.test_up import _wait_until_serving, post, start_pipeline, stop_pipeline
from tests.up_support import read_state

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]


def body(event_id: str) -> bytes:
    event = {"event": "delivered", "sg_event_id": event_id, "email": "a@example.com"}
    return json.dumps([{**event, "timestamp": 1_700_000_000}]).encode()


def forged(request_id: str, event_id: str) -> RawBatch:
    return RawBatch("main", body(event_id), 1_700_000_010_000, request_id, None, "signature")


async def produce_forgeries(bootstrap_servers: str) -> None:
    kafka = KafkaSettings(bootstrap_servers=bootstrap_servers)
    unsigned = forged("req-forged-1", "ev-forged-1")
    # Signed, but with a key of the right shape that is not the data dir's.
    guessed = forged("req-forged-2", "ev-forged-2")
    guessed_key = RawAuthKey("up-00000000", b"g" * 43)
    records = [
        OutgoingRecord(kafka.topics.raw, unsigned.body, headers=raw_batch_headers(unsigned)),
        OutgoingRecord(
            kafka.topics.raw,
            guessed.body,
            headers=sign_raw_record(guessed_key, guessed.body, raw_batch_headers(guessed)),
        ),
    ]
    assert RAW_HMAC_HEADER not in dict(records[0].headers or [])
    producer = create_producer(kafka)
    await producer.start()
    try:
        await send_all(producer, records)
    finally:
        await producer.stop()


def test_raw_records_without_the_data_dir_key_are_dead_lettered_not_stored(
    tmp_path: Path,
) -> None:
    running = start_pipeline(tmp_path, webhooks=[{"name": "main", "allow_unsigned": True}])
    try:
        _wait_until_serving(running)
        asyncio.run(produce_forgeries(read_state(running.data_dir)["kafka_bootstrap_servers"]))
        status, _, _ = post(
            f"{running.base_url}/webhooks/main",
            body("ev-genuine"),
            {"Content-Type": "application/json"},
        )
        assert status == 200
        running.wait_for(
            "SELECT reason, request_id FROM dead_letters FINAL ORDER BY request_id",
            "unauthenticated_raw_record\treq-forged-1\nunauthenticated_raw_record\treq-forged-2\n",
        )
        running.wait_for("SELECT sg_event_id FROM email_events FINAL", "ev-genuine\n")
        # Dead-lettered for good: nothing of the forgeries reached the table.
        assert running.query("SELECT sg_event_id FROM email_events FINAL") == "ev-genuine\n"
    finally:
        stop_pipeline(running)
    assert running.process.returncode == 0, running.log.read_text()
