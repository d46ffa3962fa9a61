"""The ingress over HTTP (aiohttp TestServer) with a fake publisher: status codes, JSON bodies,
and exactly which raw batches were published."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives.asymmetric import ec

from ingest.app import THREAD_HASH_MIN_BYTES, PublishError, PublishRejected, create_app
from schemas.raw_batch import RawBatch
from sgpipe.runtime import metrics
from sgpipe.runtime.health import Readiness, serve_health
from sgpipe.runtime.settings import ConfigError, Settings
from tests.sendgrid_vector import (
    BODY,
    PUBLIC_KEY,
    SIGNATURE,
    TIMESTAMP,
    new_key_pair,
    public_key_b64,
    sign,
)

Client = TestClient[web.Request, web.Application]

SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"
CONTENT_TYPE = "application/json;charset=utf-8"
MAX_BODY_BYTES = 4096

FRESH_PRIVATE_KEY, FRESH_PUBLIC_KEY = new_key_pair()


class RecordingPublisher:
    def __init__(self) -> None:
        self.batches: list[RawBatch] = []

    async def publish(self, batch: RawBatch) -> None:
        self.batches.append(batch)


class FailingPublisher:
    def __init__(self) -> None:
        self.attempts = 0

    async def publish(self, batch: RawBatch) -> None:
        self.attempts += 1
        raise PublishError("timeout", "Kafka did not acknowledge the batch: timeout")


def build_settings(*webhooks: dict[str, Any]) -> Settings:
    return Settings.model_validate(
        {
            "webhooks": list(webhooks)
            or [
                {"name": "main", "public_keys": [PUBLIC_KEY], "timestamp_tolerance": 0},
                {"name": "strict", "public_keys": [PUBLIC_KEY], "timestamp_tolerance": 600},
                {
                    "name": "rotating",
                    "public_keys": [PUBLIC_KEY, FRESH_PUBLIC_KEY],
                    "timestamp_tolerance": 600,
                },
                {"name": "open", "allow_unsigned": True},
                {"name": "signed-anyway", "public_keys": [PUBLIC_KEY], "allow_unsigned": True},
            ],
            "ingest": {"max_body_bytes": MAX_BODY_BYTES},
        }
    )


def sendgrid_headers(
    signature: str | None = SIGNATURE, timestamp: str | None = TIMESTAMP
) -> dict[str, str]:
    headers = {"Content-Type": CONTENT_TYPE, "User-Agent": "SendGrid Event API"}
    if signature is not None:
        headers[SIGNATURE_HEADER] = signature
    if timestamp is not None:
        headers[TIMESTAMP_HEADER] = timestamp
    return headers


@pytest.fixture
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
async def client(publisher: RecordingPublisher) -> AsyncIterator[Client]:
    async with TestClient(TestServer(create_app(build_settings(), publisher))) as test_client:
        yield test_client


async def assert_error(response: ClientResponse, status: int, error: str) -> dict[str, Any]:
    assert response.status == status
    assert response.content_type == "application/json"
    document: dict[str, Any] = await response.json()
    assert document["error"] == error
    assert isinstance(document["error_description"], str)
    assert document["error_description"]
    return document


async def raw_post(client: Client, path: str, headers: bytes, body: bytes) -> tuple[int, bytes]:
    """POST exactly these bytes (aiohttp's client would re-encode non-ASCII header values)."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: ingest\r\nConnection: close\r\n".encode()
            + f"Content-Length: {len(body)}\r\n".encode()
            + headers
            + b"\r\n"
            + body
        )
        await writer.drain()
        response = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    return int(response.split(b" ", 2)[1]), response


def signature_header_bytes(timestamp: bytes) -> bytes:
    return (
        f"{SIGNATURE_HEADER}: {SIGNATURE}\r\n".encode()
        + f"{TIMESTAMP_HEADER}: ".encode()
        + timestamp
        + b"\r\n"
    )


# --- accepted --------------------------------------------------------------------------------


