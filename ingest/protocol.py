"""The ingress's HTTP server: aiohttp's, with the connection-level limits aiohttp lacks.

aiohttp 3.14 has an idle keep-alive timeout (``keepalive_timeout``), line and header-count
limits (``max_line_size``, ``max_field_size``) and no decompression when ``auto_decompress``
is off; ``create_app`` sets those through ``handler_args``, so they hold under any runner. What
it does not have, and this module adds by subclassing its protocol (``RequestHandler``):

* a cap on open connections: past ``ingest.max_connections`` a new connection is answered 503
  (JSON, ``Retry-After``) and closed before aiohttp starts a task for it;
* a request-head timeout: from a connection's opening, or from the first byte of a later
  request, the head must be complete within ``ingest.header_timeout_seconds`` (slowloris);
  aiohttp only times out connections idle *between* requests;
* a cap on the whole request head (``ingest.max_header_bytes``), not only per line;
* 411 for an HTTP/1.0 request that says nothing of its body's length, also when the body
  arrives in the same packet as the head: aiohttp's parser reads such a request as bodiless and
  the body as a malformed next request, and its error replaces the request (400);
* answers to malformed HTTP as a short JSON error with one log line that quotes nothing the
  client sent: aiohttp answers its parser errors in text/plain echoing the offending bytes and
  logs them with a traceback (request bytes are personal data);
* abuse logged at most once per reason every ``_LOG_INTERVAL_SECONDS``, with a count of what
  was not logged, so a flood costs counters, not gigabytes of log.

aiohttp creates its protocol inside ``Application._make_handler`` with no hook for the class,
so ``IngressRunner`` rebuilds that Server as an ``IngressServer``. These overrides use private
members of aiohttp 3.14 (``_request_count``, ``_messages``, ``_ErrInfo``,
``_request_in_progress``, ``_keepalive_handle``, ``_process_keepalive``, ``Server._kwargs``);
pyproject pins aiohttp below 3.15 and ``tests/unit/test_ingress_protocol.py`` exercises each.
"""

from __future__ import annotations

import asyncio
import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, cast

import structlog
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, BadHttpMethod, LineTooLong
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo
from aiohttp.web_request import BaseRequest

from sgpipe.runtime import metrics
from sgpipe.runtime.metrics import STAGE_INGEST

log = structlog.get_logger(__name__)

_LOG_INTERVAL_SECONDS = 10.0
# A closing connection is half-closed and its input read and discarded for at most this long
# before it is closed: closing a socket with unread input makes the kernel send a reset, which
# can destroy the answer (a 503, 408, 431 or 400) before the client reads it. Beyond this many
# lingering connections at once, connections close at once.
_LINGER_SECONDS = 1.0
_MAX_LINGERING = 128
# How long aiohttp keeps reading a body its handler did not read, so that the client sees
# the answer rather than a reset (aiohttp's default is 10 s).
LINGERING_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class IngressLimits:
    """The connection-level limits, from ``ingest.*`` settings."""

    max_connections: int
    header_timeout_seconds: float
    idle_timeout_seconds: float
    max_header_bytes: int
    retry_after_seconds: int


INGRESS_LIMITS = web.AppKey("sgpipe_ingress_limits", IngressLimits)


