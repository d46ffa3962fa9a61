"""/healthz, /readyz and /metrics of a stage, alone and fronting other stages (peers)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from sgpipe.runtime import health, metrics
from sgpipe.runtime.health import Progress, Readiness, create_health_app, serve_health
from sgpipe.runtime.runner import bound_port


@pytest.fixture
async def peer() -> AsyncIterator[tuple[str, Readiness]]:
    """Another stage's health server on a real port."""
    readiness = Readiness("sink")
    readiness.set("kafka", True, "broker reachable")
    runner = await serve_health(readiness, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{bound_port(runner)}", readiness
    finally:
        await runner.cleanup()


class SlowPeer:
    """A stage's /readyz on a real port that answers ``ready`` at once while ``answering`` is
    set, and otherwise hangs until the test ends: a stage whose event loop is busy."""

    def __init__(self) -> None:
        self.answering = asyncio.Event()
        self.released = asyncio.Event()
        self.url = ""

    async def readyz(self, _request: web.Request) -> web.Response:
        if not self.answering.is_set():
            await self.released.wait()
        return web.json_response(
            {"status": "ready", "checks": {"process.kafka": {"ok": True, "detail": "ok"}}}
        )


@pytest.fixture
async def slow_peer() -> AsyncIterator[SlowPeer]:
    peer = SlowPeer()
    app = web.Application()
    app.router.add_get("/readyz", peer.readyz)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    peer.url = f"http://127.0.0.1:{bound_port(runner)}"
    try:
        yield peer
    finally:
        peer.released.set()  # the hanging handler returns: the runner stops at once
        await runner.cleanup()


async def front_of(peer: SlowPeer) -> TestClient[web.Request, web.Application]:
    """`sgpipe up`'s front: its own check holds, the peer is asked with a short timeout."""
    readiness = Readiness("up")
    readiness.set("children", True, "every child running")
    return await client_for(create_health_app(readiness, [peer.url], peer_timeout_seconds=0.2))


async def client_for(app: web.Application) -> TestClient[web.Request, web.Application]:
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


async def test_healthz_names_the_stage() -> None:
    client = await client_for(create_health_app(Readiness("process")))
    try:
        response = await client.get("/healthz")
        assert response.status == 200
        assert await response.json() == {"status": "ok", "stage": "process"}
    finally:
        await client.close()


async def test_readyz_is_503_naming_the_failing_check_and_200_once_all_hold() -> None:
    readiness = Readiness("process")
    readiness.set("kafka", False, "broker unreachable: KafkaConnectionError")
    readiness.add_check("assigned", lambda: (True, "2 partitions assigned"))
    client = await client_for(create_health_app(readiness))
    try:
        response = await client.get("/readyz")
        assert response.status == 503
        body = await response.json()
        assert body["status"] == "not_ready"
        assert body["checks"]["process.kafka"] == {
            "ok": False,
            "detail": "broker unreachable: KafkaConnectionError",
        }
        assert metrics.REGISTRY.get_sample_value("sgpipe_ready", {"stage": "process"}) == 0

        readiness.set("kafka", True, "broker reachable")
        response = await client.get("/readyz")
        assert response.status == 200
        assert metrics.REGISTRY.get_sample_value("sgpipe_ready", {"stage": "process"}) == 1
    finally:
        await client.close()


async def test_a_process_running_several_stages_is_ready_only_when_each_is() -> None:
    # `sgpipe sink` runs the events sink and the dead-letter sink behind one endpoint.
    sink, dead_letters = Readiness("sink"), Readiness("dead_letters")
    sink.set("kafka", True, "broker reachable")
    dead_letters.set("destination", False, "ClickHouse: ConnectionError")
    client = await client_for(create_health_app([sink, dead_letters]))
    try:
        assert await (await client.get("/healthz")).json() == {"status": "ok", "stage": "sink"}
        response = await client.get("/readyz")
        assert response.status == 503
        checks = (await response.json())["checks"]
        assert checks == {
            "sink.kafka": {"ok": True, "detail": "broker reachable"},
            "dead_letters.destination": {"ok": False, "detail": "ClickHouse: ConnectionError"},
        }

        dead_letters.set("destination", True, "ClickHouse reachable")
        assert (await client.get("/readyz")).status == 200
    finally:
        await client.close()


async def test_a_stage_with_no_checks_yet_is_not_ready() -> None:
    client = await client_for(create_health_app(Readiness("process")))
    try:
        assert (await client.get("/readyz")).status == 503
    finally:
        await client.close()


async def test_a_check_that_raises_counts_as_failing() -> None:
    readiness = Readiness("process")

    def broken() -> tuple[bool, str]:
        raise RuntimeError("oops")

    readiness.add_check("broken", broken)
    assert readiness.evaluate()["broken"] == (False, "check failed: RuntimeError('oops')")


async def test_readyz_covers_peers(peer: tuple[str, Readiness]) -> None:
    url, peer_readiness = peer
    readiness = Readiness("ingest")
    readiness.set("kafka", True, "producer ready")
    client = await client_for(create_health_app(readiness, peers=[url]))
    try:
        response = await client.get("/readyz")
        assert response.status == 200
        assert set((await response.json())["checks"]) == {"ingest.kafka", "sink.kafka"}

        peer_readiness.set("kafka", False, "broker unreachable")
        response = await client.get("/readyz")
        assert response.status == 503
        assert (await response.json())["checks"]["sink.kafka"]["ok"] is False
    finally:
        await client.close()


async def test_an_unreachable_peer_makes_the_front_not_ready() -> None:
    readiness = Readiness("ingest")
    readiness.set("kafka", True, "producer ready")
    client = await client_for(create_health_app(readiness, peers=["http://127.0.0.1:9"]))
    try:
        response = await client.get("/readyz")
        assert response.status == 503
        (check,) = [
            c for name, c in (await response.json())["checks"].items() if "127.0.0.1:9" in name
        ]
        assert check["ok"] is False and check["detail"].startswith("unreachable")
    finally:
        await client.close()


async def test_metrics_merge_the_peers_series(peer: tuple[str, Readiness]) -> None:
    url, _ = peer
    metrics.RECORDS_CONSUMED.labels("sink").inc(0)
    metrics.RECORDS_CONSUMED.labels("ingest-merge-test").inc(1)
    client = await client_for(create_health_app(Readiness("ingest"), peers=[url]))
    try:
        response = await client.get("/metrics")
        assert response.status == 200
        text = await response.text()
        assert text.count("# TYPE sgpipe_records_consumed_total counter") == 1
        # The peer here is this very process (one registry): its counters count twice, as two
        # replicas of one stage would (merge_exposition adds those up).
        assert 'sgpipe_records_consumed_total{stage="ingest-merge-test"} 2.0' in text
        assert text.count('sgpipe_records_consumed_total{stage="sink"}') == 1
    finally:
        await client.close()


def test_progress_stalls_only_past_its_threshold() -> None:
    progress = Progress(threshold_seconds=30)
    assert progress.check(None) == (True, "idle or progressing")
    assert progress.check(time.monotonic() - 5)[0] is True
    ok, detail = progress.check(time.monotonic() - 31)
    assert ok is False and detail == "no progress for 31 s"


async def test_peers_may_move_a_function_gives_the_current_ones(
    peer: tuple[str, Readiness],
) -> None:
    # `sgpipe up` fronts children that move to a new port when restarted.
    url, _ = peer
    current: list[str] = []
    readiness = Readiness("up")
    readiness.set("children", True, "every child running")
    client = await client_for(create_health_app(readiness, peers=lambda: current))
    try:
        assert set((await (await client.get("/readyz")).json())["checks"]) == {"up.children"}
        current.append(url)
        assert set((await (await client.get("/readyz")).json())["checks"]) == {
            "up.children",
            "sink.kafka",
        }
    finally:
        await client.close()


async def test_a_peer_that_hangs_is_unreachable_after_the_peer_timeout(
    slow_peer: SlowPeer,
) -> None:
    # A stage whose event loop is busy must not hold the front's answer past its own callers'
    # timeout: `sgpipe up` fronts its stages with a shorter timeout than the ingress's.
    client = await front_of(slow_peer)
    try:
        # Completes (the hanging peer never answers until released at the end).
        response = await asyncio.wait_for(client.get("/readyz"), 10)
        assert response.status == 503
        assert (await response.json())["checks"][slow_peer.url]["detail"].startswith("unreachable")
    finally:
        await client.close()


async def test_a_busy_peer_that_answered_lately_keeps_its_last_answer_then_goes_unreachable(
    slow_peer: SlowPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stage stepping a huge record holds the GIL for seconds and misses the front's timeout
    # while it is well: its last answer stands while fresh (the front's /readyz does not flap
    # under load), then it is unreachable like any peer that stopped answering.
    slow_peer.answering.set()
    client = await front_of(slow_peer)
    try:
        assert (await client.get("/readyz")).status == 200  # it answers: remembered
        slow_peer.answering.clear()  # now it is too busy to answer in time
        response = await asyncio.wait_for(client.get("/readyz"), 10)
        assert response.status == 200
        assert (await response.json())["checks"]["process.kafka"]["ok"] is True
        # Past the freshness window the last answer no longer stands.
        monkeypatch.setattr(health, "PEER_ANSWER_FRESH_SECONDS", 0.0)
        response = await asyncio.wait_for(client.get("/readyz"), 10)
        assert response.status == 503
        assert (await response.json())["checks"][slow_peer.url]["detail"].startswith("unreachable")
    finally:
        await client.close()


@pytest.mark.parametrize("failing_first", [True, False])
async def test_readyz_shows_a_check_failing_in_any_replica_of_a_stage(failing_first: bool) -> None:
    """Two processes of one stage (`sgpipe up --sinks 2`) answer under the same check names:
    the fronting /readyz is not ready while either fails, whichever answers first."""
    replicas = [Readiness("sink"), Readiness("sink")]
    replicas[0 if failing_first else 1].set("assigned", False, "no partition assigned")
    replicas[1 if failing_first else 0].set("assigned", True, "1 partitions assigned")
    runners = [await serve_health(readiness, "127.0.0.1", 0) for readiness in replicas]
    urls = [f"http://127.0.0.1:{bound_port(runner)}" for runner in runners]
    client = await client_for(create_health_app(Readiness("ingest"), peers=urls))
    try:
        response = await client.get("/readyz")
        assert response.status == 503
        body = await response.json()
        assert body["checks"]["sink.assigned"] == {
            "ok": False,
            "detail": "no partition assigned",
        }
    finally:
        await client.close()
        for runner in runners:
            await runner.cleanup()
