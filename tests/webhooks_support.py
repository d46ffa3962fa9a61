"""The SendGrid emulator in tests: served from a thread (so that the synchronous CLI can talk to
it in-process), every HTTP exchange recorded for the contract test, and a receiver that plays
the webhook URL the test endpoint posts to."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from sgpipe.webhooks.emulator import EmulatorConfig, EmulatorState, create_app

if TYPE_CHECKING:
    from openapi_core import OpenAPI

# A key anyone would recognize in output: no test may ever see it printed.
API_KEY = "SG.TESTKEY-must-never-be-printed.0123456789abcdefXYZ"
SPEC_PATH = (
    Path(__file__).resolve().parents[1] / "schemas" / "sendgrid" / "event-webhooks-openapi.yaml"
)
# The server the document names first; the emulator's address stands in for it.
SPEC_SERVER = "https://api.sendgrid.com"
# Answers the document does not describe for these paths: SendGrid's generic auth errors.
UNDOCUMENTED_STATUSES = frozenset({401, 403})
# The emulator's 400s where the document lists none: the test endpoint refusing OAuth
# credentials the seed's test page says must be complete (a secret for unsaved ones) or an
# invalid URL. Skipped by the contract check, and asserted by their own tests.
UNDOCUMENTED_ANSWERS = frozenset({("POST", "/v3/user/webhooks/event/test", 400)})


@dataclass(frozen=True)
class Exchange:
    """One request to the emulator and its answer, as they went over the wire."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    status: int
    response_body: bytes
    response_content_type: str


@dataclass
class Received:
    """What the webhook receiver got."""

    bodies: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)


class ServerThread:
    """An aiohttp application on 127.0.0.1:<free port>, in its own thread and event loop."""

    def __init__(self, app: web.Application) -> None:
        self._app = app
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    def start(self) -> None:
        self._thread.start()
        self.port = self.call(self._start)

    async def _start(self) -> int:
        self._runner = web.AppRunner(self._app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port: int = self._runner.addresses[0][1]
        return port

    def call(self, coroutine: Callable[[], Awaitable[Any]]) -> Any:
        async def wrapped() -> Any:
            return await coroutine()

        return asyncio.run_coroutine_threadsafe(wrapped(), self._loop).result(timeout=60)

    def stop(self) -> None:
        if self._runner is not None:
            self.call(self._runner.cleanup)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class RunningEmulator:
    server: ServerThread
    state: EmulatorState
    exchanges: list[Exchange]

    @property
    def url(self) -> str:
        return self.server.url


def recording_app(
    state: EmulatorState, config: EmulatorConfig, exchanges: list[Exchange]
) -> web.Application:
    """The emulator behind a middleware that records every exchange (401s included)."""

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.read()
        response: web.StreamResponse = await handler(request)
        answer = response.body if isinstance(response, web.Response) else b""
        exchanges.append(
            Exchange(
                request.method,
                request.path,
                dict(request.query),
                dict(request.headers),
                body,
                response.status,
                answer if isinstance(answer, bytes) else b"",
                response.content_type,
            )
        )
        return response

    # The emulator's own app, with the recorder placed before its authentication.
    app = create_app(state, config)
    app.middlewares.insert(0, record)
    return app


@functools.cache
def sendgrid_openapi() -> OpenAPI:
    from openapi_core import OpenAPI

    return OpenAPI.from_file_path(str(SPEC_PATH))


def validate_exchanges(exchanges: Iterable[Exchange]) -> int:
    """Validate each exchange's request and response against SendGrid's OpenAPI document with
    openapi-core; raises on the first that does not fit. Returns how many were validated."""
    from openapi_core.testing import MockRequest, MockResponse

    openapi = sendgrid_openapi()
    validated = 0
    for exchange in exchanges:
        if exchange.status in UNDOCUMENTED_STATUSES or (
            (exchange.method, exchange.path, exchange.status) in UNDOCUMENTED_ANSWERS
        ):
            continue
        request = MockRequest(
            SPEC_SERVER,
            exchange.method,
            exchange.path,
            args=exchange.query,
            headers=exchange.headers,
            data=exchange.body or None,
            content_type=exchange.headers.get("Content-Type", "application/json").split(";")[0],
        )
        openapi.validate_request(request)
        response = MockResponse(
            exchange.response_body,
            status_code=exchange.status,
            content_type=exchange.response_content_type or "application/json",
        )
        openapi.validate_response(request, response)
        validated += 1
    return validated


@contextmanager
def running_emulator(
    config: EmulatorConfig | None = None, *, contract: bool = True
) -> Iterator[RunningEmulator]:
    """The emulator on a free port. With ``contract`` (the default), every exchange the test
    made with it is validated against SendGrid's OpenAPI document when the test is done: a
    test that sends invalid requests on purpose passes ``contract=False``."""
    state = EmulatorState()
    exchanges: list[Exchange] = []
    server = ServerThread(
        recording_app(state, config or EmulatorConfig(api_keys=frozenset({API_KEY})), exchanges)
    )
    server.start()
    try:
        yield RunningEmulator(server, state, exchanges)
    finally:
        server.stop()
    if contract:
        validate_exchanges(exchanges)


@contextmanager
def webhook_receiver(status: int = 200) -> Iterator[tuple[str, Received]]:
    """A URL that answers every POST with ``status`` and keeps what it got."""
    received = Received()

    async def receive(request: web.Request) -> web.Response:
        received.bodies.append(await request.read())
        received.headers.append(dict(request.headers))
        return web.Response(status=status)

    app = web.Application()
    app.router.add_post("/webhooks/{name}", receive)
    server = ServerThread(app)
    server.start()
    try:
        yield server.url, received
    finally:
        server.stop()
