"""The ingress: ``POST /webhooks/{name}`` -> verify -> publish the raw batch -> 2xx.

The body is never parsed here: it is verified as bytes and published as bytes. SendGrid retries
any non-2xx for 24 hours, so the answer is 2xx only once Kafka acknowledged the batch and 503
when it could not take it; 4xx is kept for requests that can never become valid.

Serve it with ``ingest.protocol.IngressRunner`` (or ``start_ingress``): the app alone carries the
body, decompression and keep-alive limits under any aiohttp runner, the runner adds the
connection cap, the request-head timeout and JSON answers to malformed HTTP. Limits and
answers are documented in docs/ingress.md.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec

from ingest.backpressure import InFlightBudget, RetryWatch
from ingest.body import (
    BodyLimits,
    BodyRejected,
    ClientGone,
    Encoding,
    Turns,
    decode_body,
    hash_cooperatively,
    parse_content_encoding,
    read_raw_body,
)
from ingest.oauth import (
    TOKEN_ENDPOINT,
    TOKEN_PATH,
    BearerVerifier,
    TokenCheckUnavailable,
    TokenEndpoint,
    TokenRejected,
    bearer_challenge,
    build_bearer_verifier,
    build_token_endpoint,
    jwks_endpoint,
    token_endpoint,
)
from ingest.protocol import INGRESS_LIMITS, LINGERING_SECONDS, IngressLimits, abuse_log
from ingest.publisher import (
    AcknowledgeHealth,
    KafkaRawBatchPublisher,
    PublishError,
    PublishRejected,
    RawBatchPublisher,
)
from ingest.signature import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    InvalidPublicKey,
    SignatureHeaders,
    SignatureRejected,
    load_public_key,
    parse_signature_headers,
    signed_message_hash,
    verify_digest,
)
from schemas.raw_batch import RawBatch
from sgpipe.runtime import metrics
from sgpipe.runtime.health import Readiness, add_health_routes
from sgpipe.runtime.metrics import STAGE_INGEST
from sgpipe.runtime.settings import ConfigError, IngestSettings, Settings, WebhookSettings

__all__ = [
    "KafkaRawBatchPublisher",
    "PublishError",
    "PublishRejected",
    "RawBatchPublisher",
    "WebhookVerifier",
    "build_authentication",
    "build_verifiers",
    "create_app",
    "error_response",
]

log = structlog.get_logger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"
_REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# The webhook label of requests to names no webhook has: URL paths are chosen by clients, and a
# label per path would let anyone create unbounded metric series.
UNKNOWN_WEBHOOK_LABEL = "unknown"
# Seconds, on every 503. SendGrid keeps its own retry schedule; other clients may honour it.
RETRY_AFTER_SECONDS = 5


@dataclass(frozen=True, slots=True)
class WebhookVerifier:
    """A webhook's parsed keys and rules, built once at start.

    ``keys`` non-empty means a valid signature is required; ``bearer`` set means a valid bearer
    token is required (``auth: token`` or ``both``); neither only with ``allow_unsigned``.
    """

    name: str
    keys: tuple[ec.EllipticCurvePublicKey, ...]
    timestamp_tolerance: int
    bearer: BearerVerifier | None = None

    @property
    def authenticated_by(self) -> str:
        """What an accepted request carried: the raw batch's ``sgpipe-authenticated-by``."""
        if self.keys and self.bearer is not None:
            return "both"
        if self.bearer is not None:
            return "token"
        return "signature" if self.keys else "none"

    @classmethod
    def from_settings(
        cls,
        webhook: WebhookSettings,
        ingest: IngestSettings | None = None,
        endpoint: TokenEndpoint | None = None,
    ) -> WebhookVerifier:
        where = f"webhooks[{webhook.name}]"
        wants_signature = webhook.auth in ("signature", "both")
        if wants_signature and not webhook.public_keys:
            if webhook.auth == "both":
                raise ConfigError(f"{where}: auth is both but public_keys is empty")
            if not webhook.allow_unsigned:
                raise ConfigError(
                    f"{where}: no public_keys; set them, set auth: token with OAuth clients, "
                    "or set allow_unsigned: true to accept unauthenticated POSTs deliberately"
                )
        keys = []
        if wants_signature:
            for index, encoded in enumerate(webhook.public_keys):
                try:
                    keys.append(load_public_key(encoded))
                except InvalidPublicKey as exc:
                    raise ConfigError(f"{where}.public_keys[{index}]: {exc}") from exc
        bearer = build_bearer_verifier(webhook, ingest or IngestSettings(), endpoint)
        return cls(webhook.name, tuple(keys), webhook.timestamp_tolerance, bearer)