async def test_official_vector_is_accepted_and_published_byte_for_byte(
    client: Client, publisher: RecordingPublisher
) -> None:
    before_ms = time.time_ns() // 1_000_000
    response = await client.post("/webhooks/main", data=BODY, headers=sendgrid_headers())
    after_ms = time.time_ns() // 1_000_000

    assert response.status == 200
    request_id = response.headers["X-Request-Id"]
    assert await response.json() == {"status": "accepted", "request_id": request_id}
    assert len(publisher.batches) == 1
    batch = publisher.batches[0]
    assert batch.body == BODY
    assert batch.body.endswith(b"}]\r\n")
    assert batch.webhook == "main"
    assert batch.signature_timestamp == 1600112502
    assert batch.request_id == request_id
    assert batch.authenticated_by == "signature"
    assert batch.content_type == CONTENT_TYPE
    assert before_ms <= batch.received_at_ms <= after_ms


async def test_generated_request_id_is_fresh_per_request(client: Client) -> None:
    first = await client.post("/webhooks/main", data=BODY, headers=sendgrid_headers())
    second = await client.post("/webhooks/main", data=BODY, headers=sendgrid_headers())
    ids = [first.headers["X-Request-Id"], second.headers["X-Request-Id"]]
    assert all(re.fullmatch(r"[0-9a-f]{32}", request_id) for request_id in ids)
    assert ids[0] != ids[1]


async def test_client_supplied_request_id_is_kept(
    client: Client, publisher: RecordingPublisher
) -> None:
    headers = {**sendgrid_headers(), "X-Request-Id": "lb-7f3a:retry.2"}
    response = await client.post("/webhooks/main", data=BODY, headers=headers)

    assert response.status == 200
    assert response.headers["X-Request-Id"] == "lb-7f3a:retry.2"
    assert (await response.json())["request_id"] == "lb-7f3a:retry.2"
    assert publisher.batches[0].request_id == "lb-7f3a:retry.2"


@pytest.mark.parametrize("supplied", ["has spaces", "x" * 129, "semi;colon", "<script>"])
async def test_unsafe_request_id_is_replaced(
    client: Client, publisher: RecordingPublisher, supplied: str
) -> None:
    headers = {**sendgrid_headers(), "X-Request-Id": supplied}
    response = await client.post("/webhooks/main", data=BODY, headers=headers)

    assert response.status == 200
    request_id = response.headers["X-Request-Id"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    assert publisher.batches[0].request_id == request_id


async def test_key_rotation_accepts_the_new_key_within_the_window(
    client: Client, publisher: RecordingPublisher
) -> None:
    body = b'[{"email":"a@example.com","event":"open","sg_event_id":"b3Blbi0x","timestamp":1},\r\n'
    body += (
        b'{"email":"b@example.com","event":"click","sg_event_id":"Y2xpY2stMQ","timestamp":2}]\r\n'
    )
    timestamp = str(int(time.time()))
    headers = sendgrid_headers(sign(FRESH_PRIVATE_KEY, timestamp, body), timestamp)

    response = await client.post("/webhooks/rotating", data=body, headers=headers)

    assert response.status == 200
    assert [(b.webhook, b.body, b.signature_timestamp) for b in publisher.batches] == [
        ("rotating", body, int(timestamp))
    ]


# Found by this suite: request state under a str key made aiohttp 3.14 warn
# (NotAppKeyWarning) once per process, so with warnings as errors the first request of a test
# session answered 500.
@pytest.mark.filterwarnings("error::aiohttp.web_exceptions.NotAppKeyWarning")
async def test_request_state_uses_typed_keys(
    client: Client, publisher: RecordingPublisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    # aiohttp warns once per str key per process; forget earlier requests so order is irrelevant.
    monkeypatch.setattr(web.BaseRequest, "_seen_str_keys", set(), raising=False)
    response = await client.post("/webhooks/main", data=BODY, headers=sendgrid_headers())
    assert response.status == 200
    assert len(publisher.batches) == 1


# --- rejected --------------------------------------------------------------------------------


async def test_tampered_body_is_401_and_not_published(
    client: Client, publisher: RecordingPublisher
) -> None:
    tampered = BODY.replace(b"hello@world.com", b"hello@w0rld.com")
    response = await client.post("/webhooks/main", data=tampered, headers=sendgrid_headers())

    await assert_error(response, 401, "invalid_signature")
    assert response.headers["X-Request-Id"]
    assert publisher.batches == []


async def test_body_without_trailing_crlf_is_401(
    client: Client, publisher: RecordingPublisher
) -> None:
    response = await client.post(
        "/webhooks/main", data=BODY.removesuffix(b"\r\n"), headers=sendgrid_headers()
    )
    await assert_error(response, 401, "invalid_signature")
    assert publisher.batches == []


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        pytest.param(sendgrid_headers(signature=None), "missing_signature", id="no-signature"),
        pytest.param(sendgrid_headers(timestamp=None), "missing_timestamp", id="no-timestamp"),
        pytest.param(sendgrid_headers(None, None), "missing_signature", id="no-headers"),
        pytest.param(sendgrid_headers(signature="%%%"), "malformed_signature", id="bad-base64"),
        pytest.param(sendgrid_headers(timestamp="yesterday"), "malformed_timestamp", id="bad-ts"),
        pytest.param(sendgrid_headers(timestamp="-1"), "malformed_timestamp", id="negative-ts"),
    ],
)
async def test_missing_or_malformed_headers_are_401_with_their_code(
    client: Client, publisher: RecordingPublisher, headers: dict[str, str], error: str
) -> None:
    response = await client.post("/webhooks/main", data=BODY, headers=headers)
    await assert_error(response, 401, error)
    assert publisher.batches == []


