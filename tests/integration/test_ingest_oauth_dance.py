"""SendGrid's whole OAuth dance, played by `sgpipe simulate` against the ingress with its
built-in token endpoint and its real Kafka producer on the session broker: token fetched,
batches accepted, the cached token expires -> 401 invalid_token -> a new token -> accepted, and
every event on the raw topic.

The ingress runs in this process (``start_ingress``, the runner `sgpipe ingest` uses) so that
the test can make the first token expire while the simulator still caches it: tokens are issued
by ``ingest.oauth._issue_clock``, set back so that they live a few seconds, then restored once
the ingress refused one as expired. Real SendGrid meets the same case when its clock runs
ahead of ours or it keeps a token past its lifetime."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable

import pytest

import ingest.oauth
from ingest.app import create_app
from ingest.oauth import hash_client_secret
from ingest.protocol import start_ingress
from sgpipe.runtime import metrics
from sgpipe.runtime.kafka import ensure_topics
from tests.integration.kafka_tools import kafka_test_settings, read_topic

pytestmark = pytest.mark.kafka

EVENTS = 600
CLIENT_ID, CLIENT_SECRET = "sendgrid-dance", "dance-secret-0123456789abcdef"
TTL = 900
# The first tokens live this long in real time (their exp is set back by TTL - this).
SHORT_LIFE_SECONDS = 2


def sample(name: str, labels: dict[str, str]) -> float:
    return metrics.REGISTRY.get_sample_value(name, {"stage": "ingest", **labels}) or 0.0


async def wait_until(condition: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)


async def test_sendgrid_oauth_dance_with_the_built_in_token_endpoint(
    kafka_bootstrap_servers: str, unique_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = kafka_test_settings(
        kafka_bootstrap_servers,
        unique_name,
        webhooks=[
            {
                "name": "main",
                "auth": "token",
                "oauth_clients": [
                    {"client_id": CLIENT_ID, "secret_hash": hash_client_secret(CLIENT_SECRET)}
                ],
            }
        ],
        ingest={
            "oauth_signing_keys": [ingest.oauth.generate_signing_key_pem()],
            "oauth_token_ttl_seconds": TTL,
            "oauth_leeway_seconds": 0,
        },
    )
    await ensure_topics(settings.kafka)
    monkeypatch.setattr(
        ingest.oauth, "_issue_clock", lambda: time.time() - TTL + SHORT_LIFE_SECONDS
    )
    expired_before = sample(
        "sgpipe_ingest_auth_failures_total",
        {"webhook": "main", "method": "token", "reason": "expired"},
    )
    issued_before = sample("sgpipe_oauth_token_requests_total", {"outcome": "issued"})
    accepted_before = sample(
        "sgpipe_ingest_requests_total", {"webhook": "main", "outcome": "accepted"}
    )

    runner = await start_ingress(create_app(settings), "127.0.0.1", 0)
    simulator = None
    try:
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        simulator = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sgpipe",
            "simulate",
            "--url",
            f"{base}/webhooks/main",
            "--oauth-token-url",
            f"{base}/oauth/token",
            "--client-id",
            CLIENT_ID,
            "--client-secret",
            CLIENT_SECRET,
            "--events",
            str(EVENTS),
            "--rate",
            "60",
            "--flush-interval",
            "0.5",
            "--concurrency",
            "2",
            "--seed",
            "18",
            "--json",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )

        def expired() -> float:
            return sample(
                "sgpipe_ingest_auth_failures_total",
                {"webhook": "main", "method": "token", "reason": "expired"},
            )

        # Phase 1: a token is fetched and batches are accepted with it.
        await wait_until(
            lambda: (
                sample("sgpipe_ingest_requests_total", {"webhook": "main", "outcome": "accepted"})
                > accepted_before
            ),
            "a batch accepted with the first token",
            timeout=60,
        )
        # Phase 2: the token the simulator caches expires: 401 invalid_token.
        await wait_until(lambda: expired() > expired_before, "a POST refused as expired", 60)
        monkeypatch.setattr(ingest.oauth, "_issue_clock", time.time)
        accepted_at_expiry = sample(
            "sgpipe_ingest_requests_total", {"webhook": "main", "outcome": "accepted"}
        )

        stdout, stderr = await asyncio.wait_for(simulator.communicate(), timeout=240)
        assert simulator.returncode == 0, stdout.decode() + stderr.decode()
        summary = json.loads(stdout)
    finally:
        if simulator is not None and simulator.returncode is None:
            simulator.kill()
            await simulator.wait()
        await runner.cleanup()

    # Phase 3: a fresh token was fetched and the refused batches were accepted with it.
    assert summary["events"] == summary["events_accepted"] == EVENTS
    assert summary["responses"].get("401", 0) >= 1
    assert summary["token_requests"] >= 2
    assert sample("sgpipe_oauth_token_requests_total", {"outcome": "issued"}) >= issued_before + 2
    assert (
        sample("sgpipe_ingest_requests_total", {"webhook": "main", "outcome": "accepted"})
        > accepted_at_expiry
    )
    # Every event is on the raw topic, in batches authenticated by token; none of the refused
    # POSTs was published.
    accepted = summary["posts_acknowledged"]
    records = await read_topic(kafka_bootstrap_servers, settings.kafka.topics.raw, accepted)
    assert len(records) == accepted
    event_ids: set[str] = set()
    for record in records:
        headers = dict(record.headers)
        assert headers["sgpipe-authenticated-by"] == b"token"
        assert record.value is not None
        event_ids.update(event["sg_event_id"] for event in json.loads(record.value))
    assert len(event_ids) == EVENTS
