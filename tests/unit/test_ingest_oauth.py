"""OAuth 2.0 on the ingress, over HTTP with a fake publisher: one test per row of the table
"Authentication failures" in docs/ingress.md (status, headers, body), the built-in token
endpoint, an identity provider's JWKS, and valid batches beside the refused ones (all of them
published, none of the refused)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import RSAAlgorithm

import ingest.oauth
from ingest.app import create_app
from ingest.oauth import hash_client_secret, load_signing_keys, verify_client_secret
from schemas.raw_batch import RawBatch
from sgpipe.runtime import metrics
from sgpipe.runtime.settings import ConfigError, Settings
from tests.sendgrid_vector import new_key_pair, sign

Client = TestClient[web.Request, web.Application]

CONTENT_TYPE = "application/json;charset=utf-8"
BODY = b'[{"email":"a@example.com","event":"delivered","sg_event_id":"e1","timestamp":1}]\r\n'
SIGNING_PEM = ingest.oauth.generate_signing_key_pem()
ROTATED_PEM = ingest.oauth.generate_signing_key_pem()
SENDGRID_KEY, SENDGRID_PUBLIC = new_key_pair()
OTHER_KEY, _ = new_key_pair()
CLIENT_ID, CLIENT_SECRET = "sendgrid-main", "s3cret-main-0123456789"
OTHER_ID, OTHER_SECRET = "sendgrid-other", "s3cret-other-0123456789"
BOTH_ID, BOTH_SECRET = "sendgrid-both", "s3cret-both-0123456789"
HASHES = {
    CLIENT_ID: hash_client_secret(CLIENT_SECRET),
    OTHER_ID: hash_client_secret(OTHER_SECRET),
    BOTH_ID: hash_client_secret(BOTH_SECRET),
}
IDP_ISSUER = "https://idp.example.test/"
IDP_AUDIENCE = "sgpipe-idp-hook"
IDP_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
IDP_ROTATED_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


class RecordingPublisher:
    def __init__(self) -> None:
        self.batches: list[RawBatch] = []

    async def publish(self, batch: RawBatch) -> None:
        self.batches.append(batch)


@dataclass
class IdentityProvider:
    """A JWKS endpoint whose keys a test changes (a key rotation)."""

    keys: dict[str, rsa.RSAPrivateKey] = field(default_factory=dict)
    declared: dict[str, str] = field(default_factory=dict)  # kid -> the JWK's "alg"
    fetches: int = 0

    def jwks(self) -> dict[str, Any]:
        found = []
        for kid, key in self.keys.items():
            jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
            jwk.update(kid=kid, use="sig")
            if kid in self.declared:
                jwk["alg"] = self.declared[kid]
            found.append(jwk)
        return {"keys": found}

    async def handle(self, request: web.Request) -> web.Response:
        self.fetches += 1
        return web.json_response(self.jwks())


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(ingest.oauth, "_monotonic", fake)
    return fake


@pytest.fixture
async def idp() -> AsyncIterator[tuple[IdentityProvider, str]]:
    provider = IdentityProvider(keys={"idp-1": IDP_KEY})
    app = web.Application()
    app.router.add_get("/jwks", provider.handle)
    server = TestServer(app)
    await server.start_server()
    try:
        yield provider, str(server.make_url("/jwks"))
    finally:
        await server.close()


def oauth_settings(jwks_url: str, **ingest: Any) -> Settings:
    return Settings.model_validate(
        {
            "ingest": {"oauth_signing_keys": [SIGNING_PEM], "max_body_bytes": 65_536, **ingest},
            "webhooks": [
                {
                    "name": "main",
                    "auth": "token",
                    "oauth_clients": [{"client_id": CLIENT_ID, "secret_hash": HASHES[CLIENT_ID]}],
                },
                {
                    "name": "other",
                    "auth": "token",
                    "oauth_clients": [{"client_id": OTHER_ID, "secret_hash": HASHES[OTHER_ID]}],
                },
                {
                    "name": "both",
                    "auth": "both",
                    "public_keys": [SENDGRID_PUBLIC],
                    "timestamp_tolerance": 600,
                    "oauth_clients": [{"client_id": BOTH_ID, "secret_hash": HASHES[BOTH_ID]}],
                },
                {
                    "name": "signed",
                    "public_keys": [SENDGRID_PUBLIC],
                    "timestamp_tolerance": 600,
                },
                {
                    "name": "idp",
                    "auth": "token",
                    "oauth_issuer": IDP_ISSUER,
                    "oauth_audience": IDP_AUDIENCE,
                    "oauth_jwks_url": jwks_url,
                },
            ],
        }
    )


@pytest.fixture
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
async def client(
    publisher: RecordingPublisher, idp: tuple[IdentityProvider, str], clock: Clock
) -> AsyncIterator[Client]:
    app = create_app(oauth_settings(idp[1]), publisher)
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


@pytest.fixture(autouse=True)
def published_are_exactly_the_accepted(publisher: RecordingPublisher) -> Iterator[list[str]]:
    """Every test lists the request ids it got 2xx for; exactly those batches were published."""
    accepted: list[str] = []
    yield accepted
    assert [batch.request_id for batch in publisher.batches] == accepted


# --- helpers -----------------------------------------------------------------------------------


def built_in_kid() -> str:
    (key,) = load_signing_keys(
        Settings.model_validate({"ingest": {"oauth_signing_keys": [SIGNING_PEM]}}).ingest
    )
    return key.kid


def built_in_token(webhook: str = "main", **claims: Any) -> str:
    now = int(time.time())
    payload = {
        "iss": "sgpipe",
        "sub": CLIENT_ID,
        "aud": f"sgpipe/webhooks/{webhook}",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        **claims,
    }
    key = serialization.load_pem_private_key(SIGNING_PEM.encode(), password=None)
    return jwt.encode(payload, key, algorithm="ES256", headers={"kid": built_in_kid()})  # type: ignore[arg-type]


def idp_token(key: rsa.RSAPrivateKey = IDP_KEY, kid: str = "idp-1", **claims: Any) -> str:
    now = int(time.time())
    payload = {
        "iss": IDP_ISSUER,
        "aud": IDP_AUDIENCE,
        "sub": "sendgrid",
        "iat": now,
        "exp": now + 600,
    }
    payload.update(claims)
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": kid})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": CONTENT_TYPE}


def signed(
    key: ec.EllipticCurvePrivateKey = SENDGRID_KEY, timestamp: int | None = None
) -> dict[str, str]:
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    return {
        "X-Twilio-Email-Event-Webhook-Signature": sign(key, stamp, BODY),
        "X-Twilio-Email-Event-Webhook-Timestamp": stamp,
        "Content-Type": CONTENT_TYPE,
    }


async def post(client: Client, webhook: str, headers: dict[str, str]) -> ClientResponse:
    return await client.post(f"/webhooks/{webhook}", data=BODY, headers=headers)


async def accepted(client: Client, webhook: str, headers: dict[str, str], ids: list[str]) -> None:
    response = await post(client, webhook, headers)
    assert response.status == 200, await response.text()
    ids.append((await response.json())["request_id"])


async def assert_invalid_token(response: ClientResponse) -> dict[str, Any]:
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    document: dict[str, Any] = await response.json()
    assert document["error"] == "invalid_token"
    assert document["error_description"]
    return document


def failures(webhook: str, method: str, reason: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "sgpipe_ingest_auth_failures_total",
        {"stage": "ingest", "webhook": webhook, "method": method, "reason": reason},
    )
    return value or 0.0


def token_requests(outcome: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "sgpipe_oauth_token_requests_total", {"stage": "ingest", "outcome": outcome}
    )
    return value or 0.0


async def fetch_token(
    client: Client, client_id: str = CLIENT_ID, secret: str = CLIENT_SECRET, *, basic: bool
) -> ClientResponse:
    form = {"grant_type": "client_credentials"}
    headers = {}
    if basic:
        credentials = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
        headers["Authorization"] = f"Basic {credentials}"
    else:
        form.update(client_id=client_id, client_secret=secret)
    return await client.post("/oauth/token", data=form, headers=headers)


# --- the table: signatures ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        pytest.param({"Content-Type": CONTENT_TYPE}, "missing_signature", id="missing"),
        pytest.param(
            {
                "X-Twilio-Email-Event-Webhook-Signature": signed()[
                    "X-Twilio-Email-Event-Webhook-Signature"
                ],
                "Content-Type": CONTENT_TYPE,
            },
            "missing_timestamp",
            id="missing-timestamp",
        ),
        pytest.param(
            {**signed(), "X-Twilio-Email-Event-Webhook-Signature": "not base64!!"},
            "malformed_signature",
            id="malformed",
        ),
        pytest.param(
            {
                **signed(),
                "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(b"x" * 70).decode(),
            },
            "invalid_signature",
            id="bad",
        ),
        pytest.param(signed(timestamp=int(time.time()) - 3600), "stale_timestamp", id="stale"),
        pytest.param(signed(OTHER_KEY), "invalid_signature", id="wrong-key"),
    ],
)
async def test_signature_failures_are_401_without_a_bearer_challenge(
    client: Client,
    headers: dict[str, str],
    error: str,
    published_are_exactly_the_accepted: list[str],
) -> None:
    before = failures("signed", "signature", error)
    response = await post(client, "signed", headers)

    assert response.status == 401
    assert "WWW-Authenticate" not in response.headers
    assert (await response.json())["error"] == error
    assert failures("signed", "signature", error) == before + 1
    await accepted(client, "signed", signed(), published_are_exactly_the_accepted)


# --- the table: bearer tokens ------------------------------------------------------------------


async def test_missing_token_gets_a_bare_bearer_challenge(
    client: Client, published_are_exactly_the_accepted: list[str]
) -> None:
    before = failures("main", "token", "missing_token")
    for headers in ({"Content-Type": CONTENT_TYPE}, {"Authorization": "Basic eDp5"}):
        response = await post(client, "main", headers)
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert (await response.json())["error"] == "missing_token"
    assert failures("main", "token", "missing_token") == before + 2
    await accepted(client, "main", bearer(built_in_token()), published_are_exactly_the_accepted)


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        pytest.param(
            lambda: built_in_token(exp=int(time.time()) - 120, iat=int(time.time()) - 900),
            "expired",
            id="expired",
        ),
        pytest.param(
            lambda: built_in_token(nbf=int(time.time()) + 600), "not_yet_valid", id="not-yet-valid"
        ),
        pytest.param(
            lambda: built_in_token(iss="https://evil.example/"), "wrong_issuer", id="issuer"
        ),
        pytest.param(lambda: built_in_token(aud="someone-else"), "wrong_audience", id="audience"),
        pytest.param(lambda: built_in_token("other"), "wrong_audience", id="other-webhook"),
        pytest.param(lambda: "not.a.jwt", "malformed_token", id="malformed"),
        pytest.param(lambda: alg_none_token(), "disallowed_algorithm", id="alg-none"),
    ],
)
async def test_invalid_built_in_tokens_get_invalid_token(
    client: Client, token: Any, reason: str, published_are_exactly_the_accepted: list[str]
) -> None:
    before = failures("main", "token", reason)
    response = await post(client, "main", bearer(token()))

    await assert_invalid_token(response)
    assert failures("main", "token", reason) == before + 1
    await accepted(client, "main", bearer(built_in_token()), published_are_exactly_the_accepted)


def tampered_token() -> str:
    """A built-in token whose claims were changed after signing."""
    header, payload, signature = built_in_token().split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["aud"] = "sgpipe/webhooks/main"
    claims["sub"] = "mallory"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


def hmac_forgery() -> str:
    """The classic: HS256 with the IdP's public key (PEM) as the HMAC secret."""
    public_pem = IDP_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    now = int(time.time())
    claims = {"iss": IDP_ISSUER, "aud": IDP_AUDIENCE, "exp": now + 600}
    # PyJWT refuses to HMAC with a PEM key, as it should: sign the attack by hand.
    header = {"alg": "HS256", "typ": "JWT", "kid": "idp-1"}
    signing_input = b".".join(
        base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=")
        for part in (header, claims)
    )
    mac = hmac.new(public_pem, signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + base64.urlsafe_b64encode(mac).rstrip(b"=")).decode()


