"""A client of SendGrid's Webhooks API (Event Webhook settings), on aiohttp.

Every operation of schemas/sendgrid/event-webhooks-openapi.yaml is one method; answers are
validated with the models of ``models``. A non-2xx answer raises ``SendGridApiError`` whose
message is one line a person can act on, built from SendGrid's ``errors`` body (the existing
webhook's id for a duplicate URL, the limit for the maximum reached, the key for 401/403).

The API key is sent in the ``Authorization`` header and nowhere else: it is never logged, never
part of an error message (``_redact`` removes it from anything a server echoes back), and the
debug log names method, path and status only.
"""

from __future__ import annotations

import json
from types import TracebackType
from typing import Any, Final, Literal, TypeVar
from urllib.parse import quote

import aiohttp
import structlog
from pydantic import SecretStr, ValidationError

from sgpipe.webhooks.models import (
    ApiErrorBody,
    EventWebhook,
    EventWebhookList,
    EventWebhookRequest,
    EventWebhookTestRequest,
    SignedPublicKey,
)


def _log() -> Any:
    # Looked up at each use, not cached at import: the CLI may reconfigure logging (a new
    # stream) between commands run in one process, and a cached logger keeps the old stream.
    return structlog.get_logger("sgpipe.webhooks")


Region = Literal["global", "eu"]
# The two servers of the seed's OpenAPI document.
SERVERS: Final[dict[Region, str]] = {
    "global": "https://api.sendgrid.com",
    "eu": "https://api.eu.sendgrid.com",
}
SETTINGS_PATH: Final = "/v3/user/webhooks/event/settings"
_REDACTED = "[redacted]"
_ERROR_BODY_BYTES = 65_536


