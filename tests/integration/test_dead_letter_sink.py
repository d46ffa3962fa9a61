"""The dead-letter sink against a real broker (tansu) and the real engine (chdb served over
HTTP): dead letters land in `dead_letters` once however often they are delivered, and the
dead-letter topic's offsets are committed only after ClickHouse took the rows."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from schemas.dead_letter import DeadLetter, DeadLetterOrigin, replay_headers
from schemas.raw_batch import RawBatch, raw_batch_headers
from sgpipe.embedded.clickhouse import EmbeddedClickHouse
from sgpipe.embedded.credentials import load_or_create_credentials
from sgpipe.runtime.kafka import DeadLetterTopicWriter, ReadBack, create_producer, ensure_topics
from sgpipe.runtime.metrics import REGISTRY
from sgpipe.runtime.runner import run_consumer_stage
from sgpipe.runtime.settings import Settings
from sinks.dead_letters import dead_letter_stage
from tests.integration.clickhouse_tools import clickhouse_client, select_rows, served_clickhouse
from tests.integration.kafka_tools import kafka_test_settings

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

BATCH_HEADERS = raw_batch_headers(
    RawBatch("main", b"[]", 1_700_000_010_000, "req-1", None, "signature")
)


def settings_for(servers: str, suffix: str) -> Settings:
    return kafka_test_settings(
        servers,
        suffix,
        clickhouse={"database": f"db_{suffix}"},
        sink={
            "group_id": f"sink-{suffix}",
            "dead_letter_group_id": f"dead-letters-{suffix}",
            "batch_max_seconds": 0.1,
            "retry_backoff_initial_seconds": 0.05,
            "retry_backoff_max_seconds": 0.2,
            "stop_timeout_seconds": 1,
        },
    )


def letter(offset: int, event_index: int | None, reason: str, **changes: Any) -> DeadLetter:
    values: dict[str, Any] = {
        "reason": reason,
        "detail": f"{reason} at {offset}",
        "stage": "process",
        "payload": b'"not an event"' if event_index is not None else b"not json",
        "original_topic": "raw",
        "original_partition": 0,
        "original_offset": offset,
        "event_index": event_index,
        "context_headers": BATCH_HEADERS,
        **changes,
    }
    return DeadLetter(**values)


async def produce(settings: Settings, letters: Sequence[DeadLetter]) -> None:
    producer = create_producer(settings.kafka)
    await producer.start()
    try:
        writer = DeadLetterTopicWriter(
            producer, settings.kafka.topics.dead_letter, ReadBack(settings.kafka)
        )
        await writer.write(letters)
        await writer.stop()
    finally:
        await producer.stop()


async def committed(settings: Settings) -> list[int | None]:
    kafka = settings.kafka
    checker = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap_servers,
        group_id=settings.sink.dead_letter_group_id,
        enable_auto_commit=False,
    )
    await checker.start()
    try:
        return [
            await checker.committed(TopicPartition(kafka.topics.dead_letter, partition))
            for partition in range(kafka.topics.partitions)
        ]
    finally:
        await checker.stop()


LAST_COMMIT = ("sgpipe_last_commit_timestamp_seconds", {"stage": "dead_letters"})


def sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class RunningStage:
    """The dead-letter stage, in this process, writing to ``url``."""

    def __init__(self, settings: Settings, url: str) -> None:
        self.stop = asyncio.Event()
        self.ready = asyncio.Event()
        self.task = asyncio.create_task(
            run_consumer_stage(
                dead_letter_stage(settings, url),
                settings,
                self.stop,
                health_host="127.0.0.1",
                health_port=None,
                ready=self.ready,
            )
        )

    async def started(self) -> None:
        await asyncio.wait_for(self.ready.wait(), 60)

    async def stopped(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 60)


async def wait_for(
    url: str, sql: str, expected: list[tuple[Any, ...]], timeout: float = 30
) -> list[tuple[Any, ...]]:
    deadline = asyncio.get_running_loop().time() + timeout
    rows: list[tuple[Any, ...]] = []
    async with clickhouse_client(url) as client:
        while asyncio.get_running_loop().time() < deadline:
            rows = [tuple(row.values()) for row in await select_rows(client, sql)]
            if rows == expected:
                return rows
            await asyncio.sleep(0.1)
    raise AssertionError(f"{sql!r} gave {rows!r}, expected {expected!r}")


async def test_dead_letters_land_once_however_often_delivered_and_replays_keep_one_row(
    kafka_bootstrap_servers: str, unique_name: str, tmp_path: Path
) -> None:
    settings = settings_for(kafka_bootstrap_servers, unique_name)
    table = f"{settings.clickhouse.database}.dead_letters"
    await ensure_topics(settings.kafka)
    element, whole = letter(10, 1, "not_an_object"), letter(11, None, "invalid_json")
    # The element again after a replay (generation 1), dead-lettered for another reason.
    replayed = letter(
        977,
        0,
        "invalid_element",
        context_headers=[*BATCH_HEADERS, *replay_headers(DeadLetterOrigin("raw", 0, 10, 1), 1)],
    )
    sql = (
        "SELECT source_offset, event_index, reason, replay_generation, webhook, request_id "
        f"FROM {table} FINAL ORDER BY source_offset, event_index"
    )
    async with served_clickhouse(tmp_path / "clickhouse") as url:
        stage = RunningStage(settings, url)
        try:
            await stage.started()
            # The first letter twice: a retried produce, or a redelivery after a crash.
            await produce(settings, [element, whole, element])
            await wait_for(
                url,
                sql,
                [
                    (10, 1, "not_an_object", 0, "main", "req-1"),
                    (11, -1, "invalid_json", 0, "main", "req-1"),
                ],
            )
            await produce(settings, [replayed])
            await wait_for(
                url,
                sql,
                [
                    (10, 1, "invalid_element", 1, "main", "req-1"),
                    (11, -1, "invalid_json", 0, "main", "req-1"),
                ],
            )
        finally:
            await stage.stopped()
        async with clickhouse_client(url) as client:
            (payload,) = await select_rows(
                client, f"SELECT payload FROM {table} FINAL WHERE source_offset = 11"
            )
    assert payload == {"payload": "not json"}
    assert sum(offset or 0 for offset in await committed(settings)) == 4


async def test_dead_letters_are_committed_only_after_clickhouse_took_them(
    kafka_bootstrap_servers: str, unique_name: str, tmp_path: Path
) -> None:
    # Mutations caught: committing before the write in the stage loop, and a writer that
    # returns before ClickHouse answered: either commits letters that were never stored.
    settings = settings_for(kafka_bootstrap_servers, unique_name)
    table = f"{settings.clickhouse.database}.dead_letters"
    await ensure_topics(settings.kafka)
    letters = [letter(offset, 0, "not_an_object") for offset in range(3)]
    data_path = tmp_path / "clickhouse"
    failures = {"stage": "dead_letters", "error_class": "retriable"}
    credentials = load_or_create_credentials(tmp_path / "credentials")
    writer = credentials.writer

    def as_writer(url: str) -> str:
        return url.replace("://", f"://{writer.name}:{writer.password}@", 1)

    store = EmbeddedClickHouse(data_path, credentials)
    stage = RunningStage(settings, as_writer(await store.start(port=0)))
    try:
        await stage.started()  # the table exists now
        await store.stop()  # ClickHouse goes away
        failed, last_commit = sample("sgpipe_errors_total", failures), sample(*LAST_COMMIT)
        await produce(settings, letters)
        # Until the stage has tried to write them: twice failed, or (a broken stage) committed.
        for _ in range(600):
            if sample("sgpipe_errors_total", failures) > failed + 1:
                break
            if sample(*LAST_COMMIT) != last_commit:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the stage never tried to write the dead letters")
    finally:
        await stage.stopped()
    assert await committed(settings) == [None, None]

    # ClickHouse is back: the same letters are read again and land, then are committed.
    store = EmbeddedClickHouse(data_path, credentials)
    url = as_writer(await store.start(port=0))
    stage = RunningStage(settings, url)
    try:
        await stage.started()
        await wait_for(url, f"SELECT count() FROM {table} FINAL", [(3,)])
    finally:
        await stage.stopped()
        await store.stop()
    assert sum(offset or 0 for offset in await committed(settings)) == 3