def build_authentication(
    settings: Settings,
) -> tuple[dict[str, WebhookVerifier], TokenEndpoint | None]:
    """Every webhook's verifier and the built-in token endpoint (None when no webhook has
    clients); ConfigError naming the setting if one is unusable."""
    endpoint = build_token_endpoint(settings)
    verifiers = {
        webhook.name: WebhookVerifier.from_settings(webhook, settings.ingest, endpoint)
        for webhook in settings.webhooks
    }
    return verifiers, endpoint


def build_verifiers(settings: Settings) -> dict[str, WebhookVerifier]:
    """Every webhook's verifier; ConfigError naming the webhook if one is unusable."""
    return build_authentication(settings)[0]


REQUEST_ID = web.RequestKey("request_id", str)
WEBHOOKS = web.AppKey("webhooks", dict[str, WebhookVerifier])
PUBLISHER = web.AppKey("publisher", RawBatchPublisher)
ACKNOWLEDGE_HEALTH = web.AppKey("acknowledge_health", AcknowledgeHealth)
BODY_LIMITS = web.AppKey("body_limits", BodyLimits)
CPU_GATE = web.AppKey("cpu_gate", asyncio.Semaphore)
IN_FLIGHT = web.AppKey("in_flight", InFlightBudget)
RETRY_WATCH = web.AppKey("retry_watch", RetryWatch)
HTTP_SESSION = web.AppKey("http_session", aiohttp.ClientSession)


def create_app(
    settings: Settings,
    publisher: RawBatchPublisher | None = None,
    *,
    peers: Sequence[str] = (),
) -> web.Application:
    """The ingress application, with ``/healthz``, ``/readyz`` and ``/metrics``.

    Without ``publisher``, a Kafka producer is connected in the background while the app runs
    (``cleanup_ctx``); until it is, and whenever the broker is unreachable, webhook POSTs are
    answered 503 and ``/readyz`` 503. ``peers`` are base URLs of other stage processes whose
    readiness and metrics this app's ``/readyz`` and ``/metrics`` include (``sgpipe up``).
    Raises ConfigError for an unusable webhook setting.
    """
    ingest = settings.ingest
    app = web.Application(
        middlewares=[_request_context, _json_errors, _head_size_limit],
        handler_args=_handler_args(ingest),
    )
    verifiers, endpoint = build_authentication(settings)
    app[WEBHOOKS] = verifiers
    app[IN_FLIGHT] = InFlightBudget(ingest.max_in_flight_bytes)
    app[RETRY_WATCH] = RetryWatch()
    app[INGRESS_LIMITS] = IngressLimits(
        max_connections=ingest.max_connections,
        header_timeout_seconds=ingest.header_timeout_seconds,
        idle_timeout_seconds=ingest.idle_timeout_seconds,
        max_header_bytes=ingest.max_header_bytes,
        retry_after_seconds=RETRY_AFTER_SECONDS,
    )
    app[BODY_LIMITS] = BodyLimits(
        max_bytes=ingest.max_body_bytes,
        max_ratio=ingest.max_decompression_ratio,
        timeout_seconds=ingest.body_timeout_seconds,
    )
    app[CPU_GATE] = asyncio.Semaphore(1)
    if publisher is None:
        publisher = KafkaRawBatchPublisher(settings)
    if isinstance(publisher, KafkaRawBatchPublisher):
        # Connects unless already started, probes the broker for /readyz, and stops the
        # producer when the app stops.
        health = publisher.health
        app.cleanup_ctx.append(_kafka_lifecycle(publisher, ingest.publish_timeout_seconds))
    else:
        health = AcknowledgeHealth(started=True)
    app[PUBLISHER] = publisher
    app[ACKNOWLEDGE_HEALTH] = health
    readiness = Readiness(STAGE_INGEST)
    readiness.add_check("producer", health.producer_check)
    readiness.add_check("kafka", health.kafka_check)
    add_health_routes(app, readiness, peers)
    app.router.add_post("/webhooks/{name}", receive_batch)
    if endpoint is not None:
        app[TOKEN_ENDPOINT] = endpoint
        app.router.add_post(TOKEN_PATH, token_endpoint)
        app.router.add_get("/oauth/jwks", jwks_endpoint)
    app.cleanup_ctx.append(_identity_providers)
    return app


