"""The contract: every request sgpipe's client sends and every answer the emulator gives, as
they went over the wire, validated by openapi-core against SendGrid's own OpenAPI document
(schemas/sendgrid/event-webhooks-openapi.yaml, the seed with its indentation restored); and
each error example the document gives, reproduced by the emulator."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from openapi_core import OpenAPI
from openapi_core.testing import MockRequest, MockResponse
from openapi_spec_validator import validate
from pydantic import SecretStr

from ingest.signature import load_public_key, verify_signature
from sgpipe.webhooks.client import SendGridApiError, WebhooksClient
from sgpipe.webhooks.models import EventWebhookRequest, EventWebhookTestRequest
from tests.webhooks_support import (
    API_KEY,
    SPEC_PATH,
    SPEC_SERVER,
    UNDOCUMENTED_STATUSES,
    Exchange,
    running_emulator,
    sendgrid_openapi,
    validate_exchanges,
    webhook_receiver,
)

REPO = Path(__file__).resolve().parents[2]
# ../shared beside the clone (CI), or two levels up from a worktree under wt/.
SEED = next(
    (
        candidate
        for candidate in (
            REPO.parent / "shared" / "seeds" / "004_676c01e87e622bab.txt",
            REPO.parent.parent / "shared" / "seeds" / "004_676c01e87e622bab.txt",
        )
        if candidate.exists()
    ),
    REPO.parent / "shared" / "seeds" / "004_676c01e87e622bab.txt",
)
# Documented examples the emulator cannot produce: SendGrid refuses changes for accounts under
# compliance review, a state a local server has no way to enter.
NOT_REPRODUCED = {("patch", "/v3/user/webhooks/event/settings/{id}", "400", "Account Change")}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text())
    return loaded


@pytest.fixture(scope="module")
def openapi() -> OpenAPI:
    return sendgrid_openapi()


def test_the_committed_document_is_the_seed_line_for_line() -> None:
    if not SEED.exists():
        pytest.skip(f"{SEED} is not here (the committed copy is then the only source)")
    seed = SEED.read_text().split("\n")
    seed = seed[: next(i for i, line in enumerate(seed) if line.startswith("# --- truncated"))]
    committed = [
        line.strip() for line in SPEC_PATH.read_text().split("\n") if not line.startswith("#")
    ]
    assert committed[: len(seed)] == [line.strip() for line in seed]


def test_the_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    validate(document)
    assert document["openapi"] == "3.1.0"


async def drive_every_operation(emulator_url: str, receiver_url: str) -> dict[str, Any]:
    """Every operation, with each documented error, through sgpipe's client."""
    seen: dict[str, Any] = {}
    async with WebhooksClient(SecretStr(API_KEY), emulator_url) as client:
        seen["empty"] = await client.list()
        created = await client.create(
            EventWebhookRequest(
                url=f"{receiver_url}/webhooks/main",
                enabled=True,
                bounce=True,
                open=True,
                friendly_name="Engagement Webhook",
                oauth_client_id="a835e7210bbb47edbfa71bdfc909b2d7",
                oauth_client_secret="335a9b0c65324fd2a62e2953d4b158",
                oauth_token_url="https://oauthservice.example.com",
            )
        )
        seen["created"] = created
        for request in (
            EventWebhookRequest(url=f"{receiver_url}/webhooks/main"),  # Exists
            EventWebhookRequest(url="https://example.com bad"),  # Bad URL
        ):
            with pytest.raises(SendGridApiError):
                await client.create(request)
        for index in range(4):
            await client.create(EventWebhookRequest(url=f"https://h{index}.example/webhooks/x"))
        with pytest.raises(SendGridApiError) as maximum:
            await client.create(EventWebhookRequest(url="https://sixth.example/webhooks/x"))
        seen["maximum"] = maximum.value
        seen["listed"] = await client.list(include_account_status_change=True)
        seen["got"] = await client.get(created.id, include_account_status_change=True)
        seen["updated"] = await client.update(
            created.id,
            EventWebhookRequest(url=created.url, delivered=True, friendly_name="Delivery"),
            include_account_status_change=True,
        )
        with pytest.raises(SendGridApiError):  # Exists, on update
            await client.update(
                created.id, EventWebhookRequest(url="https://h0.example/webhooks/x")
            )
        seen["unsigned_key"] = await client.public_key(created.id)
        seen["signed"] = await client.set_signing(created.id, enabled=True)
        seen["key"] = await client.public_key(created.id)
        # No OAuth for the test batch here: the receiver has no token endpoint.
        await client.update(
            created.id,
            EventWebhookRequest(
                url=created.url, oauth_client_id="", oauth_client_secret="", oauth_token_url=""
            ),
        )
        await client.test(EventWebhookTestRequest(url=created.url, id=created.id))
        for call in (
            client.get("no-such-id"),
            client.update("no-such-id", EventWebhookRequest(url="https://x.example/a")),
            client.public_key("no-such-id"),
            client.set_signing("no-such-id", enabled=True),
            client.delete("no-such-id"),
        ):
            with pytest.raises(SendGridApiError) as missing:
                await call
            assert missing.value.status == 404
        seen["unsigned"] = await client.set_signing(created.id, enabled=False)
        await client.delete(created.id)
    async with WebhooksClient(SecretStr("SG.wrong"), emulator_url) as client:
        with pytest.raises(SendGridApiError) as refused:
            await client.list()
        seen["refused"] = refused.value
    return seen


