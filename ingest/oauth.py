"""OAuth 2.0 on the ingress: the built-in token endpoint and bearer-token checks.

SendGrid can authenticate to a webhook as an OAuth 2.0 client (client-credentials grant): it
posts its client id and secret to the webhook's ``oauth_token_url``, caches the access token,
sends it as ``Authorization: Bearer``, and fetches a new one when a POST is answered 4xx with
``invalid_token`` in the body. This module gives the ingress both sides a team may need:

* ``POST /oauth/token`` (``token_endpoint``): a client-credentials token endpoint for teams
  without an identity provider. Clients are configured per webhook (``oauth_clients``: id and a
  scrypt hash of the secret); tokens are ES256 JWTs signed with the first of
  ``ingest.oauth_signing_keys`` and verified with any of them, so every replica that shares the
  keys (a Secret) accepts every replica's tokens.
* ``BearerVerifier``: checks a webhook's bearer JWTs, from the built-in endpoint or from the
  team's identity provider (issuer, audience, exp/nbf with leeway, a key from the IdP's JWKS,
  asymmetric algorithms only).

JWT encoding, decoding and JWK parsing are PyJWT's. What is written here is the policy around
it, kept small: which key and algorithms a token may use, the JWKS refresh rule (on an unknown
``kid``, at most once per ``ingest.oauth_jwks_refresh_seconds``), the client-secret hash
(stdlib scrypt, compared in constant time, successful checks cached briefly and at most
``_KDF_CONCURRENCY`` at once, so that the slow hash cannot be turned into a denial of service),
and RFC 6749/6750 answers.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import hmac
import json
import os
import secrets
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote_plus

import aiohttp
import jwt
import structlog
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from sgpipe.runtime import metrics
from sgpipe.runtime.metrics import STAGE_INGEST
from sgpipe.runtime.secret_files import private_file_problem
from sgpipe.runtime.settings import ConfigError, IngestSettings, Settings, WebhookSettings

log = structlog.get_logger(__name__)

TOKEN_PATH: Final = "/oauth/token"
BUILT_IN_ALGORITHM: Final = "ES256"

# scrypt cost: n=2**14, r=8 takes ~16 MiB and ~40 ms a check. Secrets are 256-bit random, so
# the hash guards a leaked config, not a guessable password; the cost bound below matters more.
_SCRYPT_LOG2_N: Final = 14
_SCRYPT_R: Final = 8
_SCRYPT_P: Final = 1
# At most this many secret checks run at once (each in a thread), and at most this many wait;
# beyond that the token endpoint answers 503 at once instead of queueing CPU work.
_KDF_CONCURRENCY: Final = 2
_KDF_MAX_WAITING: Final = 32
# A secret checked successfully is not hashed again for this long (bounded number of entries).
_VERIFIED_SECRET_SECONDS: Final = 300.0
_VERIFIED_SECRET_ENTRIES: Final = 1024
# Verified bearer tokens are remembered (until they expire) so that a token SendGrid reuses for
# thousands of POSTs costs one signature check, not one per POST.
_VERIFIED_TOKEN_ENTRIES: Final = 4096
_MAX_TOKEN_CHARS: Final = 8192
_JWKS_TIMEOUT_SECONDS: Final = 10.0
_JWKS_MAX_BYTES: Final = 1_048_576
# The JWKS refresh clock and the clock tokens are issued by (module attributes so that tests
# can move them: a token that expires while SendGrid still caches it).
_monotonic = time.monotonic
_issue_clock = time.time


# --- client secrets ---------------------------------------------------------------------------


def hash_client_secret(secret: str) -> str:
    """``scrypt$<log2 n>$<r>$<p>$<salt>$<hash>`` (base64url): what config and Secrets hold."""
    salt = secrets.token_bytes(16)
    derived = _scrypt(secret.encode(), salt, _SCRYPT_LOG2_N, _SCRYPT_R, _SCRYPT_P)
    return "$".join(
        ("scrypt", str(_SCRYPT_LOG2_N), str(_SCRYPT_R), str(_SCRYPT_P), _b64(salt), _b64(derived))
    )


def verify_client_secret(secret: str, encoded: str) -> bool:
    """Whether ``secret`` matches ``encoded`` (from hash_client_secret, or pbkdf2-sha256);
    slow by design, constant-time comparison."""
    parts = encoded.split("$")
    try:
        if parts[0] == "scrypt" and len(parts) == 6:
            log2_n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
            salt, expected = _unb64(parts[4]), _unb64(parts[5])
            derived = _scrypt(secret.encode(), salt, log2_n, r, p, len(expected))
        elif parts[0] == "pbkdf2-sha256" and len(parts) == 4:
            iterations, salt, expected = int(parts[1]), _unb64(parts[2]), _unb64(parts[3])
            derived = hashlib.pbkdf2_hmac(
                "sha256", secret.encode(), salt, iterations, len(expected)
            )
        else:
            return False
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(derived, expected)


def check_secret_hash(encoded: str) -> None:
    """ConfigError unless ``encoded`` is a hash this module can check."""
    parts = encoded.split("$")
    try:
        if parts[0] == "scrypt" and len(parts) == 6:
            log2_n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
            if not (10 <= log2_n <= 20 and 1 <= r <= 16 and 1 <= p <= 4):
                raise ValueError("scrypt parameters out of range")
            _unb64(parts[4])
            if len(_unb64(parts[5])) < 16:
                raise ValueError("hash too short")
            return
        if parts[0] == "pbkdf2-sha256" and len(parts) == 4:
            if int(parts[1]) < 100_000:
                raise ValueError("fewer than 100000 iterations")
            _unb64(parts[2])
            _unb64(parts[3])
            return
    except (ValueError, binascii.Error) as exc:
        raise ConfigError(f"not a usable client secret hash: {exc}") from exc
    raise ConfigError("not a client secret hash (scrypt$... or pbkdf2-sha256$...)")


def _scrypt(secret: bytes, salt: bytes, log2_n: int, r: int, p: int, length: int = 32) -> bytes:
    n = 1 << log2_n
    return hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, maxmem=256 * n * r * p, dklen=length)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_client_credentials() -> tuple[str, str]:
    """A fresh (client id, client secret): 128 and 256 random bits."""
    return secrets.token_hex(16), secrets.token_urlsafe(32)


# --- signing keys -----------------------------------------------------------------------------


def generate_signing_key_pem() -> str:
    """A new P-256 private key, PEM (PKCS#8), for ``ingest.oauth_signing_keys``."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    private_key: ec.EllipticCurvePrivateKey

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.private_key.public_key()


def load_signing_keys(ingest: IngestSettings) -> tuple[SigningKey, ...]:
    """The token endpoint's keys, files first, then inline; ConfigError naming a bad one."""
    found: list[tuple[str, str]] = []
    for path in ingest.oauth_signing_key_files:
        found.append((str(path), _read_signing_key_file(Path(path))))
    for index, secret in enumerate(ingest.oauth_signing_keys):
        found.append((f"ingest.oauth_signing_keys[{index}]", secret.get_secret_value()))
    keys = []
    for where, pem in found:
        try:
            key = serialization.load_pem_private_key(pem.encode(), password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{where}: not an unencrypted PEM private key") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
            key.curve, ec.SECP256R1
        ):
            raise ConfigError(f"{where}: the token endpoint signs with P-256 (ES256) keys")
        keys.append(SigningKey(_thumbprint(key.public_key()), key))
    return tuple(keys)


def _read_signing_key_file(path: Path) -> str:
    """The PEM in ``path``, refused like every secrets file when others could read or replace
    it (anyone who reads it can mint tokens SendGrid's batches would be accepted with). A
    symlink is followed: a Kubernetes Secret volume's files are symlinks into its ``..data``."""
    try:
        # Non-blocking: a FIFO in the key's place is refused below instead of hanging the start.
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as handle:
            problem = private_file_problem(path, os.fstat(handle.fileno()), kubernetes_secret=True)
            if problem is not None:
                raise ConfigError(f"ingest.oauth_signing_key_files: {problem}")
            return handle.read().decode("utf-8")
    except OSError as exc:
        raise ConfigError(
            f"ingest.oauth_signing_key_files: cannot read {path}: {exc.strerror}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not an unencrypted PEM private key") from exc


def _public_jwk(key: ec.EllipticCurvePublicKey) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(ECAlgorithm.to_jwk(key))
    return jwk


def _thumbprint(key: ec.EllipticCurvePublicKey) -> str:
    # RFC 7638: SHA-256 over the required members in lexicographic order, no whitespace.
    jwk = _public_jwk(key)
    canonical = json.dumps(
        {name: jwk[name] for name in ("crv", "kty", "x", "y")}, separators=(",", ":")
    )
    return _b64(hashlib.sha256(canonical.encode()).digest())


def built_in_audience(issuer: str, webhook: str) -> str:
    """The ``aud`` of built-in tokens for ``webhook``: a token for one webhook is refused by
    every other."""
    return f"{issuer}/webhooks/{webhook}"


# --- the token endpoint -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RegisteredClient:
    client_id: str
    webhook: str
    secret_hash: str


class ClientRegistry:
    """The built-in endpoint's clients, checked against their secret hashes.

    ``authenticate`` blocks (in a thread) for one KDF unless the same id and secret succeeded
    within ``_VERIFIED_SECRET_SECONDS``; at most ``_KDF_CONCURRENCY`` KDFs run at once and at
    most ``_KDF_MAX_WAITING`` wait, beyond which it raises ``TokenEndpointBusy``.
    """

    def __init__(self, clients: Mapping[str, RegisteredClient]) -> None:
        self._clients = dict(clients)
        self._kdf_slots = asyncio.Semaphore(_KDF_CONCURRENCY)
        self._waiting = 0
        # sha256(client id NUL secret) -> monotonic expiry; never the secret itself.
        self._verified: dict[bytes, float] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> ClientRegistry:
        clients: dict[str, RegisteredClient] = {}
        for webhook in settings.webhooks:
            for index, client in enumerate(webhook.oauth_clients):
                where = f"webhooks[{webhook.name}].oauth_clients[{index}]"
                if client.client_id in clients:
                    raise ConfigError(
                        f"{where}: client_id {client.client_id} is also a client of webhook "
                        f"{clients[client.client_id].webhook}; a client belongs to one webhook"
                    )
                try:
                    check_secret_hash(client.secret_hash)
                except ConfigError as exc:
                    raise ConfigError(f"{where}.secret_hash: {exc}") from exc
                clients[client.client_id] = RegisteredClient(
                    client.client_id, webhook.name, client.secret_hash
                )
        return cls(clients)

    def __bool__(self) -> bool:
        return bool(self._clients)

    async def authenticate(self, client_id: str, secret: str) -> RegisteredClient | None:
        client = self._clients.get(client_id)
        # An unknown id costs a KDF too, so that timing does not reveal which ids exist.
        encoded = client.secret_hash if client is not None else _decoy_hash()
        fingerprint = hashlib.sha256(f"{client_id}\0{secret}".encode()).digest()
        now = time.monotonic()
        if client is not None and self._verified.get(fingerprint, 0.0) > now:
            return client
        if self._waiting >= _KDF_MAX_WAITING:
            raise TokenEndpointBusy
        self._waiting += 1
        try:
            async with self._kdf_slots:
                ok = await asyncio.to_thread(verify_client_secret, secret, encoded)
        finally:
            self._waiting -= 1
        if client is None or not ok:
            return None
        if len(self._verified) >= _VERIFIED_SECRET_ENTRIES:
            self._verified = {k: v for k, v in self._verified.items() if v > now}
            if len(self._verified) >= _VERIFIED_SECRET_ENTRIES:
                self._verified.pop(next(iter(self._verified)))
        self._verified[fingerprint] = now + _VERIFIED_SECRET_SECONDS
        return client


@functools.cache
def _decoy_hash() -> str:
    # A valid hash of a random secret, checked for unknown client ids (same cost as a real one);
    # made on first use, not at import (it costs a KDF).
    return hash_client_secret(secrets.token_urlsafe(32))


class TokenEndpointBusy(Exception):
    """Too many secret checks are running or waiting."""


@dataclass(frozen=True, slots=True)
class TokenIssuer:
    issuer: str
    ttl_seconds: int
    keys: tuple[SigningKey, ...]

    def issue(self, client: RegisteredClient, now: float) -> str:
        key = self.keys[0]
        issued_at = int(now)
        claims = {
            "iss": self.issuer,
            "sub": client.client_id,
            "aud": built_in_audience(self.issuer, client.webhook),
            "iat": issued_at,
            "nbf": issued_at,
            "exp": issued_at + self.ttl_seconds,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(
            claims, key.private_key, algorithm=BUILT_IN_ALGORITHM, headers={"kid": key.kid}
        )

    def jwks(self) -> dict[str, Any]:
        keys = []
        for key in self.keys:
            jwk = _public_jwk(key.public_key)
            jwk.update(kid=key.kid, use="sig", alg=BUILT_IN_ALGORITHM)
            keys.append(jwk)
        return {"keys": keys}


@dataclass(frozen=True, slots=True)
class TokenEndpoint:
    clients: ClientRegistry
    issuer: TokenIssuer


TOKEN_ENDPOINT = web.AppKey("oauth_token_endpoint", TokenEndpoint)


def token_error(
    status: int, error: str, description: str, *, basic_challenge: bool = False
) -> web.Response:
    """An RFC 6749 section 5.2 error answer (never cached)."""
    response = web.json_response({"error": error, "error_description": description}, status=status)
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"
    if basic_challenge:
        response.headers["WWW-Authenticate"] = 'Basic realm="sgpipe", charset="UTF-8"'
    return response


def _token_outcome(outcome: str) -> None:
    metrics.OAUTH_TOKEN_REQUESTS.labels(STAGE_INGEST, outcome).inc()


async def token_endpoint(request: web.Request) -> web.Response:
    """``POST /oauth/token``: client credentials by HTTP Basic or form body, RFC 6749."""
    endpoint = request.app[TOKEN_ENDPOINT]
    content_type = request.headers.get("Content-Type", "")
    if content_type.split(";")[0].strip().lower() != "application/x-www-form-urlencoded":
        _token_outcome("invalid_request")
        return token_error(
            400, "invalid_request", "the body must be application/x-www-form-urlencoded"
        )
    if request.content_length is not None and request.content_length > 16_384:
        _token_outcome("invalid_request")
        return token_error(400, "invalid_request", "the request body is too large")
    try:
        form = await request.post()
    except (ValueError, web.HTTPException):
        _token_outcome("invalid_request")
        return token_error(400, "invalid_request", "the body is not a valid form")
    fields: dict[str, str] = {}
    for name in ("grant_type", "client_id", "client_secret", "scope"):
        values = form.getall(name, [])
        if len(values) > 1:  # RFC 6749 section 3.2: parameters must not repeat
            _token_outcome("invalid_request")
            return token_error(400, "invalid_request", f"parameter {name} is repeated")
        if values:
            if not isinstance(values[0], str):
                _token_outcome("invalid_request")
                return token_error(400, "invalid_request", f"parameter {name} is not text")
            fields[name] = values[0]

    basic = _basic_credentials(request.headers.get("Authorization"))
    used_basic = basic is not None
    if request.headers.get("Authorization") and basic is None:
        _token_outcome("invalid_client")
        return token_error(
            401,
            "invalid_client",
            "the Authorization header is not valid HTTP Basic",
            basic_challenge=True,
        )
    if basic is not None and ("client_secret" in fields):
        _token_outcome("invalid_request")
        return token_error(
            400, "invalid_request", "use one client authentication method, not Basic and the body"
        )
    grant_type = fields.get("grant_type")
    if grant_type is None:
        _token_outcome("invalid_request")
        return token_error(400, "invalid_request", "grant_type is missing")
    if grant_type != "client_credentials":
        _token_outcome("unsupported_grant_type")
        return token_error(
            400, "unsupported_grant_type", "only the client_credentials grant is supported"
        )
    if basic is not None:
        client_id, secret = basic
    else:
        client_id, secret = fields.get("client_id", ""), fields.get("client_secret", "")
        if not client_id or not secret:
            _token_outcome("invalid_client")
            # No credentials at all: a 401 challenge tells the client to use Basic.
            return token_error(
                401, "invalid_client", "client authentication is missing", basic_challenge=True
            )
    try:
        client = await endpoint.clients.authenticate(client_id, secret)
    except TokenEndpointBusy:
        _token_outcome("busy")
        response = token_error(503, "temporarily_unavailable", "too many token requests; retry")
        response.headers["Retry-After"] = "1"
        return response
    if client is None:
        _token_outcome("invalid_client")
        log.warning("token request refused: invalid client", basic=used_basic)
        return token_error(
            401, "invalid_client", "unknown client or wrong secret", basic_challenge=used_basic
        )
    token = endpoint.issuer.issue(client, _issue_clock())
    _token_outcome("issued")
    log.info("issued access token", webhook=client.webhook, client_id=client.client_id)
    response = web.json_response(
        {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": endpoint.issuer.ttl_seconds,
        }
    )
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"
    return response


def _basic_credentials(header: str | None) -> tuple[str, str] | None:
    if not header:
        return None
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    client_id, separator, secret = decoded.partition(":")
    if not separator:
        return None
    # RFC 6749 section 2.3.1: both parts are form-urlencoded before the Basic encoding.
    return unquote_plus(client_id), unquote_plus(secret)


async def jwks_endpoint(request: web.Request) -> web.Response:
    """``GET /oauth/jwks``: the public keys of the built-in endpoint (for other verifiers)."""
    return web.json_response(request.app[TOKEN_ENDPOINT].issuer.jwks())


def build_token_endpoint(settings: Settings) -> TokenEndpoint | None:
    """The endpoint when any webhook has built-in clients; ConfigError if it has no key."""
    clients = ClientRegistry.from_settings(settings)
    if not clients:
        return None
    keys = load_signing_keys(settings.ingest)
    if not keys:
        raise ConfigError(
            "webhooks have oauth_clients but ingest.oauth_signing_keys (or "
            "ingest.oauth_signing_key_files) is empty: the token endpoint needs a key "
            "(`sgpipe oauth key create`)"
        )
    issuer = TokenIssuer(
        settings.ingest.oauth_issuer, settings.ingest.oauth_token_ttl_seconds, keys
    )
    return TokenEndpoint(clients, issuer)


# --- bearer tokens ----------------------------------------------------------------------------


class TokenRejected(Exception):
    """A bearer token was refused. ``reason`` is a metric label; ``missing`` means no token was
    sent (RFC 6750: then the challenge carries no error code)."""

    def __init__(self, reason: str, description: str, *, missing: bool = False) -> None:
        super().__init__(description)
        self.reason = reason
        self.description = description
        self.missing = missing


class TokenCheckUnavailable(Exception):
    """The identity provider's keys could not be loaded: the token may be valid (503)."""


class JwksCache:
    """An identity provider's JWKS: fetched at start, then again only for an unknown ``kid``
    and at most once per ``refresh_seconds`` (one fetch at a time)."""

    def __init__(self, url: str, refresh_seconds: float) -> None:
        self.url = url
        self._refresh_seconds = refresh_seconds
        self._keys: dict[str, jwt.PyJWK] = {}
        self._declared: dict[str, str] = {}
        self._loaded = False
        self._last_attempt = -float("inf")
        self._lock = asyncio.Lock()
        self.fetches = 0
        self.on_refresh: list[Any] = []

    @property
    def loaded(self) -> bool:
        return self._loaded

    async def refresh(self, session: aiohttp.ClientSession) -> bool:
        """Fetch now; False (logged) if the IdP did not answer with a usable JWKS."""
        self._last_attempt = _monotonic()
        self.fetches += 1
        try:
            timeout = aiohttp.ClientTimeout(total=_JWKS_TIMEOUT_SECONDS)
            async with session.get(self.url, timeout=timeout, allow_redirects=False) as response:
                body = await response.content.read(_JWKS_MAX_BYTES)
                if response.status != 200:
                    raise ValueError(f"HTTP {response.status}")
            document = json.loads(body)
            key_set = jwt.PyJWKSet.from_dict(document)
        except (aiohttp.ClientError, TimeoutError, ValueError, jwt.PyJWTError) as exc:
            log.error("cannot load the identity provider's JWKS", url=self.url, error=repr(exc))
            return False
        keys = {key.key_id: key for key in key_set.keys if key.key_id}
        declared = {
            entry["kid"]: entry["alg"]
            for entry in document.get("keys", [])
            if isinstance(entry, dict)
            and isinstance(entry.get("kid"), str)
            and isinstance(entry.get("alg"), str)
        }
        if not keys:
            log.error("the identity provider's JWKS has no key with a kid", url=self.url)
            return False
        self._keys = keys
        self._declared = declared
        self._loaded = True
        for callback in self.on_refresh:
            callback()
        log.info("loaded the identity provider's JWKS", url=self.url, kids=sorted(keys))
        return True

    def declared_algorithm(self, kid: str) -> str | None:
        return self._declared.get(kid)

    async def key(self, kid: str, session: aiohttp.ClientSession) -> jwt.PyJWK | None:
        found = self._keys.get(kid)
        if found is not None:
            return found
        async with self._lock:
            found = self._keys.get(kid)
            if found is None and _monotonic() - self._last_attempt >= self._refresh_seconds:
                await self.refresh(session)
                found = self._keys.get(kid)
        if found is None and not self._loaded:
            raise TokenCheckUnavailable(f"the JWKS at {self.url} could not be loaded")
        return found


@dataclass(frozen=True, slots=True)
class _TrustedIssuer:
    """Where a webhook's tokens may come from: the built-in endpoint or an IdP."""

    issuer: str
    audience: str
    algorithms: tuple[str, ...]
    static_keys: Mapping[str, Any] | None = None  # kid -> public key (built-in)
    jwks: JwksCache | None = None


class BearerVerifier:
    """One webhook's bearer-token check. ``verify`` returns the token's subject or raises
    TokenRejected (401) or TokenCheckUnavailable (503)."""

    def __init__(
        self, webhook: str, issuers: Sequence[_TrustedIssuer], leeway_seconds: int
    ) -> None:
        self.webhook = webhook
        self._issuers = {trusted.issuer: trusted for trusted in issuers}
        self._leeway = leeway_seconds
        # token -> (exp, subject); only tokens whose signature and claims were verified.
        self._verified: dict[str, tuple[float, str]] = {}
        for trusted in issuers:
            if trusted.jwks is not None:
                trusted.jwks.on_refresh.append(self._verified.clear)

    @property
    def jwks_caches(self) -> list[JwksCache]:
        return [t.jwks for t in self._issuers.values() if t.jwks is not None]

    async def verify(self, authorization: str | None, session: aiohttp.ClientSession) -> str:
        token = _bearer_token(authorization)
        now = time.time()
        cached = self._verified.get(token)
        if cached is not None and cached[0] + self._leeway > now:
            return cached[1]
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise TokenRejected("malformed_token", "the bearer token is not a JWT") from exc
        issuer = unverified.get("iss")
        trusted = self._issuers.get(issuer) if isinstance(issuer, str) else None
        if trusted is None:
            raise TokenRejected("wrong_issuer", "the token's issuer is not trusted here")
        algorithm = header.get("alg")
        if algorithm not in trusted.algorithms:
            raise TokenRejected(
                "disallowed_algorithm",
                f"tokens must be signed with one of {', '.join(trusted.algorithms)}",
            )
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenRejected("unknown_kid", "the token names no signing key (kid)")
        key = await self._key(trusted, kid, algorithm, session)
        if key is None:
            raise TokenRejected("unknown_kid", "the token's signing key (kid) is not known")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=trusted.audience,
                issuer=trusted.issuer,
                leeway=self._leeway,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise TokenRejected("expired", "the token has expired") from exc
        except jwt.ImmatureSignatureError as exc:
            raise TokenRejected("not_yet_valid", "the token is not valid yet") from exc
        except jwt.InvalidAudienceError as exc:
            raise TokenRejected("wrong_audience", "the token is not for this webhook") from exc
        except jwt.InvalidIssuerError as exc:
            raise TokenRejected("wrong_issuer", "the token's issuer is not trusted here") from exc
        except jwt.InvalidSignatureError as exc:
            raise TokenRejected(
                "invalid_token_signature", "the token's signature is invalid"
            ) from exc
        except jwt.PyJWTError as exc:
            # Also a key of another type than the algorithm needs (an EC key for RS256).
            raise TokenRejected("malformed_token", f"the token is not acceptable: {exc}") from exc
        subject = str(claims.get("sub", ""))
        self._remember(token, float(claims["exp"]), subject, now)
        return subject

    async def _key(
        self, trusted: _TrustedIssuer, kid: str, algorithm: str, session: aiohttp.ClientSession
    ) -> Any:
        if trusted.static_keys is not None:
            return trusted.static_keys.get(kid)
        assert trusted.jwks is not None
        found = await trusted.jwks.key(kid, session)
        if found is None:
            return None
        declared = trusted.jwks.declared_algorithm(kid)
        if declared is not None and declared != algorithm:
            # A JWK that declares its algorithm (RFC 7517 "alg") may only be used with it.
            raise TokenRejected("disallowed_algorithm", "the signing key is for another algorithm")
        return found.key

    def _remember(self, token: str, expires: float, subject: str, now: float) -> None:
        if len(self._verified) >= _VERIFIED_TOKEN_ENTRIES:
            self._verified = {k: v for k, v in self._verified.items() if v[0] + self._leeway > now}
            if len(self._verified) >= _VERIFIED_TOKEN_ENTRIES:
                self._verified.pop(next(iter(self._verified)))
        self._verified[token] = (expires, subject)


def _bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise TokenRejected(
            "missing_token", "an Authorization: Bearer token is required", missing=True
        )
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise TokenRejected(
            "missing_token", "an Authorization: Bearer token is required", missing=True
        )
    token = token.strip()
    if not token or len(token) > _MAX_TOKEN_CHARS:
        raise TokenRejected("malformed_token", "the bearer token is empty or too long")
    return token


def build_bearer_verifier(
    webhook: WebhookSettings, ingest: IngestSettings, endpoint: TokenEndpoint | None
) -> BearerVerifier | None:
    """The webhook's token check (None unless ``auth`` is token or both); ConfigError when it
    could accept no token at all."""
    if not webhook.accepts_tokens:
        return None
    issuers: list[_TrustedIssuer] = []
    if webhook.oauth_clients and endpoint is not None:
        issuers.append(
            _TrustedIssuer(
                issuer=endpoint.issuer.issuer,
                audience=built_in_audience(endpoint.issuer.issuer, webhook.name),
                algorithms=(BUILT_IN_ALGORITHM,),
                static_keys={key.kid: key.public_key for key in endpoint.issuer.keys},
            )
        )
    if webhook.oauth_jwks_url and webhook.oauth_issuer and webhook.oauth_audience:
        if any(t.issuer == webhook.oauth_issuer for t in issuers):
            raise ConfigError(
                f"webhooks[{webhook.name}].oauth_issuer: the built-in endpoint already uses "
                f"issuer {webhook.oauth_issuer!r}; set ingest.oauth_issuer to another value"
            )
        issuers.append(
            _TrustedIssuer(
                issuer=webhook.oauth_issuer,
                audience=webhook.oauth_audience,
                algorithms=tuple(webhook.oauth_algorithms),
                jwks=JwksCache(webhook.oauth_jwks_url, ingest.oauth_jwks_refresh_seconds),
            )
        )
    if not issuers:
        raise ConfigError(
            f"webhooks[{webhook.name}].auth is {webhook.auth}: set oauth_clients (the built-in "
            "token endpoint) or oauth_issuer, oauth_audience and oauth_jwks_url (your identity "
            "provider)"
        )
    return BearerVerifier(webhook.name, issuers, ingest.oauth_leeway_seconds)


def bearer_challenge(exc: TokenRejected) -> web.Response:
    """RFC 6750 section 3: no error code when no token was sent, ``invalid_token`` otherwise.
    The body carries the code too: SendGrid refreshes its token on a 4xx body that names it."""
    error = "missing_token" if exc.missing else "invalid_token"
    response = web.json_response({"error": error, "error_description": exc.description}, status=401)
    response.headers["WWW-Authenticate"] = (
        "Bearer" if exc.missing else 'Bearer error="invalid_token"'
    )
    return response
