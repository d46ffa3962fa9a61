"""The ingress with its real Kafka producer while the broker dies and comes back: a POST is
answered 200 only once the batch is acknowledged — while the broker is gone every answer is a
503 with Retry-After (never 200, never 500) and /readyz says 503; once it is back, both recover
by themselves. Each test runs its own tansu process and kills it by PID."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest

from ingest.app import create_app
from ingest.protocol import start_ingress
from sgpipe.embedded.broker import EmbeddedBroker
from sgpipe.runtime.kafka import ensure_topics
from sgpipe.runtime.settings import Settings
from tests.integration.kafka_tools import kafka_test_settings, read_topic
from tests.ports import free_port
from tests.sendgrid_vector import BODY, PUBLIC_KEY, SIGNATURE, TIMESTAMP

pytestmark = pytest.mark.kafka

HEADERS = {
    "Content-Type": "application/json;charset=utf-8",
    "X-Twilio-Email-Event-Webhook-Signature": SIGNATURE,
    "X-Twilio-Email-Event-Webhook-Timestamp": TIMESTAMP,
}


def ingress_settings(bootstrap_servers: str, suffix: str) -> Settings:
    settings = kafka_test_settings(
        bootstrap_servers,
        suffix,
        webhooks=[{"name": "main", "public_keys": [PUBLIC_KEY]}],
        ingest={"publish_timeout_seconds": 1.5, "readiness_probe_interval_seconds": 0.3},
    )
    kafka = settings.kafka.model_copy(update={"request_timeout_ms": 1500})
    return settings.model_copy(update={"kafka": kafka})


@asynccontextmanager
async def running_ingress(settings: Settings) -> AsyncIterator[str]:
    runner = await start_ingress(create_app(settings), "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def post(http: aiohttp.ClientSession, base: str, request_id: str) -> tuple[int, str | None]:
    headers = {**HEADERS, "X-Request-Id": request_id}
    async with http.post(f"{base}/webhooks/main", data=BODY, headers=headers) as response:
        await response.read()
        return response.status, response.headers.get("Retry-After")


async def readyz(http: aiohttp.ClientSession, base: str) -> tuple[int, Any]:
    async with http.get(f"{base}/readyz") as response:
        return response.status, await response.json()


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


async def kill_by_pid(broker: EmbeddedBroker) -> None:
    assert broker.pid is not None
    broker.kill()  # SIGKILL to its process group
    await broker.wait_exited()


async def test_broker_killed_under_the_ingress_means_503_then_recovery(unique_name: str) -> None:
    broker = EmbeddedBroker()
    servers = await broker.start()
    restarted: EmbeddedBroker | None = None
    settings = ingress_settings(servers, unique_name)
    topic = settings.kafka.topics.raw
    try:
        await ensure_topics(settings.kafka)
        async with running_ingress(settings) as base, aiohttp.ClientSession() as http:

            async def is_ready() -> bool:
                return (await readyz(http, base))[0] == 200

            await eventually(is_ready, "/readyz 200 with the broker up")
            assert await post(http, base, "before-loss") == (200, None)

            await kill_by_pid(broker)
            down = await asyncio.gather(*(post(http, base, f"down-{i}") for i in range(4)))
            later = [await post(http, base, f"down-late-{i}") for i in range(2)]
            # Never a 200 for a batch no broker acknowledged, never a 500.
            assert down + later == [(503, "5")] * 6

            async def is_not_ready() -> bool:
                status, document = await readyz(http, base)
                return status == 503 and not document["checks"]["ingest.kafka"]["ok"]

            await eventually(is_not_ready, "/readyz 503 with the broker dead")

            restarted = EmbeddedBroker(port=broker.port)
            await restarted.start()
            acknowledged: list[str] = []
            answers: set[int] = set()
            attempt = 0

            async def three_acknowledged() -> bool:
                nonlocal attempt
                attempt += 1
                status, retry_after = await post(http, base, f"after-{attempt}")
                answers.add(status)
                if status == 200:
                    acknowledged.append(f"after-{attempt}")
                else:
                    assert (status, retry_after) == (503, "5")
                return len(acknowledged) >= 3

            await eventually(three_acknowledged, "200 again after the broker restarted", 60)
            assert answers <= {200, 503}
            await eventually(is_ready, "/readyz 200 after the broker restarted")

        records = await read_topic(servers, topic, expected=len(acknowledged))
        published = {dict(record.headers)["sgpipe-request-id"].decode() for record in records}
        # Every batch acknowledged after the restart is on the (new, in-memory) topic.
        assert set(acknowledged) <= published
        assert all(record.value == BODY for record in records)
    finally:
        if restarted is not None:
            await restarted.stop()
        await broker.stop()


async def test_ingress_started_before_its_broker_answers_503_until_it_connects(
    unique_name: str,
) -> None:
    port = free_port()
    servers = f"127.0.0.1:{port}"
    settings = ingress_settings(servers, unique_name)
    broker = EmbeddedBroker(port=port)
    try:
        async with running_ingress(settings) as base, aiohttp.ClientSession() as http:
            assert await post(http, base, "too-early") == (503, "5")
            status, document = await readyz(http, base)
            assert status == 503
            assert document["checks"]["ingest.producer"]["ok"] is False

            await broker.start()
            await ensure_topics(settings.kafka)

            async def is_ready() -> bool:
                return (await readyz(http, base))[0] == 200

            await eventually(is_ready, "/readyz 200 once the broker is up", 60)
            assert await post(http, base, "in-time") == (200, None)
        records = await read_topic(servers, settings.kafka.topics.raw, expected=1)
        assert [dict(r.headers)["sgpipe-request-id"] for r in records] == [b"in-time"]
    finally:
        await broker.stop()
