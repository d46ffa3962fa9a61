"""The ingress's HTTP server (IngressRunner on a real socket) against clients no well-behaved
HTTP library would be: every abuse gets a bounded outcome, a JSON answer where one can be
given, at most one short log line, and never a byte of the request in a log or an answer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from ingest.app import create_app
from ingest.protocol import IngressRunner, abuse_log, start_ingress
from schemas.raw_batch import RawBatch
from sgpipe.runtime import metrics
from sgpipe.runtime.settings import Settings
from tests.raw_http import RawResponse, exchange, http_request, parse_responses

MARKER = b"secret-person@example.com"
BODY = b'[{"email":"secret-person@example.com","event":"open"}]\r\n'


class RecordingPublisher:
    def __init__(self) -> None:
        self.batches: list[RawBatch] = []
        self.fail_with: BaseException | None = None

    async def publish(self, batch: RawBatch) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.batches.append(batch)


@dataclass
class Ingress:
    host: str
    port: int
    runner: IngressRunner
    publisher: RecordingPublisher

    async def send(self, *chunks: bytes, **options: Any) -> RawResponse:
        return (await exchange(self.host, self.port, chunks, **options))[0]


@asynccontextmanager
async def serve(**ingest: Any) -> AsyncIterator[Ingress]:
    settings = Settings.model_validate(
        {
            "webhooks": [{"name": "open", "allow_unsigned": True}],
            "ingest": {
                "header_timeout_seconds": 0.3,
                "body_timeout_seconds": 0.3,
                "idle_timeout_seconds": 0.3,
                "max_body_bytes": 65_536,
                **ingest,
            },
        }
    )
    publisher = RecordingPublisher()
    runner = await start_ingress(create_app(settings, publisher), "127.0.0.1", 0)
    try:
        yield Ingress("127.0.0.1", runner.addresses[0][1], runner, publisher)
    finally:
        await runner.cleanup()


@pytest.fixture(autouse=True)
def fresh_rate_limit() -> None:
    abuse_log.reset()


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Any:
    """structlog events of the test; aiohttp's own (stdlib) records are checked apart."""
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    with capture_logs() as captured:
        yield captured


def rejected(reason: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "sgpipe_ingest_connections_rejected_total", {"stage": "ingest", "reason": reason}
    )
    return value or 0.0


def requests(outcome: str, webhook: str = "open") -> float:
    value = metrics.REGISTRY.get_sample_value(
        "sgpipe_ingest_requests_total", {"stage": "ingest", "webhook": webhook, "outcome": outcome}
    )
    return value or 0.0


def assert_quiet(events: list[dict[str, Any]], caplog: pytest.LogCaptureFixture) -> None:
    """At most one short line, quoting nothing of the request; nothing from aiohttp itself."""
    assert len(events) <= 1, events
    for event in events:
        assert MARKER.decode() not in repr(event)
        assert len(repr(event)) < 400
        assert "exc_info" not in event
    aiohttp_records = [r for r in caplog.records if r.name.startswith("aiohttp")]
    assert aiohttp_records == []


def assert_json_error(response: RawResponse, status: int, error: str) -> None:
    assert response.status == status, response.raw
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"] == error
    assert MARKER not in response.raw


# --- the connection cap --------------------------------------------------------------------


