"""`sgpipe sendgrid-emulator`: SendGrid's Webhooks API on a local aiohttp server.

Every operation of schemas/sendgrid/event-webhooks-openapi.yaml, with SendGrid's documented
behaviour: request bodies validated (the models of ``models``: unknown fields and wrong types
are a 400 in SendGrid's ``errors`` shape), the documented error bodies (invalid URL, duplicate
URL naming the existing id, ``max_allowed: 5`` reached, ``Invalid id provided.``), state kept
per account (the parent, or each ``on-behalf-of`` subuser), a P-256 key pair per webhook while
signing is on, and a test endpoint that really POSTs a signed sample batch.

Written here rather than taken from a library because no maintained SendGrid mock exists; it
stays small by reusing the simulator for everything SendGrid does on the wire: event JSON,
batch framing, signing, the OAuth client-credentials flow, and never following a redirect
(``sgpipe.simulator.simulate``).

Authentication: ``api_keys`` empty accepts any bearer token; otherwise another token is a 401
and a key in ``read_only_keys`` gets 403 on every change, as a SendGrid key without the
Mail Settings write scope does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import structlog
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel, ValidationError

from sgpipe.simulator.keys import generate_private_key, public_key_base64
from sgpipe.simulator.oauth import OAuthClientSettings
from sgpipe.simulator.simulation import SimulationOptions, simulate
from sgpipe.webhooks.fields import EVENT_FIELDS, MAX_WEBHOOKS
from sgpipe.webhooks.models import (
    EventWebhookRequest,
    EventWebhookTestRequest,
    SignatureToggle,
)


def _log() -> Any:
    # Looked up at each use, not cached at import: the CLI may reconfigure logging (a new
    # stream) between commands run in one process, and a cached logger keeps the old stream.
    return structlog.get_logger("sgpipe.sendgrid_emulator")


PREFIX: Final = "/v3/user/webhooks/event"
# Events in the sample batch the test endpoint posts.
TEST_BATCH_EVENTS: Final = 11
_NOT_FOUND: Final = "Invalid id provided."
_MAX_REACHED: Final = (
    "You have reached the maximum number of webhooks per your current billing plan."
)


@dataclass
class StoredWebhook:
    id: str
    url: str
    enabled: bool
    events: dict[str, bool]
    friendly_name: str | None
    oauth_client_id: str | None
    oauth_client_secret: str | None
    oauth_token_url: str | None
    created_date: str
    updated_date: str
    account_status_change: bool = False
    # PKCS#8 PEM of the signing key while signature verification is on.
    private_key_pem: str | None = None

    def private_key(self) -> ec.EllipticCurvePrivateKey | None:
        if self.private_key_pem is None:
            return None
        key = serialization.load_pem_private_key(self.private_key_pem.encode(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key

    def public_key(self) -> str:
        key = self.private_key()
        return public_key_base64(key) if key is not None else ""

    def answer(
        self, *, dates: bool = True, signed: bool = True, account_status: bool = False
    ) -> dict[str, Any]:
        """The webhook object of SendGrid's answers; OAuth and key fields only when set."""
        body: dict[str, Any] = {"enabled": self.enabled, "url": self.url, **self.events}
        if account_status:
            body["account_status_change"] = self.account_status_change
        if self.friendly_name is not None:
            body["friendly_name"] = self.friendly_name
        body["id"] = self.id
        if self.oauth_client_id:
            body["oauth_client_id"] = self.oauth_client_id
            body["oauth_token_url"] = self.oauth_token_url or ""
        if signed and self.private_key_pem is not None:
            body["public_key"] = self.public_key()
        if dates:
            body["created_date"] = self.created_date
            body["updated_date"] = self.updated_date
        return body


@dataclass(frozen=True)
class TestDelivery:
    """What one call of the test endpoint delivered."""

    url: str
    webhook_id: str | None
    signed: bool
    oauth: bool
    events: int
    accepted: bool
    detail: str | None


@dataclass
class EmulatorState:
    """Webhooks per account ("" is the parent account, else the on-behalf-of value)."""

    accounts: dict[str, list[StoredWebhook]] = field(default_factory=dict)
    path: Path | None = None
    deliveries: list[TestDelivery] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path | None) -> EmulatorState:
        state = cls(path=path)
        if path is not None and path.exists():
            document = json.loads(path.read_text(encoding="utf-8"))
            state.accounts = {
                account: [StoredWebhook(**webhook) for webhook in webhooks]
                for account, webhooks in document.get("accounts", {}).items()
            }
        return state

    def save(self) -> None:
        if self.path is None:
            return
        document = {
            "accounts": {
                account: [asdict(webhook) for webhook in webhooks]
                for account, webhooks in self.accounts.items()
            }
        }
        # The file holds private keys and OAuth secrets: owner only, replaced atomically.
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            json.dump(document, file, indent=1)
        os.replace(temporary, self.path)

    def webhooks(self, account: str) -> list[StoredWebhook]:
        return self.accounts.setdefault(account, [])

    def find(self, account: str, webhook_id: str) -> StoredWebhook | None:
        return next((w for w in self.webhooks(account) if w.id == webhook_id), None)