async def _identity_providers(app: web.Application) -> AsyncIterator[None]:
    """An HTTP session for identity providers' JWKS, each fetched once before serving (a
    failure is logged; the next token with an unknown kid tries again)."""
    async with aiohttp.ClientSession() as session:
        app[HTTP_SESSION] = session
        caches = [
            cache
            for verifier in app[WEBHOOKS].values()
            if verifier.bearer is not None
            for cache in verifier.bearer.jwks_caches
        ]
        if caches:
            await asyncio.gather(*(cache.refresh(session) for cache in caches))
        yield


def _handler_args(ingest: IngestSettings) -> dict[str, Any]:
    """aiohttp's per-connection options (RequestHandler keyword arguments), set on the app so
    that they hold under any runner."""
    line_limit = min(8190, ingest.max_header_bytes)
    return {
        # Bodies are decompressed by receive_batch, capped and in slices between loop turns.
        "auto_decompress": False,
        # An idle keep-alive connection is closed after this long.
        "keepalive_timeout": ingest.idle_timeout_seconds,
        "max_line_size": line_limit,
        "max_field_size": line_limit,
        "lingering_time": LINGERING_SECONDS,
        # handler_cancellation stays off: a handler whose client left still finishes its
        # publish, so the outcome it records (metrics, readiness) is the broker's answer.
    }


