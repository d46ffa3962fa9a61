"""HTTP/1.1 at the byte level, for requests no well-behaved client would send: slow heads,
lying lengths, broken chunking, early disconnects. Responses are parsed just enough to read a
status, headers and a Content-Length body."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RawResponse:
    """The first response on a connection; ``status`` None if it closed without one."""

    status: int | None
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""
    raw: bytes = b""
    closed: bool = False  # the server closed the connection

    def json(self) -> Any:
        return json.loads(self.body)


def parse_responses(data: bytes) -> list[RawResponse]:
    """Every complete response in ``data`` (Content-Length bodies only)."""
    responses: list[RawResponse] = []
    rest = data
    while b"\r\n\r\n" in rest:
        head, _, after = rest.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        if len(after) < length:
            break
        status = int(lines[0].split(" ", 2)[1])
        raw = head + b"\r\n\r\n" + after[:length]
        responses.append(RawResponse(status, headers, after[:length], raw))
        rest = after[length:]
    return responses


def http_request(
    path: str,
    body: bytes = b"",
    headers: Mapping[str, str] | Sequence[tuple[str, str]] = (),
    *,
    method: str = "POST",
    version: str = "1.1",
    content_length: bool | int = True,
    host: bool = True,
    close: bool = True,
) -> bytes:
    """One request as bytes. ``content_length``: True for the real length, an int to lie,
    False to send none."""
    lines = [f"{method} {path} HTTP/{version}"]
    if host:
        lines.append("Host: ingest.test")
    items = headers.items() if isinstance(headers, Mapping) else headers
    lines.extend(f"{name}: {value}" for name, value in items)
    if content_length is True:
        lines.append(f"Content-Length: {len(body)}")
    elif content_length is not False:
        lines.append(f"Content-Length: {content_length}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def exchange(
    host: str,
    port: int,
    chunks: Sequence[bytes],
    *,
    pause: float = 0.0,
    disconnect: bool = False,
    responses: int = 1,
    timeout: float = 20.0,
) -> list[RawResponse]:
    """Send ``chunks`` (``pause`` seconds apart) while reading, until ``responses`` responses
    arrived or the server closed; ``disconnect`` closes right after the last chunk. Returns the
    responses read ([RawResponse(None, closed=...)] if none)."""
    reader, writer = await asyncio.open_connection(host, port)
    received = bytearray()
    closed = asyncio.Event()

    async def read() -> None:
        try:
            while len(parse_responses(bytes(received))) < responses:
                data = await reader.read(65536)
                if not data:
                    break
                received.extend(data)
        except ConnectionError:
            pass
        finally:
            closed.set()

    reading = asyncio.create_task(read())
    try:
        with contextlib.suppress(ConnectionError):
            for index, chunk in enumerate(chunks):
                if closed.is_set():
                    break
                writer.write(chunk)
                await writer.drain()
                if pause and index < len(chunks) - 1:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(closed.wait(), pause)
        if disconnect:
            writer.close()
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await reading
            return [RawResponse(None, closed=False)]
        await asyncio.wait_for(reading, timeout)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    parsed = parse_responses(bytes(received))
    server_closed = reader.at_eof()
    for response in parsed:
        response.closed = server_closed
    return parsed or [RawResponse(None, raw=bytes(received), closed=server_closed)]