class SendGridApiError(Exception):
    """SendGrid answered an error, or could not be reached (``status`` None). ``str()`` is one
    line; ``existing_id`` is the id SendGrid names for a duplicate URL."""

    def __init__(self, status: int | None, message: str, existing_id: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.existing_id = existing_id


def base_url_for(region: Region, api_base_url: str | None) -> str:
    return (api_base_url or SERVERS[region]).rstrip("/")


class WebhooksClient:
    """One API key, one server, optionally one subuser (``on_behalf_of``). Use as an async
    context manager; each method makes one request and raises SendGridApiError on failure."""

    def __init__(
        self,
        api_key: SecretStr,
        base_url: str,
        *,
        on_behalf_of: str | None = None,
        timeout_seconds: float = 30.0,
    ) -> None:
        self._api_key = api_key
        self.base_url = base_url.rstrip("/")
        self._on_behalf_of = on_behalf_of
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> WebhooksClient:
        self._session = aiohttp.ClientSession(
            timeout=self._timeout, cookie_jar=aiohttp.DummyCookieJar()
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- operations (operationId of the OpenAPI document) --------------------------------

    async def list(self, *, include_account_status_change: bool = False) -> EventWebhookList:
        """ListEventWebhook."""
        answer = await self._request(
            "GET", f"{SETTINGS_PATH}/all", query=_include(include_account_status_change)
        )
        return _parse(EventWebhookList, answer)

    async def get(
        self, webhook_id: str, *, include_account_status_change: bool = False
    ) -> EventWebhook:
        """GetEventWebhook."""
        answer = await self._request(
            "GET",
            f"{SETTINGS_PATH}/{_segment(webhook_id)}",
            query=_include(include_account_status_change),
            webhook_id=webhook_id,
        )
        return _parse(EventWebhook, answer)

    async def create(self, request: EventWebhookRequest) -> EventWebhook:
        """CreateEventWebhook (201)."""
        answer = await self._request("POST", SETTINGS_PATH, body=request.body())
        return _parse(EventWebhook, answer)

    async def update(
        self,
        webhook_id: str,
        request: EventWebhookRequest,
        *,
        include_account_status_change: bool = False,
    ) -> EventWebhook:
        """UpdateEventWebhook."""
        answer = await self._request(
            "PATCH",
            f"{SETTINGS_PATH}/{_segment(webhook_id)}",
            body=request.body(),
            query=_include(include_account_status_change),
            webhook_id=webhook_id,
        )
        return _parse(EventWebhook, answer)

    async def delete(self, webhook_id: str) -> None:
        """DeleteEventWebhook (204)."""
        await self._request(
            "DELETE", f"{SETTINGS_PATH}/{_segment(webhook_id)}", webhook_id=webhook_id
        )

    async def set_signing(self, webhook_id: str, *, enabled: bool) -> SignedPublicKey:
        """UpdateSignedEventWebhook: the public key when enabled, "" when disabled."""
        answer = await self._request(
            "PATCH",
            f"{SETTINGS_PATH}/signed/{_segment(webhook_id)}",
            body={"enabled": enabled},
            webhook_id=webhook_id,
        )
        return _parse(SignedPublicKey, answer)

    async def public_key(self, webhook_id: str) -> SignedPublicKey:
        """GetSignedEventWebhook."""
        answer = await self._request(
            "GET", f"{SETTINGS_PATH}/signed/{_segment(webhook_id)}", webhook_id=webhook_id
        )
        return _parse(SignedPublicKey, answer)

    async def test(self, request: EventWebhookTestRequest) -> None:
        """TestEventWebhook (204): SendGrid POSTs a sample batch to ``request.url``."""
        await self._request(
            "POST", "/v3/user/webhooks/event/test", body=request.model_dump(exclude_none=True)
        )

    # --- the one request path ----------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        query: dict[str, str] | None = None,
        webhook_id: str | None = None,
    ) -> Any:
        if self._session is None:
            raise RuntimeError("WebhooksClient is used outside its `async with`")
        headers = {
            "Authorization": f"Bearer {self._api_key.get_secret_value()}",
            "Accept": "application/json",
        }
        if self._on_behalf_of:
            headers["on-behalf-of"] = self._on_behalf_of
        try:
            async with self._session.request(
                method,
                self.base_url + path,
                json=body,
                params=query,
                headers=headers,
                allow_redirects=False,
            ) as response:
                status = response.status
                raw = await response.content.read(_ERROR_BODY_BYTES)
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = self._redact(str(exc) or type(exc).__name__)
            raise SendGridApiError(None, f"cannot reach {self.base_url}: {reason}") from None
        _log().debug("sendgrid api request", method=method, path=path, status=status)
        if 200 <= status < 300:
            if not raw.strip():
                return None
            try:
                return json.loads(raw)
            except ValueError:
                raise SendGridApiError(
                    status, f"{method} {path}: answer {status} is not JSON"
                ) from None
        raise self._error(method, path, status, raw, webhook_id)

    def _error(
        self, method: str, path: str, status: int, raw: bytes, webhook_id: str | None
    ) -> SendGridApiError:
        messages: list[str] = []
        existing_id: str | None = None
        try:
            parsed = ApiErrorBody.model_validate_json(raw)
        except ValidationError:
            parsed = ApiErrorBody()
        for item in parsed.errors:
            text = item.message.strip()
            if item.id:
                existing_id = item.id
                text += f" (existing webhook id {item.id})"
            if item.field:
                text = f"{item.field}: {text}"
            messages.append(text)
        detail = "; ".join(message for message in messages if message) or (
            raw[:200].decode("utf-8", "replace").strip() or "no details"
        )
        detail = self._redact(" ".join(detail.split()))
        if status == 401:
            line = (
                f"SendGrid refused the API key (401: {detail}): check SENDGRID_API_KEY or "
                "sendgrid.api_key"
            )
        elif status == 403:
            line = (
                f"the API key may not do this (403: {detail}): it needs the Mail Settings "
                "(Event Webhook) permission"
                + (f", and access to subuser {self._on_behalf_of!r}" if self._on_behalf_of else "")
            )
        elif status == 404 and webhook_id is not None:
            line = f"no webhook with id {webhook_id!r} (404: {detail})"
        else:
            line = f"SendGrid answered {status} to {method} {path}: {detail}"
        return SendGridApiError(status, line, existing_id)

    def _redact(self, text: str) -> str:
        key = self._api_key.get_secret_value()
        return text.replace(key, _REDACTED) if key else text


def _include(account_status_change: bool) -> dict[str, str] | None:
    return {"include": "account_status_change"} if account_status_change else None


def _segment(webhook_id: str) -> str:
    return quote(webhook_id, safe="")


_Model = TypeVar("_Model", EventWebhook, EventWebhookList, SignedPublicKey)


def _parse(model: type[_Model], answer: Any) -> _Model:
    try:
        return model.model_validate(answer if answer is not None else {})
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(part) for part in problem["loc"]) or "body"
        raise SendGridApiError(
            None, f"SendGrid's answer does not fit its API ({where}: {problem['msg']})"
        ) from None
