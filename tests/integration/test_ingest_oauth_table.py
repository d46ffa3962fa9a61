"""docs/ingress.md's "Authentication failures" table against the ingress with its real Kafka
producer on the session broker: every row's request gets its status, challenge and error, a
valid batch follows each, and the raw topic then holds exactly the valid batches -- each with
how it was authenticated -- and nothing of the refused ones.

The requests are the unit table's (tests/unit/test_ingest_oauth.py, which checks each row
against a recording publisher, with its metric); here they go through the publisher that
production uses, into Kafka."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import pytest

from ingest.app import create_app
from ingest.protocol import start_ingress
from schemas.raw_batch import AUTHENTICATED_BY_HEADER, REQUEST_ID_HEADER
from sgpipe.runtime.kafka import ensure_topics
from tests.integration.kafka_tools import kafka_test_settings, read_topic
from tests.unit.test_ingest_oauth import (
    BODY,
    BOTH_ID,
    CLIENT_ID,
    CLIENT_SECRET,
    CONTENT_TYPE,
    IDP_ROTATED_KEY,
    OTHER_KEY,
    Clock,
    IdentityProvider,
    alg_none_token,
    bearer,
    built_in_token,
    clock,
    hmac_forgery,
    idp,
    idp_token,
    oauth_settings,
    signed,
    tampered_token,
)

__all__ = ["clock", "idp"]  # fixtures, used by name

pytestmark = pytest.mark.kafka

BEARER_INVALID = 'Bearer error="invalid_token"'
ABSENT = None


@dataclass(frozen=True)
class Row:
    """A request of the table and what it must get. ``headers`` is called when sent (tokens
    carry the time); ``expect`` maps header names to their value, or ABSENT."""

    name: str
    webhook: str
    headers: Callable[[], dict[str, str]]
    status: int
    error: str
    expect: dict[str, str | None] = field(default_factory=dict)


def signature_row(name: str, headers: Callable[[], dict[str, str]], error: str) -> Row:
    return Row(name, "signed", headers, 401, error, {"WWW-Authenticate": ABSENT})


def token_row(name: str, webhook: str, token: Callable[[], str]) -> Row:
    return Row(
        name,
        webhook,
        lambda: bearer(token()),
        401,
        "invalid_token",
        {"WWW-Authenticate": BEARER_INVALID},
    )


SIGNATURE = "X-Twilio-Email-Event-Webhook-Signature"
ROWS = [
    signature_row(
        "no signature headers", lambda: {"Content-Type": CONTENT_TYPE}, "missing_signature"
    ),
    signature_row(
        "no timestamp",
        lambda: {SIGNATURE: signed()[SIGNATURE], "Content-Type": CONTENT_TYPE},
        "missing_timestamp",
    ),
    signature_row(
        "signature not base64",
        lambda: {**signed(), SIGNATURE: "not base64!!"},
        "malformed_signature",
    ),
    signature_row(
        "stale signature", lambda: signed(timestamp=int(time.time()) - 3600), "stale_timestamp"
    ),
    signature_row("signed with another key", lambda: signed(OTHER_KEY), "invalid_signature"),
    Row(
        "no token",
        "main",
        lambda: {"Content-Type": CONTENT_TYPE},
        401,
        "missing_token",
        {"WWW-Authenticate": "Bearer"},
    ),
    Row(
        "not Bearer",
        "main",
        lambda: {"Authorization": "Basic eDp5", "Content-Type": CONTENT_TYPE},
        401,
        "missing_token",
        {"WWW-Authenticate": "Bearer"},
    ),
    token_row(
        "expired built-in JWT",
        "main",
        lambda: built_in_token(exp=int(time.time()) - 120, iat=int(time.time()) - 900),
    ),
    token_row("expired IdP JWT", "idp", lambda: idp_token(exp=int(time.time()) - 120)),
    token_row(
        "built-in JWT not yet valid", "main", lambda: built_in_token(nbf=int(time.time()) + 600)
    ),
    token_row("IdP JWT not yet valid", "idp", lambda: idp_token(nbf=int(time.time()) + 600)),
    token_row("wrong issuer", "main", lambda: built_in_token(iss="https://evil.example/")),
    token_row("IdP token on a built-in webhook", "main", lambda: idp_token()),
    token_row("wrong audience", "idp", lambda: idp_token(aud="another-service")),
    token_row("a token for another webhook", "main", lambda: built_in_token("other")),
    token_row("alg: none", "main", alg_none_token),
    token_row("HS256 signed with the IdP's public key", "idp", hmac_forgery),
    token_row("tampered claims", "main", tampered_token),
    token_row("not a JWT", "main", lambda: "not.a.jwt"),
    Row(
        "token fine, signature missing (auth: both)",
        "both",
        lambda: bearer(built_in_token("both", sub=BOTH_ID)),
        401,
        "missing_signature",
        {"WWW-Authenticate": ABSENT},
    ),
    Row(
        "token fine, signature wrong (auth: both)",
        "both",
        lambda: {**signed(OTHER_KEY), **bearer(built_in_token("both", sub=BOTH_ID))},
        401,
        "invalid_signature",
        {"WWW-Authenticate": ABSENT},
    ),
    Row(
        "the IdP's JWKS could never be loaded",
        "idp-down",
        lambda: bearer(idp_token()),
        503,
        "unavailable",
        {"Retry-After": "5", "WWW-Authenticate": ABSENT},
    ),
]

# After each row, a valid batch to one webhook in turn, and how the ingress must record it.
VALID: list[tuple[str, Callable[[], dict[str, str]], str]] = [
    ("signed", signed, "signature"),
    ("main", lambda: bearer(built_in_token()), "token"),
    ("idp", lambda: bearer(idp_token()), "token"),
    ("both", lambda: {**signed(), **bearer(built_in_token("both", sub=BOTH_ID))}, "both"),
]


async def test_every_authentication_failure_is_refused_and_only_valid_batches_reach_kafka(
    kafka_bootstrap_servers: str,
    unique_name: str,
    idp: tuple[IdentityProvider, str],
    clock: Clock,
) -> None:
    provider, jwks_url = idp
    table = oauth_settings(jwks_url)
    topics = kafka_test_settings(kafka_bootstrap_servers, unique_name)
    idp_down = table.webhook("idp")
    assert idp_down is not None
    settings = table.model_copy(
        update={
            "kafka": topics.kafka,
            "raw_auth": topics.raw_auth,
            "webhooks": (
                *table.webhooks,
                idp_down.model_copy(
                    update={"name": "idp-down", "oauth_jwks_url": "http://127.0.0.1:9/jwks"}
                ),
            ),
        }
    )
    await ensure_topics(settings.kafka)
    runner = await start_ingress(create_app(settings), "127.0.0.1", 0)
    accepted: dict[str, str] = {}  # request id -> how it was authenticated
    try:
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        async with aiohttp.ClientSession(base) as http:

            async def accept(webhook: str, headers: dict[str, str], how: str, after: str) -> None:
                async with http.post(f"/webhooks/{webhook}", data=BODY, headers=headers) as answer:
                    assert answer.status == 200, (after, await answer.text())
                    accepted[(await answer.json())["request_id"]] = how

            for index, row in enumerate(ROWS):
                async with http.post(
                    f"/webhooks/{row.webhook}", data=BODY, headers=row.headers()
                ) as answer:
                    assert answer.status == row.status, row.name
                    assert (await answer.json())["error"] == row.error, row.name
                    for name, value in row.expect.items():
                        assert answer.headers.get(name) == value, (row.name, name)
                webhook, headers, how = VALID[index % len(VALID)]
                await accept(webhook, headers(), how, after=row.name)

            # Unknown kid: the JWKS is fetched again (past the interval) and the IdP has it...
            provider.keys["idp-2"] = IDP_ROTATED_KEY
            clock.now += 61
            rotated = bearer(idp_token(IDP_ROTATED_KEY, "idp-2"))
            await accept("idp", rotated, "token", after="a kid the refreshed JWKS has")
            # ...or has not: refused, and not fetched again within the interval.
            fetches = provider.fetches
            async with http.post(
                "/webhooks/idp", data=BODY, headers=bearer(idp_token(IDP_ROTATED_KEY, "idp-3"))
            ) as answer:
                assert answer.status == 401
                assert answer.headers["WWW-Authenticate"] == BEARER_INVALID
            assert provider.fetches == fetches

            # The token endpoint's own refusals (nothing to publish), then a good token.
            token_rows = [
                (
                    {
                        "grant_type": "client_credentials",
                        "client_id": CLIENT_ID,
                        "client_secret": "wrong",
                    },
                    401,
                    "invalid_client",
                ),
                (
                    {
                        "grant_type": "password",
                        "client_id": CLIENT_ID,
                        "client_secret": CLIENT_SECRET,
                    },
                    400,
                    "unsupported_grant_type",
                ),
                ({"grant_type": "client_credentials"}, 401, "invalid_client"),
            ]
            for form, status, error in token_rows:
                async with http.post("/oauth/token", data=form) as answer:
                    assert answer.status == status, form
                    assert (await answer.json())["error"] == error, form
            form = {
                "grant_type": "client_credentials",
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
            }
            async with http.post("/oauth/token", data=form) as answer:
                assert answer.status == 200
                token = (await answer.json())["access_token"]
            await accept("main", bearer(token), "token", after="a token from /oauth/token")
    finally:
        await runner.cleanup()

    records = await read_topic(kafka_bootstrap_servers, settings.kafka.topics.raw, len(accepted))
    published = {
        dict(record.headers)[REQUEST_ID_HEADER].decode(): dict(record.headers)[
            AUTHENTICATED_BY_HEADER
        ].decode()
        for record in records
    }
    assert len(records) == len(accepted) == len(ROWS) + 2
    assert published == accepted
    assert all(record.value == BODY for record in records)
