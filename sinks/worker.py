"""The sink's consume -> insert -> commit loop.

Events are batched by size and time, decoded, and inserted into ClickHouse; offsets are
committed only after the insert returned. Records that cannot be decoded go to the dead-letter
topic. Insert failures are retried (holding the batch) until they succeed: a ClickHouse that
rejects well-formed rows is a bad deploy to fix, not data to throw away.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import structlog
from clickhouse_connect.driver.asyncclient import AsyncClient

from schemas.dead_letter import DeadLetter, dead_letter_headers
from schemas.email_event import EmailEventCodec, SerializationError
from sgpipe.runtime.clickhouse import apply_migrations, connect
from sgpipe.runtime.kafka import (
    OutgoingRecord,
    Record,
    StageOptions,
    create_producer,
    run_consumer_stage,
    send_all,
)
from sgpipe.runtime.redact import redact_url
from sgpipe.runtime.settings import Settings
from sinks.clickhouse import ClickHouseWriter
from sinks.rows import to_columns

log = structlog.get_logger(__name__)

STAGE = "sink"


def decode_records(
    records: Sequence[Record], codec: EmailEventCodec
) -> tuple[list[dict[str, Any]], list[DeadLetter]]:
    decoded: list[dict[str, Any]] = []
    dead_letters: list[DeadLetter] = []
    for record in records:
        try:
            decoded.append(codec.decode(record.value or b""))
        except SerializationError as exc:
            dead_letters.append(
                DeadLetter(
                    reason="undecodable_event",
                    detail=str(exc),
                    stage=STAGE,
                    payload=record.value or b"",
                    original_topic=record.topic,
                    original_partition=record.partition,
                    original_offset=record.offset,
                    context_headers=record.headers,
                )
            )
    return decoded, dead_letters


async def run_sink(
    settings: Settings,
    stop: asyncio.Event,
    clickhouse_url: str | None = None,
    *,
    drain: bool = False,
    ready: asyncio.Event | None = None,
) -> None:
    """Consume normalized events until ``stop`` is set; flushes and commits before returning.

    ``clickhouse_url`` overrides ``settings.clickhouse.url`` (the embedded store's address).
    ``ready`` is set once ClickHouse is migrated and the sink consumes; until ClickHouse
    answers, the sink retries with backoff instead of failing.
    """
    client = await _connect_and_migrate(settings, clickhouse_url, stop)
    if client is None:
        return
    try:
        codec = EmailEventCodec()
        writer = ClickHouseWriter(client, settings.clickhouse.database)
        producer = create_producer(settings.kafka)
        dead_letter_topic = settings.kafka.topics.dead_letter

        async def flush(records: Sequence[Record]) -> None:
            decoded, dead_letters = decode_records(records, codec)
            written = await writer.insert(to_columns(decoded)) if decoded else 0
            await send_all(
                producer,
                [
                    OutgoingRecord(
                        dead_letter_topic, letter.payload, headers=dead_letter_headers(letter)
                    )
                    for letter in dead_letters
                ],
            )
            log.info(
                "inserted events",
                rows=written,
                records=len(records),
                dead_letters=len(dead_letters),
            )

        options = StageOptions(
            name="sink",
            group_id=settings.sink.group_id,
            topic=settings.kafka.topics.events,
            max_records=settings.sink.batch_max_records,
            max_seconds=settings.sink.batch_max_seconds,
            retry_backoff_max_seconds=settings.sink.retry_backoff_max_seconds,
            stop_timeout_seconds=settings.sink.stop_timeout_seconds,
            drain=drain,
        )
        await run_consumer_stage(settings.kafka, options, producer, flush, stop, ready)
    finally:
        await client.close()


async def _connect_and_migrate(
    settings: Settings, clickhouse_url: str | None, stop: asyncio.Event
) -> AsyncClient | None:
    """A migrated client, retrying with backoff until ClickHouse answers; None if stopped."""
    delay = 0.5
    while not stop.is_set():
        client: AsyncClient | None = None
        try:
            client = await connect(settings.clickhouse, clickhouse_url)
            await apply_migrations(client, settings.clickhouse.database)
            return client
        except Exception as exc:  # noqa: BLE001 - unreachable or not ready yet: retry
            if client is not None:
                await client.close()
            log.warning(
                "clickhouse not ready; retrying",
                url=redact_url(clickhouse_url or settings.clickhouse.url or ""),
                retry_in_seconds=delay,
                error=repr(exc),
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
            delay = min(delay * 2, settings.sink.retry_backoff_max_seconds)
    return None
