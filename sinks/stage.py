"""The sink, declared: normalized Avro events -> ClickHouse ``email_events``.

Step: decode each record (an undecodable one is rejected, to the dead-letter topic); writer:
a column-oriented insert per batch (``sink.batch_max_records`` / ``sink.batch_max_seconds``).
The runtime commits a batch's offsets only after ClickHouse accepted its insert.

``run_sink`` (``sgpipe sink``) also runs the dead-letter sink (``sinks.dead_letters``), so that
one Deployment keeps both tables current, behind one health endpoint.
"""

from __future__ import annotations

import asyncio
from typing import Any

from schemas.email_event import EmailEventCodec, SerializationError
from sgpipe.runtime.dead_letters import Rejection
from sgpipe.runtime.kafka import max_record_bytes
from sgpipe.runtime.messages import Message
from sgpipe.runtime.metrics import STAGE_SINK
from sgpipe.runtime.runner import run_consumer_stages
from sgpipe.runtime.schema_registry import open_event_codec_retrying
from sgpipe.runtime.settings import Settings
from sgpipe.runtime.stage import ConsumerStage, StageOptions, Transformed
from sinks.clickhouse import ClickHouseWriter
from sinks.dead_letters import dead_letter_stage


def sink_stage(
    settings: Settings, clickhouse_url: str | None = None, codec: EmailEventCodec | None = None
) -> ConsumerStage[dict[str, Any]]:
    """``clickhouse_url`` overrides ``clickhouse.url`` (the embedded store's address);
    ``codec`` knows the registry ids of the Confluent format (``open_event_codec``).

    Records of any released schema version decode (to the current one). A record naming a
    writer schema this version does not know raises UnknownWriterSchema out of the step: not
    poison, a newer sgpipe wrote it; the runtime stops the stage until it is upgraded."""
    codec = codec or EmailEventCodec()

    def transform(message: Message) -> Transformed[dict[str, Any]]:
        try:
            return Transformed([codec.decode(message.value or b"")])
        except SerializationError as exc:
            return Transformed(rejections=[Rejection("undecodable_event", str(exc))])

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
    await run_consumer_stages(
        [sink_stage(settings, clickhouse_url, codec), dead_letter_stage(settings, clickhouse_url)],
        settings,
        stop,
        health_host=section.health_host,
        health_port=section.health_port if health_port == -1 else health_port,
        drain=drain,
        ready=ready,
    )
