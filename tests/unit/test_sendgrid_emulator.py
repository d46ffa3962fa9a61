"""The emulator's own promises beyond the contract: the test batch goes through the OAuth
client-credentials flow when configured (with the stored secret when only the id and token URL
are given), a redirect is never followed, state survives a restart through --state, and
`sgpipe sendgrid-emulator` serves as a process."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from aiohttp import web
from pydantic import SecretStr

from sgpipe.webhooks.client import SendGridApiError, WebhooksClient
from sgpipe.webhooks.emulator import EmulatorState
from sgpipe.webhooks.models import EventWebhookRequest, EventWebhookTestRequest
from tests import forked
from tests.ports import free_port
from tests.webhooks_support import API_KEY, ServerThread, running_emulator

TOKEN = "token-for-sendgrid"


class OAuthReceiver:
    """A token endpoint (client_secret_basic) and a webhook URL that wants its token."""

    def __init__(self, client_id: str, secret: str) -> None:
        self.expected_basic = "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()
        self.token_requests = 0
        self.authorizations: list[str] = []
        self.redirect_followed = False
        app = web.Application()
        app.router.add_post("/token", self.token)
        app.router.add_post("/webhooks/main", self.webhook)
        app.router.add_post("/webhooks/moved", self.moved)
        app.router.add_post("/webhooks/target", self.target)
        self.server = ServerThread(app)

    async def token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        form = await request.post()
        if request.headers.get("Authorization") != self.expected_basic:
            return web.json_response({"error": "invalid_client"}, status=401)
        assert form["grant_type"] == "client_credentials"
        return web.json_response({"access_token": TOKEN, "expires_in": 3600})

    async def webhook(self, request: web.Request) -> web.Response:
        self.authorizations.append(request.headers.get("Authorization", ""))
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"error": "invalid_token"}, status=401)
        return web.Response(status=200)

    async def moved(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/webhooks/target")

    async def target(self, request: web.Request) -> web.Response:
        self.redirect_followed = True
        return web.Response(status=200)


async def test_the_test_batch_goes_through_oauth_with_the_stored_secret() -> None:
    receiver = OAuthReceiver("client-1", "secret-1")
    receiver.server.start()
    try:
        with running_emulator() as emulator:
            base = receiver.server.url
            async with WebhooksClient(SecretStr(API_KEY), emulator.url) as client:
                created = await client.create(
                    EventWebhookRequest(
                        url=f"{base}/webhooks/main",
                        enabled=True,
                        oauth_client_id="client-1",
                        oauth_client_secret="secret-1",
                        oauth_token_url=f"{base}/token",
                    )
                )
                # Saved credentials: the id and token URL suffice, SendGrid has the secret.
                await client.test(
                    EventWebhookTestRequest(
                        url=created.url,
                        id=created.id,
                        oauth_client_id="client-1",
                        oauth_token_url=f"{base}/token",
                    )
                )
                # New credentials without a secret: refused before anything is sent.
                with pytest.raises(SendGridApiError, match="oauth_client_secret is required"):
                    await client.test(
                        EventWebhookTestRequest(
                            url=created.url,
                            oauth_client_id="other",
                            oauth_token_url=f"{base}/token",
                        )
                    )
                # A wrong secret: the token endpoint refuses, the batch is not accepted.
                await client.test(
                    EventWebhookTestRequest(
                        url=created.url,
                        oauth_client_id="client-1",
                        oauth_client_secret="wrong",
                        oauth_token_url=f"{base}/token",
                    )
                )
            good, bad = emulator.state.deliveries
    finally:
        receiver.server.stop()
    assert good.oauth and good.accepted and receiver.authorizations == [f"Bearer {TOKEN}"]
    assert bad.oauth and not bad.accepted and "token endpoint answered 401" in (bad.detail or "")
    assert receiver.token_requests == 2


async def test_a_redirect_is_never_followed() -> None:
    receiver = OAuthReceiver("unused", "unused")
    receiver.server.start()
    try:
        with running_emulator() as emulator:
            async with WebhooksClient(SecretStr(API_KEY), emulator.url) as client:
                await client.test(
                    EventWebhookTestRequest(url=f"{receiver.server.url}/webhooks/moved")
                )
            [delivery] = emulator.state.deliveries
    finally:
        receiver.server.stop()
    assert not delivery.accepted and "redirect not followed" in (delivery.detail or "")
    assert receiver.redirect_followed is False


def test_state_survives_a_restart(tmp_path: Path) -> None:
    from sgpipe.webhooks.emulator import EmulatorConfig, create_app

    path = tmp_path / "state.json"
    state = EmulatorState.load(path)
    server = ServerThread(create_app(state, EmulatorConfig()))
    server.start()

    async def set_up() -> tuple[str, str]:
        async with WebhooksClient(SecretStr("any"), server.url, on_behalf_of="sub") as client:
            created = await client.create(EventWebhookRequest(url="https://a.example/webhooks/m"))
            key = (await client.set_signing(created.id, enabled=True)).public_key
            return created.id, key

    try:
        webhook_id, key = asyncio.run(set_up())
    finally:
        server.stop()
    assert oct(path.stat().st_mode & 0o777) == "0o600"  # it holds private keys
    reloaded = EmulatorState.load(path)
    [webhook] = reloaded.webhooks("sub")
    assert webhook.id == webhook_id and webhook.public_key() == key
    assert reloaded.webhooks("") == []


def test_the_emulator_command_serves_until_sigterm(tmp_path: Path) -> None:
    port = free_port()
    process = forked.Popen(
        [sys.executable, "-m", "sgpipe", "sendgrid-emulator", "--port", str(port)]
        + ["--state", str(tmp_path / "state.json"), "--api-key", API_KEY],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        assert line.strip() == f"SendGrid emulator listening on http://127.0.0.1:{port}"
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v3/user/webhooks/event/settings/all",
            headers={"Authorization": f"Bearer {API_KEY}"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.read() == b'{"max_allowed": 5, "webhooks": [{}]}'
    finally:
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if process.poll() is None:
            process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()
    assert process.returncode == 0


def test_invalid_bodies_get_a_400_naming_the_field_and_accounts_do_not_see_each_other() -> None:
    # Invalid requests on purpose: they are outside the document, so no contract check here.
    with running_emulator(contract=False) as emulator:

        def call(method: str, path: str, body: bytes, account: str = "") -> tuple[int, bytes]:
            headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
            if account:
                headers["on-behalf-of"] = account
            request = urllib.request.Request(
                f"{emulator.url}/v3/user/webhooks/event/{path}", body, headers, method=method
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return response.status, response.read()
            except urllib.error.HTTPError as error:
                return error.code, error.read()

        assert call("POST", "settings", b'{"url": "https://a.example/w", "enabled": "yes"}') == (
            400,
            b'{"errors": [{"field": "enabled", "message": "Input should be a valid boolean"}]}',
        )
        status, body = call("POST", "settings", b'{"url": "https://a.example/w", "opens": true}')
        assert status == 400 and b'"field": "opens"' in body
        assert call("POST", "settings", b"[1]")[0] == 400
        assert call("POST", "settings", b'{"enabled": true}')[0] == 400  # url is required
        status, body = call("POST", "settings", b'{"url": "https://a.example/w"}')
        assert status == 201
        webhook_id = json.loads(body)["id"]
        assert call("GET", f"settings/{webhook_id}", b"", account="sub")[0] == 404
        assert call("GET", f"settings/{webhook_id}", b"")[0] == 200


async def test_oauth_settings_follow_the_same_rules_on_create_and_update() -> None:
    # Out of the document's examples (the 400s are the seed's rules): no contract check.
    with running_emulator(contract=False) as emulator:
        async with WebhooksClient(SecretStr(API_KEY), emulator.url) as client:
            for number, (fields, message) in enumerate(
                [
                    ({"oauth_client_id": "c"}, "oauth_token_url is required when"),
                    ({"oauth_client_secret": "s"}, "oauth_client_id and oauth_token_url are"),
                    (
                        {"oauth_client_id": "c", "oauth_token_url": "not a url"},
                        "'not a url' is not a valid url",
                    ),
                ]
            ):
                url = f"https://a.example/webhooks/{number}"
                with pytest.raises(SendGridApiError, match=message):
                    await client.create(EventWebhookRequest.model_validate({"url": url, **fields}))
                with pytest.raises(SendGridApiError, match=message):
                    created = await client.create(EventWebhookRequest(url=url))
                    await client.update(
                        created.id, EventWebhookRequest.model_validate({"url": url, **fields})
                    )
            url = "https://a.example/webhooks/main"
            created = await client.create(
                EventWebhookRequest(
                    url=url,
                    oauth_client_id="c",
                    oauth_client_secret="s",
                    oauth_token_url="https://token.example/t",
                )
            )
            [stored] = [w for w in emulator.state.webhooks("") if w.id == created.id]
            # A field left out keeps its stored value: a new secret alone is enough.
            await client.update(created.id, EventWebhookRequest(url=url, oauth_client_secret="t"))
            assert (stored.oauth_client_id, stored.oauth_client_secret) == ("c", "t")
            assert stored.oauth_token_url == "https://token.example/t"
            # The merged settings are checked: the id stays, so the URL may not go alone.
            with pytest.raises(SendGridApiError, match="oauth_token_url is required when"):
                await client.update(created.id, EventWebhookRequest(url=url, oauth_token_url=""))
            assert stored.oauth_token_url == "https://token.example/t"
            # Empty strings for all three turn OAuth off.
            empty = {"oauth_client_id": "", "oauth_client_secret": "", "oauth_token_url": ""}
            updated = await client.update(
                created.id, EventWebhookRequest.model_validate({"url": url, **empty})
            )
            [cleared] = [w for w in emulator.state.webhooks("") if w.id == created.id]
    assert cleared.oauth_client_id is cleared.oauth_client_secret is cleared.oauth_token_url is None
    assert updated.oauth_client_id is None