def _kafka_lifecycle(
    publisher: KafkaRawBatchPublisher, first_check_timeout: float
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        stop = asyncio.Event()
        task = asyncio.create_task(publisher.run(stop), name="ingest-kafka-producer")
        # Serve once Kafka was checked (or could not be in time: then 503s until it is).
        await publisher.wait_until_checked(first_check_timeout)
        yield
        stop.set()
        await task

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
    # aiohttp's own errors (404, 405) become JSON bodies like ours.
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


@web.middleware
async def _head_size_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
    # IngressProtocol refuses a head that grows past the limit while it arrives; one that
    # arrives whole in a single read is measured here.
    limit = request.app[INGRESS_LIMITS].max_header_bytes
    size = len(request.method) + len(request.raw_path) + 11  # "M P HTTP/1.1\r\n"
    size += sum(len(name) + len(value) + 4 for name, value in request.raw_headers)
    if size > limit:
        metrics.INGEST_CONNECTIONS_REJECTED.labels(STAGE_INGEST, "headers_too_large").inc()
        abuse_log.warning("request refused: head too large", reason="headers_too_large")
        response = error_response(
            431, "headers_too_large", f"the request head exceeds {limit} bytes"
        )
        return _closing(response)
    return await handler(request)


def error_response(status: int, error: str, description: str) -> web.Response:
    # RFC 6750-style body: SendGrid looks for these codes in a 4xx body to refresh its token.
    return web.json_response({"error": error, "error_description": description}, status=status)


def _closing(response: web.Response) -> web.Response:
    # The request stream is in an unknown state (body unread, late or broken): do not reuse it.
    response.force_close()
    return response


async def receive_batch(request: web.Request) -> web.Response:
    started = time.perf_counter()
    name = request.match_info["name"]
    verifier = request.app[WEBHOOKS].get(name)
    label = name if verifier is not None else UNKNOWN_WEBHOOK_LABEL
    outcome = "internal_error"
    try:
        if verifier is None:
            outcome = "unknown_webhook"
            # A fixed text: the requested name is the client's bytes, never echoed back.
            return error_response(404, "unknown_webhook", "no webhook of that name")
        outcome, response = await _receive(request, verifier)
        return response
    finally:
        metrics.INGEST_REQUESTS.labels(STAGE_INGEST, label, outcome).inc()
        metrics.INGEST_REQUEST_SECONDS.labels(STAGE_INGEST, label).observe(
            time.perf_counter() - started
        )


async def _receive(request: web.Request, verifier: WebhookVerifier) -> tuple[str, web.Response]:
    """(outcome label, response) for a POST to a known webhook."""
    name = verifier.name
    # Everything that can be refused from the head alone is, before any body byte is read:
    # an unsigned gzip bomb to a signed webhook costs nothing, and neither does a bad token.
    if verifier.bearer is not None:
        try:
            await verifier.bearer.verify(
                request.headers.get("Authorization"), request.app[HTTP_SESSION]
            )
        except TokenRejected as exc:
            return _token_refused(name, exc)
        except TokenCheckUnavailable as exc:
            abuse_log.error(
                "cannot check bearer tokens; answered 503",
                reason="jwks_unavailable",
                error=str(exc),
            )
            metrics.INGEST_AUTH_FAILURES.labels(
                STAGE_INGEST, name, "token", "jwks_unavailable"
            ).inc()
            response = error_response(503, "unavailable", "tokens cannot be checked now; retry")
            response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
            return "unavailable", _closing(response)
    signature: SignatureHeaders | None = None
    try:
        encoding = parse_content_encoding(request.headers.get("Content-Encoding"))
        if verifier.keys:
            signature = parse_signature_headers(
                request.headers.get(SIGNATURE_HEADER), request.headers.get(TIMESTAMP_HEADER)
            )
    except SignatureRejected as exc:
        return _unauthorized(name, exc)
    except BodyRejected as exc:
        return _body_rejected(name, exc)

    limits = request.app[BODY_LIMITS]
    # The body and its batch stay in memory until Kafka answers: reserve them first.
    length = request.content_length
    # A compressed body may decode to max_ratio times its size (never past max_bytes); a
    # chunked one is of unknown size.
    if length is None:
        reservation = limits.max_bytes
    elif encoding is Encoding.IDENTITY:
        reservation = length
    else:
        reservation = int(length * limits.max_ratio)
    reservation = min(max(reservation, 1), limits.max_bytes)
    budget = request.app[IN_FLIGHT]
    if not budget.try_reserve(reservation):
        abuse_log.warning(
            "in-flight bytes at ingest.max_in_flight_bytes; answered 503",
            reason="overloaded",
            webhook=name,
            in_flight_bytes=budget.reserved,
        )
        response = error_response(
            503, "overloaded", "the ingress holds as many batches as it may; retry"
        )
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return "overloaded", _closing(response)
    try:
        return await _receive_body(request, verifier, encoding, signature)
    finally:
        budget.release(reservation)


async def _receive_body(
    request: web.Request,
    verifier: WebhookVerifier,
    encoding: Encoding,
    signature: SignatureHeaders | None,
) -> tuple[str, web.Response]:
    name = verifier.name
    limits = request.app[BODY_LIMITS]
    try:
        raw = await read_raw_body(request, limits)
    except BodyRejected as exc:
        return _body_rejected(name, exc)
    except ClientGone:
        abuse_log.warning(
            "client disconnected before its body was complete",
            reason="client_disconnected",
            webhook=name,
        )
        # Never delivered; answered for the sake of aiohttp's bookkeeping.
        response = error_response(400, "client_disconnected", "the body was not complete")
        return "client_disconnected", _closing(response)
    metrics.INGEST_RECEIVED_BYTES.labels(STAGE_INGEST, name).inc(len(raw))

    # One request at a time decodes and hashes, each in steps of about a millisecond: with
    # twenty bombs at once, round-robin steps would delay every other request (and /healthz)
    # by twenty steps per loop turn; one at a time, by one. The total work is the same.
    digest: bytes | None = None
    body_hash: bytes | None = None
    async with request.app[CPU_GATE]:
        turns = Turns()
        try:
            body = await decode_body(raw, encoding, limits, turns)
        except BodyRejected as exc:
            return _body_rejected(name, exc)
        if body and signature is not None and len(body) >= THREAD_HASH_MIN_BYTES:
            digest, body_hash = await asyncio.to_thread(
                hash_in_thread, signed_message_hash(signature), body
            )
        elif body and signature is not None:
            digest = await hash_cooperatively(signed_message_hash(signature), body, turns)
            # For the retry watch: the same body re-sent with a new signed timestamp. Only
            # bodies whose signature verified are compared, so an identity need not resist
            # forgery: the length and CRC-32 (0.2 ms per 768 KB, where a second SHA-256 took
            # 0.45 ms of the ingress's ~3 ms of CPU per request).
            body_hash = body_identity(body)
    if not body:
        return "bad_request", error_response(400, "empty_body", "the request has no body")

    signature_timestamp: int | None = None
    if signature is not None and digest is not None:
        try:
            verified = verify_digest(
                verifier.keys,
                signature,
                digest,
                now=time.time(),
                tolerance_seconds=verifier.timestamp_tolerance,
            )
        except SignatureRejected as exc:
            return _unauthorized(name, exc)
        signature_timestamp = verified.timestamp
        if body_hash is not None:
            request.app[RETRY_WATCH].observe(name, body_hash, signature_timestamp)

    received_at_ms = time.time_ns() // 1_000_000
    batch = RawBatch(
        webhook=name,
        body=body,
        received_at_ms=received_at_ms,
        request_id=request[REQUEST_ID],
        signature_timestamp=signature_timestamp,
        authenticated_by=verifier.authenticated_by,
        content_type=request.headers.get("Content-Type"),
        delivery_delay_ms=(
            received_at_ms - signature_timestamp * 1000 if signature_timestamp is not None else None
        ),
    )
    outcome, response = await _publish(request, batch)
    if outcome == "accepted" and batch.delivery_delay_ms is not None:
        metrics.INGEST_DELIVERY_DELAY_SECONDS.labels(STAGE_INGEST, name).observe(
            max(0.0, batch.delivery_delay_ms / 1000)
        )
    return outcome, response


# Bodies from this size are hashed in a worker thread: hashlib and zlib release the GIL while
# they work, so the event loop serves other requests meanwhile and a second core can hash.
THREAD_HASH_MIN_BYTES = 65_536


def hash_in_thread(digest: Any, body: bytes) -> tuple[bytes, bytes]:
    """The signature's digest of ``body`` and its retry-watch identity (a worker thread)."""
    digest.update(body)
    return digest.digest(), body_identity(body)


def body_identity(body: bytes) -> bytes:
    """What the retry watch remembers of a verified body: its length and CRC-32 (two distinct
    SendGrid batches of one webhook share both with odds of about 2**-32)."""
    return len(body).to_bytes(8, "big") + zlib.crc32(body).to_bytes(4, "big")


async def _publish(request: web.Request, batch: RawBatch) -> tuple[str, web.Response]:
    health = request.app[ACKNOWLEDGE_HEALTH]
    started = time.perf_counter()
    try:
        await request.app[PUBLISHER].publish(batch)
    except PublishRejected as exc:
        log.error(
            "raw batch larger than kafka.max_request_size allows; raise it",
            webhook=batch.webhook,
            bytes=len(batch.body),
            error=str(exc),
        )
        response = error_response(413, "body_too_large", "the batch is too large to store")
        return "too_large", response
    except PublishError as exc:
        metrics.INGEST_PUBLISH_SECONDS.labels(STAGE_INGEST).observe(time.perf_counter() - started)
        metrics.INGEST_PUBLISH_FAILURES.labels(STAGE_INGEST, exc.reason).inc()
        health.record(False, f"last publish failed: {exc.reason}")
        abuse_log.error(
            "could not publish raw batch; answered 503",
            reason=f"unavailable:{exc.reason}",
            webhook=batch.webhook,
            bytes=len(batch.body),
            error=str(exc),
        )
        response = error_response(503, "unavailable", "the batch could not be stored; retry")
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return "unavailable", response
    metrics.INGEST_PUBLISH_SECONDS.labels(STAGE_INGEST).observe(time.perf_counter() - started)
    health.record(True, "last publish acknowledged")
    log.info("accepted raw batch", webhook=batch.webhook, bytes=len(batch.body))
    return "accepted", web.json_response({"status": "accepted", "request_id": batch.request_id})


def _unauthorized(name: str, exc: SignatureRejected) -> tuple[str, web.Response]:
    metrics.INGEST_VERIFICATION_FAILURES.labels(STAGE_INGEST, name, exc.code).inc()
    metrics.INGEST_AUTH_FAILURES.labels(STAGE_INGEST, name, "signature", exc.code).inc()
    abuse_log.warning("rejected webhook request", reason=f"unauthorized:{exc.code}", webhook=name)
    return "unauthorized", error_response(401, exc.code, exc.message)


def _token_refused(name: str, exc: TokenRejected) -> tuple[str, web.Response]:
    metrics.INGEST_VERIFICATION_FAILURES.labels(STAGE_INGEST, name, exc.reason).inc()
    metrics.INGEST_AUTH_FAILURES.labels(STAGE_INGEST, name, "token", exc.reason).inc()
    abuse_log.warning(
        "rejected webhook request", reason=f"unauthorized:token:{exc.reason}", webhook=name
    )
    return "unauthorized", bearer_challenge(exc)


_BODY_OUTCOMES = {408: "timeout", 413: "too_large"}


def _body_rejected(name: str, exc: BodyRejected) -> tuple[str, web.Response]:
    if exc.status == 408:
        metrics.INGEST_CONNECTIONS_REJECTED.labels(STAGE_INGEST, "body_timeout").inc()
    abuse_log.warning(
        "rejected webhook request", reason=f"body:{exc.code}", webhook=name, status=exc.status
    )
    outcome = _BODY_OUTCOMES.get(exc.status, "bad_request")
    return outcome, _closing(error_response(exc.status, exc.code, exc.description))
