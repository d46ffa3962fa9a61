"""The ingress's in-flight byte budget (503 + Retry-After at once, memory bounded) and its
watch on SendGrid's retry clock (delivery delay, re-signed retries), over HTTP with fakes."""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from ingest.app import IN_FLIGHT, create_app
from schemas.raw_batch import RawBatch, decode_raw_batch, raw_batch_headers
from sgpipe.runtime import metrics
from sgpipe.runtime.settings import Settings
from tests.sendgrid_vector import new_key_pair, sign

Client = TestClient[web.Request, web.Application]
KEY, PUBLIC = new_key_pair()
BUDGET = 8 * 1024
BODY = b"[" + b",".join([b'{"event":"delivered","sg_event_id":"x"}'] * 50) + b"]\r\n"


class GatedPublisher:
    """Holds every publish until ``gate`` opens, like a Kafka that does not acknowledge."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.waiting = 0
        self.batches: list[RawBatch] = []

    async def publish(self, batch: RawBatch) -> None:
        self.waiting += 1
        await self.gate.wait()
        self.batches.append(batch)


def settings(**ingest: Any) -> Settings:
    return Settings.model_validate(
        {
            "webhooks": [{"name": "main", "public_keys": [PUBLIC]}],
            "ingest": {"max_in_flight_bytes": BUDGET, **ingest},
        }
    )


def signed(timestamp: int, body: bytes = BODY) -> dict[str, str]:
    return {
        "X-Twilio-Email-Event-Webhook-Signature": sign(KEY, str(timestamp), body),
        "X-Twilio-Email-Event-Webhook-Timestamp": str(timestamp),
        "Content-Type": "application/json",
    }


@pytest.fixture
def publisher() -> GatedPublisher:
    return GatedPublisher()


@pytest.fixture
async def client(publisher: GatedPublisher) -> AsyncIterator[Client]:
    async with TestClient(TestServer(create_app(settings(), publisher))) as test_client:
        yield test_client


async def wait_for(condition: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def sample(name: str, labels: dict[str, str]) -> float:
    return metrics.REGISTRY.get_sample_value(name, {"stage": "ingest", **labels}) or 0.0


async def test_requests_past_the_budget_get_503_at_once_and_the_held_ones_succeed(
    client: Client, publisher: GatedPublisher
) -> None:
    assert len(BODY) * 4 <= BUDGET < len(BODY) * 5
    now = int(time.time())
    held = [
        asyncio.create_task(client.post("/webhooks/main", data=BODY, headers=signed(now)))
        for _ in range(4)
    ]
    await wait_for(lambda: publisher.waiting == 4, "four batches waiting for Kafka")
    assert client.app[IN_FLIGHT].reserved == 4 * len(BODY)
    assert sample("sgpipe_ingest_in_flight_bytes", {}) == 4 * len(BODY)

    # Kafka still has not answered: the next requests are refused at once, bodies unread.
    for _ in range(3):
        # At once: a request that waited for Kafka instead would hang here (the gate is shut).
        response = await asyncio.wait_for(
            client.post("/webhooks/main", data=BODY, headers=signed(now)), timeout=30
        )
        assert response.status == 503
        assert response.headers["Retry-After"] == "5"
        assert (await response.json())["error"] == "overloaded"
    assert publisher.waiting == 4
    assert client.app[IN_FLIGHT].reserved == 4 * len(BODY)

    publisher.gate.set()
    answers = [await task for task in held]
    assert [answer.status for answer in answers] == [200] * 4
    ids = [(await answer.json())["request_id"] for answer in answers]
    assert sorted(batch.request_id for batch in publisher.batches) == sorted(ids)
    assert client.app[IN_FLIGHT].reserved == 0
    # The budget is free again: the refused batch, retried, is accepted.
    response = await client.post("/webhooks/main", data=BODY, headers=signed(now))
    assert response.status == 200
    assert len(publisher.batches) == 5


async def test_a_chunked_body_reserves_max_body_bytes(publisher: GatedPublisher) -> None:
    app = create_app(settings(max_body_bytes=BUDGET // 2 + 1), publisher)
    async with TestClient(TestServer(app)) as client:
        now = int(time.time())

        async def chunks() -> AsyncIterator[bytes]:
            yield BODY

        first = asyncio.create_task(
            client.post("/webhooks/main", data=chunks(), headers=signed(now))
        )
        await wait_for(lambda: publisher.waiting == 1, "the chunked batch waiting for Kafka")
        assert app[IN_FLIGHT].reserved == BUDGET // 2 + 1
        second = await client.post("/webhooks/main", data=chunks(), headers=signed(now))
        assert second.status == 503
        publisher.gate.set()
        assert (await first).status == 200
        assert len(publisher.batches) == 1


async def test_delivery_delay_is_recorded_on_the_batch_and_the_histogram(
    client: Client, publisher: GatedPublisher
) -> None:
    publisher.gate.set()
    count = sample("sgpipe_ingest_delivery_delay_seconds_count", {"webhook": "main"})
    late = sample(
        "sgpipe_ingest_delivery_delay_seconds_bucket", {"webhook": "main", "le": "+Inf"}
    ) - sample("sgpipe_ingest_delivery_delay_seconds_bucket", {"webhook": "main", "le": "43200.0"})
    signed_at = int(time.time()) - 13 * 3600  # a retry 13 hours after SendGrid signed it
    assert 43200.0 in metrics.INGEST_DELIVERY_DELAY_SECONDS._upper_bounds

    response = await client.post("/webhooks/main", data=BODY, headers=signed(signed_at))

    assert response.status == 200
    (batch,) = publisher.batches
    assert batch.delivery_delay_ms is not None
    assert 13 * 3600 * 1000 <= batch.delivery_delay_ms < 13 * 3600 * 1000 + 60_000
    decoded = decode_raw_batch(batch.body, raw_batch_headers(batch))
    assert decoded.delivery_delay_ms == batch.delivery_delay_ms
    assert sample("sgpipe_ingest_delivery_delay_seconds_count", {"webhook": "main"}) == count + 1
    assert (
        sample("sgpipe_ingest_delivery_delay_seconds_bucket", {"webhook": "main", "le": "+Inf"})
        - sample(
            "sgpipe_ingest_delivery_delay_seconds_bucket", {"webhook": "main", "le": "43200.0"}
        )
        == late + 1
    )


async def test_a_retry_re_signed_with_a_new_timestamp_is_counted(
    client: Client, publisher: GatedPublisher
) -> None:
    publisher.gate.set()

    def repeated(kind: str) -> float:
        return sample(
            "sgpipe_ingest_repeated_batches_total", {"webhook": "main", "timestamp": kind}
        )

    new, same = repeated("new"), repeated("same")
    body = BODY.replace(b'"x"', f'"{time.time_ns()}"'.encode())
    first = int(time.time()) - 600
    for timestamp in (first, first, first + 300):
        response = await client.post("/webhooks/main", data=body, headers=signed(timestamp, body))
        assert response.status == 200
    assert repeated("same") == same + 1
    assert repeated("new") == new + 1
    assert len(publisher.batches) == 3


async def test_a_compressed_body_reserves_what_it_may_decode_to(publisher: GatedPublisher) -> None:
    compressed = gzip.compress(BODY)
    app = create_app(settings(max_decompression_ratio=40), publisher)
    async with TestClient(TestServer(app)) as client:
        headers = {**signed(int(time.time())), "Content-Encoding": "gzip"}
        held = asyncio.create_task(client.post("/webhooks/main", data=compressed, headers=headers))
        await wait_for(lambda: publisher.waiting == 1, "the gzip batch waiting for Kafka")
        assert app[IN_FLIGHT].reserved == len(compressed) * 40
        publisher.gate.set()
        assert (await held).status == 200
        assert publisher.batches[0].body == BODY
        assert app[IN_FLIGHT].reserved == 0
