"""`sgpipe up`: the whole pipeline in one process, on embedded defaults where nothing is set.

Start order: broker (when no Kafka is configured) -> topics -> ClickHouse (embedded chdb
served over HTTP when no URL is configured) -> sink -> processor -> ingress. Stop order is the
reverse of the data flow: the ingress stops taking requests, then the processor and the sink
drain their topics (only with the in-memory embedded broker, where that drain is what makes a
clean stop lose nothing; the durable one keeps what was not consumed), then the stores stop.

While it runs, ``<data-dir>/sgpipe-up.json`` records where its services listen so that
``sgpipe query`` (and BI tools) read the embedded store through its HTTP interface instead of
opening the chdb data path, which only one process may hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from ingest.app import build_verifiers, create_app
from ingest.protocol import IngressRunner
from processors.stage import run_processor
from sgpipe.preflight import PreflightFailed, check_up, lock_data_dir
from sgpipe.runtime.clickhouse import with_credentials
from sgpipe.runtime.kafka import ensure_topics
from sgpipe.runtime.redact import redact_url
from sgpipe.runtime.settings import ConfigError, Settings
from sgpipe.runtime.startup import retry_kafka_at_start, start_deadline
from sinks.stage import run_sink

if TYPE_CHECKING:
    from sgpipe.embedded.credentials import EmbeddedCredentials

log = structlog.get_logger(__name__)

STATE_FILE = "sgpipe-up.json"
CLICKHOUSE_DIR = "clickhouse"


class StageFailed(RuntimeError):
    """A stage of `sgpipe up` stopped on its own; the pipeline was shut down."""


def state_file(data_dir: Path) -> Path:
    return data_dir / STATE_FILE


def retention_groups(settings: Settings) -> dict[str, list[str]]:
    """Which sgpipe consumer groups must have committed a topic's batches before the embedded
    broker's retention may delete them. The dead-letter topic has none: it is kept."""
    return {
        settings.kafka.topics.raw: [settings.processor.group_id],
        settings.kafka.topics.events: [settings.sink.group_id],
    }


async def run_up(settings: Settings, data_dir: Path, stop: asyncio.Event) -> None:
    """Run until ``stop`` is set or a stage fails (then StageFailed, after a full shutdown).

    Raises ConfigError or PreflightFailed (a busy port, the data dir in use) before anything
    is started; holds the data dir's lock until it returns.
    """
    build_verifiers(settings)  # a bad key must stop us before anything starts
    problems = check_up(settings, data_dir)
    if problems:
        raise PreflightFailed(problems)
    lock = lock_data_dir(data_dir, "up")
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(lock.release)
        # Before anything starts too: an unsafe credentials file is a configuration error.
        credentials = _embedded_credentials(settings, data_dir)
        embedded_broker = settings.kafka.bootstrap_servers is None
        # Only an in-memory broker needs the stages to drain before it stops.
        drain = embedded_broker and settings.embedded.broker_storage == "memory"
        if embedded_broker:
            from sgpipe.embedded.broker import EmbeddedKafka

            broker = EmbeddedKafka(
                settings.embedded, data_dir, retention_groups=retention_groups(settings)
            )
            bootstrap_servers = await broker.start()
            stack.push_async_callback(broker.stop)
            kafka = settings.kafka.model_copy(
                update={"bootstrap_servers": bootstrap_servers, "enable_idempotence": False}
            )
            settings = settings.model_copy(update={"kafka": kafka})
        if settings.kafka.create_topics:
            kafka_settings = settings.kafka
            created = await retry_kafka_at_start(
                lambda: ensure_topics(kafka_settings),
                kafka_settings,
                action="create topics",
                deadline=start_deadline(kafka_settings),
                stop=stop,
            )
            if created:
                log.info("created topics", topics=created)

        clickhouse_url = settings.clickhouse.url
        if clickhouse_url is None:
            from sgpipe.embedded.clickhouse import EmbeddedClickHouse
            from sgpipe.embedded.credentials import credentials_file

            assert credentials is not None  # loaded up front whenever no URL is configured
            store = EmbeddedClickHouse(
                data_dir / CLICKHOUSE_DIR,
                credentials,
                allowed_origins=settings.embedded.clickhouse_allowed_origins,
            )
            clickhouse_url = await store.start(
                settings.embedded.host, settings.embedded.clickhouse_http_port
            )
            stack.push_async_callback(store.stop)
            # The sink (and its migrations) write as the writer user.
            settings = settings.model_copy(
                update={
                    "clickhouse": with_credentials(
                        settings.clickhouse, credentials.writer.name, credentials.writer.password
                    )
                }
            )
            log.info(
                "embedded clickhouse serving",
                url=clickhouse_url,
                users=[user.name for user in credentials.users],
                credentials=str(credentials_file(data_dir)),
            )
        else:
            log.info("sink writes to clickhouse", url=redact_url(clickhouse_url))

        _write_state(data_dir, settings, clickhouse_url)
        stack.callback(_remove_state, data_dir)

        sink_stop, processor_stop = asyncio.Event(), asyncio.Event()
        sink_ready, processor_ready = asyncio.Event(), asyncio.Event()
        sink = asyncio.create_task(
            run_sink(
                settings,
                sink_stop,
                clickhouse_url,
                drain=drain,
                ready=sink_ready,
                health_port=None,
            ),
            name="sink",
        )
        processor = asyncio.create_task(
            run_processor(
                settings,
                processor_stop,
                drain=drain,
                ready=processor_ready,
                health_port=None,
            ),
            name="processor",
        )
        stages = [sink, processor]
        runner = IngressRunner(create_app(settings))
        try:
            try:
                # The ingress answers 2xx for what it publishes, so it takes requests only
                # once the stages that carry those batches on are up.
                if await _wait_for_ready(stop, [sink_ready, processor_ready], stages):
                    await runner.setup()
                    site = web.TCPSite(runner, settings.ingest.host, settings.ingest.port)
                    await site.start()
                    _log_webhook_urls(settings, runner)
                    await _wait_for_stop_or_failure(stop, stages)
            finally:
                log.info("stopping: ingress first, then draining processor and sink")
                await runner.cleanup()
        finally:
            await _stop_stage(processor, processor_stop)
            await _stop_stage(sink, sink_stop)
        failures = [
            f"{task.get_name()}: {task.exception()!r}" for task in stages if task.exception()
        ]
        if failures:
            raise StageFailed("; ".join(failures))
    log.info("stopped")