@dataclass(frozen=True)
class EmulatorConfig:
    api_keys: frozenset[str] = frozenset()
    read_only_keys: frozenset[str] = frozenset()
    # How long the test endpoint's POST may take (SendGrid's test does not retry).
    test_timeout_seconds: float = 30.0


STATE = web.AppKey("state", EmulatorState)
CONFIG = web.AppKey("config", EmulatorConfig)
LOCK = web.AppKey("lock", asyncio.Lock)
ACCOUNT = web.RequestKey("sendgrid_account", str)


def create_app(state: EmulatorState, config: EmulatorConfig | None = None) -> web.Application:
    app = web.Application(middlewares=[_authenticate])
    app[STATE] = state
    app[CONFIG] = config or EmulatorConfig()
    app[LOCK] = asyncio.Lock()
    app.router.add_post(f"{PREFIX}/settings", create_webhook)
    app.router.add_get(f"{PREFIX}/settings/all", list_webhooks)
    app.router.add_get(f"{PREFIX}/settings/signed/{{id}}", get_public_key)
    app.router.add_patch(f"{PREFIX}/settings/signed/{{id}}", toggle_signing)
    app.router.add_post(f"{PREFIX}/test", test_webhook)
    app.router.add_get(f"{PREFIX}/settings/{{id}}", get_webhook)
    app.router.add_patch(f"{PREFIX}/settings/{{id}}", update_webhook)
    app.router.add_delete(f"{PREFIX}/settings/{{id}}", delete_webhook)
    return app


def errors(status: int, *items: dict[str, Any]) -> web.Response:
    return web.json_response({"errors": list(items)}, status=status)


@web.middleware
async def _authenticate(request: web.Request, handler: Any) -> web.StreamResponse:
    config = request.app[CONFIG]
    header = request.headers.get("Authorization", "")
    token = header[len("Bearer ") :] if header.startswith("Bearer ") else ""
    # SendGrid's answers to a missing or unknown key, and to a key without the scope.
    if not token or (config.api_keys and token not in config.api_keys):
        return errors(401, {"field": None, "message": "authorization required"})
    if token in config.read_only_keys and request.method != "GET":
        return errors(403, {"field": None, "message": "access forbidden"})
    request[ACCOUNT] = request.headers.get("on-behalf-of", "")
    response: web.StreamResponse = await handler(request)
    return response


_Model = TypeVar("_Model", bound=BaseModel)


async def _body(request: web.Request, model: type[_Model]) -> _Model | web.Response:
    try:
        document = json.loads(await request.read() or b"null")
    except ValueError:
        return errors(400, {"field": None, "message": "invalid JSON"})
    if not isinstance(document, dict):
        return errors(400, {"field": None, "message": "request body must be a JSON object"})
    try:
        # Strict: JSON Schema's `boolean` is true or false, not "yes" (pydantic's lax mode
        # would take it).
        return model.model_validate(document, strict=True)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        return errors(400, {"field": where or None, "message": problem["msg"]})


def _valid_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.hostname) and " " not in url


def _oauth_problem(client_id: str | None, secret: str | None, token_url: str | None) -> str | None:
    # The rules of the seed: a client id needs a token URL; a secret needs both.
    if client_id and not token_url:
        return "oauth_token_url is required when oauth_client_id is set"
    if secret and not (client_id and token_url):
        return "oauth_client_id and oauth_token_url are required when oauth_client_secret is set"
    if token_url and not _valid_url(token_url):
        return f"'{token_url}' is not a valid url"
    return None


@dataclass(frozen=True, slots=True)
class _OAuthSettings:
    client_id: str | None
    client_secret: str | None
    token_url: str | None


