"""The simulator as SendGrid's sender, against real HTTP servers on free ports: signing and
headers, retries, giving up, redirects, timeouts, OAuth tokens, determinism, pacing, stop."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from ingest.signature import SignatureRejected, load_public_key, verify_signature
from sgpipe.simulator import (
    OAuthClientSettings,
    SimulationOptions,
    SimulationProgress,
    generate_private_key,
    public_key_base64,
    simulate,
)
from sgpipe.simulator.batches import PlannedPost
from sgpipe.simulator.command import _ProgressLine
from sgpipe.simulator.oauth import ClientAuthMethod
from tests.ports import free_port
from tests.simulator_support import ReceivedRequest, record, run_sgpipe, serve

WEBHOOK = "/webhooks/main"
# Fast retries for tests; the schedule itself is tested as a pure function.
QUICK: dict[str, Any] = {
    "initial_backoff_seconds": 0.02,
    "max_backoff_seconds": 0.1,
    "retry_for_seconds": 5.0,
}


def event_ids(requests: list[ReceivedRequest]) -> list[str]:
    return [event["sg_event_id"] for r in requests for event in json.loads(r.body)]


def answering(statuses: list[int], received: list[ReceivedRequest]) -> web.Application:
    """A webhook that answers the given statuses in turn, then 200."""

    async def webhook(request: web.Request) -> web.Response:
        await record(request, received)
        status = statuses.pop(0) if statuses else 200
        if status == 200:
            return web.json_response({"status": "accepted"})
        return web.json_response({"error": "nope", "error_description": "test"}, status=status)

    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.router.add_post(WEBHOOK, webhook)
    return app


def run_cli(args: list[str]) -> tuple[int, dict[str, Any]]:
    result = run_sgpipe(["simulate", *args, "--json"])
    return result.returncode, json.loads(result.stdout)


def test_signed_batches_verify_at_the_receiver_and_carry_sendgrids_headers(
    tmp_path: Path,
) -> None:
    key_file = tmp_path / "webhook.pem"
    public_key = load_public_key(run_sgpipe(["keys", "generate", "--out", str(key_file)]).stdout)
    received: list[ReceivedRequest] = []

    async def webhook(request: web.Request) -> web.Response:
        body = (await record(request, received)).body
        try:
            verify_signature(
                [public_key],
                request.headers.get("X-Twilio-Email-Event-Webhook-Signature"),
                request.headers.get("X-Twilio-Email-Event-Webhook-Timestamp"),
                body,
                now=time.time(),
                tolerance_seconds=300,
            )
        except SignatureRejected as exc:
            return web.json_response({"error": exc.code}, status=401)
        return web.json_response({"status": "accepted"})

    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.router.add_post(WEBHOOK, webhook)
    with serve(app) as base_url:
        code, summary = run_cli(
            [
                "--url",
                base_url + WEBHOOK,
                "--private-key",
                str(key_file),
                "--events",
                "3000",
                "--max-batch-bytes",
                "65536",
            ],
        )

    assert code == 0, summary
    assert summary["ok"] and summary["events"] == summary["events_accepted"] == 3000
    assert summary["posts"] == summary["posts_acknowledged"] == len(received) > 1
    assert summary["responses"] == {"200": len(received)}
    for request in received:
        assert request.headers["Content-Type"] == "application/json;charset=utf-8"
        assert request.headers["User-Agent"] == "SendGrid Event API"
        assert len(request.body) <= 65536
    assert len(set(event_ids(received))) == 3000


async def test_a_503_is_retried_with_the_same_body_until_it_is_accepted() -> None:
    received: list[ReceivedRequest] = []
    with serve(answering([503, 503], received)) as base_url:
        summary = await simulate(SimulationOptions(url=base_url + WEBHOOK, events=200, **QUICK))

    assert summary.ok and summary.events_accepted == 200
    assert summary.retries == 2
    assert summary.responses == {"503": 2, "200": 1}
    assert len(received) == 3 and len({r.body for r in received}) == 1


async def test_hooks_see_each_post_planned_and_each_post_acknowledged() -> None:
    # What `bench/e2e.py` builds on: the bodies sent, and the moment each was acknowledged.
    received: list[ReceivedRequest] = []
    planned: list[PlannedPost] = []
    acknowledged: list[PlannedPost] = []
    with serve(answering([503, 400], received)) as base_url:
        summary = await simulate(
            SimulationOptions(
                url=base_url + WEBHOOK, events=1000, max_batch_bytes=65536, concurrency=1, **QUICK
            ),
            on_post=planned.append,
            on_acknowledged=acknowledged.append,
        )

    assert [post.body for post in planned] == [r.body for r in received[1:]]
    assert acknowledged == planned[1:]  # the first post was retried, then refused with a 400
    assert summary.events_not_accepted == len(
        set(planned[0].serials) - {serial for post in acknowledged for serial in post.serials}
    )


def test_a_401_is_given_up_at_once_with_a_clear_summary_and_exit_code_1() -> None:
    received: list[ReceivedRequest] = []
    with serve(answering([401] * 100, received)) as base_url:
        code, summary = run_cli(["--url", base_url + WEBHOOK, "--events", "500"])
        as_text = run_sgpipe(["simulate", "--url", base_url + WEBHOOK, "--events", "10"])
        assert as_text.returncode == 1
        text = as_text.stdout

    assert code == 1
    assert not summary["ok"]
    assert summary["events"] == summary["events_not_accepted"] == 500
    assert summary["events_accepted"] == 0
    assert summary["posts_rejected"] == summary["posts"] == 1
    assert summary["retries"] == 0
    assert summary["responses"] == {"401": 1}
    assert "HTTP 401" in summary["last_error"] and "nope" in summary["last_error"]
    assert "NOT ACCEPTED: 10 events; last error: HTTP 401" in text
    assert len(received) == 2  # one POST per run: a 401 is never retried


@pytest.mark.parametrize(
    ("status", "retried"),
    [
        (400, False),
        (401, False),
        (403, False),
        (404, False),
        (413, False),
        (422, False),
        (408, True),
        (429, True),
        (500, True),
        (502, True),
        (503, True),
        (504, True),
    ],
)
async def test_4xx_is_final_except_408_and_429(status: int, retried: bool) -> None:
    received: list[ReceivedRequest] = []
    with serve(answering([status], received)) as base_url:
        summary = await simulate(SimulationOptions(url=base_url + WEBHOOK, events=50, **QUICK))

    assert summary.ok is retried
    assert len(received) == (2 if retried else 1)
    assert summary.events_not_accepted == (0 if retried else 50)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_is_never_followed_and_counts_as_a_failure(status: int) -> None:
    received: list[ReceivedRequest] = []
    elsewhere: list[ReceivedRequest] = []

    async def redirecting(request: web.Request) -> web.Response:
        await record(request, received)
        return web.Response(status=status, headers={"Location": "/elsewhere"})

    async def target(request: web.Request) -> web.Response:
        await record(request, elsewhere)
        return web.json_response({"status": "accepted"})

    app = web.Application()
    app.router.add_post(WEBHOOK, redirecting)
    app.router.add_route("*", "/elsewhere", target)
    options = {**QUICK, "retry_for_seconds": 0.3}
    with serve(app) as base_url:
        summary = await simulate(SimulationOptions(url=base_url + WEBHOOK, events=20, **options))

    assert elsewhere == []
    assert not summary.ok and summary.events_not_accepted == 20
    assert summary.responses == {str(status): len(received)}
    assert len(received) > 1  # a 3xx is a failure SendGrid retries, not a final answer
    assert summary.last_error is not None and "redirect not followed" in summary.last_error


async def test_a_timeout_is_retried() -> None:
    received: list[ReceivedRequest] = []

    async def slow_once(request: web.Request) -> web.Response:
        await record(request, received)
        if len(received) == 1:
            await asyncio.sleep(3)
        return web.json_response({"status": "accepted"})

    app = web.Application()
    app.router.add_post(WEBHOOK, slow_once)
    with serve(app) as base_url:
        summary = await simulate(
            SimulationOptions(
                url=base_url + WEBHOOK, events=20, request_timeout_seconds=0.3, **QUICK
            )
        )

    assert summary.ok
    assert summary.responses == {"timeout": 1, "200": 1}
    assert received[0].body == received[1].body


async def test_an_unreachable_receiver_is_retried_then_given_up() -> None:
    url = f"http://127.0.0.1:{free_port()}{WEBHOOK}"
    summary = await simulate(
        SimulationOptions(url=url, events=20, **{**QUICK, "retry_for_seconds": 0.2})
    )

    assert not summary.ok and summary.events_not_accepted == 20
    assert summary.retries >= 1
    assert set(summary.responses) == {"connection error"}


class TokenServer:
    """A minimal OAuth token endpoint (client credentials) and a webhook that checks bearers.

    The webhook honours a token for ``uses_per_token`` POSTs, then treats it as revoked and
    answers 401 ``invalid_token``, as an RFC 6750 resource server does.
    """

    def __init__(self, auth_method: ClientAuthMethod, uses_per_token: int) -> None:
        self.auth_method = auth_method
        self.uses_per_token = uses_per_token
        self.token_requests: list[ReceivedRequest] = []
        self.webhook_requests: list[ReceivedRequest] = []
        self.uses: dict[str, int] = {}
        self.app = web.Application()
        self.app.router.add_post("/oauth/token", self.token)
        self.app.router.add_post(WEBHOOK, self.webhook)

    async def token(self, request: web.Request) -> web.Response:
        received = await record(request, self.token_requests)
        form = await request.post()
        # RFC 6749 section 2.3.1: form-urlencoded, then Basic.
        basic = "Basic " + base64.b64encode(b"sim-client:s3cr%25t%26").decode()
        if self.auth_method == "client_secret_basic":
            valid = received.headers.get("Authorization") == basic and "client_secret" not in form
        else:
            valid = (
                form.get("client_id") == "sim-client"
                and form.get("client_secret") == "s3cr%t&"
                and "Authorization" not in received.headers
            )
        if form.get("grant_type") != "client_credentials" or not valid:
            return web.json_response({"error": "invalid_client"}, status=401)
        token = f"token-{len(self.token_requests)}"
        self.uses[token] = 0
        return web.json_response(
            {"access_token": token, "token_type": "Bearer", "expires_in": 3600}
        )

    async def webhook(self, request: web.Request) -> web.Response:
        received = await record(request, self.webhook_requests)
        token = received.headers.get("Authorization", "").removeprefix("Bearer ")
        if token not in self.uses or self.uses[token] >= self.uses_per_token:
            body = {"error": "invalid_token", "error_description": "The access token expired"}
            return web.json_response(body, status=401)
        self.uses[token] += 1
        return web.json_response({"status": "accepted"})


@pytest.mark.parametrize("auth_method", ["client_secret_basic", "client_secret_post"])
async def test_oauth_token_is_cached_and_refreshed_on_a_401_invalid_token(
    auth_method: ClientAuthMethod,
) -> None:
    server = TokenServer(auth_method, uses_per_token=3)
    with serve(server.app) as base_url:
        oauth = OAuthClientSettings(
            token_url=base_url + "/oauth/token",
            client_id="sim-client",
            client_secret="s3cr%t&",  # characters that Basic must form-encode
            auth_method=auth_method,
        )
        summary = await simulate(
            SimulationOptions(
                url=base_url + WEBHOOK,
                oauth=oauth,
                events=5000,
                max_batch_bytes=256 * 1024,
                concurrency=1,
                **QUICK,
            )
        )

    assert summary.ok, summary
    assert summary.posts > 6
    # token-1 for three POSTs, then one 401 and token-2, and so on: cached, refreshed on demand.
    bearers = [r.headers["Authorization"] for r in server.webhook_requests]
    assert bearers[:5] == ["Bearer token-1"] * 4 + ["Bearer token-2"]
    refreshes = (summary.posts - 1) // 3
    assert summary.token_requests == len(server.token_requests) == 1 + refreshes
    assert summary.responses == {"200": summary.posts, "401": refreshes}


async def test_oauth_refused_credentials_give_up_without_posting() -> None:
    server = TokenServer("client_secret_post", uses_per_token=1)  # but we send Basic
    with serve(server.app) as base_url:
        oauth = OAuthClientSettings(
            token_url=base_url + "/oauth/token", client_id="sim-client", client_secret="s3cr%t&"
        )
        summary = await simulate(
            SimulationOptions(url=base_url + WEBHOOK, oauth=oauth, events=10, **QUICK)
        )

    assert not summary.ok and summary.events_not_accepted == 10
    assert server.webhook_requests == []
    assert summary.responses == {"token error": 1}  # refused credentials are not retried
    assert summary.last_error is not None and "token endpoint answered 401" in summary.last_error


def test_the_same_seed_gives_byte_identical_bodies() -> None:
    def bodies(seed: str) -> list[bytes]:
        received: list[ReceivedRequest] = []
        with serve(answering([], received)) as base_url:
            args = ["--url", base_url + WEBHOOK, "--events", "2000", "--seed", seed]
            args += ["--start-time", "1735689600"]
            args += ["--duplicates", "0.3", "--max-batch-bytes", "32768", "--concurrency", "1"]
            code, summary = run_cli(args)
        assert code == 0 and summary["seed"] == int(seed)
        assert summary["duplicate_events"] > 0 and summary["resent_batches"] > 0
        return [request.body for request in received]

    first = bodies("11")
    assert len(first) > 20
    assert bodies("11") == first
    assert bodies("12") != first


def test_events_are_dated_from_now_unless_start_time_pins_them() -> None:
    def first_timestamp(*extra: str) -> tuple[int, int]:
        received: list[ReceivedRequest] = []
        with serve(answering([], received)) as base_url:
            args = ["--url", base_url + WEBHOOK, "--events", "5", "--seed", "3", *extra]
            code, summary = run_cli(args)
        assert code == 0
        events = json.loads(received[0].body)
        return min(int(event["timestamp"]) for event in events), int(summary["start_time"])

    before = int(time.time())
    dated, start = first_timestamp()
    assert before <= start <= int(time.time())
    assert start <= dated <= start + 60  # demo data lands in "the last days" queries
    pinned, start = first_timestamp("--start-time", "1735689600")
    assert start == 1735689600 and 1735689600 <= pinned <= 1735689600 + 60


async def test_a_rate_paces_batches_by_the_flush_interval() -> None:
    received: list[ReceivedRequest] = []
    with serve(answering([], received)) as base_url:
        summary = await simulate(
            SimulationOptions(
                url=base_url + WEBHOOK, events=400, rate=2000, flush_interval_seconds=0.05
            )
        )

    assert summary.ok
    assert [len(json.loads(r.body)) for r in received] == [100] * 4


async def test_stop_ends_an_endless_run_and_waits_for_posts_in_flight() -> None:
    received: list[ReceivedRequest] = []
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    async def webhook(request: web.Request) -> web.Response:
        await record(request, received)
        if len(received) == 3:
            loop.call_soon_threadsafe(stop.set)
        return web.json_response({"status": "accepted"})

    app = web.Application()
    app.router.add_post(WEBHOOK, webhook)
    progress: list[int] = []
    with serve(app) as base_url:
        summary = await simulate(
            SimulationOptions(
                url=base_url + WEBHOOK, events=None, rate=400, flush_interval_seconds=0.05
            ),
            stop=stop,
            on_progress=lambda p: progress.append(p.events_acknowledged),
            progress_interval_seconds=0.05,
        )

    assert summary.ok and summary.posts == len(received) >= 3
    assert summary.events == len(set(event_ids(received)))
    assert progress[-1] == summary.events  # the last report is the final count


async def test_a_duration_bounds_a_run() -> None:
    received: list[ReceivedRequest] = []
    with serve(answering([], received)) as base_url:
        summary = await simulate(
            SimulationOptions(
                url=base_url + WEBHOOK,
                events=None,
                duration_seconds=0.3,
                rate=500,
                flush_interval_seconds=0.05,
            )
        )

    assert summary.ok and 0 < summary.events <= 150
    assert summary.events == len(set(event_ids(received)))


def test_backoff_grows_until_its_cap() -> None:
    from itertools import islice

    from sgpipe.simulator.simulation import backoff_delays

    delays = list(islice(backoff_delays(1.0, 60.0), 10))
    assert all(later > earlier for earlier, later in zip(delays[:6], delays[1:7], strict=True))
    assert 0.9 <= delays[0] <= 1.0 and 54 <= delays[-1] <= 60


def test_the_progress_line_overwrites_itself() -> None:
    output = io.StringIO()
    line = _ProgressLine(output)
    line(SimulationProgress(events_sent=2500, events_acknowledged=2000, retries=3))
    line.finish()
    text = output.getvalue()
    assert text.startswith("\rsent 2,500  acknowledged 2,000  retried 3  rejected 0  ")
    assert text.endswith(" events/s\x1b[K\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--client-id", "x"], "OAuth needs --oauth-token-url, --client-id and --client-secret"),
        (["--private-key", "/nonexistent/key.pem"], "cannot read /nonexistent/key.pem"),
        (["--url", "ftp://x"], "the URL must be http(s)://"),
    ],
)
def test_unusable_options_exit_2_with_one_line(args: list[str], message: str) -> None:
    argv = ["simulate", "--log-format", "console", "--url", "http://127.0.0.1:1/x", *args]
    result = run_sgpipe(argv)
    assert result.returncode == 2
    error = result.stderr
    assert error.startswith("sgpipe: ") and message in error and error.count("\n") == 1


def test_out_of_range_numbers_are_usage_errors() -> None:
    for bad in (["--duplicates", "1.5"], ["--events", "0"], ["--rate", "-1"]):
        result = run_sgpipe(["simulate", "--url", "http://127.0.0.1:1/x", *bad])
        assert result.returncode == 2 and "usage: sgpipe simulate" in result.stderr


def test_public_key_of_a_generated_key_is_what_sendgrid_shows() -> None:
    encoded = public_key_base64(generate_private_key())
    assert encoded.startswith("MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE")  # P-256 SPKI prefix
    load_public_key(encoded)