def alg_none_token() -> str:
    return jwt.encode(
        {"iss": "sgpipe", "aud": "sgpipe/webhooks/main", "exp": int(time.time()) + 60},
        "",
        algorithm="none",
        headers={"kid": built_in_kid()},
    )


async def test_tampered_token_signature_is_refused(
    client: Client, published_are_exactly_the_accepted: list[str]
) -> None:
    before = failures("main", "token", "invalid_token_signature")

    await assert_invalid_token(await post(client, "main", bearer(tampered_token())))
    assert failures("main", "token", "invalid_token_signature") == before + 1
    await accepted(client, "main", bearer(built_in_token()), published_are_exactly_the_accepted)


async def test_hmac_token_signed_with_the_idps_public_key_is_refused(
    client: Client, published_are_exactly_the_accepted: list[str]
) -> None:
    before = failures("idp", "token", "disallowed_algorithm")

    await assert_invalid_token(await post(client, "idp", bearer(hmac_forgery())))
    assert failures("idp", "token", "disallowed_algorithm") == before + 1
    await accepted(client, "idp", bearer(idp_token()), published_are_exactly_the_accepted)


async def test_unknown_kid_refreshes_the_jwks_at_most_once_per_interval(
    client: Client,
    idp: tuple[IdentityProvider, str],
    clock: Clock,
    published_are_exactly_the_accepted: list[str],
) -> None:
    provider, _ = idp
    assert provider.fetches == 1  # at start
    await accepted(client, "idp", bearer(idp_token()), published_are_exactly_the_accepted)
    # The IdP rotates to a key the ingress has not seen, within the refresh interval of the
    # start: one refresh is allowed only after the interval.
    provider.keys["idp-2"] = IDP_ROTATED_KEY
    clock.now += 0.5
    rotated = bearer(idp_token(IDP_ROTATED_KEY, "idp-2"))
    unknown_before = failures("idp", "token", "unknown_kid")
    for _ in range(3):
        await assert_invalid_token(await post(client, "idp", rotated))
    assert provider.fetches == 1, "a refresh per request"
    assert failures("idp", "token", "unknown_kid") == unknown_before + 3

    clock.now += 60
    await accepted(client, "idp", rotated, published_are_exactly_the_accepted)
    assert provider.fetches == 2
    # A kid the IdP does not have either: one refresh, then refused until the next interval.
    clock.now += 61
    for _ in range(3):
        await assert_invalid_token(
            await post(client, "idp", bearer(idp_token(IDP_ROTATED_KEY, "idp-3")))
        )
    assert provider.fetches == 3
    await accepted(client, "idp", bearer(idp_token()), published_are_exactly_the_accepted)


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        # Claims made when the test runs, not when it is collected: a suite slower than ten
        # minutes (a loaded machine) let a "not yet valid" made at collection become valid.
        pytest.param(lambda: {"iss": "https://other-idp.example/"}, "wrong_issuer", id="issuer"),
        pytest.param(lambda: {"aud": "another-service"}, "wrong_audience", id="audience"),
        pytest.param(lambda: {"exp": int(time.time()) - 120}, "expired", id="expired"),
        pytest.param(lambda: {"nbf": int(time.time()) + 600}, "not_yet_valid", id="not-yet-valid"),
    ],
)
async def test_invalid_idp_tokens_get_invalid_token(
    client: Client,
    claims: Callable[[], dict[str, Any]],
    reason: str,
    published_are_exactly_the_accepted: list[str],
) -> None:
    before = failures("idp", "token", reason)
    await assert_invalid_token(await post(client, "idp", bearer(idp_token(**claims()))))
    assert failures("idp", "token", reason) == before + 1
    await accepted(client, "idp", bearer(idp_token()), published_are_exactly_the_accepted)


