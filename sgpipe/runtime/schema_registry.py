"""The Confluent Schema Registry, over its small REST API, and the events codec built on it.

Only what the Confluent wire format needs: at start, find (or register, when missing) the
current EmailEvent schema under the events topic's subject (``TopicNameStrategy``:
``<topic>-value``) and look up the ids of the older released versions there (records an older
sgpipe wrote); later, fetch the writer schema of a registry id a consumer has not seen. Plain
HTTP through aiohttp.

Errors: ``SchemaRegistryError`` carries the registry's HTTP status and error code; 401/403
(credentials) and 409/422 (the schema is incompatible with the subject's) are fatal for a
stage, connection failures and 5xx retriable (``retriable``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from typing import Any, Final, Protocol
from urllib.parse import quote

import aiohttp

from schemas.email_event import (
    EmailEventCodec,
    SerializationError,
    current_schema,
    schema_versions,
)
from sgpipe.runtime.retry import Backoff
from sgpipe.runtime.runner import retry_until_started
from sgpipe.runtime.schema_registry_errors import SchemaRegistryError
from sgpipe.runtime.settings import SchemaRegistrySettings, Settings, StageSettings

__all__ = ["SchemaRegistryError"]

CONTENT_TYPE: Final = "application/vnd.schemaregistry.v1+json"


def value_subject(topic: str) -> str:
    """The subject of a topic's record values (Confluent's TopicNameStrategy)."""
    return f"{topic}-value"


class SchemaRegistryClient:
    """``async with SchemaRegistryClient(settings) as registry: ...``"""

    def __init__(self, settings: SchemaRegistrySettings) -> None:
        if settings.url is None:
            raise ValueError("schema_registry.url is not set")
        self._base = settings.url.rstrip("/")
        headers = {"Accept": CONTENT_TYPE}
        if settings.username is not None:
            password = settings.password.get_secret_value() if settings.password else ""
            headers["Authorization"] = aiohttp.encode_basic_auth(settings.username, password)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=settings.timeout_seconds), headers=headers
        )

    async def __aenter__(self) -> SchemaRegistryClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._session.close()

    async def register(self, subject: str, schema_text: str) -> int:
        """The id of ``schema_text`` under ``subject``, registering it if it is new (the
        registry answers an already registered schema with its existing id)."""
        document = await self._request(
            "POST",
            f"/subjects/{quote(subject, safe='')}/versions",
            {"schema": schema_text},  # no schemaType: AVRO is the default everywhere
        )
        return int(document["id"])

    async def lookup(self, subject: str, schema_text: str) -> int | None:
        """The id of ``schema_text`` if it is registered under ``subject``, else None."""
        try:
            document = await self._request(
                "POST", f"/subjects/{quote(subject, safe='')}", {"schema": schema_text}
            )
        except SchemaRegistryError as exc:
            if exc.status == 404:  # 40401 no such subject, 40403 not registered there
                return None
            raise
        return int(document["id"])

    async def schema(self, schema_id: int) -> str:
        """The schema text registered under ``schema_id``."""
        document = await self._request("GET", f"/schemas/ids/{int(schema_id)}", None)
        return str(document["schema"])

    async def _request(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        # Never the URL with credentials in messages: only the path.
        try:
            async with self._session.request(
                method,
                self._base + path,
                data=None if body is None else json.dumps(body),
                headers={"Content-Type": CONTENT_TYPE} if body is not None else None,
            ) as response:
                text = await response.text()
                if response.status >= 400:
                    raise _registry_error(method, path, response.status, text)
                return json.loads(text)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SchemaRegistryError(f"schema registry {method} {path}: {exc!r}") from exc
        except json.JSONDecodeError as exc:
            raise SchemaRegistryError(
                f"schema registry {method} {path}: answer is not JSON"
            ) from exc


def _registry_error(method: str, path: str, status: int, text: str) -> SchemaRegistryError:
    try:
        document = json.loads(text)
        code, message = document.get("error_code"), document.get("message", text)
    except (ValueError, AttributeError):
        code, message = None, text
    return SchemaRegistryError(
        f"schema registry {method} {path}: {status} {str(message)[:300]}",
        status=status,
        code=code if isinstance(code, int) else None,
    )


async def open_event_codec(settings: Settings) -> EmailEventCodec:
    """The events codec of a stage: single-object encoding, or, with
    ``kafka.events_format: confluent``, the Confluent format under the registry id of the
    current schema in ``<events topic>-value`` (looked up, and registered only when missing,
    so a stage with read-only registry credentials works once the schema is there), knowing
    the ids of the older released versions registered there too, so a sink reads whatever an
    older sgpipe wrote without another request."""
    if settings.kafka.events_format != "confluent":
        return EmailEventCodec()
    subject = value_subject(settings.kafka.topics.events)
    current = current_schema().text
    async with SchemaRegistryClient(settings.schema_registry) as registry:
        schema_id = await registry.lookup(subject, current)
        if schema_id is None:
            schema_id = await registry.register(subject, current)
        codec = EmailEventCodec(confluent_schema_id=schema_id)
        for older in schema_versions()[:-1]:
            older_id = await registry.lookup(subject, older.text)
            if older_id is not None:
                codec.add_registry_schema(older_id, older.text)
    return codec


async def open_event_codec_retrying(
    settings: Settings, stage: str, section: StageSettings, stop: asyncio.Event
) -> EmailEventCodec | None:
    """``open_event_codec``, retried like any start-up dependency while the registry is
    unreachable (a refusal of our credentials or schema is fatal); None if stopped first."""
    opened: list[EmailEventCodec] = []

    async def attempt() -> None:
        opened.append(await open_event_codec(settings))

    backoff = Backoff(section.retry_backoff_initial_seconds, section.retry_backoff_max_seconds)
    if not await retry_until_started(stage, "reading the schema registry", attempt, stop, backoff):
        return None
    return opened[-1]


class WriterSchemas(Protocol):
    """Where a consumer finds the writer schema of a registry id (``SchemaRegistryClient``)."""

    async def schema(self, schema_id: int) -> str: ...


async def fetch_unknown_schemas(
    codec: EmailEventCodec, registry: WriterSchemas, payloads: Iterable[bytes | None]
) -> int:
    """Teach ``codec`` the writer schemas of the Confluent-framed ``payloads`` it has not
    seen; a consuming stage calls this before decoding a batch. Returns how many it fetched.

    An id the registry does not know (404), or under which it holds no EmailEvent schema, is
    remembered as unreadable: its records are poison (the bytes came from whoever produced
    them). Any other failure raises SchemaRegistryError: unreachable or 5xx is retriable (the
    batch is held and retried), a refusal of our credentials fatal."""
    unknown = codec.unknown_schema_ids(payloads)
    fetched = 0
    for schema_id in sorted(unknown):
        try:
            text = await registry.schema(schema_id)
        except SchemaRegistryError as exc:
            if exc.status != 404:
                raise
            codec.add_unreadable_schema(schema_id, "the schema registry does not know this id")
            continue
        try:
            codec.add_registry_schema(schema_id, text)
        except SerializationError as exc:
            codec.add_unreadable_schema(schema_id, str(exc))
            continue
        fetched += 1
    return fetched
