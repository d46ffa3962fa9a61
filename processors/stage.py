"""The processor, declared: raw batches -> normalized Avro events, deduplicated.

Steps: ``RawRecordAuthenticator`` (a record without a valid ``sgpipe-raw-hmac`` is
dead-lettered as ``unauthenticated_raw_record`` before anything of it is read),
``process_raw_record`` (1 -> N: split, normalize, encode; poison elements become rejections)
and the ``DuplicateEventFilter``; writer: the events topic, keyed by ``sg_message_id`` (else
``sg_event_id``: docs/consuming.md). The runtime runs it (``sgpipe.runtime.runner``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Iterator
from typing import Any

from processors.authenticate import RawRecordAuthenticator
from processors.dedup import DuplicateEventFilter
from processors.pii import PiiPolicy
from processors.pipeline import EncodedEvent, process_raw_record
from schemas.email_event import SCHEMA_HEADER, SCHEMA_HEADER_VALUE, EmailEventCodec
from sgpipe.runtime.kafka import OutgoingRecord, ReadBack, TopicWriter, max_record_bytes
from sgpipe.runtime.messages import Message
from sgpipe.runtime.metrics import COERCION_ERRORS, PII_MASKED, STAGE_PROCESS
from sgpipe.runtime.raw_auth import raw_auth_keys
from sgpipe.runtime.runner import run_consumer_stage
from sgpipe.runtime.schema_registry import open_event_codec_retrying
from sgpipe.runtime.settings import PiiSettings, Settings
from sgpipe.runtime.stage import ConsumerStage, StageOptions, Transformed

# Lets consumers of the events topic route by schema without decoding the value.
EVENT_SCHEMA_HEADER = (SCHEMA_HEADER, SCHEMA_HEADER_VALUE)


def processor_stage(
    settings: Settings, codec: EmailEventCodec | None = None
) -> ConsumerStage[EncodedEvent]:
    """``codec``: how events are framed (``open_event_codec``); single-object by default.
    Raises ConfigError without ``raw_auth.keys`` (unless ``raw_auth.allow_unauthenticated``)."""
    codec = codec or EmailEventCodec()
    authenticator = RawRecordAuthenticator(
        raw_auth_keys(settings.raw_auth),
        allow_unauthenticated=settings.raw_auth.allow_unauthenticated,
    )
    record_limit = max_record_bytes(settings.kafka)
    events_topic = settings.kafka.topics.events
    pii = pii_policy(settings.pii)
    pii_modes = {
        "email": settings.pii.email,
        "ip": settings.pii.ip,
        "useragent": settings.pii.useragent,
    }

    def transform(message: Message) -> Transformed[EncodedEvent]:
        # Before anything of the record is read: a forged one must not become an event.
        verified = authenticator.authenticate(message)
        if verified.rejection is not None:
            return Transformed([], [verified.rejection])
        processed = process_raw_record(message, codec, record_limit, pii=pii)
        for field_name, count in processed.coercion_errors.items():
            COERCION_ERRORS.labels(STAGE_PROCESS, field_name).inc(count)
        for field_name, count in processed.pii_masked.items():
            PII_MASKED.labels(STAGE_PROCESS, field_name, pii_modes[field_name]).inc(count)
        rejections = [
            authenticator.vouch(message, verified, rejection) for rejection in processed.rejections
        ]
        return Transformed(processed.events, rejections)

    def to_record(event: EncodedEvent) -> OutgoingRecord:
        return OutgoingRecord(
            events_topic, event.value, key=event.key, headers=[EVENT_SCHEMA_HEADER]
        )

    def writer(producer: Any) -> TopicWriter[EncodedEvent]:
        return TopicWriter(
            producer,
            events_topic,
            to_record,
            output="events",
            read_back=ReadBack(settings.kafka),
        )

    return ConsumerStage(
        name=STAGE_PROCESS,
        topic=settings.kafka.topics.raw,
        group_id=settings.processor.group_id,
        options=StageOptions.from_settings(
            STAGE_PROCESS, settings.processor, max_dead_letter_payload_bytes=record_limit
        ),
        transform=transform,
        writer=writer,
        filter_step=DuplicateEventFilter(settings.processor.dedup_window),
    )


def pii_policy(settings: PiiSettings) -> PiiPolicy | None:
    """The processor's PII policy from ``pii.*``; None when every field is kept."""
    key = settings.hash_key.get_secret_value().encode("utf-8") if settings.hash_key else b""
    policy = PiiPolicy(settings.email, settings.ip, settings.useragent, key)
    return policy if policy.active else None


# The cyclic garbage collector's generation thresholds while the stage runs (CPython's
# defaults: 700, 10, 10). A poll of 768 KB batches is ~10,000 events whose objects (dicts,
# strings, records, Kafka batches) stay alive until the batch is written; with a young
# collection every 700 allocations, each batch was walked and promoted many times over, and
# every full collection also walked the whole start-up heap (modules, schemas, clients).
# None of these objects form cycles. Measured (bench/processor_stage.py, same run): 1.45-1.55x
# the core per event with the defaults, 1.3x with these thresholds and the start-up heap frozen.
PROCESSOR_GC_THRESHOLDS = (50_000, 10, 10)


_tuned_stages = 0
_default_thresholds = gc.get_threshold()


@contextlib.contextmanager
def collector_tuned_for_batches() -> Iterator[None]:
    """Freeze what exists now (the start-up heap: never garbage, never walked again by a
    full collection) and raise the young generation's threshold; undone when the last stage
    of the process that entered it exits (tests run several in one process)."""
    global _tuned_stages, _default_thresholds
    if _tuned_stages == 0:
        _default_thresholds = gc.get_threshold()
        gc.collect()
        gc.freeze()
        gc.set_threshold(*PROCESSOR_GC_THRESHOLDS)
    _tuned_stages += 1
    try:
        yield
    finally:
        _tuned_stages -= 1
        if _tuned_stages == 0:
            gc.set_threshold(*_default_thresholds)
            gc.unfreeze()


async def run_processor(
    settings: Settings,
    stop: asyncio.Event,
    *,
    drain: bool = False,
    ready: asyncio.Event | None = None,
    health_port: int | None = -1,
    tune_collector: bool = True,
) -> None:
    """Consume raw batches until ``stop`` is set (see run_consumer_stage).

    ``health_port``: -1 uses ``processor.health_port``; None serves no health endpoint.
    ``tune_collector``: run with ``collector_tuned_for_batches`` (off only to measure it)."""
    section = settings.processor
    # With kafka.events_format: confluent, registers the schema before consuming anything.
    codec = await open_event_codec_retrying(settings, STAGE_PROCESS, section, stop)
    if codec is None:
        return
    with collector_tuned_for_batches() if tune_collector else contextlib.nullcontext():
        await run_consumer_stage(
            processor_stage(settings, codec),
            settings,
            stop,
            health_host=section.health_host,
            health_port=section.health_port if health_port == -1 else health_port,
            drain=drain,
            ready=ready,
        )