async def test_an_idp_token_is_not_a_built_in_token(client: Client) -> None:
    # The IdP's issuer is not trusted on a webhook with built-in clients only.
    await assert_invalid_token(await post(client, "main", bearer(idp_token())))
    await assert_invalid_token(await post(client, "idp", bearer(built_in_token("idp"))))


async def test_leeway_accepts_a_token_expired_seconds_ago(
    client: Client, published_are_exactly_the_accepted: list[str]
) -> None:
    token = built_in_token(exp=int(time.time()) - 5)
    await accepted(client, "main", bearer(token), published_are_exactly_the_accepted)


# --- auth: both ----------------------------------------------------------------------------------


async def test_both_needs_signature_and_token(
    client: Client, publisher: RecordingPublisher, published_are_exactly_the_accepted: list[str]
) -> None:
    token = built_in_token("both", sub=BOTH_ID)
    response = await post(client, "both", signed())
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    response = await post(client, "both", {**bearer(token), "Content-Type": CONTENT_TYPE})
    assert response.status == 401
    assert (await response.json())["error"] == "missing_signature"
    response = await post(client, "both", {**signed(OTHER_KEY), **bearer(token)})
    assert response.status == 401
    assert (await response.json())["error"] == "invalid_signature"

    await accepted(
        client, "both", {**signed(), **bearer(token)}, published_are_exactly_the_accepted
    )
    await accepted(client, "main", bearer(built_in_token()), published_are_exactly_the_accepted)
    await accepted(client, "signed", signed(), published_are_exactly_the_accepted)
    assert [batch.authenticated_by for batch in publisher.batches] == ["both", "token", "signature"]
    assert publisher.batches[0].signature_timestamp is not None
    assert publisher.batches[1].signature_timestamp is None