def _oauth_settings(
    body: EventWebhookRequest, stored: StoredWebhook | None
) -> _OAuthSettings | web.Response:
    """A webhook's OAuth settings once ``body`` is applied (to ``stored`` on an update; None on
    a create), or the 400 SendGrid answers. A field the body leaves out keeps its stored value;
    an empty string clears it (the seed: "pass an empty string ... for each")."""
    names = ("oauth_client_id", "oauth_client_secret", "oauth_token_url")
    sent = (body.oauth_client_id, body.oauth_client_secret, body.oauth_token_url)
    kept = (
        (stored.oauth_client_id, stored.oauth_client_secret, stored.oauth_token_url)
        if stored is not None
        else (None, None, None)
    )
    given = body.model_fields_set
    client_id, secret, token_url = (
        (new if name in given else old) or None
        for name, new, old in zip(names, sent, kept, strict=True)
    )
    settings = _OAuthSettings(client_id, secret, token_url)
    problem = _oauth_problem(settings.client_id, settings.client_secret, settings.token_url)
    if problem is not None:
        return errors(400, {"message": problem})
    return settings


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _include_account_status(request: web.Request) -> bool:
    return "account_status_change" in request.query.get("include", "").split(",")


async def create_webhook(request: web.Request) -> web.Response:
    body = await _body(request, EventWebhookRequest)
    if isinstance(body, web.Response):
        return body
    state, account = request.app[STATE], request[ACCOUNT]
    async with request.app[LOCK]:
        problem = _url_problem(state, account, body.url, None)
        if problem is not None:
            return problem
        if len(state.webhooks(account)) >= MAX_WEBHOOKS:
            return errors(400, {"message": _MAX_REACHED})
        oauth = _oauth_settings(body, None)
        if isinstance(oauth, web.Response):
            return oauth
        now = _now()
        webhook = StoredWebhook(
            id=str(uuid.uuid4()),
            url=body.url,
            enabled=bool(body.enabled),
            events={name: bool(getattr(body, name)) for name in EVENT_FIELDS},
            friendly_name=body.friendly_name,
            oauth_client_id=oauth.client_id,
            oauth_client_secret=oauth.client_secret,
            oauth_token_url=oauth.token_url,
            created_date=now,
            updated_date=now,
        )
        state.webhooks(account).append(webhook)
        state.save()
    _log().info("webhook created", webhook_id=webhook.id, account=account or None)
    return web.json_response(webhook.answer(signed=False), status=201)


def _url_problem(
    state: EmulatorState, account: str, url: str, own_id: str | None
) -> web.Response | None:
    if not _valid_url(url):
        return errors(400, {"message": f"'{url}' is not a valid url"})
    for other in state.webhooks(account):
        if other.url == url and other.id != own_id:
            return errors(
                400,
                {
                    "id": other.id,
                    "message": f"Webhook at '{url}' already exists. Please provide a unique URL.",
                    "url": url,
                },
            )
    return None


async def list_webhooks(request: web.Request) -> web.Response:
    state, account = request.app[STATE], request[ACCOUNT]
    status = _include_account_status(request)
    webhooks = [w.answer(account_status=status) for w in state.webhooks(account)]
    # SendGrid's "Zero Webhooks" example: an array holding one empty object.
    return web.json_response({"max_allowed": MAX_WEBHOOKS, "webhooks": webhooks or [{}]})


async def get_webhook(request: web.Request) -> web.Response:
    webhook = request.app[STATE].find(request[ACCOUNT], request.match_info["id"])
    if webhook is None:
        return errors(404, {"message": _NOT_FOUND})
    # EventWebhookNoDatesResponse: this answer has no dates.
    return web.json_response(
        webhook.answer(dates=False, account_status=_include_account_status(request))
    )


async def update_webhook(request: web.Request) -> web.Response:
    state, account = request.app[STATE], request[ACCOUNT]
    webhook = state.find(account, request.match_info["id"])
    if webhook is None:
        return errors(404, {"message": _NOT_FOUND})
    body = await _body(request, EventWebhookRequest)
    if isinstance(body, web.Response):
        return body
    async with request.app[LOCK]:
        problem = _url_problem(state, account, body.url, webhook.id)
        if problem is not None:
            return problem
        oauth = _oauth_settings(body, webhook)
        if isinstance(oauth, web.Response):
            return oauth
        given = body.model_fields_set
        webhook.url = body.url
        if body.enabled is not None:
            webhook.enabled = body.enabled
        for name in EVENT_FIELDS:
            value = getattr(body, name)
            if value is not None:
                webhook.events[name] = value
        if "friendly_name" in given:
            webhook.friendly_name = body.friendly_name
        webhook.oauth_client_id = oauth.client_id
        webhook.oauth_token_url = oauth.token_url
        webhook.oauth_client_secret = oauth.client_secret
        webhook.updated_date = _now()
        state.save()
    _log().info("webhook updated", webhook_id=webhook.id, account=account or None)
    return web.json_response(
        webhook.answer(signed=False, account_status=_include_account_status(request))
    )