def _embedded_credentials(settings: Settings, data_dir: Path) -> EmbeddedCredentials | None:
    """The embedded store's credentials (created on first start), None with a configured
    ClickHouse. An unsafe credentials file is a configuration error."""
    if settings.clickhouse.url is not None:
        return None
    from sgpipe.embedded.credentials import CredentialsError, load_or_create_credentials

    try:
        return load_or_create_credentials(data_dir)
    except CredentialsError as exc:  # e.g. a file others can read: fix it, then start
        raise ConfigError(str(exc)) from exc


async def _wait_for_ready(
    stop: asyncio.Event, ready: list[asyncio.Event], stages: list[asyncio.Task[None]]
) -> bool:
    """True once every stage is ready; False if stopped or a stage ended first."""
    waiters = [asyncio.create_task(event.wait()) for event in ready]
    stopped = asyncio.create_task(stop.wait())
    all_ready = asyncio.gather(*waiters)
    watched: list[asyncio.Future[Any]] = [all_ready, stopped, *stages]
    try:
        await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in (*waiters, stopped):
            waiter.cancel()
    return all(event.is_set() for event in ready) and not any(task.done() for task in stages)


async def _wait_for_stop_or_failure(stop: asyncio.Event, stages: list[asyncio.Task[None]]) -> None:
    stopped = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([stopped, *stages], return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    for task in stages:
        if task in done:
            log.error("stage stopped unexpectedly", stage=task.get_name(), error=task.exception())


async def _stop_stage(task: asyncio.Task[None], stop: asyncio.Event) -> None:
    stop.set()
    if not task.done():
        await asyncio.wait([task])


def _log_webhook_urls(settings: Settings, runner: web.AppRunner) -> None:
    ports = [address[1] for address in runner.addresses if isinstance(address, tuple)]
    port = ports[0] if ports else settings.ingest.port
    if not settings.webhooks:
        log.warning("no webhooks configured: add one under `webhooks:` in the config file")
    for webhook in settings.webhooks:
        log.info(
            "send SendGrid events to",
            webhook=webhook.name,
            url=f"http://<this-host>:{port}/webhooks/{webhook.name}",
            local_url=f"http://127.0.0.1:{port}/webhooks/{webhook.name}",
        )


def _write_state(data_dir: Path, settings: Settings, clickhouse_url: str) -> None:
    """Where the services listen, for `sgpipe query` and operators: no secret in it (URLs
    are redacted; the embedded store's credentials have their own file), mode 0600."""
    state = {
        "pid": os.getpid(),
        "clickhouse_url": redact_url(clickhouse_url),
        "clickhouse_embedded": settings.clickhouse.url is None,
        "kafka_bootstrap_servers": settings.kafka.bootstrap_servers,
        "database": settings.clickhouse.database,
    }
    path = state_file(data_dir)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(state, handle, indent=2)
    temporary.replace(path)


def _remove_state(data_dir: Path) -> None:
    state_file(data_dir).unlink(missing_ok=True)
