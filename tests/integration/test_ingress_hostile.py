"""The hostile-input corpus (tests/ingress_corpus.py) against a real `sgpipe ingest` process
publishing to a real broker: each case gets its expected status, and exactly the expected
bytes reach the raw topic (or nothing does). Meanwhile /healthz is probed continuously: it must
answer throughout; its worst latency is reported (timings are asserted in bench/, not here).
Finally the server's log is checked: short lines, no tracebacks, no request bytes."""

from __future__ import annotations

import asyncio
import http.client
import json
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from aiokafka import AIOKafkaConsumer

from tests import forked
from tests.ingress_corpus import MARKER, HostileCase, Target, hostile_cases, server_config
from tests.ports import free_port
from tests.promise_report import REPORT
from tests.raw_http import exchange, http_request

# One xdist worker runs this module (make test: --dist loadgroup): its module-scoped fixture
# (the ingress process and its watchers) is then set up once, not once per worker.
pytestmark = [pytest.mark.kafka, pytest.mark.xdist_group("ingress-hostile")]

CASES = hostile_cases()
START_TIMEOUT = 60.0


class RawTopicWatcher:
    """Reads the raw topic from the start in a thread; request id -> bodies published."""

    def __init__(self, bootstrap_servers: str, topic: str) -> None:
        self._servers = bootstrap_servers
        self._topic = topic
        self._published: dict[str, list[bytes]] = {}
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._read()), daemon=True)
        self._thread.start()

    async def _read(self) -> None:
        consumer = AIOKafkaConsumer(
            self._topic,
            bootstrap_servers=self._servers,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            group_id=None,
            fetch_max_wait_ms=20,
        )
        await consumer.start()
        try:
            while not self._stop.is_set():
                polled = await consumer.getmany(timeout_ms=100)
                for records in polled.values():
                    for record in records:
                        request_id = dict(record.headers)["sgpipe-request-id"].decode()
                        with self._changed:
                            self._published.setdefault(request_id, []).append(record.value)
                            self._changed.notify_all()
        finally:
            await consumer.stop()

    def wait_for(self, request_id: str, timeout: float = 20.0) -> list[bytes]:
        with self._changed:
            self._changed.wait_for(lambda: request_id in self._published, timeout)
            return list(self._published.get(request_id, []))

    def published(self, request_id: str) -> list[bytes]:
        with self._changed:
            return list(self._published.get(request_id, []))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


@dataclass
class HealthzProbe:
    """GET /healthz every 10 ms on one keep-alive connection (like a kubelet's), from a
    thread."""

    target: Target
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._probe, daemon=True)
        self._thread.start()

    def _probe(self) -> None:
        connection = http.client.HTTPConnection(self.target.host, self.target.port, timeout=30)
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                connection.request("GET", "/healthz")
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    self.failures.append(f"HTTP {response.status}")
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(repr(exc))
                connection.close()
            self.latencies.append(time.perf_counter() - started)
            self._stop.wait(0.01)
        connection.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(40)


@dataclass
class HostileIngress:
    target: Target
    watcher: RawTopicWatcher
    probe: HealthzProbe
    log: Path

    async def assert_not_published(self, request_id: str) -> None:
        # The raw topic has one partition: once a later batch is there, an earlier one would be.
        sentinel = f"sentinel-{request_id}"
        request = http_request("/webhooks/open", b"[]", [("X-Request-Id", sentinel)])
        answer = (await exchange(self.target.host, self.target.port, [request]))[0]
        assert answer.status == 200
        assert self.watcher.wait_for(sentinel) == [b"[]"]
        assert self.watcher.published(request_id) == []


@pytest.fixture(scope="module")
def hostile_ingress(
    kafka_bootstrap_servers: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HostileIngress]:
    directory = tmp_path_factory.mktemp("hostile")
    document = server_config(kafka_bootstrap_servers, uuid.uuid4().hex[:10])
    config = directory / "sgpipe.yaml"
    config.write_text(yaml.safe_dump(document), encoding="utf-8")
    port = free_port()
    log = directory / "ingest.log"
    with log.open("wb") as output:
        process = forked.Popen(
            [sys.executable, "-m", "sgpipe.cli", "ingest", "--config", str(config)]
            + ["--port", str(port)],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}"
    watcher: RawTopicWatcher | None = None
    probe: HealthzProbe | None = None
    try:
        _wait_ready(base_url, process, log)
        watcher = RawTopicWatcher(kafka_bootstrap_servers, document["kafka"]["topics"]["raw"])
        probe = HealthzProbe(Target("127.0.0.1", port))
        yield HostileIngress(Target("127.0.0.1", port), watcher, probe, log)
    finally:
        if probe is not None:
            probe.close()
        if watcher is not None:
            watcher.close()
        process.terminate()
        process.wait(30)


def _wait_ready(base_url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"sgpipe ingest exited: {log.read_text()}")
        try:
            with urllib.request.urlopen(f"{base_url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"sgpipe ingest not ready in {START_TIMEOUT} s: {log.read_text()}")


def test_the_corpus_covers_every_class_with_at_least_40_cases() -> None:
    assert len(CASES) >= 40
    categories = {case.category for case in CASES}
    assert categories == {"signature", "timestamp", "encoding", "json_shape", "size", "http"}


@pytest.mark.hostile("ingress")
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
async def test_hostile_input(case: HostileCase, hostile_ingress: HostileIngress) -> None:
    request_id = f"{case.id}-{uuid.uuid4().hex[:8]}"
    response = await case.run(hostile_ingress.target, request_id)

    assert response.status == case.status, response.raw[:300]
    assert MARKER.encode() not in response.raw
    if case.error is not None:
        assert response.headers["content-type"].startswith("application/json")
        accepted = (case.error,) if isinstance(case.error, str) else case.error
        assert json.loads(response.body)["error"] in accepted
    if case.status == 503:
        assert response.headers["retry-after"].isdigit()
    if case.published is not None:
        assert hostile_ingress.watcher.wait_for(request_id) == [case.published]
    else:
        await hostile_ingress.assert_not_published(request_id)


def test_healthz_answered_throughout_the_corpus(
    hostile_ingress: HostileIngress, record_property: Callable[[str, object], None]
) -> None:
    probe = hostile_ingress.probe
    assert probe.latencies, "the probe never ran"
    assert probe.failures == []
    worst = max(probe.latencies)
    record_property("healthz_probes", len(probe.latencies))
    record_property("healthz_worst_seconds", round(worst, 4))
    REPORT.record_healthz(worst, len(probe.latencies))
    print(
        f"\n/healthz during the corpus: {len(probe.latencies)} probes, worst {worst * 1000:.1f} ms"
    )


def test_the_server_log_is_short_and_quotes_no_request(hostile_ingress: HostileIngress) -> None:
    lines = hostile_ingress.log.read_text(encoding="utf-8", errors="replace").splitlines()
    assert lines
    for line in lines:
        assert MARKER not in line, line
        assert "Traceback" not in line, line
        assert len(line) < 600, line
        json.loads(line)  # every line is one structured event
    # At most one line per request (rate limiting keeps floods shorter), plus start-up.
    assert len(lines) <= 2 * len(CASES) + 10  # each case and its sentinel