class RateLimitedLog:
    """One line per reason per ``interval``, carrying how many were not logged since."""

    def __init__(
        self, interval: float = _LOG_INTERVAL_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def reset(self) -> None:
        self._last.clear()
        self._suppressed.clear()

    def warning(self, event: str, *, reason: str, **fields: Any) -> bool:
        """Log unless ``reason`` was logged within the interval; True if it was logged."""
        return self._emit(log.warning, event, reason, fields)

    def error(self, event: str, *, reason: str, **fields: Any) -> bool:
        return self._emit(log.error, event, reason, fields)

    def _emit(
        self, method: Callable[..., Any], event: str, reason: str, fields: dict[str, Any]
    ) -> bool:
        now = self._clock()
        last = self._last.get(reason)
        if last is not None and now - last < self._interval:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return False
        self._last[reason] = now
        suppressed = self._suppressed.pop(reason, 0)
        method(event, reason=reason, not_logged_since_last=suppressed, **fields)
        return True


# One per process: every connection and request of the ingress shares the rate limit.
abuse_log = RateLimitedLog()


def json_error_body(error: str, description: str) -> bytes:
    # The RFC 6750-style body of every ingress error (SendGrid looks for these codes in 4xx).
    return json.dumps({"error": error, "error_description": description}).encode()


def raw_json_response(
    status: int, error: str, description: str, *, retry_after: int | None = None
) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, for answers given where aiohttp
    has no request object (at accept, in the middle of a request head)."""
    body = json_error_body(error, description)
    head = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if retry_after is not None:
        head.append(f"Retry-After: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


def exception_summary(exc: BaseException | None) -> dict[str, str]:
    """The exception's class and innermost location, not its message (which may quote
    request bytes)."""
    if exc is None:
        return {"error_type": "unknown"}
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else ""
    return {"error_type": type(exc).__name__, "where": where}


class BrokenBody(RequestPayloadError):
    """Set on a body whose transfer framing the parser refused (handled by the app as 400)."""


class ConnectionGuard:
    """Counts the open connections of one server and applies its limits."""

    def __init__(self, limits: IngressLimits) -> None:
        self.limits = limits
        self.open = 0
        self.lingering = 0

    def try_open(self) -> bool:
        if self.open >= self.limits.max_connections:
            return False
        self.open += 1
        metrics.INGEST_OPEN_CONNECTIONS.labels(STAGE_INGEST).set(self.open)
        return True

    def closed(self) -> None:
        self.open -= 1
        metrics.INGEST_OPEN_CONNECTIONS.labels(STAGE_INGEST).set(self.open)


def _rejected(reason: str) -> None:
    metrics.INGEST_CONNECTIONS_REJECTED.labels(STAGE_INGEST, reason).inc()


class IngressProtocol(RequestHandler):
    """aiohttp's HTTP/1.1 protocol with the limits in the module docstring."""

    def __init__(self, manager: web.Server, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._accepted = False
        self._linger_timer: asyncio.TimerHandle | None = None
        self._shutting_down = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        # The body of the last request whose head was parsed: while it is still arriving, the
        # bytes received are body, not the head of a next request.
        self._body: StreamReader | None = None
        # What arrived of the current request head (at most max_header_bytes, then 431).
        self._head_received = bytearray()

    # --- the connection cap --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if not self._guard.try_open():
            self._refuse(transport)
            return
        self._accepted = True
        # aiohttp closes connections itself (after an error answer, at keep-alive's end): it
        # gets a transport whose close() lingers first.
        super().connection_made(cast(asyncio.Transport, _LingeringClose(transport, self)))
        # A new connection must send a complete request head in time, like any later one:
        # the head timer, not aiohttp's idle timer, governs until the first head is complete.
        self._stop_idle_timer()
        self._arm_head_timer()

    def _refuse(self, transport: asyncio.Transport) -> None:
        _rejected("too_many_connections")
        abuse_log.warning(
            "connection refused: too many open connections",
            reason="too_many_connections",
            max_connections=self._guard.limits.max_connections,
        )
        transport.write(
            raw_json_response(
                503,
                "overloaded",
                "too many open connections; retry later",
                retry_after=self._guard.limits.retry_after_seconds,
            )
        )
        self.linger_then_close(transport)

    def linger_then_close(self, transport: asyncio.Transport) -> None:
        """Half-close (our answer, then FIN), discard what the client still sends until it
        closes or ``_LINGER_SECONDS`` pass, then close."""
        if self._linger_timer is not None or transport.is_closing():
            return
        guard = self._guard
        if (
            self._shutting_down
            or guard.lingering >= _MAX_LINGERING
            or not transport.can_write_eof()
        ):
            transport.close()
            return
        guard.lingering += 1
        transport.write_eof()
        self._linger_timer = self._loop.call_later(_LINGER_SECONDS, transport.close)

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        # The server is stopping: close without lingering.
        self._shutting_down = True
        await super().shutdown(timeout)

    def eof_received(self) -> None:
        # The client closed its side; a lingering connection is then closed by asyncio.
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
            self._guard.lingering -= 1
        if not self._accepted:
            return
        self._accepted = False
        self._guard.closed()
        self._disarm_head_timer()
        super().connection_lost(exc)

    # --- the request-head timeout and size cap ---------------------------------------------

    def data_received(self, data: bytes) -> None:
        if not self._accepted or self._linger_timer is not None:
            return  # refused or closing: discard until the client closes
        in_head = self._reading_head()
        if in_head and self._head_timer is None:
            # A new request begins: it is no longer idle, and its head must be complete in time.
            self._stop_idle_timer()
            self._arm_head_timer()
        if in_head:
            self._head_received += data[: self._guard.limits.max_header_bytes + 4]
            if _unframed_http10_body(self._head_received):
                _rejected("malformed")
                abuse_log.warning(
                    "request refused: an HTTP/1.0 body without a length", reason="length_required"
                )
                self._answer_and_close(
                    411, "length_required", "send Content-Length (or a chunked body)"
                )
                return
        requests_before = self._request_count
        super().data_received(data)
        if self._request_count > requests_before:
            # The parser completed a request head (or refused one): the head phase is over.
            self._disarm_head_timer()
            self._head_bytes = 0
            self._head_received.clear()
            newest = self._messages[-1] if self._messages else None
            if newest is not None and isinstance(newest[0], _ErrInfo):
                self._fail_body_in_progress()
            self._body = newest[1] if newest is not None else None
        elif in_head:
            self._head_bytes += len(data)
            if self._head_bytes > self._guard.limits.max_header_bytes:
                _rejected("headers_too_large")
                abuse_log.warning(
                    "request refused: head too large",
                    reason="headers_too_large",
                    max_header_bytes=self._guard.limits.max_header_bytes,
                )
                self._answer_and_close(
                    431,
                    "headers_too_large",
                    f"the request head exceeds {self._guard.limits.max_header_bytes} bytes",
                )

    def _fail_body_in_progress(self) -> None:
        # aiohttp's C parser drops the body of a request whose chunked framing turns out
        # broken without telling its reader, which would then wait for the body timeout:
        # tell it now, so the handler answers 400 at once.
        body = self._body
        if body is not None and not body.is_eof() and body.exception() is None:
            body.set_exception(BrokenBody("the request body's framing is malformed"))

    def _reading_head(self) -> bool:
        return not self._upgraded and (self._body is None or self._body.is_eof())

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self._loop.call_later(
            self._guard.limits.header_timeout_seconds, self._head_timed_out
        )

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport is None or self._force_close:
            return
        if self._request_in_progress or self._messages:
            # A request is being handled; what was received of the next head waits for it.
            self._arm_head_timer()
            return
        _rejected("header_timeout")
        abuse_log.warning(
            "connection closed: request head not received in time",
            reason="header_timeout",
            header_timeout_seconds=self._guard.limits.header_timeout_seconds,
            bytes_received=self._head_bytes,
        )
        if self._head_bytes:
            self._answer_and_close(
                408,
                "header_timeout",
                "the request head did not arrive within "
                f"{self._guard.limits.header_timeout_seconds:g} s",
            )
        else:
            self.force_close()  # nothing was asked: nothing to answer

    def _answer_and_close(self, status: int, error: str, description: str) -> None:
        transport = self.transport
        if transport is not None and not self._request_in_progress and not self._messages:
            transport.write(raw_json_response(status, error, description))
        self.force_close()

    # --- idle keep-alive connections ------------------------------------------------------

    def _stop_idle_timer(self) -> None:
        # aiohttp re-arms it after the next response.
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
            self._keepalive_handle = None

    def _process_keepalive(self) -> None:
        was_open = not self._force_close
        super()._process_keepalive()
        if was_open and self._force_close:
            _rejected("idle_timeout")

    # --- malformed requests and unexpected errors -------------------------------------------

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's parser errors and unhandled handler errors, answered in JSON without
        quoting the request (``message`` does, so it is ignored) and logged in one line."""
        if request.writer.output_size > 0:
            # Same as aiohttp: a response is partly sent, the connection can only be dropped.
            raise ConnectionError("a response is already partly sent")
        if status >= 500:
            error, description = "internal_error", "the ingress could not handle the request"
            log.error("unhandled error in the ingress", status=status, **exception_summary(exc))
        else:
            status, error, description, reason = _describe_parse_error(exc)
            _rejected(reason)
            abuse_log.warning(
                "malformed request refused",
                reason=reason,
                status=status,
                error_type=type(exc).__name__ if exc else "unknown",
            )
        response = web.Response(
            status=status,
            body=json_error_body(error, description),
            content_type="application/json",
        )
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        # aiohttp's own error logging (tracebacks whose messages may quote request bytes),
        # reduced to one line naming the exception's class and place.
        exc = kwargs.get("exc_info")
        if isinstance(exc, BrokenBody):
            return  # aiohttp met it again discarding the rest; the handler already answered
        log.error(
            "error in the HTTP server",
            **exception_summary(exc if isinstance(exc, BaseException) else None),
        )


_LENGTH_HEADERS = (b"content-length:", b"transfer-encoding:")


def _unframed_http10_body(received: bytes | bytearray) -> bool:
    """Whether ``received`` holds a complete HTTP/1.0 request head (not GET or HEAD) that names
    neither Content-Length nor Transfer-Encoding, followed by more bytes (its body, which could
    only be delimited by the connection's end)."""
    end = received.find(b"\r\n\r\n")
    if end < 0 or end + 4 == len(received):
        return False
    request_line, *header_lines = bytes(received[:end]).split(b"\r\n")
    # A GET or HEAD has no body: what follows it is a next (pipelined) request.
    if not request_line.endswith(b" HTTP/1.0") or request_line.startswith((b"GET ", b"HEAD ")):
        return False
    return not any(line.lower().startswith(_LENGTH_HEADERS) for line in header_lines)


def _describe_parse_error(exc: BaseException | None) -> tuple[int, str, str, str]:
    """(status, error code, description, metric reason) for an HTTP parser error."""
    if isinstance(exc, LineTooLong) or (
        isinstance(exc, BadHttpMessage) and "Too many headers" in exc.message
    ):
        return (
            431,
            "headers_too_large",
            "a request line or header exceeds the ingress's limits",
            "headers_too_large",
        )
    if isinstance(exc, BadHttpMethod):
        return 400, "invalid_method", "the request method is not valid HTTP", "malformed"
    return 400, "malformed_request", "the request is not valid HTTP/1.1", "malformed"


class _LingeringClose:
    """The transport aiohttp's protocol writes to: every call goes to the real transport,
    except ``close``, which lingers first (``IngressProtocol.linger_then_close``)."""

    def __init__(self, transport: asyncio.Transport, protocol: IngressProtocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def close(self) -> None:
        self._protocol.linger_then_close(self._transport)


class IngressServer(web.Server):
    """aiohttp's Server whose connections are IngressProtocols sharing one ConnectionGuard."""

    def __init__(self, *args: Any, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guard = guard

    def __call__(self) -> RequestHandler:
        return IngressProtocol(self, loop=self._loop, guard=self.guard, **self._kwargs)


class IngressRunner(web.AppRunner):
    """``web.AppRunner`` for the ingress app: same use (setup, TCPSite, cleanup), with the
    connection limits stored in the app by ``create_app``. Access logs are off by default:
    one line per request at this rate is noise, and the ingress logs its own outcomes."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        kwargs.setdefault("access_log", None)
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # The Server aiohttp built carries the app's handler, request factory and handler
        # kwargs (handler_args included); only the protocol class differs.
        return IngressServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=asyncio.get_running_loop(),
            guard=ConnectionGuard(self.app[INGRESS_LIMITS]),
            **server._kwargs,
        )

    @property
    def guard(self) -> ConnectionGuard:
        server = self.server
        assert isinstance(server, IngressServer), "call setup() first"
        return server.guard


async def start_ingress(app: web.Application, host: str, port: int) -> IngressRunner:
    """Serve ``app`` on ``host:port`` (0: a free port, see ``runner.addresses``); the caller
    awaits ``runner.cleanup()`` to stop."""
    runner = IngressRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
