"""The ``sgpipe`` command: the one place that reads the environment and builds Settings.

sgpipe up      [--config F] [--data-dir D] [--port P]   the whole pipeline, one process
sgpipe ingest  [--config F] [--port P]                  the ingress only
sgpipe process [--config F]                             raw batches -> normalized events
sgpipe sink    [--config F]                             normalized events -> ClickHouse
sgpipe query   [--config F] [--data-dir D] "SQL"        print a query's result as TSV
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import structlog

from sgpipe.runtime.errors import FatalStageError
from sgpipe.runtime.logs import configure_logging
from sgpipe.runtime.settings import ClickHouseSettings, ConfigError, Settings, load_settings

log = structlog.get_logger(__name__)

DEFAULT_DATA_DIR = Path("sgpipe-data")

EXIT_CONFIG = 2
EXIT_FAILURE = 1
# A stage stopped itself (wrong credentials, schema mismatch, dead-letter limit): a person
# must act; Kubernetes restarts it and the restarts surface the message.
EXIT_FATAL = 3


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    if getattr(args, "port", None) is not None:
        overrides["ingest.port"] = args.port
    try:
        settings = load_settings(args.config, os.environ, overrides)
    except ConfigError as exc:
        print(f"sgpipe: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.logging.level, settings.logging.format)
    command: Callable[[argparse.Namespace, Settings], int] = args.command
    try:
        return command(args, settings)
    except ConfigError as exc:
        print(f"sgpipe: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sgpipe", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[..., int], help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(command=handler)
        sub.add_argument("--config", type=Path, help="YAML settings file")
        return sub

    up = command("up", _up, "run ingress, processor and sink in one process")
    up.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    up.add_argument("--port", type=int, help="ingress port (default: ingest.port)")
    ingest = command("ingest", _ingest, "run the webhook ingress against external Kafka")
    ingest.add_argument("--port", type=int, help="ingress port (default: ingest.port)")
    command("process", _process, "run the processor against external Kafka")
    command("sink", _sink, "run the ClickHouse sink against external Kafka and ClickHouse")
    query = command("query", _query, "run SQL against the store and print TSV")
    query.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    query.add_argument("sql")
    return parser


def _run_until_signal(body: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    async def runner() -> None:
        stop = asyncio.Event()
        main_task = asyncio.current_task()
        assert main_task is not None

        def on_signal() -> None:
            # The first signal drains; a second one means "now", without draining.
            if stop.is_set():
                log.warning("second signal: stopping at once, without draining")
                main_task.cancel()
            stop.set()

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal)
        await body(stop)

    try:
        asyncio.run(runner())
    except ConfigError:
        raise
    except asyncio.CancelledError:
        return EXIT_FAILURE
    except FatalStageError as exc:
        log.error("stage stopped on a fatal error", error=str(exc))
        return EXIT_FATAL
    except Exception as exc:
        log.error("sgpipe stopped on an error", error=repr(exc), exc_info=True)
        return EXIT_FAILURE
    return 0


def _require_kafka(settings: Settings) -> None:
    if settings.kafka.bootstrap_servers is None:
        raise ConfigError("kafka.bootstrap_servers must be set (only `sgpipe up` embeds a broker)")


async def _prepare_topics(settings: Settings) -> None:
    from sgpipe.runtime.kafka import ensure_topics

    if settings.kafka.create_topics:
        created = await ensure_topics(settings.kafka)
        if created:
            log.info("created topics", topics=created)


def _up(args: argparse.Namespace, settings: Settings) -> int:
    from sgpipe.up import run_up

    return _run_until_signal(lambda stop: run_up(settings, args.data_dir, stop))


def _ingest(args: argparse.Namespace, settings: Settings) -> int:
    from aiohttp import web

    from ingest.app import create_app

    _require_kafka(settings)
    app = create_app(settings)
    asyncio.run(_prepare_topics(settings))
    web.run_app(app, host=settings.ingest.host, port=settings.ingest.port, access_log=None)
    return 0


def _process(args: argparse.Namespace, settings: Settings) -> int:
    from processors.stage import run_processor

    _require_kafka(settings)

    async def body(stop: asyncio.Event) -> None:
        await run_processor(settings, stop)

    return _run_until_signal(body)


def _sink(args: argparse.Namespace, settings: Settings) -> int:
    from sinks.stage import run_sink

    _require_kafka(settings)
    if settings.clickhouse.url is None:
        raise ConfigError("clickhouse.url must be set (only `sgpipe up` embeds ClickHouse)")

    async def body(stop: asyncio.Event) -> None:
        await run_sink(settings, stop)

    return _run_until_signal(body)


def _query(args: argparse.Namespace, settings: Settings) -> int:
    """Through ClickHouse's HTTP interface when a server is configured or `sgpipe up` serves
    the data dir (as the data dir's writer user); otherwise straight from the embedded data
    path (nobody holds it)."""
    from sgpipe.embedded.credentials import CredentialsError, load_credentials
    from sgpipe.runtime.clickhouse import with_credentials

    clickhouse = settings.clickhouse
    url = clickhouse.url
    if url is None:
        url = _running_store_url(args.data_dir)
        if url is not None:
            try:
                writer = load_credentials(args.data_dir).writer
            except (FileNotFoundError, CredentialsError) as exc:
                print(
                    f"sgpipe: cannot read the embedded store's credentials: {exc}", file=sys.stderr
                )
                return EXIT_FAILURE
            clickhouse = with_credentials(clickhouse, writer.name, writer.password)
    database = clickhouse.database
    if url is not None:
        try:
            output = _query_http(url, clickhouse, args.sql)
        except QueryFailed as exc:
            print(f"sgpipe: {exc}", file=sys.stderr)
            return EXIT_FAILURE
    else:
        from sgpipe.embedded.clickhouse import EmbeddedQueryError, query_tsv
        from sgpipe.up import CLICKHOUSE_DIR

        data_path = args.data_dir / CLICKHOUSE_DIR
        if not data_path.is_dir():
            print(f"sgpipe: no ClickHouse store at {data_path}", file=sys.stderr)
            return EXIT_FAILURE
        try:
            output = query_tsv(data_path, args.sql, database=database)
        except EmbeddedQueryError as exc:
            print(f"sgpipe: {exc}", file=sys.stderr)
            return EXIT_FAILURE
    sys.stdout.buffer.write(output)
    sys.stdout.flush()
    return 0


def _running_store_url(data_dir: Path) -> str | None:
    """The embedded store's URL if `sgpipe up` serves this data dir and answers."""
    from sgpipe.up import state_file

    try:
        state = json.loads(state_file(data_dir).read_text(encoding="utf-8"))
        if not state.get("clickhouse_embedded", True):
            return None  # `up` ran against a configured ClickHouse: pass the same config
        url = str(state["clickhouse_url"])
        with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
            return url if response.status == 200 else None
    except (OSError, ValueError, KeyError, urllib.error.URLError):
        return None


def _query_http(url: str, clickhouse: ClickHouseSettings, sql: str) -> bytes:
    from clickhouse_connect.driver.exceptions import ClickHouseError

    from sgpipe.runtime.clickhouse import connect

    async def run() -> bytes:
        client = await connect(clickhouse, url, database=clickhouse.database)
        try:
            result: bytes = await client.raw_query(sql, fmt="TabSeparated")
            return result
        finally:
            await client.close()

    try:
        return asyncio.run(run())
    except ClickHouseError as exc:
        raise QueryFailed(str(exc)) from exc


class QueryFailed(Exception):
    """The store answered the query with an error."""


if __name__ == "__main__":
    sys.exit(main())
