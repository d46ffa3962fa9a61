"""Processors scaling in and out on a real broker (tansu): two processors consume a stream of
raw batches while a third `sgpipe process` joins and leaves -- once with SIGTERM, once with
kill -9 (its membership then times out). The survivors never crash, every event reaches the
events topic (copies allowed: the sink's ReplacingMergeTree absorbs them), and the group ends
with every raw record committed.

What the runtime promises here is in sgpipe/runtime/stage.py (revoked partitions abandoned
uncommitted, commits only for owned partitions, a refused commit is a rejoin); the unit
tests in tests/unit/test_stage_rebalance.py break each rule on purpose."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import CommitFailedError, NoOffsetForPartitionError
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from processors.stage import run_processor
from schemas.email_event import EmailEventCodec
from schemas.raw_batch import RawBatch
from sgpipe.runtime.kafka import (
    OutgoingRecord,
    create_consumer,
    create_producer,
    ensure_topics,
    send_all,
)
from sgpipe.runtime.metrics import REGISTRY
from sgpipe.runtime.settings import Settings
from tests.integration.kafka_tools import FAST_GROUP_SETTINGS
from tests.integration.processes import StageProcess, start_sgpipe, write_config
from tests.raw_auth_support import RAW_AUTH_DOCUMENT, signed_raw_batch_headers

pytestmark = pytest.mark.kafka

PARTITIONS = 4
BATCHES = 240
EVENTS_PER_BATCH = 4


def document(bootstrap_servers: str, suffix: str) -> dict[str, Any]:
    return {
        "kafka": {
            "bootstrap_servers": bootstrap_servers,
            **FAST_GROUP_SETTINGS,
            "topics": {
                "raw": f"raw-{suffix}",
                "events": f"events-{suffix}",
                "dead_letter": f"dlq-{suffix}",
                "partitions": PARTITIONS,
            },
        },
        "processor": {
            "group_id": f"processor-{suffix}",
            "health_host": "127.0.0.1",
            "health_port": 0,
            "batch_max_seconds": 0.1,
            "retry_backoff_initial_seconds": 0.05,
            "retry_backoff_max_seconds": 0.5,
        },
        "logging": {"format": "json"},
        "raw_auth": RAW_AUTH_DOCUMENT,
    }


def event_id(suffix: str, number: int) -> str:
    return f"ev-{suffix}-{number}"


def raw_record(settings: Settings, suffix: str, batch: int) -> OutgoingRecord:
    events = [
        {
            "email": f"user{batch}@example.com",
            "event": "delivered",
            "sg_event_id": event_id(suffix, batch * EVENTS_PER_BATCH + index),
            "timestamp": 1_700_000_000 + batch,
        }
        for index in range(EVENTS_PER_BATCH)
    ]
    raw = RawBatch(
        webhook="main",
        body=json.dumps(events).encode(),
        received_at_ms=1_700_000_000_000 + batch,
        request_id=f"req-{batch}",
        signature_timestamp=1_700_000_000,
        authenticated_by="signature",
    )
    # Spread over every partition, so that each member owns some while the group changes.
    return OutgoingRecord(
        settings.kafka.topics.raw,
        raw.body,
        key=b"%d" % batch,
        headers=signed_raw_batch_headers(raw),
    )


async def produce_stream(settings: Settings, suffix: str, produced: list[int]) -> None:
    """The raw batches, a few at a time, for as long as the group keeps changing."""
    producer = create_producer(settings.kafka)
    await producer.start()
    try:
        for batch in range(BATCHES):
            await send_all(producer, [raw_record(settings, suffix, batch)])
            produced.append(batch)
            await asyncio.sleep(0.02)  # a stream's pace, not a wait for anything
    finally:
        await producer.stop()


async def wait_for(condition: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        await asyncio.sleep(0.05)


def assigned_partitions(stage: StageProcess) -> list[str]:
    """The partitions of the last assignment a `sgpipe process` logged."""
    last: list[str] = []
    for line in stage.output().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == "partitions assigned":
                last = list(entry.get("partitions", []))
    return last


async def event_ids_on_topic(bootstrap_servers: str, topic: str, wanted: set[str]) -> set[str]:
    """Read ``topic`` from the start until every id in ``wanted`` was seen (or 90 s passed);
    returns every id read."""
    codec = EmailEventCodec()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap_servers,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    seen: set[str] = set()
    try:
        deadline = time.monotonic() + 90
        while not wanted <= seen and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                seen.update(str(codec.decode(record.value)["sg_event_id"]) for record in records)
    finally:
        await consumer.stop()
    return seen


def rebalances() -> float:
    return REGISTRY.get_sample_value("sgpipe_rebalances_total", {"stage": "process"}) or 0.0


async def test_processors_joining_and_leaving_crash_nobody_and_lose_nothing(
    kafka_bootstrap_servers: str, unique_name: str, tmp_path: Path
) -> None:
    config = document(kafka_bootstrap_servers, unique_name)
    settings = Settings.model_validate(config)
    await ensure_topics(settings.kafka)
    config_path = write_config(tmp_path / "sgpipe.yaml", config)
    rebalances_before = rebalances()

    stops = [asyncio.Event(), asyncio.Event()]
    ready = [asyncio.Event(), asyncio.Event()]
    survivors = [
        asyncio.create_task(run_processor(settings, stop, ready=started, health_port=None))
        for stop, started in zip(stops, ready, strict=True)
    ]
    third: list[StageProcess] = []
    produced: list[int] = []
    try:
        await asyncio.wait_for(asyncio.gather(*(started.wait() for started in ready)), 60)
        stream = asyncio.create_task(produce_stream(settings, unique_name, produced))

        # A third processor joins, takes partitions from the survivors, and leaves with
        # SIGTERM (a rolling restart, a scale-in) ...
        third.append(start_sgpipe(["process"], config_path, tmp_path / "third-1.log"))
        await wait_for(lambda: assigned_partitions(third[0]) != [], "the third took partitions")
        await wait_for(lambda: len(produced) >= BATCHES // 3, "a third of the stream produced")
        assert await asyncio.to_thread(third[0].stop) == 0, third[0].output()

        # ... and again, dying with kill -9 (a crash, the OOM killer): its membership times out.
        third.append(start_sgpipe(["process"], config_path, tmp_path / "third-2.log"))
        await wait_for(lambda: assigned_partitions(third[1]) != [], "the third took partitions")
        await wait_for(lambda: len(produced) >= 2 * BATCHES // 3, "two thirds produced")
        third[1].process.kill()
        await asyncio.to_thread(third[1].process.wait)

        await asyncio.wait_for(stream, 120)
        wanted = {event_id(unique_name, n) for n in range(BATCHES * EVENTS_PER_BATCH)}
        seen = await event_ids_on_topic(
            kafka_bootstrap_servers, settings.kafka.topics.events, wanted
        )
        assert sorted(wanted - seen) == [], f"events never processed: {len(wanted - seen)}"
        assert seen == wanted  # nothing invented

        # The survivors rode every rebalance out: still running, and they took part in them.
        for survivor in survivors:
            assert not survivor.done(), survivor.exception()
        assert rebalances() - rebalances_before >= 4  # two joins and two leaves, at least
    finally:
        for stop in stops:
            stop.set()
        for process in third:
            if process.process.poll() is None:
                process.process.kill()
                process.process.wait()
        results = await asyncio.wait_for(asyncio.gather(*survivors, return_exceptions=True), 60)
    assert results == [None, None], results  # each stopped cleanly when asked

    # Every raw record is committed by the group in the end: nothing left to re-read.
    reader = AIOKafkaConsumer(
        bootstrap_servers=kafka_bootstrap_servers,
        group_id=settings.processor.group_id,
        enable_auto_commit=False,
    )
    await reader.start()
    try:
        committed = [
            await reader.committed(TopicPartition(settings.kafka.topics.raw, partition)) or 0
            for partition in range(PARTITIONS)
        ]
    finally:
        await reader.stop()
    assert sum(committed) == BATCHES, committed


async def test_a_member_the_coordinator_forgot_sends_no_group_less_commit(
    kafka_bootstrap_servers: str, unique_name: str
) -> None:
    # The cause of issue 21's ~998 lost events: after the memory broker came back empty, the
    # sink's heartbeat was refused (UnknownMemberId), aiokafka reset its generation to -1, and
    # the sink's last batch of the lost log was committed meanwhile -- a group-less commit,
    # which tansu stored for the now empty group. After its rejoin the sink resumed at that
    # offset of the new log and skipped every record below it. Mutation caught: creating a
    # plain AIOKafkaConsumer in sgpipe.runtime.kafka.create_consumer.
    settings = Settings.model_validate(document(kafka_bootstrap_servers, unique_name))
    await ensure_topics(settings.kafka)
    topic = settings.kafka.topics.raw
    producer = create_producer(settings.kafka)
    await producer.start()
    try:
        await send_all(producer, [raw_record(settings, unique_name, batch) for batch in range(8)])
    finally:
        await producer.stop()
    consumer = create_consumer(settings.kafka, group_id=settings.processor.group_id)
    consumer.subscribe([topic])
    await consumer.start()
    try:
        deadline = time.monotonic() + 30
        read: dict[TopicPartition, int] = {}
        while sum(read.values()) < 8 and time.monotonic() < deadline:
            try:
                polled = await consumer.getmany(timeout_ms=200)
            except NoOffsetForPartitionError as exc:  # a new group: auto_offset_reset="none"
                await consumer.seek_to_beginning(*exc.args)
                continue
            for partition, records in polled.items():
                read[partition] = records[-1].offset + 1
        assert sum(read.values()) == 8, read
        coordinator = consumer._coordinator
        sent_generations: list[int] = []
        send_request = coordinator._send_req

        async def recording(request: Any) -> Any:
            if type(request).__name__.startswith("OffsetCommitRequest"):
                sent_generations.append(request._consumer_group_generation_id)
            return await send_request(request)

        coordinator._send_req = recording
        offsets = {partition: OffsetAndMetadata(offset, "") for partition, offset in read.items()}
        await consumer.commit(offsets)  # a member's commit
        # What a heartbeat answered with UnknownMemberId does, until the rejoin completes.
        coordinator.reset_generation()
        with pytest.raises(CommitFailedError):
            await consumer.commit(offsets)
    finally:
        await consumer.stop()
    assert sent_generations and all(generation >= 0 for generation in sent_generations), (
        sent_generations
    )
