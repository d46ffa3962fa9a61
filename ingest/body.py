"""Reading a webhook body without letting one request stall the process.

Three costs are bounded here, each with its own answer:

* time: the body must arrive within ``body_timeout`` (else 408) — a client sending one byte a
  second holds a connection for that long at most;
* memory: at most ``max_body_bytes`` are read (else 413), checked against Content-Length before
  reading and again while reading;
* CPU: Content-Encoding is undone here, not by aiohttp (the app turns ``auto_decompress``
  off), in steps of at most 64 KiB of output, giving the event loop a turn every millisecond
  of work; the decoded body is capped at ``max_body_bytes`` and at ``max_ratio`` times its
  compressed size (else 413). A gzip bomb costs a few milliseconds spread across loop turns,
  never a stall of /healthz or of other requests. Hashing a small body for the signature uses
  the same turns (``hash_cooperatively``); a large one is hashed in a worker thread
  (``ingest.app.THREAD_HASH_MIN_BYTES``).

No exception message here quotes body bytes: they are personal data.
"""

from __future__ import annotations

import asyncio
import enum
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

# Output per decompression step and input per hashing step: ~0.1-0.2 ms of CPU each here.
_DECODE_STEP_BYTES = 65_536
_HASH_STEP_BYTES = 262_144
# Compressed input fed to zlib per step: bounds the copy zlib makes of unconsumed input.
_INPUT_STEP_BYTES = 65_536
# How much CPU a request may use before it lets the loop run other tasks.
_TURN_SECONDS = 0.001


