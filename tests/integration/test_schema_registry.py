"""The Confluent wire format end to end: sgpipe's registry client over HTTP, the processor on a
real broker registering and writing in Confluent framing, confluent-kafka's own
``AvroDeserializer`` reading the topic, and the sink landing it in the real engine.

No Schema Registry server installs on this machine, so the HTTP endpoints sgpipe uses
(register under a subject, fetch by id) are served here in front of confluent-kafka's own
``mock://`` registry (the library's test double), which assigns the ids and keeps the state.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from clickhouse_connect.driver.exceptions import DatabaseError
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext
from pydantic import SecretStr

from processors.stage import run_processor
from schemas.email_event import EmailEventCodec, UnknownWriterSchema, schema_versions
from schemas.raw_batch import RawBatch
from sgpipe.runtime.errors import ErrorClass, classify
from sgpipe.runtime.kafka import OutgoingRecord, create_producer, ensure_topics, send_all
from sgpipe.runtime.schema_registry import (
    SchemaRegistryClient as SgpipeRegistryClient,
)
from sgpipe.runtime.schema_registry import (
    SchemaRegistryError,
    fetch_unknown_schemas,
    open_event_codec,
)
from sgpipe.runtime.settings import SchemaRegistrySettings, Settings
from sinks.stage import run_sink
from tests.golden import expected_record, fixture_names, json_form, payload
from tests.integration.clickhouse_tools import clickhouse_client, select_rows, served_clickhouse
from tests.integration.kafka_tools import kafka_test_settings, read_topic
from tests.ports import free_port
from tests.raw_auth_support import RAW_AUTH_DOCUMENT, signed_raw_batch_headers

pytestmark = pytest.mark.kafka

USER, PASSWORD = "registry-user", "registry-secret"
CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


@dataclass
class Registry:
    url: str
    mock: SchemaRegistryClient
    requests: list[str]


@asynccontextmanager
async def registry_server() -> AsyncIterator[Registry]:
    mock = SchemaRegistryClient.new_client({"url": "mock://sgpipe-registry"})
    requests: list[str] = []

    def authorized(request: web.Request) -> bool:
        expected = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        return request.headers.get("Authorization") == f"Basic {expected}"

    def error(status: int, code: int, message: str) -> web.Response:
        body = json.dumps({"error_code": code, "message": message})
        return web.Response(status=status, text=body, content_type=CONTENT_TYPE)

    async def register(request: web.Request) -> web.Response:
        requests.append(f"POST {request.path}")
        if not authorized(request):
            return error(401, 40101, "Unauthorized")
        assert request.content_type == CONTENT_TYPE
        document = await request.json()
        schema_id = mock.register_schema(
            request.match_info["subject"], Schema(document["schema"], "AVRO")
        )
        return web.json_response({"id": schema_id}, content_type=CONTENT_TYPE)

    async def schema_by_id(request: web.Request) -> web.Response:
        requests.append(f"GET {request.path}")
        if not authorized(request):
            return error(401, 40101, "Unauthorized")
        try:
            schema = mock.get_schema(int(request.match_info["id"]))
        except Exception:  # noqa: BLE001 - the mock raises its own error type for 404
            return error(404, 40403, "Schema not found")
        return web.json_response({"schema": schema.schema_str}, content_type=CONTENT_TYPE)

    async def lookup(request: web.Request) -> web.Response:
        requests.append(f"POST {request.path}")
        if not authorized(request):
            return error(401, 40101, "Unauthorized")
        document = await request.json()
        try:
            found = mock.lookup_schema(
                request.match_info["subject"], Schema(document["schema"], "AVRO")
            )
        except Exception:  # noqa: BLE001 - the mock raises its own error type for 404
            return error(404, 40403, "Schema not found")
        return web.json_response(
            {"id": found.schema_id, "version": found.version}, content_type=CONTENT_TYPE
        )

    app = web.Application()
    app.router.add_post("/subjects/{subject}", lookup)
    app.router.add_post("/subjects/{subject}/versions", register)
    app.router.add_get("/schemas/ids/{id}", schema_by_id)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield Registry(f"http://127.0.0.1:{port}", mock, requests)
    finally:
        await runner.cleanup()


def confluent_settings(bootstrap: str, suffix: str, url: str, **sections: Any) -> Settings:
    base = kafka_test_settings(bootstrap, suffix, **sections)
    document = base.model_dump(mode="json")
    document["raw_auth"] = RAW_AUTH_DOCUMENT  # model_dump masks secrets
    document["kafka"]["events_format"] = "confluent"
    document["schema_registry"] = {"url": url, "username": USER, "password": PASSWORD}
    return Settings.model_validate(document)


async def test_codec_registers_the_current_schema_under_the_topics_subject() -> None:
    async with registry_server() as registry:
        settings = confluent_settings("127.0.0.1:1", "reg", registry.url)
        subject = f"{settings.kafka.topics.events}-value"
        codec = await open_event_codec(settings)
        again = await open_event_codec(settings)

        # Look the current version up, register it as it is missing; look up v1 (absent).
        # The second time, the lookup finds it: no write needed.
        lookup, register = f"POST /subjects/{subject}", f"POST /subjects/{subject}/versions"
        assert registry.requests == [lookup, register, lookup, lookup, lookup]
        registered = registry.mock.get_latest_version(subject)
        assert codec.confluent_schema_id == again.confluent_schema_id == registered.schema_id
        assert registered.schema.schema_str is not None
        assert json.loads(registered.schema.schema_str) == json.loads(schema_versions()[-1].text)


async def test_codec_knows_the_ids_older_sgpipes_registered() -> None:
    async with registry_server() as registry:
        settings = confluent_settings("127.0.0.1:1", "old", registry.url)
        subject = f"{settings.kafka.topics.events}-value"
        # An older sgpipe (schema v1) registered its schema and wrote with its id.
        v1_id = registry.mock.register_schema(subject, Schema(schema_versions()[0].text, "AVRO"))
        foundation = base64.b64decode(foundation_record())
        framed = b"\x00" + v1_id.to_bytes(4, "big") + foundation[10:]

        codec = await open_event_codec(settings)

        assert codec.confluent_schema_id != v1_id
        assert codec.unknown_schema_ids([framed]) == set()
        assert codec.decode(framed) == EmailEventCodec().decode(foundation)
        assert not [request for request in registry.requests if request.startswith("GET")]


def foundation_record() -> str:
    path = Path(__file__).resolve().parents[1] / "fixtures/avro/v1_records_from_foundation.json"
    value: str = json.loads(path.read_text())["records"][0]["value"]
    return value


async def test_registry_errors_say_whether_to_retry() -> None:
    async with registry_server() as registry:
        wrong = SchemaRegistrySettings(url=registry.url, username=USER, password=SecretStr("nope"))
        async with SgpipeRegistryClient(wrong) as client:
            with pytest.raises(SchemaRegistryError) as unauthorized:
                await client.register("t-value", schema_versions()[-1].text)
        assert (unauthorized.value.status, unauthorized.value.code) == (401, 40101)
        assert not unauthorized.value.retriable
        assert "nope" not in str(unauthorized.value)

        right = SchemaRegistrySettings(
            url=registry.url, username=USER, password=SecretStr(PASSWORD)
        )
        async with SgpipeRegistryClient(right) as client:
            with pytest.raises(SchemaRegistryError) as missing:
                await client.schema(999)
        assert (missing.value.status, missing.value.retriable) == (404, False)

    gone = SchemaRegistrySettings(url=f"http://127.0.0.1:{free_port()}", timeout_seconds=2)
    async with SgpipeRegistryClient(gone) as client:
        with pytest.raises(SchemaRegistryError) as unreachable:
            await client.schema(1)
    assert unreachable.value.status is None and unreachable.value.retriable


async def test_a_consumer_fetches_writer_schemas_it_has_not_seen() -> None:
    async with registry_server() as registry:
        # Another writer (an older sgpipe) registered v1 and wrote with its id.
        v1 = schema_versions()[0]
        v1_id = registry.mock.register_schema("events-value", Schema(v1.text, "AVRO"))
        foundation = json.loads(
            (
                Path(__file__).resolve().parents[1]
                / "fixtures/avro/v1_records_from_foundation.json"
            ).read_text()
        )["records"][0]["value"]
        framed = b"\x00" + v1_id.to_bytes(4, "big") + base64.b64decode(foundation)[10:]
        codec = EmailEventCodec()
        settings = SchemaRegistrySettings(
            url=registry.url, username=USER, password=SecretStr(PASSWORD)
        )
        async with SgpipeRegistryClient(settings) as client:
            assert await fetch_unknown_schemas(codec, client, [framed, framed, None]) == 1
            assert await fetch_unknown_schemas(codec, client, [framed]) == 0
        assert registry.requests == [f"GET /schemas/ids/{v1_id}"]
        assert codec.decode(framed) == EmailEventCodec().decode(base64.b64decode(foundation))


async def test_processor_writes_confluent_framing_that_confluent_and_the_sink_read(
    kafka_bootstrap_servers: str, unique_name: str, tmp_path: Path
) -> None:
    pytest.importorskip("chdb")
    names = fixture_names()[:8]
    body = b"[" + b",\r\n".join(payload(name) for name in names) + b"]\r\n"
    batch = RawBatch("main", body, 1_700_000_100_000, "req-1", None, "signature")
    async with registry_server() as registry:
        settings = confluent_settings(
            kafka_bootstrap_servers,
            unique_name,
            registry.url,
            clickhouse={"database": f"conf_{unique_name}"},
        )
        topics = settings.kafka.topics
        await ensure_topics(settings.kafka)
        producer = create_producer(settings.kafka)
        await producer.start()
        try:
            await send_all(
                producer,
                [OutgoingRecord(topics.raw, body, headers=signed_raw_batch_headers(batch))],
            )
        finally:
            await producer.stop()

        stop = asyncio.Event()
        processor = asyncio.create_task(run_processor(settings, stop, health_port=None))
        try:
            events = await read_topic(kafka_bootstrap_servers, topics.events, expected=len(names))
        finally:
            stop.set()
            await asyncio.wait_for(processor, timeout=30)

        assert len(events) == len(names)
        deserializer = AvroDeserializer(registry.mock)
        context = SerializationContext(topics.events, MessageField.VALUE)
        by_raw = {}
        for record in events:
            assert record.value[:1] == b"\x00"
            event = deserializer(record.value, context)
            assert isinstance(event, dict)
            by_raw[event["raw"]] = json_form(event)
        for name in names:
            assert by_raw[payload(name).decode()] == expected_record(name)

        database = settings.clickhouse.database
        async with served_clickhouse(tmp_path / "ch") as url, clickhouse_client(url) as client:
            stop = asyncio.Event()
            sink = asyncio.create_task(
                run_sink(settings, stop, clickhouse_url=url, health_port=None)
            )
            try:
                deadline = time.monotonic() + 60
                rows: list[dict[str, Any]] = []
                while len(rows) < len(names) and time.monotonic() < deadline:
                    await asyncio.sleep(0.3)
                    try:
                        rows = await select_rows(
                            client,
                            f"SELECT * EXCEPT (inserted_at) FROM {database}.email_events FINAL",
                        )
                    except DatabaseError:  # not migrated yet
                        rows = []
            finally:
                stop.set()
                await asyncio.wait_for(sink, timeout=60)
        assert sorted(json.dumps(json_form(row), sort_keys=True) for row in rows) == sorted(
            json.dumps(expected_record(name), sort_keys=True) for name in names
        )


async def test_an_id_the_registry_does_not_know_is_remembered_as_unreadable() -> None:
    """A record's registry id comes from its bytes: one the registry does not know (404) makes
    its records poison, and is not asked for again; an unreachable registry is retriable."""
    unknown = b"\x00" + (424242).to_bytes(4, "big") + b"garbage"
    async with registry_server() as registry:
        settings = SchemaRegistrySettings(
            url=registry.url, username=USER, password=SecretStr(PASSWORD)
        )
        codec = EmailEventCodec()
        async with SgpipeRegistryClient(settings) as client:
            assert await fetch_unknown_schemas(codec, client, [unknown]) == 0
            assert await fetch_unknown_schemas(codec, client, [unknown]) == 0
        assert registry.requests == ["GET /schemas/ids/424242"]
        with pytest.raises(UnknownWriterSchema, match="the schema registry does not know this id"):
            codec.decode(unknown)
    closed = SchemaRegistrySettings(url=f"http://127.0.0.1:{free_port()}", timeout_seconds=2)
    async with SgpipeRegistryClient(closed) as client:
        with pytest.raises(SchemaRegistryError) as down:
            await fetch_unknown_schemas(EmailEventCodec(), client, [unknown])
    assert classify(down.value) is ErrorClass.RETRIABLE