async def test_connections_past_the_cap_get_503_and_the_cap_frees_up(
    logs: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    async with serve(max_connections=3, header_timeout_seconds=30) as ingress:
        before = rejected("too_many_connections")
        held = [await asyncio.open_connection(ingress.host, ingress.port) for _ in range(3)]
        await eventually_open(ingress, 3)

        refused = await ingress.send(http_request("/healthz", method="GET"))

        assert_json_error(refused, 503, "overloaded")
        assert refused.headers["retry-after"] == "5"
        assert refused.closed
        assert rejected("too_many_connections") == before + 1
        assert_quiet(logs, caplog)

        _, writer = held.pop()
        writer.close()
        await writer.wait_closed()
        await eventually_open(ingress, 2)
        served = await ingress.send(http_request("/healthz", method="GET"))
        assert served.status == 200
        for _, writer in held:
            writer.close()


async def eventually_open(ingress: Ingress, count: int) -> None:
    """Wait until the server has accepted (or let go of) connections down to ``count``."""
    for _ in range(500):
        if ingress.runner.guard.open == count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{ingress.runner.guard.open} connections open, not {count}")


async def test_open_connections_are_exported() -> None:
    async with serve(header_timeout_seconds=30) as ingress:
        held = [await asyncio.open_connection(ingress.host, ingress.port) for _ in range(2)]
        await eventually_open(ingress, 2)
        gauge = metrics.REGISTRY.get_sample_value(
            "sgpipe_ingest_open_connections", {"stage": "ingest"}
        )
        assert gauge == 2
        for _, writer in held:
            writer.close()


# --- timeouts ------------------------------------------------------------------------------


async def test_slowloris_head_gets_408_after_the_header_timeout(
    logs: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    async with serve() as ingress:
        before = rejected("header_timeout")
        head = http_request("/webhooks/open", BODY)
        one_byte_at_a_time = [head[i : i + 1] for i in range(len(head))]

        response = await ingress.send(*one_byte_at_a_time, pause=0.05)

        assert_json_error(response, 408, "header_timeout")
        assert response.closed
        assert rejected("header_timeout") == before + 1
        assert ingress.publisher.batches == []
        assert_quiet(logs, caplog)


async def test_a_silent_connection_is_closed_after_the_header_timeout() -> None:
    async with serve() as ingress:
        before = rejected("header_timeout")
        response = await ingress.send()
        assert response.status is None
        assert response.closed
        assert rejected("header_timeout") == before + 1


async def test_slow_body_gets_408_after_the_body_timeout(
    logs: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    async with serve() as ingress:
        before = rejected("body_timeout"), requests("timeout")
        head = http_request("/webhooks/open", BODY)
        response = await ingress.send(head[: -len(BODY) + 10])  # head and 10 body bytes

        assert_json_error(response, 408, "body_timeout")
        assert response.headers["connection"] == "close"
        assert (rejected("body_timeout"), requests("timeout")) == (before[0] + 1, before[1] + 1)
        assert ingress.publisher.batches == []
        assert_quiet(logs, caplog)


async def test_an_idle_keep_alive_connection_is_closed() -> None:
    async with serve() as ingress:
        before = rejected("idle_timeout")
        reader, writer = await asyncio.open_connection(ingress.host, ingress.port)
        writer.write(http_request("/healthz", method="GET", close=False))
        first = await reader.readuntil(b"\r\n\r\n")
        assert first.startswith(b"HTTP/1.1 200")
        # Nothing more is sent: the server closes the connection by itself.
        rest = await asyncio.wait_for(reader.read(), 10)
        assert rest.endswith(b'{"status": "ok", "stage": "ingest"}')
        assert reader.at_eof()
        writer.close()
        assert rejected("idle_timeout") == before + 1


async def test_the_head_timeout_restarts_for_each_request_on_a_connection() -> None:
    async with serve(header_timeout_seconds=0.5, idle_timeout_seconds=5) as ingress:
        request = http_request("/healthz", method="GET", close=False)
        responses = await exchange(
            ingress.host, ingress.port, [request, request, request], pause=0.3, responses=3
        )
        # 0.9 s in total, more than one header timeout: each head had its own.
        assert [response.status for response in responses] == [200, 200, 200]


# --- heads too large -------------------------------------------------------------------------


async def test_a_head_growing_past_the_cap_gets_431(
    logs: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    async with serve(max_header_bytes=2048, header_timeout_seconds=5) as ingress:
        before = rejected("headers_too_large")
        start = b"POST /webhooks/open HTTP/1.1\r\nHost: x\r\n"
        headers = [b"X-Filler-%d: %s\r\n" % (i, b"v" * 200) for i in range(20)]
        response = await ingress.send(start, *headers, pause=0.01)

        assert_json_error(response, 431, "headers_too_large")
        assert rejected("headers_too_large") == before + 1
        assert_quiet(logs, caplog)


async def test_a_whole_head_past_the_cap_gets_431() -> None:
    async with serve(max_header_bytes=2048) as ingress:
        headers = [(f"X-Filler-{i}", "v" * 200) for i in range(20)]
        response = await ingress.send(http_request("/webhooks/open", BODY, headers))
        assert_json_error(response, 431, "headers_too_large")
        assert ingress.publisher.batches == []


@pytest.mark.parametrize(
    "head",
    [
        pytest.param([("X-Huge", "x" * 20_000)], id="one-huge-header"),
        pytest.param([(f"X-{i}", "v") for i in range(200)], id="too-many-headers"),
    ],
)
async def test_parser_limits_answer_431_in_json(
    head: list[tuple[str, str]], logs: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    async with serve(max_header_bytes=1_048_576) as ingress:
        response = await ingress.send(http_request("/webhooks/open", BODY, head))
        assert_json_error(response, 431, "headers_too_large")
        assert_quiet(logs, caplog)


# --- malformed requests ----------------------------------------------------------------------

PERSONAL_LINE = b"POST /webhooks/open?email=secret-person@example.com"


@pytest.mark.parametrize(
    ("request_bytes", "status", "error"),
    [
        pytest.param(
            b"FOO /webhooks/open HTTP/1.1\r\nHost: x\r\n\r\n", 400, "invalid_method", id="method"
        ),
        pytest.param(
            b"\x16\x03\x01\x02\x00" + MARKER + b"\r\n\r\n", 400, "invalid_method", id="tls"
        ),
        pytest.param(
            b"POST /webhooks/open HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Content-Length: 6\r\n\r\n" + BODY,
            400,
            "malformed_request",
            id="duplicate-content-length",
        ),
        pytest.param(
            b"POST /webhooks/open HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n" + BODY,
            400,
            "malformed_request",
            id="negative-content-length",
        ),
        pytest.param(
            b"POST /webhooks/open HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + BODY,
            400,
            "malformed_request",
            id="length-and-chunked",
        ),
        pytest.param(
            b"POST /webhooks/open HTTP/1.1\r\nContent-Length: 3\r\n\r\n[]\n",
            400,
            "malformed_request",
            id="no-host",
        ),
        pytest.param(
            b"POST /webhooks/open HTTP/1.1\r\nHost: x\r\nX-Email: " + MARKER + b"\x00\r\n\r\n",
            400,
            "malformed_request",
            id="nul-in-header",
        ),
        pytest.param(MARKER + b"\r\n\r\n", 400, "invalid_method", id="garbage-line"),
        pytest.param(PERSONAL_LINE + b" HTTP/9.9\r\n\r\n", 400, "malformed_request", id="version"),
    ],
)
async def test_malformed_http_gets_a_short_json_400_and_one_log_line(
    request_bytes: bytes,
    status: int,
    error: str,
    logs: list[dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serve() as ingress:
        before = rejected("malformed")
        response = await ingress.send(request_bytes)

        assert_json_error(response, status, error)
        assert response.closed
        assert rejected("malformed") == before + 1
        assert ingress.publisher.batches == []
        assert_quiet(logs, caplog)
        assert [event["reason"] for event in logs] == ["malformed"]


async def test_broken_chunked_framing_is_400_at_once(
    logs: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    async with serve(body_timeout_seconds=30) as ingress:
        reader, writer = await asyncio.open_connection(ingress.host, ingress.port)
        try:
            writer.write(
                b"POST /webhooks/open HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            # The handler is reading the body before the framing breaks (sent together, the
            # parser would refuse both at once); without the fix it would wait 30 s for it.
            await eventually_handling_a_request(ingress)
            writer.write(b"zz\r\n" + MARKER + b"\r\n0\r\n\r\n")
            response = parse_responses(await asyncio.wait_for(reader.read(), 10))[0]
        finally:
            writer.close()

        assert_json_error(response, 400, "invalid_body")
        assert ingress.publisher.batches == []
        assert_quiet(logs, caplog)


async def eventually_handling_a_request(ingress: Ingress) -> None:
    server = ingress.runner.server
    assert server is not None
    for _ in range(500):
        if any(connection._request_in_progress for connection in server.connections):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the request was never handled")


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(b"POST /webhooks/open HTTP/1.0\r\nHost: x\r\n\r\n", id="head-alone"),
        # The body in the same packet: aiohttp's parser alone would answer 400 (docs: 411).
        pytest.param(
            b"POST /webhooks/open HTTP/1.0\r\nHost: x\r\n\r\n" + BODY, id="body-same-packet"
        ),
        pytest.param(
            b"POST /webhooks/open HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\n\r\n"
            + BODY[:5],
            id="short-body-same-packet",
        ),
    ],
)
async def test_http10_without_length_is_411_however_it_arrives(
    request_bytes: bytes, logs: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    async with serve() as ingress:
        response = await ingress.send(request_bytes)
        assert_json_error(response, 411, "length_required")
        assert ingress.publisher.batches == []


async def test_http10_with_a_length_is_served() -> None:
    async with serve() as ingress:
        response = await ingress.send(
            b"POST /webhooks/open HTTP/1.0\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(BODY)
            + BODY
        )
        assert response.status == 200
        assert [batch.body for batch in ingress.publisher.batches] == [BODY]


async def test_http10_without_length_is_411(
    logs: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    async with serve() as ingress:
        # Without a length an HTTP/1.0 body could only be read up to the connection's end.
        response = await ingress.send(b"POST /webhooks/open HTTP/1.0\r\nHost: x\r\n\r\n")
        assert_json_error(response, 411, "length_required")
        assert ingress.publisher.batches == []
        assert_quiet(logs, caplog)


async def test_a_valid_chunked_body_is_accepted() -> None:
    async with serve() as ingress:
        head = b"POST /webhooks/open HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        chunks = [b"%x\r\n%s\r\n" % (len(part), part) for part in (BODY[:10], BODY[10:])]
        response = await ingress.send(head, *chunks, b"0\r\n\r\n", pause=0.02)
        assert response.status == 200
        assert [batch.body for batch in ingress.publisher.batches] == [BODY]


async def test_early_disconnect_is_one_line_and_nothing_published(
    logs: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    async with serve(body_timeout_seconds=30) as ingress:
        before = requests("client_disconnected")
        partial = http_request("/webhooks/open", BODY)[:-20]
        await ingress.send(partial, disconnect=True)
        for _ in range(200):
            if requests("client_disconnected") > before:
                break
            await asyncio.sleep(0.01)

        assert requests("client_disconnected") == before + 1
        assert ingress.publisher.batches == []
        assert_quiet(logs, caplog)
        # The server goes on serving.
        assert (await ingress.send(http_request("/webhooks/open", BODY))).status == 200


async def test_pipelined_requests_are_all_answered() -> None:
    async with serve() as ingress:
        one = http_request("/webhooks/open", BODY, close=False)
        responses = await exchange(ingress.host, ingress.port, [one + one + one], responses=3)
        assert [response.status for response in responses] == [200, 200, 200]
        assert len(ingress.publisher.batches) == 3


async def test_an_unexpected_error_is_a_json_500_logged_without_its_message(
    logs: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    async with serve() as ingress:
        ingress.publisher.fail_with = RuntimeError(f"bug while handling {MARKER.decode()}")
        response = await ingress.send(http_request("/webhooks/open", BODY))

        assert_json_error(response, 500, "internal_error")
        assert_quiet(logs, caplog)
        assert logs[0]["error_type"] == "RuntimeError"
        assert logs[0]["where"].startswith("test_ingress_protocol.py:")


async def test_floods_are_logged_once_per_interval_with_a_count(
    logs: list[dict[str, Any]],
) -> None:
    async with serve() as ingress:
        for _ in range(5):
            await ingress.send(b"FOO / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert len(logs) == 1
        abuse_log.reset()  # as if the interval had passed
        abuse_log.warning("next", reason="malformed")
        assert logs[-1]["not_logged_since_last"] == 0


def test_structlog_is_not_cached_so_capture_works() -> None:
    # capture_logs only sees loggers that were not cached by configure_logging in this process.
    assert not structlog.get_config()["cache_logger_on_first_use"]