class BodyRejected(Exception):
    """The body cannot be accepted: ``status``, a stable ``code`` and a short description that
    quotes no body bytes."""

    def __init__(self, status: int, code: str, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.code = code
        self.description = description


class ClientGone(Exception):
    """The client closed the connection before the body was complete."""


class Encoding(enum.Enum):
    IDENTITY = "identity"
    GZIP = "gzip"
    DEFLATE = "deflate"


# SendGrid does not compress; gzip and deflate are accepted for other senders and proxies.
# br and zstd are refused (415) rather than half-supported.
_ENCODINGS = {
    "": Encoding.IDENTITY,
    "identity": Encoding.IDENTITY,
    "gzip": Encoding.GZIP,
    "x-gzip": Encoding.GZIP,
    "deflate": Encoding.DEFLATE,
}


def parse_content_encoding(header: str | None) -> Encoding:
    """The one encoding of the body; BodyRejected(415) for anything else, stacked ones included."""
    value = (header or "").strip().lower()
    encoding = _ENCODINGS.get(value)
    if encoding is None:
        raise BodyRejected(
            415,
            "unsupported_encoding",
            "Content-Encoding must be identity, gzip or deflate",
        )
    return encoding


@dataclass(frozen=True, slots=True)
class BodyLimits:
    max_bytes: int
    max_ratio: float
    timeout_seconds: float


class Turns:
    """Gives the event loop a turn once ``budget`` seconds of work ran since the last one."""

    def __init__(self, budget: float = _TURN_SECONDS, clock: Callable[[], float] = time.monotonic):
        self._budget = budget
        self._clock = clock
        self._since = clock()

    async def checkpoint(self) -> None:
        if self._clock() - self._since >= self._budget:
            await asyncio.sleep(0)
            self._since = self._clock()


async def read_raw_body(request: web.Request, limits: BodyLimits) -> bytes:
    """The body as sent (still encoded). Raises BodyRejected (411, 413, 408, 400) or ClientGone.

    A request must say how long its body is (Content-Length or chunked): without either, an
    HTTP/1.0 client's body would be read as the next request.
    """
    chunked = "chunked" in request.headers.get("Transfer-Encoding", "").lower()
    length = request.content_length
    if length is None and not chunked:
        raise BodyRejected(411, "length_required", "send Content-Length (or a chunked body)")
    if length is not None and length > limits.max_bytes:
        raise BodyRejected(413, "body_too_large", f"the body exceeds {limits.max_bytes} bytes")
    # Chunks joined once at the end: one copy of the body, not a growing buffer and a copy.
    received: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(limits.timeout_seconds):
            while True:
                chunk = await request.content.readany()
                if not chunk:
                    break
                received.append(chunk)
                size += len(chunk)
                if size > limits.max_bytes:
                    raise BodyRejected(
                        413, "body_too_large", f"the body exceeds {limits.max_bytes} bytes"
                    )
    except TimeoutError as exc:
        raise BodyRejected(
            408, "body_timeout", f"the body did not arrive within {limits.timeout_seconds:g} s"
        ) from exc
    except web.RequestPayloadError as exc:
        # A broken chunked encoding or a body shorter than its Content-Length.
        raise BodyRejected(400, "invalid_body", "the request body is malformed") from exc
    except ConnectionError as exc:
        raise ClientGone("the client closed the connection during the body") from exc
    return received[0] if len(received) == 1 else b"".join(received)


class _Decompressor(Protocol):
    @property
    def eof(self) -> bool: ...
    @property
    def unconsumed_tail(self) -> bytes: ...
    @property
    def unused_data(self) -> bytes: ...
    def decompress(self, data: bytes, max_length: int = ..., /) -> bytes: ...


def _decompressor(encoding: Encoding, first_byte: int) -> _Decompressor:
    if encoding is Encoding.GZIP:
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    # "deflate" is zlib-wrapped (RFC 9110 8.4.1.2), but some senders send raw deflate:
    # a zlib stream's first byte has compression method 8 in its low nibble.
    wbits = zlib.MAX_WBITS if first_byte & 0x0F == 8 else -zlib.MAX_WBITS
    return zlib.decompressobj(wbits)


def decoded_size_limit(raw_size: int, limits: BodyLimits) -> int:
    return min(limits.max_bytes, int(raw_size * limits.max_ratio))


async def decode_body(
    raw: bytes, encoding: Encoding, limits: BodyLimits, turns: Turns | None = None
) -> bytes:
    """Undo ``encoding`` in bounded steps, yielding to the loop between them.

    Raises BodyRejected: 413 past ``decoded_size_limit``; 400 for a corrupt, truncated or
    trailing-garbage stream. Concatenated gzip members (RFC 1952) are decoded in turn.
    """
    if encoding is Encoding.IDENTITY or not raw:
        return raw
    turns = turns or Turns()
    limit = decoded_size_limit(len(raw), limits)
    decompressor = _decompressor(encoding, raw[0])
    decoded = bytearray()
    position = 0
    pending = b""
    more_output = False
    try:
        while True:
            if not pending and not more_output:
                if position >= len(raw):
                    break
                pending = raw[position : position + _INPUT_STEP_BYTES]
                position += _INPUT_STEP_BYTES
            chunk = decompressor.decompress(pending, _DECODE_STEP_BYTES)
            # A full step may leave output inside zlib even when no input is left.
            more_output = len(chunk) == _DECODE_STEP_BYTES
            pending = decompressor.unconsumed_tail
            decoded += chunk
            if len(decoded) > limit:
                raise BodyRejected(
                    413,
                    "body_too_large",
                    f"the body decompresses to more than {limit} bytes "
                    f"(at most {limits.max_bytes} bytes and {limits.max_ratio:g}x "
                    "its compressed size)",
                )
            if decompressor.eof:
                rest = decompressor.unused_data
                if not rest and position >= len(raw):
                    break
                if encoding is not Encoding.GZIP:
                    raise BodyRejected(
                        400, "invalid_body", "data after the end of the compressed body"
                    )
                # Another gzip member follows; zlib refuses it if it is not one.
                decompressor = _decompressor(encoding, 0)
                pending, more_output = rest, False
            await turns.checkpoint()
    except zlib.error as exc:
        raise BodyRejected(
            400, "invalid_body", f"the body is not valid {encoding.value} data"
        ) from exc
    if not decompressor.eof:
        raise BodyRejected(400, "invalid_body", f"the {encoding.value} body is truncated")
    return bytes(decoded)


async def hash_cooperatively(digest: _Hash, body: bytes, turns: Turns | None = None) -> bytes:
    """``digest`` updated with ``body`` in slices, yielding between them; the final digest.

    SHA-256 of 4 MB is ~3 ms of CPU: fine once, not while other requests wait on the loop.
    """
    turns = turns or Turns()
    view = memoryview(body)
    for start in range(0, len(view), _HASH_STEP_BYTES):
        digest.update(view[start : start + _HASH_STEP_BYTES])
        await turns.checkpoint()
    return digest.digest()


class _Hash(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...
    def digest(self) -> bytes: ...
