"""The processor's consume -> produce -> commit loop around ``process_raw_record``.

Each poll's records are processed, their events and dead letters sent, and only when Kafka has
acknowledged all of them are the raw offsets committed (``sgpipe.runtime.kafka.CommitLoop``).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence

import structlog

from processors.dedup import RecentEventIds
from processors.pipeline import RECORD_HEADROOM_BYTES, Metadata, process_raw_record
from schemas.dead_letter import dead_letter_headers
from schemas.email_event import EmailEventCodec
from sgpipe.runtime import metrics
from sgpipe.runtime.kafka import (
    OutgoingRecord,
    Record,
    StageOptions,
    create_producer,
    run_consumer_stage,
    send_all,
)
from sgpipe.runtime.schema_registry import open_event_codec
from sgpipe.runtime.settings import Settings

log = structlog.get_logger(__name__)

# Lets consumers of the events topic route by schema without decoding the value.
EVENT_SCHEMA_HEADER = ("sgpipe-schema", b"io.sgpipe.v1.EmailEvent")


class RawBatchProcessor:
    """Turns polled raw records into outgoing records; owns the best-effort dedup window."""

    def __init__(self, settings: Settings, codec: EmailEventCodec | None = None) -> None:
        self._topics = settings.kafka.topics
        self._codec = codec or EmailEventCodec()
        self._recent = RecentEventIds(settings.processor.dedup_window)
        self._max_record_bytes = settings.kafka.max_request_size - RECORD_HEADROOM_BYTES

    def process(
        self, records: Sequence[Record]
    ) -> tuple[list[OutgoingRecord], set[str], Counter[str]]:
        """Outgoing records, the sg_event_ids they publish, and counts by outcome."""
        outgoing: list[OutgoingRecord] = []
        published: set[str] = set()
        outcomes: Counter[str] = Counter()
        for record in records:
            metadata = Metadata(record.topic, record.partition, record.offset, record.timestamp)
            processed = process_raw_record(
                record.value, record.headers, metadata, self._codec, self._max_record_bytes
            )
            for field, count in processed.coercion_errors.items():
                metrics.COERCION_ERRORS.labels(metrics.STAGE_PROCESS, field).inc(count)
            for event in processed.events:
                if event.sg_event_id in self._recent or event.sg_event_id in published:
                    outcomes["duplicate"] += 1
                    continue
                published.add(event.sg_event_id)
                outcomes["published"] += 1
                outgoing.append(
                    OutgoingRecord(
                        self._topics.events,
                        event.value,
                        key=event.key,
                        headers=[EVENT_SCHEMA_HEADER],
                    )
                )
            for letter in processed.dead_letters:
                outcomes[f"dead_letter:{letter.reason}"] += 1
                outgoing.append(
                    OutgoingRecord(
                        self._topics.dead_letter,
                        letter.payload,
                        headers=dead_letter_headers(letter),
                    )
                )
        return outgoing, published, outcomes

    def acknowledged(self, published: set[str]) -> None:
        """Called once Kafka acknowledged the events: only now may they count as seen."""
        self._recent.remember(published)


async def run_processor(
    settings: Settings,
    stop: asyncio.Event,
    *,
    drain: bool = False,
    ready: asyncio.Event | None = None,
) -> None:
    """Consume raw batches until ``stop`` is set, then commit what was processed and return
    (with ``drain``, only once the raw topic has nothing left; see CommitLoop.run).
    ``ready`` is set once the processor consumes."""
    processor = RawBatchProcessor(settings, await open_event_codec(settings))
    producer = create_producer(settings.kafka)

    async def flush(records: Sequence[Record]) -> None:
        outgoing, published, outcomes = processor.process(records)
        await send_all(producer, outgoing)
        processor.acknowledged(published)
        log.info("processed raw batches", batches=len(records), **outcomes)

    options = StageOptions(
        name="processor",
        group_id=settings.processor.group_id,
        topic=settings.kafka.topics.raw,
        max_records=settings.processor.batch_max_records,
        max_seconds=0.0,
        retry_backoff_max_seconds=30.0,
        stop_timeout_seconds=settings.processor.stop_timeout_seconds,
        drain=drain,
    )
    await run_consumer_stage(settings.kafka, options, producer, flush, stop, ready)
