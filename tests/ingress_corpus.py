"""The hostile-input corpus of the ingress: each case a request (or a misbehaving client), the
status it must get (None: the connection is closed without an answer) and the exact bytes that
must reach the raw topic (None: nothing may).

Run by tests/integration/test_ingress_hostile.py against a real `sgpipe ingest` process and
broker, and by bench/ingress_hostile.py to measure what it costs /healthz. Every body carries
``MARKER``, an e-mail address: it must never appear in an answer or a log line.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tests.raw_auth_support import RAW_AUTH_DOCUMENT
from tests.raw_http import RawResponse, exchange, http_request
from tests.sendgrid_vector import BODY as VECTOR_BODY
from tests.sendgrid_vector import PUBLIC_KEY as VECTOR_PUBLIC_KEY
from tests.sendgrid_vector import SIGNATURE as VECTOR_SIGNATURE
from tests.sendgrid_vector import TIMESTAMP as VECTOR_TIMESTAMP
from tests.sendgrid_vector import new_key_pair, sign

MARKER = "secret-person@example.com"
CORPUS_KEY, CORPUS_PUBLIC_KEY = new_key_pair()
STRANGER_KEY, _ = new_key_pair()

SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"
MAX_BODY_BYTES = 1_048_576
MAX_CONNECTIONS = 32
# Ingress limits of the server the corpus runs against: short timeouts keep the run short.
INGEST_LIMITS: dict[str, Any] = {
    "max_body_bytes": MAX_BODY_BYTES,
    "max_decompression_ratio": 100,
    "header_timeout_seconds": 1.0,
    "body_timeout_seconds": 1.0,
    "idle_timeout_seconds": 3.0,
    "max_connections": MAX_CONNECTIONS,
    "max_header_bytes": 8192,
    "publish_timeout_seconds": 5.0,
    "readiness_probe_interval_seconds": 1.0,
}
WEBHOOKS: list[dict[str, Any]] = [
    # The corpus key, plus SendGrid's published test key (a rotation: two keys at once).
    {"name": "main", "public_keys": [CORPUS_PUBLIC_KEY, VECTOR_PUBLIC_KEY]},
    {"name": "strict", "public_keys": [CORPUS_PUBLIC_KEY], "timestamp_tolerance": 600},
    {"name": "open", "allow_unsigned": True},
]


def server_config(bootstrap_servers: str, suffix: str) -> dict[str, Any]:
    """The YAML document of the `sgpipe ingest` the corpus runs against."""
    return {
        "kafka": {
            "bootstrap_servers": bootstrap_servers,
            "topics": {
                "raw": f"hostile-raw-{suffix}",
                "events": f"hostile-events-{suffix}",
                "dead_letter": f"hostile-dlq-{suffix}",
                # One partition: a record published after another is read after it.
                "partitions": 1,
            },
        },
        "webhooks": WEBHOOKS,
        "ingest": INGEST_LIMITS,
        "logging": {"format": "json"},
        "raw_auth": RAW_AUTH_DOCUMENT,
    }


@dataclass(frozen=True)
class Target:
    host: str
    port: int


Run = Callable[[Target, str], Awaitable[RawResponse]]


@dataclass(frozen=True)
class HostileCase:
    id: str
    category: str
    run: Run
    status: int | None
    published: bytes | None = None
    # The JSON error code of a 4xx/5xx answer; several when timing decides which part of the
    # stack refuses first (the parser, if the packets coalesce; the handler, if not).
    error: str | tuple[str, ...] | None = None


def events(*extra: dict[str, Any]) -> bytes:
    """A SendGrid-shaped body: events joined by ``,\\r\\n``, ending in ``\\r\\n``."""
    base = {"email": MARKER, "event": "open", "sg_event_id": "c2VjcmV0", "timestamp": 1_700_000_000}
    items = [json.dumps({**base, **item}, separators=(",", ":")) for item in (extra or ({},))]
    return ("[" + ",\r\n".join(items) + "]\r\n").encode()


def sendgrid_batch(target_bytes: int) -> bytes:
    items: list[dict[str, Any]] = []
    size = 0
    while size < target_bytes:
        item = {"sg_event_id": f"ev-{len(items):08d}", "category": ["a", "b"], "n": len(items)}
        items.append(item)
        size += 160
    return events(*items)


def signed_headers(
    body: bytes, *, key: Any = None, timestamp: str | None = None
) -> list[tuple[str, str]]:
    stamp = timestamp if timestamp is not None else str(int(time.time()))
    return [
        ("Content-Type", "application/json;charset=utf-8"),
        ("User-Agent", "SendGrid Event API"),
        (SIGNATURE_HEADER, sign(key or CORPUS_KEY, stamp, body)),
        (TIMESTAMP_HEADER, stamp),
    ]


def post(
    path: str,
    body: bytes,
    headers: Callable[[], Sequence[tuple[str, str]]] | Sequence[tuple[str, str]] = (),
    **options: Any,
) -> Run:
    """A run that POSTs ``body`` with ``headers`` (a callable: built at run time, so signed
    timestamps are fresh) and the request id."""

    async def run(target: Target, request_id: str) -> RawResponse:
        head = list(headers() if callable(headers) else headers)
        head.append(("X-Request-Id", request_id))
        request = http_request(path, body, head, **options)
        return (await exchange(target.host, target.port, [request]))[0]

    return run


def raw(*chunks: bytes, pause: float = 0.0, disconnect: bool = False) -> Run:
    async def run(target: Target, request_id: str) -> RawResponse:
        sent = [chunk.replace(b"{request_id}", request_id.encode()) for chunk in chunks]
        responses = await exchange(
            target.host, target.port, sent, pause=pause, disconnect=disconnect
        )
        return responses[0]

    return run


def signed(
    path: str,
    body: bytes,
    *,
    encode: Callable[[bytes], bytes] | None = None,
    encoding: str | None = None,
    **sign_options: Any,
) -> Run:
    def headers() -> list[tuple[str, str]]:
        head = signed_headers(body, **sign_options)
        if encoding is not None:
            head.append(("Content-Encoding", encoding))
        return head

    return post(path, encode(body) if encode else body, headers)


def deflate(data: bytes, *, raw_stream: bool = False) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS if raw_stream else zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


async def over_the_connection_cap(target: Target, request_id: str) -> RawResponse:
    """Hold every connection the ingress allows, then ask once more."""
    held = [await asyncio.open_connection(target.host, target.port) for _ in range(MAX_CONNECTIONS)]
    try:
        await asyncio.sleep(0.1)
        request = http_request("/healthz", method="GET")
        return (await exchange(target.host, target.port, [request]))[0]
    finally:
        for _, writer in held:
            writer.close()
        # Wait until the server has let them go, so the next case is not refused.
        for _ in range(200):
            answer = (await exchange(target.host, target.port, [request]))[0]
            if answer.status == 200:
                break
            await asyncio.sleep(0.05)


def chunked(body: bytes, *, size: int = 1000) -> bytes:
    parts = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"


def hostile_cases() -> list[HostileCase]:
    body = events()
    fresh = str(int(time.time()))
    head = b"POST /webhooks/open HTTP/1.1\r\nHost: x\r\nX-Request-Id: {request_id}\r\n"
    realistic = sendgrid_batch(768 * 1024)
    at_limit = body[:-3] + b" " * (MAX_BODY_BYTES - len(body)) + b"]\r\n"
    ratio_bomb = bytes(500_000)  # within the size cap, but > 100x its gzip size
    cases = [
        # --- signature ---------------------------------------------------------------------
        HostileCase("valid-signed", "signature", signed("/webhooks/main", body), 200, body),
        HostileCase(
            "sendgrid-test-vector",
            "signature",
            post(
                "/webhooks/main",
                VECTOR_BODY,
                [(SIGNATURE_HEADER, VECTOR_SIGNATURE), (TIMESTAMP_HEADER, VECTOR_TIMESTAMP)],
            ),
            200,
            VECTOR_BODY,
        ),
        HostileCase(
            "tampered-body",
            "signature",
            post(
                "/webhooks/main",
                body.replace(b"open", b"drop"),
                lambda: signed_headers(body),
            ),
            401,
            error="invalid_signature",
        ),
        HostileCase(
            "missing-signature",
            "signature",
            post("/webhooks/main", body, [(TIMESTAMP_HEADER, fresh)]),
            401,
            error="missing_signature",
        ),
        HostileCase(
            "missing-timestamp",
            "signature",
            post("/webhooks/main", body, lambda: signed_headers(body)[:3]),
            401,
            error="missing_timestamp",
        ),
        HostileCase(
            "signature-not-base64",
            "signature",
            post("/webhooks/main", body, [(SIGNATURE_HEADER, "%%%"), (TIMESTAMP_HEADER, fresh)]),
            401,
            error="malformed_signature",
        ),
        HostileCase(
            "signature-not-der",
            "signature",
            post(
                "/webhooks/main",
                body,
                [
                    (SIGNATURE_HEADER, base64.b64encode(b"x" * 70).decode()),
                    (TIMESTAMP_HEADER, fresh),
                ],
            ),
            401,
            error="invalid_signature",
        ),
        HostileCase(
            "signed-by-a-stranger",
            "signature",
            signed("/webhooks/main", body, key=STRANGER_KEY),
            401,
            error="invalid_signature",
        ),
        HostileCase(
            "signature-without-trailing-crlf",
            "signature",
            post("/webhooks/main", body.rstrip(), lambda: signed_headers(body)),
            401,
            error="invalid_signature",
        ),
        HostileCase(
            "unsigned-to-signed-webhook",
            "signature",
            post("/webhooks/main", body),
            401,
            error="missing_signature",
        ),
        # --- timestamp ---------------------------------------------------------------------
        HostileCase(
            "timestamp-not-a-number",
            "timestamp",
            post("/webhooks/main", body, [(SIGNATURE_HEADER, "AAAA"), (TIMESTAMP_HEADER, "now")]),
            401,
            error="malformed_timestamp",
        ),
        HostileCase(
            "timestamp-negative",
            "timestamp",
            post("/webhooks/main", body, [(SIGNATURE_HEADER, "AAAA"), (TIMESTAMP_HEADER, "-1")]),
            401,
            error="malformed_timestamp",
        ),
        HostileCase(
            "timestamp-13-digits",
            "timestamp",
            post(
                "/webhooks/main",
                body,
                [(SIGNATURE_HEADER, "AAAA"), (TIMESTAMP_HEADER, "1700000000000")],
            ),
            401,
            error="malformed_timestamp",
        ),
        HostileCase(
            "timestamp-non-ascii-space",
            "timestamp",
            raw(
                head.replace(b"/webhooks/open", b"/webhooks/main")
                + b"X-Twilio-Email-Event-Webhook-Signature: AAAA\r\n"
                + b"X-Twilio-Email-Event-Webhook-Timestamp: \xc2\xa01700000000\r\n"
                + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
                + body
            ),
            401,
            error="malformed_timestamp",
        ),
        HostileCase(
            "stale-on-strict-webhook",
            "timestamp",
            signed("/webhooks/strict", body, timestamp=str(int(time.time()) - 7200)),
            401,
            error="stale_timestamp",
        ),
        HostileCase(
            "fresh-on-strict-webhook", "timestamp", signed("/webhooks/strict", body), 200, body
        ),
        HostileCase(
            "old-timestamp-without-window",
            "timestamp",
            signed("/webhooks/main", body, timestamp="1600000000"),
            200,
            body,
        ),
        # --- encoding ----------------------------------------------------------------------
        HostileCase(
            "gzip-signed",
            "encoding",
            signed("/webhooks/main", body, encode=gzip.compress, encoding="gzip"),
            200,
            body,
        ),
        HostileCase(
            "deflate-signed",
            "encoding",
            signed("/webhooks/main", body, encode=deflate, encoding="deflate"),
            200,
            body,
        ),
        HostileCase(
            "raw-deflate-signed",
            "encoding",
            signed(
                "/webhooks/main",
                body,
                encode=lambda data: deflate(data, raw_stream=True),
                encoding="deflate",
            ),
            200,
            body,
        ),
        HostileCase(
            "two-gzip-members",
            "encoding",
            signed(
                "/webhooks/main",
                body,
                encode=lambda data: gzip.compress(data[:20]) + gzip.compress(data[20:]),
                encoding="gzip",
            ),
            200,
            body,
        ),
        HostileCase(
            "brotli",
            "encoding",
            post("/webhooks/open", body, [("Content-Encoding", "br")]),
            415,
            error="unsupported_encoding",
        ),
        HostileCase(
            "stacked-gzip",
            "encoding",
            post(
                "/webhooks/open",
                gzip.compress(gzip.compress(body)),
                [("Content-Encoding", "gzip, gzip")],
            ),
            415,
            error="unsupported_encoding",
        ),
        HostileCase(
            "corrupt-gzip",
            "encoding",
            post("/webhooks/open", b"\x1f\x8b" + body, [("Content-Encoding", "gzip")]),
            400,
            error="invalid_body",
        ),
        HostileCase(
            "truncated-gzip",
            "encoding",
            post("/webhooks/open", gzip.compress(body)[:-10], [("Content-Encoding", "gzip")]),
            400,
            error="invalid_body",
        ),
        HostileCase(
            "unsigned-gzip-bomb-to-signed-webhook",
            "encoding",
            post(
                "/webhooks/main",
                gzip.compress(bytes(64 * 1_048_576)),
                [("Content-Encoding", "gzip")],
            ),
            401,
            error="missing_signature",
        ),
        HostileCase(
            "unsigned-gzip-bomb-to-open-webhook",
            "encoding",
            post(
                "/webhooks/open",
                gzip.compress(bytes(64 * 1_048_576)),
                [("Content-Encoding", "gzip")],
            ),
            413,
            error="body_too_large",
        ),
        HostileCase(
            "signed-gzip-bomb",
            "encoding",
            signed("/webhooks/main", bytes(4 * 1_048_576), encode=gzip.compress, encoding="gzip"),
            413,
            error="body_too_large",
        ),
        HostileCase(
            "ratio-bomb-within-size",
            "encoding",
            signed("/webhooks/main", ratio_bomb, encode=gzip.compress, encoding="gzip"),
            413,
            error="body_too_large",
        ),
        # --- JSON shape: the ingress never parses; signed bytes are stored as sent ------------
        *[
            HostileCase(f"shape-{name}", "json_shape", signed("/webhooks/main", shape), 200, shape)
            for name, shape in [
                ("empty-array", b"[]"),
                ("object-not-array", b'{"email":"' + MARKER.encode() + b'"}'),
                ("not-json", b"hello " + MARKER.encode()),
                ("nested-5000", b"[" * 5000 + b"]" * 5000),
                ("integer-5000-digits", b'[{"event":"open","n":' + b"9" * 5000 + b"}]"),
                ("lone-surrogate", b'[{"event":"open","email":"\\ud800' + MARKER.encode() + b'"}]'),
                ("invalid-utf8", b'[{"event":"open","x":"\xff\xfe' + MARKER.encode() + b'"}]'),
                ("duplicate-keys-and-1e400", b'[{"event":"open","event":"drop","n":1e400}]'),
                ("nul-bytes", b"[\x00" + MARKER.encode() + b"\x00]"),
                ("whitespace-only", b" \r\n\t "),
            ]
        ],
        # --- sizes -------------------------------------------------------------------------
        HostileCase("sendgrid-768kb", "size", signed("/webhooks/main", realistic), 200, realistic),
        HostileCase("at-the-limit", "size", signed("/webhooks/main", at_limit), 200, at_limit),
        HostileCase(
            "over-the-limit",
            "size",
            signed("/webhooks/main", at_limit + b" "),
            413,
            error="body_too_large",
        ),
        HostileCase(
            "length-lies-large",
            "size",
            raw(head + b"Content-Length: 99999999\r\nConnection: close\r\n\r\n" + body),
            413,
            error="body_too_large",
        ),
        HostileCase(
            "empty-signed",
            "size",
            signed("/webhooks/main", b""),
            400,
            error="empty_body",
        ),
        HostileCase("empty-unsigned", "size", post("/webhooks/open", b""), 400, error="empty_body"),
        # --- HTTP-level abuse --------------------------------------------------------------
        HostileCase(
            "slowloris-head",
            "http",
            raw(*[bytes([byte]) for byte in head], pause=0.15),
            408,
            error="header_timeout",
        ),
        HostileCase("silent-connection", "http", raw(), None),
        HostileCase(
            "slow-body",
            "http",
            raw(head + b"Content-Length: %d\r\n\r\n" % len(body) + body[:10]),
            408,
            error="body_timeout",
        ),
        HostileCase(
            "early-disconnect",
            "http",
            raw(head + b"Content-Length: %d\r\n\r\n" % len(body) + body[:10], disconnect=True),
            None,
        ),
        HostileCase(
            "http10-no-length",
            "http",
            # The head alone: a body sent after it would race the answer (see the next case).
            raw(b"POST /webhooks/open HTTP/1.0\r\nX-Request-Id: {request_id}\r\n\r\n"),
            411,
            error="length_required",
        ),
        HostileCase(
            "http10-no-length-one-packet",
            "http",
            raw(b"POST /webhooks/open HTTP/1.0\r\n\r\n" + body),
            411,
            error="length_required",
        ),
        HostileCase(
            "bad-chunk-size",
            "http",
            raw(
                head + b"Transfer-Encoding: chunked\r\n\r\n",
                b"zz\r\n" + body + b"\r\n0\r\n\r\n",
                pause=0.1,
            ),
            400,
            error=("invalid_body", "malformed_request"),
        ),
        HostileCase(
            "valid-chunked-signed",
            "http",
            post(
                "/webhooks/main",
                chunked(body, size=16),
                lambda: [*signed_headers(body), ("Transfer-Encoding", "chunked")],
                content_length=False,
            ),
            200,
            body,
        ),
        HostileCase(
            "huge-header-line",
            "http",
            post("/webhooks/open", body, [("X-Huge", "h" * 20_000)]),
            431,
            error="headers_too_large",
        ),
        HostileCase(
            "head-over-total-cap",
            "http",
            post("/webhooks/open", body, [(f"X-Filler-{i}", "f" * 500) for i in range(20)]),
            431,
            error="headers_too_large",
        ),
        HostileCase(
            "too-many-headers",
            "http",
            post("/webhooks/open", body, [(f"X-{i}", "v") for i in range(200)]),
            431,
            error="headers_too_large",
        ),
        HostileCase(
            "invalid-method",
            "http",
            raw(b"FROB /webhooks/open HTTP/1.1\r\nHost: x\r\n\r\n"),
            400,
            error="invalid_method",
        ),
        HostileCase(
            "tls-on-plain-port",
            "http",
            raw(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + MARKER.encode() + b"\r\n\r\n"),
            400,
            error="invalid_method",
        ),
        HostileCase(
            "duplicate-content-length",
            "http",
            raw(head + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\n" + body),
            400,
            error="malformed_request",
        ),
        HostileCase(
            "length-and-chunked",
            "http",
            raw(head + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n" + body),
            400,
            error="malformed_request",
        ),
        HostileCase(
            "missing-host",
            "http",
            raw(b"POST /webhooks/open HTTP/1.1\r\nContent-Length: 2\r\n\r\n[]"),
            400,
            error="malformed_request",
        ),
        HostileCase(
            "get-on-webhook",
            "http",
            post("/webhooks/main", b"", method="GET", content_length=False),
            405,
            error="method_not_allowed",
        ),
        HostileCase(
            "unknown-webhook",
            "http",
            signed("/webhooks/" + MARKER.replace("@", "-at-"), body),
            404,
            error="unknown_webhook",
        ),
        HostileCase(
            "path-traversal",
            "http",
            post("/webhooks/../webhooks/open", body),
            404,
            error="not_found",
        ),
        HostileCase(
            "over-the-connection-cap",
            "http",
            over_the_connection_cap,
            503,
            error="overloaded",
        ),
    ]
    ids = [case.id for case in cases]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    return cases