# --- the token endpoint --------------------------------------------------------------------------


@pytest.mark.parametrize("basic", [True, False], ids=["basic", "form"])
async def test_token_endpoint_issues_a_token_that_the_webhook_accepts(
    client: Client, basic: bool, published_are_exactly_the_accepted: list[str]
) -> None:
    issued_before = token_requests("issued")
    response = await fetch_token(client, basic=basic)

    assert response.status == 200
    assert token_requests("issued") == issued_before + 1
    assert response.headers["Cache-Control"] == "no-store"
    document = await response.json()
    assert document["token_type"] == "Bearer"
    assert document["expires_in"] == 900
    header = jwt.get_unverified_header(document["access_token"])
    assert header["alg"] == "ES256"
    assert header["kid"] == built_in_kid()
    await accepted(
        client, "main", bearer(document["access_token"]), published_are_exactly_the_accepted
    )
    # The token is for its client's webhook only.
    await assert_invalid_token(await post(client, "other", bearer(document["access_token"])))


@pytest.mark.parametrize("basic", [True, False], ids=["basic", "form"])
async def test_bad_client_secret_is_invalid_client(client: Client, basic: bool) -> None:
    for client_id, secret in ((CLIENT_ID, "wrong"), ("no-such-client", CLIENT_SECRET)):
        before = token_requests("invalid_client")
        response = await fetch_token(client, client_id, secret, basic=basic)

        assert response.status == 401
        assert (await response.json())["error"] == "invalid_client"
        assert token_requests("invalid_client") == before + 1
        if basic:
            assert response.headers["WWW-Authenticate"].startswith("Basic ")
        else:
            assert "WWW-Authenticate" not in response.headers