async def delete_webhook(request: web.Request) -> web.Response:
    state, account = request.app[STATE], request[ACCOUNT]
    async with request.app[LOCK]:
        webhook = state.find(account, request.match_info["id"])
        if webhook is None:
            return errors(404, {"message": _NOT_FOUND})
        state.webhooks(account).remove(webhook)
        state.save()
    _log().info("webhook deleted", webhook_id=webhook.id, account=account or None)
    return web.Response(status=204)


async def get_public_key(request: web.Request) -> web.Response:
    webhook = request.app[STATE].find(request[ACCOUNT], request.match_info["id"])
    if webhook is None:
        return errors(404, {"message": _NOT_FOUND})
    return web.json_response({"id": webhook.id, "public_key": webhook.public_key()})


async def toggle_signing(request: web.Request) -> web.Response:
    state, account = request.app[STATE], request[ACCOUNT]
    webhook = state.find(account, request.match_info["id"])
    if webhook is None:
        return errors(404, {"message": _NOT_FOUND})
    body = await _body(request, SignatureToggle)
    if isinstance(body, web.Response):
        return body
    async with request.app[LOCK]:
        if body.enabled and webhook.private_key_pem is None:
            # A new key pair each time signing is turned on, as SendGrid does.
            webhook.private_key_pem = (
                generate_private_key()
                .private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
                .decode()
            )
        elif not body.enabled:
            webhook.private_key_pem = None
        webhook.updated_date = _now()
        state.save()
    return web.json_response({"id": webhook.id, "public_key": webhook.public_key()})


async def test_webhook(request: web.Request) -> web.Response:
    body = await _body(request, EventWebhookTestRequest)
    if isinstance(body, web.Response):
        return body
    state, account = request.app[STATE], request[ACCOUNT]
    if not _valid_url(body.url):
        return errors(400, {"message": f"'{body.url}' is not a valid url"})
    webhook = (
        state.find(account, body.id)
        if body.id
        else next((w for w in state.webhooks(account) if w.url == body.url), None)
    )
    if body.id and webhook is None:
        return errors(404, {"message": _NOT_FOUND})
    secret = body.oauth_client_secret
    if not secret and webhook is not None and body.oauth_client_id == webhook.oauth_client_id:
        # The seed: with OAuth already saved, the client id and token URL suffice; SendGrid
        # pulls the stored secret.
        secret = webhook.oauth_client_secret
    oauth_problem = _oauth_problem(body.oauth_client_id, secret, body.oauth_token_url)
    if oauth_problem is None and body.oauth_client_id and not secret:
        oauth_problem = "oauth_client_secret is required for credentials SendGrid has not saved"
    if oauth_problem is not None:
        return errors(400, {"message": oauth_problem})
    oauth = (
        OAuthClientSettings(body.oauth_token_url or "", body.oauth_client_id, secret or "")
        if body.oauth_client_id
        else None
    )
    key = webhook.private_key() if webhook is not None else None
    delivery = await _deliver_test_batch(
        body.url, key, oauth, request.app[CONFIG].test_timeout_seconds
    )
    state.deliveries.append(
        TestDelivery(
            url=body.url,
            webhook_id=webhook.id if webhook else None,
            signed=key is not None,
            oauth=oauth is not None,
            events=delivery[0],
            accepted=delivery[1],
            detail=delivery[2],
        )
    )
    return web.Response(status=204)


async def _deliver_test_batch(
    url: str,
    key: ec.EllipticCurvePrivateKey | None,
    oauth: OAuthClientSettings | None,
    timeout: float,
) -> tuple[int, bool, str | None]:
    """(events, accepted, last error): one signed sample batch, one attempt, no redirects."""
    options = SimulationOptions(
        url=url,
        private_key=key,
        oauth=oauth,
        events=TEST_BATCH_EVENTS,
        concurrency=1,
        request_timeout_seconds=timeout,
        retry_for_seconds=0.0,  # the test endpoint does not retry (the seed)
    )
    summary = await simulate(options)
    _log().info(
        "test batch posted",
        url=url,
        events=summary.events,
        accepted=summary.ok,
        responses=summary.responses,
    )
    return summary.events, summary.ok, summary.last_error


async def serve(
    state: EmulatorState, config: EmulatorConfig, host: str, port: int, stop: asyncio.Event
) -> None:
    """Serve until ``stop`` is set; prints the address it listens on."""
    runner = web.AppRunner(create_app(state, config), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    try:
        bound = runner.addresses[0]
        print(f"SendGrid emulator listening on http://{bound[0]}:{bound[1]}", flush=True)
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await runner.cleanup()
