"""The sink, declared: normalized Avro events -> ClickHouse ``email_events``.

Steps: with a schema registry (``kafka.events_format: confluent``), fetch the writer schemas a
batch names that are not known yet (registry unreachable: retried, holding the batch); then
make each record a row (``sinks.rows.EventRows``: the record's Avro body, checked without
decoding it when it is in the current schema, decoded otherwise). Whatever a record's bytes,
it becomes a row or a rejection (to the dead-letter topic), never a stop: bytes in no known
framing or damaged Avro (``undecodable_event``), a writer schema nobody here knows
(``unknown_schema``: a fingerprint of no released version, a registry id with no registry
configured or one the registry does not know), a value its column cannot hold
(``unwritable_event``). Writer: one ``INSERT ... FORMAT RowBinary`` per batch
(``sink.batch_max_records`` / ``sink.batch_max_seconds``), the rows' Avro bodies transcoded
chunk by chunk. The runtime commits a batch's offsets only after ClickHouse accepted its insert.

``run_sink`` (``sgpipe sink``) also runs the dead-letter sink (``sinks.dead_letters``), so that
one Deployment keeps both tables current, behind one health endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

from schemas.email_event import EmailEventCodec, SerializationError, UnknownWriterSchema
from sgpipe.runtime.dead_letters import Rejection
from sgpipe.runtime.kafka import max_record_bytes
from sgpipe.runtime.messages import Message
from sgpipe.runtime.metrics import STAGE_SINK
from sgpipe.runtime.runner import run_consumer_stages
from sgpipe.runtime.schema_registry import (
    SchemaRegistryClient,
    WriterSchemas,
    fetch_unknown_schemas,
    open_event_codec_retrying,
)
from sgpipe.runtime.settings import Settings
from sgpipe.runtime.stage import UNKNOWN_SCHEMA, ConsumerStage, StageOptions, Transformed
from sinks.clickhouse import ClickHouseWriter
from sinks.dead_letters import dead_letter_stage
from sinks.rows import EventRow, EventRows, UnwritableEvent

# Said of a Confluent-framed record when nothing could look its id up.
_NO_REGISTRY = " (no schema registry is configured: kafka.events_format is not confluent)"


def sink_stage(
    settings: Settings,
    clickhouse_url: str | None = None,
    codec: EmailEventCodec | None = None,
    registry: WriterSchemas | None = None,
) -> ConsumerStage[EventRow]:
    """``clickhouse_url`` overrides ``clickhouse.url`` (the embedded store's address);
    ``codec`` knows the registry ids of the Confluent format (``open_event_codec``);
    ``registry`` (open for as long as the stage runs) fetches the ids it does not know.

    Records of any released schema version decode (to the current one). A record naming a
    writer schema no one here knows is dead-lettered (``unknown_schema``): a newer sgpipe may
    have written it, but so may anyone who can produce to the topic; a deploy that puts a newer
    processor before its sinks trips the dead-letter limit, which pauses the sink."""
    codec = codec or EmailEventCodec()
    rows = EventRows(codec)

    def transform(message: Message) -> Transformed[EventRow]:
        try:
            row = rows.row(message.value or b"")
        except SerializationError as exc:
            return Transformed(rejections=[Rejection("undecodable_event", str(exc))])
        except UnknownWriterSchema as exc:
            detail = str(exc)
            if exc.schema_id is not None and registry is None:
                detail += _NO_REGISTRY
            return Transformed(rejections=[Rejection(UNKNOWN_SCHEMA, detail)])
        except UnwritableEvent as exc:
            return Transformed(rejections=[Rejection("unwritable_event", str(exc))])
        return Transformed([row])

    async def fetch_writer_schemas(messages: Sequence[Message]) -> None:
        if registry is not None:
            await fetch_unknown_schemas(codec, registry, (message.value for message in messages))

    def writer(producer: Any) -> ClickHouseWriter:
        return ClickHouseWriter(settings.clickhouse, clickhouse_url, stage=STAGE_SINK)

    return ConsumerStage(
        name=STAGE_SINK,
        topic=settings.kafka.topics.events,
        group_id=settings.sink.group_id,
        options=StageOptions.from_settings(
            STAGE_SINK,
            settings.sink,
            max_dead_letter_payload_bytes=max_record_bytes(settings.kafka),
        ),
        transform=transform,
        writer=writer,
        before_steps=fetch_writer_schemas if registry is not None else None,
    )


async def run_sink(
    settings: Settings,
    stop: asyncio.Event,
    clickhouse_url: str | None = None,
    *,
    drain: bool = False,
    ready: asyncio.Event | None = None,
    health_port: int | None = -1,
) -> None:
    """Consume normalized events, and dead letters, until ``stop`` is set (see
    run_consumer_stages: the dead-letter sink stops after the events sink, so it still reads
    the events sink's last dead letters).

    ``health_port``: -1 uses ``sink.health_port``; None serves no health endpoint."""
    section = settings.sink
    # The Confluent format's ids of every released version, looked up (and the current one
    # registered) before consuming anything.
    codec = await open_event_codec_retrying(settings, STAGE_SINK, section, stop)
    if codec is None:
        return
    async with contextlib.AsyncExitStack() as stack:
        registry = None
        if settings.kafka.events_format == "confluent":
            registry = await stack.enter_async_context(
                SchemaRegistryClient(settings.schema_registry)
            )
        await run_consumer_stages(
            [
                sink_stage(settings, clickhouse_url, codec, registry),
                dead_letter_stage(settings, clickhouse_url),
            ],
            settings,
            stop,
            health_host=section.health_host,
            health_port=section.health_port if health_port == -1 else health_port,
            drain=drain,
            ready=ready,
        )