async def test_wrong_grant_type_and_bad_requests(client: Client) -> None:
    credentials = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    basic = {"Authorization": f"Basic {credentials}"}
    form_type = {"Content-Type": "application/x-www-form-urlencoded"}
    cases: list[tuple[str, bytes, dict[str, str], int, str]] = [
        (
            "wrong grant type",
            b"grant_type=password&username=u&password=p",
            basic,
            400,
            "unsupported_grant_type",
        ),
        ("no grant_type", b"", basic, 400, "invalid_request"),
        (
            "a repeated parameter",
            b"grant_type=client_credentials&grant_type=client_credentials",
            basic,
            400,
            "invalid_request",
        ),
        (
            "Basic and a body secret",
            b"grant_type=client_credentials&client_secret=x",
            basic,
            400,
            "invalid_request",
        ),
        ("no client credentials", b"grant_type=client_credentials", {}, 401, "invalid_client"),
    ]
    for case, form, headers, status, error in cases:
        before = token_requests(error)
        response = await client.post("/oauth/token", data=form, headers={**form_type, **headers})
        assert response.status == status, case
        assert (await response.json())["error"] == error, case
        assert token_requests(error) == before + 1, case
        if case == "no client credentials":
            assert response.headers["WWW-Authenticate"] == 'Basic realm="sgpipe", charset="UTF-8"'
        else:
            assert "WWW-Authenticate" not in response.headers, case
    before = token_requests("invalid_request")
    response = await client.post(
        "/oauth/token",
        data=b'{"grant_type":"client_credentials"}',
        headers={**basic, "Content-Type": "application/json"},
    )
    assert response.status == 400
    assert (await response.json())["error"] == "invalid_request"
    assert token_requests("invalid_request") == before + 1