async def test_stale_timestamp_is_401_when_the_webhook_has_a_window(
    client: Client, publisher: RecordingPublisher
) -> None:
    response = await client.post("/webhooks/strict", data=BODY, headers=sendgrid_headers())
    document = await assert_error(response, 401, "stale_timestamp")
    assert "600" in document["error_description"]
    assert publisher.batches == []


async def test_rotation_webhook_applies_its_window_to_the_old_key_too(
    client: Client, publisher: RecordingPublisher
) -> None:
    # "rotating" holds the vector's key (the old one) and a 600 s window: the vector is stale.
    response = await client.post("/webhooks/rotating", data=BODY, headers=sendgrid_headers())
    await assert_error(response, 401, "stale_timestamp")
    assert publisher.batches == []


async def test_unknown_webhook_is_404_json(client: Client, publisher: RecordingPublisher) -> None:
    response = await client.post("/webhooks/nope-<script>", data=BODY, headers=sendgrid_headers())
    document = await assert_error(response, 404, "unknown_webhook")
    # A fixed message: nothing of the requested name is echoed.
    assert document["error_description"] == "no webhook of that name"
    assert "nope" not in await response.text()
    assert publisher.batches == []


async def test_unknown_path_is_404_json(client: Client) -> None:
    response = await client.post("/events", data=BODY, headers=sendgrid_headers())
    await assert_error(response, 404, "not_found")
    assert response.headers["X-Request-Id"]


async def test_get_on_the_webhook_path_is_405_json(client: Client) -> None:
    response = await client.get("/webhooks/main")
    await assert_error(response, 405, "method_not_allowed")
    # Found by this suite: the JSON rewrite dropped Allow, required on a 405 (RFC 9110 15.5.6).
    assert response.headers["Allow"] == "POST"