Recorded = tuple[list[Exchange], dict[str, Any], list[bytes], list[dict[str, str]]]


@pytest.fixture(scope="module")
def exchanges() -> Recorded:
    """(exchanges with the emulator, what the client returned, bodies and headers the webhook
    URL received), from one run of every operation."""
    with running_emulator() as emulator, webhook_receiver() as (receiver_url, received):
        seen = asyncio.run(drive_every_operation(emulator.url, receiver_url))
        return list(emulator.exchanges), seen, list(received.bodies), list(received.headers)


def test_every_exchange_matches_sendgrids_openapi(exchanges: Recorded) -> None:
    """Every operation was exercised, and each exchange fits the document (the same check
    runs, through ``running_emulator``, after every test that talks to the emulator)."""
    recorded = exchanges[0]
    validated = validate_exchanges(recorded)
    operations = {
        (exchange.method, re.sub(r"/[0-9a-f-]{36}$|/no-such-id$", "/{id}", exchange.path))
        for exchange in recorded
        if exchange.status not in UNDOCUMENTED_STATUSES
    }
    assert operations == {
        ("POST", "/v3/user/webhooks/event/settings"),
        ("GET", "/v3/user/webhooks/event/settings/all"),
        ("GET", "/v3/user/webhooks/event/settings/{id}"),
        ("PATCH", "/v3/user/webhooks/event/settings/{id}"),
        ("DELETE", "/v3/user/webhooks/event/settings/{id}"),
        ("GET", "/v3/user/webhooks/event/settings/signed/{id}"),
        ("PATCH", "/v3/user/webhooks/event/settings/signed/{id}"),
        ("POST", "/v3/user/webhooks/event/test"),
    }
    assert validated >= 20


def test_a_response_outside_the_document_is_caught(openapi: OpenAPI) -> None:
    """The validator is not a rubber stamp: a wrong type in an answer fails."""
    request = MockRequest(
        SPEC_SERVER,
        "GET",
        "/v3/user/webhooks/event/settings/all",
        headers={"Authorization": "Bearer x"},
    )
    wrong = MockResponse(json.dumps({"max_allowed": "five", "webhooks": []}).encode())
    with pytest.raises(Exception, match="max_allowed|five|not of type"):
        openapi.validate_response(request, wrong)


def _normalized(errors: list[dict[str, Any]]) -> list[tuple[tuple[str, ...], str]]:
    """An error body without its particulars: quoted URLs and ids become placeholders."""
    return [
        (
            tuple(sorted(key for key in error if error[key] is not None)),
            re.sub(r"'[^']*'", "'URL'", " ".join(str(error.get("message", "")).split())),
        )
        for error in errors
    ]


