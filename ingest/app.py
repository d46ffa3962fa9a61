"""The ingress: ``POST /webhooks/{name}`` -> verify -> publish the raw batch -> 2xx.

The body is never parsed here: it is verified as bytes and published as bytes. SendGrid retries
any non-2xx for 24 hours, so the answer is 2xx only once Kafka acknowledged the batch and 503
when it could not take it; 4xx is kept for requests that can never become valid.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import structlog
from aiohttp import web
from aiokafka.errors import KafkaError
from cryptography.hazmat.primitives.asymmetric import ec

from ingest.signature import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    InvalidPublicKey,
    SignatureRejected,
    load_public_key,
    verify_signature,
)
from schemas.raw_batch import RawBatch, raw_batch_headers
from sgpipe.runtime.kafka import create_producer
from sgpipe.runtime.settings import ConfigError, Settings, WebhookSettings

log = structlog.get_logger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"
_REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class PublishError(Exception):
    """The raw batch is not durable; the client must retry (503)."""


class RawBatchPublisher(Protocol):
    async def publish(self, batch: RawBatch) -> None:
        """Return once the batch is durable in Kafka; raise PublishError otherwise."""


class KafkaRawBatchPublisher:
    def __init__(self, settings: Settings) -> None:
        self._producer = create_producer(settings.kafka)
        self._topic = settings.kafka.topics.raw
        self._timeout = settings.ingest.publish_timeout_seconds

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def publish(self, batch: RawBatch) -> None:
        try:
            await asyncio.wait_for(
                self._producer.send_and_wait(
                    self._topic, batch.body, headers=raw_batch_headers(batch)
                ),
                timeout=self._timeout,
            )
        except (KafkaError, TimeoutError) as exc:
            raise PublishError(f"Kafka did not acknowledge the batch: {exc!r}") from exc


@dataclass(frozen=True, slots=True)
class WebhookVerifier:
    """A webhook's parsed keys and rules, built once at start."""

    name: str
    keys: tuple[ec.EllipticCurvePublicKey, ...]
    timestamp_tolerance: int

    @classmethod
    def from_settings(cls, webhook: WebhookSettings) -> WebhookVerifier:
        if not webhook.public_keys and not webhook.allow_unsigned:
            raise ConfigError(
                f"webhooks[{webhook.name}]: no public_keys; set them, or set "
                "allow_unsigned: true to accept unauthenticated POSTs deliberately"
            )
        keys = []
        for index, encoded in enumerate(webhook.public_keys):
            try:
                keys.append(load_public_key(encoded))
            except InvalidPublicKey as exc:
                raise ConfigError(f"webhooks[{webhook.name}].public_keys[{index}]: {exc}") from exc
        return cls(webhook.name, tuple(keys), webhook.timestamp_tolerance)


def build_verifiers(settings: Settings) -> dict[str, WebhookVerifier]:
    """Every webhook's verifier; ConfigError naming the webhook if one is unusable."""
    return {webhook.name: WebhookVerifier.from_settings(webhook) for webhook in settings.webhooks}


REQUEST_ID = web.RequestKey("request_id", str)
WEBHOOKS = web.AppKey("webhooks", dict[str, WebhookVerifier])
PUBLISHER = web.AppKey("publisher", RawBatchPublisher)


def create_app(settings: Settings, publisher: RawBatchPublisher | None = None) -> web.Application:
    """The ingress application. Without ``publisher``, a Kafka producer is started and stopped
    with the app (``cleanup_ctx``). Raises ConfigError for an unusable webhook setting."""
    app = web.Application(
        client_max_size=settings.ingest.max_body_bytes,
        middlewares=[_request_context, _json_errors],
    )
    app[WEBHOOKS] = build_verifiers(settings)
    if publisher is None:
        app.cleanup_ctx.append(_kafka_publisher(settings))
    else:
        app[PUBLISHER] = publisher
    app.router.add_post("/webhooks/{name}", receive_batch)
    app.router.add_get("/healthz", healthz)
    return app


def _kafka_publisher(
    settings: Settings,
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        publisher = KafkaRawBatchPublisher(settings)
        await publisher.start()
        app[PUBLISHER] = publisher
        yield
        await publisher.stop()

    return lifecycle


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    supplied = request.headers.get(REQUEST_ID_HEADER, "")
    request_id = supplied if _REQUEST_ID_PATTERN.match(supplied) else uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    with structlog.contextvars.bound_contextvars(request_id=request_id):
        response = await handler(request)
    response.headers[REQUEST_ID_HEADER] = request_id
    return response


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    # aiohttp's own errors (404, 405, 413) become JSON bodies like ours.
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
        response = error_response(exc.status, code.get(exc.status, "http_error"), exc.reason)
        if "Allow" in exc.headers:  # required on every 405 (RFC 9110 section 15.5.6)
            response.headers["Allow"] = exc.headers["Allow"]
        return response


def error_response(status: int, error: str, description: str) -> web.Response:
    # RFC 6750-style body: SendGrid looks for these codes in a 4xx body to refresh its token.
    return web.json_response({"error": error, "error_description": description}, status=status)


async def receive_batch(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    verifier = request.app[WEBHOOKS].get(name)
    if verifier is None:
        return error_response(404, "unknown_webhook", f"no webhook named {name!r}")
    try:
        body = await request.read()
    except web.RequestPayloadError as exc:
        # A body that does not decode (a broken Content-Encoding) can never become valid.
        return error_response(400, "invalid_body", f"the request body cannot be read: {exc}")
    if not body:
        return error_response(400, "empty_body", "the request has no body")

    signature_timestamp: int | None = None
    if verifier.keys:
        try:
            verified = verify_signature(
                verifier.keys,
                request.headers.get(SIGNATURE_HEADER),
                request.headers.get(TIMESTAMP_HEADER),
                body,
                now=time.time(),
                tolerance_seconds=verifier.timestamp_tolerance,
            )
        except SignatureRejected as exc:
            log.warning("rejected webhook request", webhook=name, reason=exc.code)
            return error_response(401, exc.code, exc.message)
        signature_timestamp = verified.timestamp

    batch = RawBatch(
        webhook=name,
        body=body,
        received_at_ms=time.time_ns() // 1_000_000,
        request_id=request[REQUEST_ID],
        signature_timestamp=signature_timestamp,
        authenticated_by="signature" if verifier.keys else "none",
        content_type=request.headers.get("Content-Type"),
    )
    try:
        await request.app[PUBLISHER].publish(batch)
    except PublishError as exc:
        log.error("could not publish raw batch", webhook=name, bytes=len(body), error=str(exc))
        response = error_response(503, "unavailable", "the batch could not be stored; retry")
        response.headers["Retry-After"] = "5"
        return response
    log.info("accepted raw batch", webhook=name, bytes=len(body))
    return web.json_response({"status": "accepted", "request_id": batch.request_id})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})