async def test_rotation_first_key_signs_and_every_key_verifies(
    idp: tuple[IdentityProvider, str],
    clock: Clock,
    publisher: RecordingPublisher,
    published_are_exactly_the_accepted: list[str],
) -> None:
    old = oauth_settings(idp[1])
    rotated = oauth_settings(idp[1], oauth_signing_keys=[ROTATED_PEM, SIGNING_PEM])
    async with TestClient(TestServer(create_app(old, RecordingPublisher()))) as old_replica:
        old_token = (await (await fetch_token(old_replica, basic=True)).json())["access_token"]
    async with TestClient(TestServer(create_app(rotated, publisher))) as new_replica:
        new_token = (await (await fetch_token(new_replica, basic=True)).json())["access_token"]
        assert jwt.get_unverified_header(new_token)["kid"] != built_in_kid()
        # A token from a replica that still signs with the old key is accepted, and the new one.
        await accepted(new_replica, "main", bearer(old_token), published_are_exactly_the_accepted)
        await accepted(new_replica, "main", bearer(new_token), published_are_exactly_the_accepted)


def test_client_secret_hash_is_slow_kdf_and_checks() -> None:
    encoded = HASHES[CLIENT_ID]
    assert encoded.startswith("scrypt$")
    assert CLIENT_SECRET not in encoded
    assert verify_client_secret(CLIENT_SECRET, encoded)
    assert not verify_client_secret(CLIENT_SECRET + "x", encoded)
    assert not verify_client_secret(CLIENT_SECRET, "scrypt$garbage")