def _documented_errors(document: dict[str, Any]) -> list[tuple[str, str, str, str, Any]]:
    found = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation.get("responses", {}).items():
                if not status.startswith("4"):
                    continue
                for name, example in (
                    response["content"]["application/json"].get("examples", {}).items()
                ):
                    found.append((method, path, status, name, example["value"]))
    return found


def test_each_documented_error_example_is_what_the_emulator_answers(
    document: dict[str, Any],
    openapi: OpenAPI,
    exchanges: Recorded,
) -> None:
    recorded = exchanges[0]
    documented = _documented_errors(document)
    assert len(documented) >= 9  # Bad URL, Exists x2, Max, Account Change, Not found x5
    for method, path, status, name, example in documented:
        pattern = re.compile("^" + re.sub(r"\{id\}", "[^/]+", path) + "$")
        answers = [
            _normalized(json.loads(exchange.response_body)["errors"])
            for exchange in recorded
            if exchange.method == method.upper()
            and pattern.match(exchange.path)
            and str(exchange.status) == status
        ]
        if (method, path, status, name) in NOT_REPRODUCED:
            continue
        assert _normalized(example["errors"]) in answers, (method, path, status, name, answers)


def test_the_client_reads_the_documents_examples(document: dict[str, Any]) -> None:
    """The answers SendGrid documents parse into the client's models."""
    from sgpipe.webhooks.models import EventWebhook, EventWebhookList

    listing = document["paths"]["/v3/user/webhooks/event/settings/all"]["get"]["responses"]
    two = listing["200"]["content"]["application/json"]["examples"]["Two Webhooks"]["value"]
    parsed = EventWebhookList.model_validate(two)
    assert [w.id for w in parsed.real()] == [
        "77d4a5da-7015-11ed-a1eb-0242ac120002",
        "77d4a5da-7015-11ed-a1eb-0242ac120003",
    ]
    assert parsed.real()[1].events == ("delivered", "bounce", "deferred", "processed", "dropped")
    zero = listing["200"]["content"]["application/json"]["examples"]["Zero Webhooks"]["value"]
    assert EventWebhookList.model_validate(zero).real() == ()
    single = document["paths"]["/v3/user/webhooks/event/settings/{id}"]["get"]["responses"]
    one = single["200"]["content"]["application/json"]["examples"]["One of One Webhooks"]["value"]
    assert EventWebhook.model_validate(one).public_key == "123publickeyabc"


def test_the_emulators_test_batch_is_signed_with_the_webhooks_key(
    exchanges: Recorded,
) -> None:
    _, seen, bodies, headers = exchanges
    assert len(bodies) == 1
    key = seen["key"].public_key
    assert key and key == seen["signed"].public_key
    verify_signature(
        [load_public_key(key)],
        headers[0]["X-Twilio-Email-Event-Webhook-Signature"],
        headers[0]["X-Twilio-Email-Event-Webhook-Timestamp"],
        bodies[0],
        now=0,
        tolerance_seconds=0,
    )
    events = json.loads(bodies[0])
    assert len(events) == 11 and all("sg_event_id" in event for event in events)


def test_the_client_reports_each_error_in_one_line(
    exchanges: Recorded,
) -> None:
    seen = exchanges[1]
    assert str(seen["maximum"]) == (
        "SendGrid answered 400 to POST /v3/user/webhooks/event/settings: You have reached the "
        "maximum number of webhooks per your current billing plan."
    )
    assert seen["refused"].status == 401
    assert "\n" not in str(seen["refused"]) and "SG.wrong" not in str(seen["refused"])
    assert seen["unsigned_key"].public_key == "" and seen["unsigned"].public_key == ""
    assert seen["got"].account_status_change is False
    assert seen["updated"].delivered and seen["updated"].friendly_name == "Delivery"