async def test_body_over_the_limit_is_413_json_and_not_published(
    client: Client, publisher: RecordingPublisher
) -> None:
    body = b"[" + b'{"event":"open"},' * (MAX_BODY_BYTES // 10) + b"{}]\r\n"
    assert len(body) > MAX_BODY_BYTES
    response = await client.post("/webhooks/main", data=body, headers=sendgrid_headers())

    await assert_error(response, 413, "body_too_large")
    assert publisher.batches == []


async def test_chunked_body_over_the_limit_is_413(
    client: Client, publisher: RecordingPublisher
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(MAX_BODY_BYTES // 512 + 1):
            yield b" " * 512

    response = await client.post("/webhooks/open", data=chunks())

    await assert_error(response, 413, "body_too_large")
    assert publisher.batches == []


async def test_body_at_the_limit_is_read(client: Client, publisher: RecordingPublisher) -> None:
    body = b"[" + b" " * (MAX_BODY_BYTES - 2) + b"]"
    response = await client.post("/webhooks/open", data=body)
    assert response.status == 200
    assert publisher.batches[0].body == body


async def test_empty_body_is_400(client: Client, publisher: RecordingPublisher) -> None:
    response = await client.post("/webhooks/main", data=b"", headers=sendgrid_headers())
    await assert_error(response, 400, "empty_body")
    assert publisher.batches == []


async def test_raw_http_request_with_sendgrid_bytes_is_accepted(
    client: Client, publisher: RecordingPublisher
) -> None:
    status, _ = await raw_post(
        client, "/webhooks/main", signature_header_bytes(TIMESTAMP.encode()), BODY
    )
    assert status == 200
    assert [batch.body for batch in publisher.batches] == [BODY]


# Found by this suite: verify_signature raised UnicodeEncodeError, a text/plain 500.
async def test_non_ascii_whitespace_in_timestamp_is_401(
    client: Client, publisher: RecordingPublisher
) -> None:
    headers = signature_header_bytes(b"\xc2\xa0" + TIMESTAMP.encode())
    status, response = await raw_post(client, "/webhooks/main", headers, BODY)
    assert status == 401, response
    _, _, body = response.partition(b"\r\n\r\n")
    assert json.loads(body)["error"] == "malformed_timestamp"
    assert publisher.batches == []


# --- unavailable -----------------------------------------------------------------------------


async def test_publish_failure_is_503_with_retry_after() -> None:
    failing = FailingPublisher()
    app = create_app(build_settings(), failing)
    async with TestClient(TestServer(app)) as test_client:
        response = await test_client.post("/webhooks/main", data=BODY, headers=sendgrid_headers())
        document = await assert_error(response, 503, "unavailable")

    assert response.headers["Retry-After"] == "5"
    assert "retry" in document["error_description"]
    assert failing.attempts == 1


# --- unsigned webhooks -----------------------------------------------------------------------


async def test_allow_unsigned_webhook_accepts_an_unsigned_body(
    client: Client, publisher: RecordingPublisher
) -> None:
    response = await client.post(
        "/webhooks/open", data=BODY, headers={"Content-Type": "application/json"}
    )

    assert response.status == 200
    assert len(publisher.batches) == 1
    batch = publisher.batches[0]
    assert batch.body == BODY
    assert batch.webhook == "open"
    assert batch.authenticated_by == "none"
    assert batch.signature_timestamp is None
    assert batch.content_type == "application/json"


async def test_allow_unsigned_webhook_ignores_signature_headers(
    client: Client, publisher: RecordingPublisher
) -> None:
    response = await client.post("/webhooks/open", data=b"[]", headers=sendgrid_headers())
    assert response.status == 200
    assert publisher.batches[0].authenticated_by == "none"
    assert publisher.batches[0].signature_timestamp is None


async def test_webhook_with_keys_requires_a_signature_even_if_unsigned_is_allowed(
    client: Client, publisher: RecordingPublisher
) -> None:
    response = await client.post("/webhooks/signed-anyway", data=BODY)
    await assert_error(response, 401, "missing_signature")
    assert publisher.batches == []


# --- configuration ---------------------------------------------------------------------------


def test_webhook_without_keys_or_allow_unsigned_is_a_config_error() -> None:
    settings = build_settings({"name": "main", "public_keys": [PUBLIC_KEY]}, {"name": "nokeys"})
    with pytest.raises(ConfigError, match=re.escape("webhooks[nokeys]")) as caught:
        create_app(settings, RecordingPublisher())
    assert "allow_unsigned" in str(caught.value)


@pytest.mark.parametrize(
    "bad_key",
    [
        pytest.param("not base64!", id="non-base64"),
        pytest.param("bm90IGEga2V5", id="not-der"),
        pytest.param(PUBLIC_KEY[:40], id="truncated"),
        pytest.param(public_key_b64(ec.generate_private_key(ec.SECP384R1())), id="p384"),
        pytest.param(
            base64.b64encode(
                base64.b64decode(PUBLIC_KEY).replace(
                    bytes.fromhex("2a8648ce3d030107"), bytes.fromhex("2a8648ce3d030109")
                )
            ).decode(),
            id="unsupported-curve-oid",
        ),
    ],
)
def test_invalid_public_key_is_a_config_error_naming_the_webhook(bad_key: str) -> None:
    settings = build_settings({"name": "eu-west", "public_keys": [PUBLIC_KEY, bad_key]})
    with pytest.raises(ConfigError, match=re.escape("webhooks[eu-west].public_keys[1]")):
        create_app(settings, RecordingPublisher())


async def test_app_without_webhooks_knows_none() -> None:
    publisher = RecordingPublisher()
    app = create_app(Settings.model_validate({}), publisher)
    async with TestClient(TestServer(app)) as test_client:
        response = await test_client.post("/webhooks/main", data=BODY, headers=sendgrid_headers())
        await assert_error(response, 404, "unknown_webhook")
    assert publisher.batches == []


# --- health ----------------------------------------------------------------------------------


async def test_healthz(client: Client) -> None:
    response = await client.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok", "stage": "ingest"}
    assert response.headers["X-Request-Id"]


async def test_a_body_that_does_not_decompress_is_a_json_400(
    client: Client, publisher: RecordingPublisher
) -> None:
    # Found in review: aiohttp's decoding error escaped as a text/plain 500.
    response = await client.post(
        "/webhooks/open",
        data=b"this is not gzip",
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    await assert_error(response, 400, "invalid_body")
    assert publisher.batches == []


# --- acknowledgement, readiness and metrics ---------------------------------------------------


def metric(name: str, **labels: str) -> float:
    value = metrics.REGISTRY.get_sample_value(name, {"stage": "ingest", **labels})
    return value or 0.0


class GatedPublisher:
    """Holds every publish until released; then succeeds or fails as told."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.fail = False
        self.batches: list[RawBatch] = []

    async def publish(self, batch: RawBatch) -> None:
        self.entered.set()
        await self.release.wait()
        if self.fail:
            raise PublishError("KafkaConnectionError", "broker gone")
        self.batches.append(batch)


@pytest.mark.parametrize("fails", [False, True], ids=["acknowledged", "not-acknowledged"])
async def test_the_answer_waits_for_the_acknowledgement(fails: bool) -> None:
    gated = GatedPublisher()
    gated.fail = fails
    async with TestClient(TestServer(create_app(build_settings(), gated))) as test_client:
        answer = asyncio.create_task(
            test_client.post("/webhooks/main", data=BODY, headers=sendgrid_headers())
        )
        await gated.entered.wait()
        # The publish is pending: no answer may have been sent yet.
        done, _ = await asyncio.wait({answer}, timeout=0.3)
        assert not done
        gated.release.set()
        response = await answer

        if fails:
            await assert_error(response, 503, "unavailable")
            assert response.headers["Retry-After"] == "5"
            assert gated.batches == []
        else:
            assert response.status == 200
            assert [batch.body for batch in gated.batches] == [BODY]


async def test_a_failed_publish_makes_readyz_503_until_a_publish_succeeds() -> None:
    gated = GatedPublisher()
    gated.release.set()
    async with TestClient(TestServer(create_app(build_settings(), gated))) as test_client:
        assert (await test_client.get("/readyz")).status == 200

        gated.fail = True
        failed = await test_client.post("/webhooks/main", data=BODY, headers=sendgrid_headers())
        assert failed.status == 503
        readyz = await test_client.get("/readyz")
        assert readyz.status == 503
        checks = (await readyz.json())["checks"]
        assert checks["ingest.kafka"] == {
            "ok": False,
            "detail": "last publish failed: KafkaConnectionError",
        }

        gated.fail = False
        ok = await test_client.post("/webhooks/main", data=BODY, headers=sendgrid_headers())
        assert ok.status == 200
        assert (await test_client.get("/readyz")).status == 200


async def test_readyz_includes_peers() -> None:
    peer_readiness = Readiness("process")
    peer_readiness.set("consumer", True, "assigned")
    peer = await serve_health(peer_readiness, "127.0.0.1", 0)
    peer_url = f"http://127.0.0.1:{peer.addresses[0][1]}"
    try:
        app = create_app(build_settings(), RecordingPublisher(), peers=[peer_url])
        async with TestClient(TestServer(app)) as test_client:
            response = await test_client.get("/readyz")
            assert response.status == 200
            assert set((await response.json())["checks"]) == {
                "ingest.producer",
                "ingest.kafka",
                "process.consumer",
            }
            peer_readiness.set("consumer", False, "no partitions")
            assert (await test_client.get("/readyz")).status == 503
    finally:
        await peer.cleanup()


async def test_metrics_count_requests_by_webhook_and_outcome(client: Client) -> None:
    accepted = metric("sgpipe_ingest_requests_total", webhook="main", outcome="accepted")
    unauthorized = metric("sgpipe_ingest_requests_total", webhook="main", outcome="unauthorized")
    bad_signature = metric(
        "sgpipe_ingest_verification_failures_total", webhook="main", reason="invalid_signature"
    )
    durations = metric("sgpipe_ingest_request_duration_seconds_count", webhook="main")
    received = metric("sgpipe_ingest_received_bytes_total", webhook="main")

    await client.post("/webhooks/main", data=BODY, headers=sendgrid_headers())
    await client.post("/webhooks/main", data=BODY + b" ", headers=sendgrid_headers())

    assert metric("sgpipe_ingest_requests_total", webhook="main", outcome="accepted") == (
        accepted + 1
    )
    assert metric("sgpipe_ingest_requests_total", webhook="main", outcome="unauthorized") == (
        unauthorized + 1
    )
    assert metric(
        "sgpipe_ingest_verification_failures_total", webhook="main", reason="invalid_signature"
    ) == (bad_signature + 1)
    assert metric("sgpipe_ingest_request_duration_seconds_count", webhook="main") == (durations + 2)
    assert metric("sgpipe_ingest_received_bytes_total", webhook="main") == (
        received + 2 * len(BODY) + 1
    )
    exposition = await (await client.get("/metrics")).text()
    assert 'sgpipe_ingest_requests_total{outcome="accepted",stage="ingest",webhook="main"}' in (
        exposition
    )


async def test_unknown_webhook_names_never_become_labels(client: Client) -> None:
    before = metric("sgpipe_ingest_requests_total", webhook="unknown", outcome="unknown_webhook")
    for name in ("attacker-1", "attacker-2", "x" * 60):
        response = await client.post(f"/webhooks/{name}", data=BODY)
        assert response.status == 404
    after = metric("sgpipe_ingest_requests_total", webhook="unknown", outcome="unknown_webhook")
    assert after == before + 3
    exposition = await (await client.get("/metrics")).text()
    assert "attacker" not in exposition


async def test_publish_failures_are_counted_by_reason() -> None:
    before = metric("sgpipe_ingest_publish_failures_total", reason="timeout")
    failing = FailingPublisher()
    async with TestClient(TestServer(create_app(build_settings(), failing))) as test_client:
        response = await test_client.post("/webhooks/main", data=BODY, headers=sendgrid_headers())
    assert response.status == 503
    assert metric("sgpipe_ingest_publish_failures_total", reason="timeout") == before + 1


async def test_a_batch_too_large_for_kafka_is_413() -> None:
    class TooLarge:
        async def publish(self, batch: RawBatch) -> None:
            raise PublishRejected("The message is 5000000 bytes ... max_request_size")

    async with TestClient(TestServer(create_app(build_settings(), TooLarge()))) as test_client:
        response = await test_client.post("/webhooks/main", data=BODY, headers=sendgrid_headers())
        await assert_error(response, 413, "body_too_large")


# --- compressed bodies -------------------------------------------------------------------------


async def test_a_signed_gzip_body_is_verified_and_published_decoded(
    client: Client, publisher: RecordingPublisher
) -> None:
    timestamp = str(int(time.time()))
    body = b'[{"event":"open","sg_event_id":"gz-1"}]\r\n'
    headers = {
        **sendgrid_headers(sign(FRESH_PRIVATE_KEY, timestamp, body), timestamp),
        "Content-Encoding": "gzip",
    }
    response = await client.post(
        "/webhooks/rotating", data=gzip.compress(body), headers=headers, compress=None
    )
    assert response.status == 200
    assert [batch.body for batch in publisher.batches] == [body]


async def test_a_signed_gzip_bomb_is_413_and_not_published(
    client: Client, publisher: RecordingPublisher
) -> None:
    decoded = bytes(MAX_BODY_BYTES * 4)
    timestamp = str(int(time.time()))
    headers = {
        **sendgrid_headers(sign(FRESH_PRIVATE_KEY, timestamp, decoded), timestamp),
        "Content-Encoding": "gzip",
    }
    response = await client.post("/webhooks/rotating", data=gzip.compress(decoded), headers=headers)
    await assert_error(response, 413, "body_too_large")
    assert publisher.batches == []


async def test_an_unsigned_bomb_to_a_signed_webhook_is_refused_before_its_body_is_read(
    client: Client, publisher: RecordingPublisher
) -> None:
    received = metric("sgpipe_ingest_received_bytes_total", webhook="main")
    response = await client.post(
        "/webhooks/main",
        data=gzip.compress(bytes(10 * 1_048_576)),
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    await assert_error(response, 401, "missing_signature")
    assert metric("sgpipe_ingest_received_bytes_total", webhook="main") == received
    assert publisher.batches == []


async def test_an_unsupported_encoding_is_415(
    client: Client, publisher: RecordingPublisher
) -> None:
    response = await client.post(
        "/webhooks/open", data=b"\x00\x01", headers={"Content-Encoding": "br"}
    )
    await assert_error(response, 415, "unsupported_encoding")
    assert publisher.batches == []


async def test_a_content_length_over_the_limit_is_413_before_reading(client: Client) -> None:
    received = metric("sgpipe_ingest_received_bytes_total", webhook="open")
    status, response = await raw_post_declared_length(client, MAX_BODY_BYTES + 1, b"[]")
    assert status == 413, response
    assert metric("sgpipe_ingest_received_bytes_total", webhook="open") == received


async def raw_post_declared_length(client: Client, declared: int, body: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(
            b"POST /webhooks/open HTTP/1.1\r\nHost: ingest\r\nConnection: close\r\n"
            + f"Content-Length: {declared}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        response = await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()
    return int(response.split(b" ", 2)[1]), response


# --- large bodies: hashed in a worker thread --------------------------------------------------


async def test_a_large_body_is_verified_in_a_thread_like_a_small_one() -> None:
    events = [
        f'{{"email":"u{index}@example.com","event":"delivered","sg_event_id":"e{index}"}}'
        for index in range(THREAD_HASH_MIN_BYTES // 40)
    ]
    body = ("[" + ",\r\n".join(events) + "]\r\n").encode()
    assert len(body) >= THREAD_HASH_MIN_BYTES
    settings = Settings.model_validate(
        {
            "webhooks": [{"name": "main", "public_keys": [FRESH_PUBLIC_KEY]}],
            "ingest": {"max_body_bytes": 4 * len(body)},
        }
    )
    publisher = RecordingPublisher()
    timestamp = str(int(time.time()))

    def headers(signed_at: str) -> dict[str, str]:
        signature = sign(FRESH_PRIVATE_KEY, signed_at, body)
        return sendgrid_headers(signature=signature, timestamp=signed_at)

    def repeated(kind: str) -> float:
        return metric("sgpipe_ingest_repeated_batches_total", webhook="main", timestamp=kind)

    resigned = repeated("new")
    async with TestClient(TestServer(create_app(settings, publisher))) as client:
        accepted = await client.post("/webhooks/main", data=body, headers=headers(timestamp))
        tampered = await client.post(
            "/webhooks/main", data=body.replace(b"u7@", b"u8@"), headers=headers(timestamp)
        )
        await assert_error(tampered, 401, "invalid_signature")
        retried = await client.post(
            "/webhooks/main", data=body, headers=headers(str(int(timestamp) + 60))
        )

    assert accepted.status == 200
    assert retried.status == 200
    assert [batch.body for batch in publisher.batches] == [body, body]
    assert repeated("new") == resigned + 1
