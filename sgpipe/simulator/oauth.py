"""SendGrid's side of the webhook OAuth flow: client credentials, a cached token, refresh.

SendGrid obtains an access token from the webhook's ``oauth_token_url`` with its client id and
secret, sends ``Authorization: Bearer <token>`` on every POST, keeps the token until it
expires, and fetches a new one when the receiver answers a 4xx whose body contains
``invalid_request``, ``invalid_token`` or ``insufficient_scope``. How SendGrid presents the
client secret is not documented; RFC 6749 section 2.3.1 obliges every token endpoint to accept
HTTP Basic (``client_secret_basic``) and lets it accept the form body (``client_secret_post``),
so Basic is the default here and the other is an option.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote_plus

import aiohttp

ClientAuthMethod = Literal["client_secret_basic", "client_secret_post"]

# Error codes that make SendGrid fetch a new token (RFC 6750 section 3.1).
TOKEN_ERROR_CODES = (b"invalid_request", b"invalid_token", b"insufficient_scope")
# Refresh this long before the announced expiry, so that a token never expires in flight.
_EXPIRY_MARGIN_SECONDS = 30.0
# When the token endpoint announces no lifetime: keep the token until the receiver rejects it.
_DEFAULT_LIFETIME_SECONDS = 3600.0


@dataclass(frozen=True, slots=True)
class OAuthClientSettings:
    token_url: str
    client_id: str
    client_secret: str
    auth_method: ClientAuthMethod = "client_secret_basic"
    scope: str | None = None


class TokenError(Exception):
    """No token could be obtained. ``permanent`` when retrying cannot help (the endpoint
    refused the credentials); otherwise the endpoint was unreachable or failing."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


def is_token_rejection(status: int, body: bytes) -> bool:
    """Would SendGrid fetch a new token after this answer to a POST?"""
    return 400 <= status < 500 and any(code in body for code in TOKEN_ERROR_CODES)


class TokenSource:
    """A cached client-credentials token shared by every concurrent POST.

    ``token()`` returns the cached token or fetches one (one fetch at a time: concurrent callers
    wait for it). ``invalidate(token)`` drops the cache only if it still holds that token, so
    that a burst of rejections of one token costs one fetch, not one per POST.
    """

    def __init__(
        self, session: aiohttp.ClientSession, settings: OAuthClientSettings, timeout: float
    ) -> None:
        self._session = session
        self._settings = settings
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._lock = asyncio.Lock()
        self._token: str | None = None
        self._expires_at = 0.0
        self.requests = 0  # token endpoint calls, for the summary

    async def token(self) -> str:
        async with self._lock:
            if self._token is None or time.monotonic() >= self._expires_at:
                self._token, lifetime = await self._fetch()
                self._expires_at = time.monotonic() + max(0.0, lifetime - _EXPIRY_MARGIN_SECONDS)
            return self._token

    def invalidate(self, token: str) -> None:
        if self._token == token:
            self._token = None

    async def _fetch(self) -> tuple[str, float]:
        settings = self._settings
        form = {"grant_type": "client_credentials"}
        if settings.scope:
            form["scope"] = settings.scope
        headers = {"Accept": "application/json"}
        if settings.auth_method == "client_secret_basic":
            # RFC 6749 section 2.3.1: both parts form-urlencoded before Basic encoding.
            credentials = f"{quote_plus(settings.client_id)}:{quote_plus(settings.client_secret)}"
            headers["Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode()
        else:
            form["client_id"] = settings.client_id
            form["client_secret"] = settings.client_secret
        self.requests += 1
        try:
            async with self._session.post(
                settings.token_url,
                data=form,
                headers=headers,
                allow_redirects=False,
                timeout=self._timeout,
            ) as response:
                body = await response.content.read(65_536)
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TokenError(f"token endpoint unreachable: {exc!r}", permanent=False) from exc
        if status != 200:
            detail = body[:200].decode("utf-8", "replace")
            # 4xx (bad credentials, unknown client) will not heal by itself; 408/429/5xx may.
            permanent = 400 <= status < 500 and status not in (408, 429)
            raise TokenError(f"token endpoint answered {status}: {detail}", permanent=permanent)
        return _parse_token_response(body)


def _parse_token_response(body: bytes) -> tuple[str, float]:
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise TokenError("token endpoint answered 200 without JSON", permanent=True) from exc
    token = document.get("access_token") if isinstance(document, dict) else None
    if not isinstance(token, str) or not token:
        raise TokenError("token endpoint answered 200 without an access_token", permanent=True)
    lifetime = document.get("expires_in", _DEFAULT_LIFETIME_SECONDS)
    if isinstance(lifetime, str) and lifetime.isdigit():
        lifetime = int(lifetime)  # some servers send it as a string
    if isinstance(lifetime, bool) or not isinstance(lifetime, int | float):
        lifetime = _DEFAULT_LIFETIME_SECONDS
    return token, float(lifetime)
