"""`sgpipe ingest`: the ingress as its own process, against an external Kafka.

Start order: webhook keys (a bad one stops us before any connection), topics (unless
``kafka.create_topics`` is off), the producer, then the listening socket, so that the ingress
never takes a request it cannot publish. Until Kafka answers, both Kafka steps are retried up
to ``kafka.start_timeout_seconds`` (``sgpipe.runtime.startup``).
"""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import web

from ingest.app import KafkaRawBatchPublisher, build_verifiers, create_app
from ingest.protocol import IngressRunner
from sgpipe.runtime import status
from sgpipe.runtime.kafka import ensure_topics
from sgpipe.runtime.settings import Settings
from sgpipe.runtime.startup import retry_kafka_at_start, start_deadline

log = structlog.get_logger(__name__)


async def run_ingress(settings: Settings, stop: asyncio.Event) -> None:
    """Serve ``POST /webhooks/{name}`` until ``stop`` is set (returns at once if it is set
    while Kafka is still being reached). Raises StartTimeout when Kafka never answers."""
    build_verifiers(settings)
    deadline = start_deadline(settings.kafka)
    if settings.kafka.create_topics:
        created = await retry_kafka_at_start(
            lambda: ensure_topics(settings.kafka),
            settings.kafka,
            action="create topics",
            deadline=deadline,
            stop=stop,
        )
        if created is None:
            return
        if created:
            log.info("created topics", topics=created)
    publisher = await retry_kafka_at_start(
        lambda: _started_publisher(settings),
        settings.kafka,
        action="start producer",
        deadline=deadline,
        stop=stop,
    )
    if publisher is None:
        return
    try:
        # IngressRunner: aiohttp's runner plus the connection cap, the request-head timeout
        # and JSON answers to malformed HTTP (ingest/protocol.py).
        runner = IngressRunner(create_app(settings, publisher, peers=settings.ingest.health_peers))
        await runner.setup()
        try:
            await web.TCPSite(runner, settings.ingest.host, settings.ingest.port).start()
            port = _bound_port(runner, settings.ingest.port)
            log.info(
                "ingress listening",
                host=settings.ingest.host,
                port=port,
                webhooks=[webhook.name for webhook in settings.webhooks],
            )
            status.report_listening("ingress", port)
            await stop.wait()
            log.info("stopping: ingress takes no more requests")
        finally:
            await runner.cleanup()
    finally:
        await publisher.stop()
    log.info("stopped")


async def _started_publisher(settings: Settings) -> KafkaRawBatchPublisher:
    publisher = KafkaRawBatchPublisher(settings)
    try:
        await publisher.start()
    except BaseException:
        await publisher.stop()  # a failed start leaves connections behind otherwise
        raise
    return publisher


def _bound_port(runner: web.AppRunner, configured: int) -> int:
    ports = [address[1] for address in runner.addresses if isinstance(address, tuple)]
    return ports[0] if ports else configured