async def test_secret_checks_are_cached_and_bounded(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = ingest.oauth.verify_client_secret

    def counting(secret: str, encoded: str) -> bool:
        calls.append(secret)
        return real(secret, encoded)

    monkeypatch.setattr(ingest.oauth, "verify_client_secret", counting)
    registry = ingest.oauth.ClientRegistry.from_settings(oauth_settings("http://127.0.0.1:9/jwks"))
    for _ in range(3):
        assert await registry.authenticate(CLIENT_ID, CLIENT_SECRET) is not None
    assert len(calls) == 1, "a successful check is cached"
    for _ in range(2):
        assert await registry.authenticate(CLIENT_ID, "wrong") is None
    assert len(calls) == 3, "failures are never cached as successes"


# --- configuration -------------------------------------------------------------------------------


def test_configuration_errors_name_the_setting() -> None:
    def build(webhook: dict[str, Any], **ingest_settings: Any) -> None:
        create_app(
            Settings.model_validate({"webhooks": [webhook], "ingest": ingest_settings}),
            RecordingPublisher(),
        )

    client = {"client_id": CLIENT_ID, "secret_hash": HASHES[CLIENT_ID]}
    with pytest.raises(ConfigError, match="oauth_signing_keys"):
        build({"name": "main", "auth": "token", "oauth_clients": [client]})
    with pytest.raises(ConfigError, match=r"webhooks\[main\].auth is token"):
        build({"name": "main", "auth": "token"})
    with pytest.raises(ConfigError, match="auth is both but public_keys is empty"):
        build(
            {"name": "main", "auth": "both", "oauth_clients": [client]},
            oauth_signing_keys=[SIGNING_PEM],
        )
    with pytest.raises(ConfigError, match="secret_hash"):
        build(
            {
                "name": "main",
                "auth": "token",
                "oauth_clients": [{"client_id": "x", "secret_hash": "scrypt$1"}],
            },
            oauth_signing_keys=[SIGNING_PEM],
        )
    with pytest.raises(ValueError, match="missing oauth_jwks_url"):
        Settings.model_validate(
            {
                "webhooks": [
                    {"name": "main", "auth": "token", "oauth_issuer": "i", "oauth_audience": "a"}
                ]
            }
        )


async def test_unreachable_jwks_means_503_not_401(
    publisher: RecordingPublisher, clock: Clock, published_are_exactly_the_accepted: list[str]
) -> None:
    # Nothing listens on port 9 of loopback: the JWKS cannot be fetched at start; a token that
    # may well be valid gets 503 (SendGrid retries), never 401.
    app = create_app(oauth_settings("http://127.0.0.1:9/jwks"), publisher)
    async with TestClient(TestServer(app)) as client:
        before = failures("idp", "token", "jwks_unavailable")
        response = await post(client, "idp", bearer(idp_token()))
        assert response.status == 503
        assert response.headers["Retry-After"] == "5"
        assert (await response.json())["error"] == "unavailable"
        assert failures("idp", "token", "jwks_unavailable") == before + 1
        await accepted(client, "main", bearer(built_in_token()), published_are_exactly_the_accepted)


async def test_token_endpoint_refuses_at_once_when_too_many_secret_checks_wait(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest.oauth, "_KDF_MAX_WAITING", 0)
    before = token_requests("busy")
    response = await fetch_token(client, basic=True)
    assert response.status == 503
    assert token_requests("busy") == before + 1
    assert response.headers["Retry-After"] == "1"
    assert (await response.json())["error"] == "temporarily_unavailable"


async def test_a_bad_token_is_refused_before_the_body_is_read(client: Client) -> None:
    # The body is over max_body_bytes (64 KiB here): had it been read first, the answer
    # would be 413. A refused token costs no body read at all.
    large = b"[" + b" " * 70_000 + b"]"
    received = metrics.REGISTRY.get_sample_value(
        "sgpipe_ingest_received_bytes_total", {"stage": "ingest", "webhook": "main"}
    )
    for body in (large, BODY):
        for headers in ({"Content-Type": CONTENT_TYPE}, bearer(built_in_token("other"))):
            response = await client.post("/webhooks/main", data=body, headers=headers)
            assert response.status == 401
    assert (
        metrics.REGISTRY.get_sample_value(
            "sgpipe_ingest_received_bytes_total", {"stage": "ingest", "webhook": "main"}
        )
        == received
    ), "a refused request's body was read"


async def test_a_jwk_that_declares_another_algorithm_is_not_used(
    client: Client,
    idp: tuple[IdentityProvider, str],
    clock: Clock,
    published_are_exactly_the_accepted: list[str],
) -> None:
    provider, _ = idp
    # The IdP publishes a key for RS384 only; a token claims RS256 with it.
    provider.keys["idp-384"] = IDP_ROTATED_KEY
    provider.declared["idp-384"] = "RS384"
    clock.now += 61
    before = failures("idp", "token", "disallowed_algorithm")

    await assert_invalid_token(
        await post(client, "idp", bearer(idp_token(IDP_ROTATED_KEY, "idp-384")))
    )
    assert failures("idp", "token", "disallowed_algorithm") == before + 1
    await accepted(client, "idp", bearer(idp_token()), published_are_exactly_the_accepted)
