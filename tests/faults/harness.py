"""The pieces a fault test is made of, each real and each breakable on purpose:

* ``BackgroundLoop``: an event loop in a thread of the test process that owns the services a
  test starts and breaks (the embedded broker with its supervisor, the ClickHouse server), so
  they keep running while the test's own loop drives the simulator;
* ``BrokerUnderTest``: the embedded Kafka-protocol broker (tansu, on SeaweedFS when durable)
  through ``EmbeddedKafka``, on a fixed port so that a restart keeps the clients' address;
* ``ClickHouseUnderTest``: the real engine served over ClickHouse's HTTP interface with
  credentials, stoppable and restartable on the same port and data path;
* ``StageProcesses``: ``sgpipe ingest``, ``sgpipe process`` and ``sgpipe sink`` as separate
  processes, each killable (SIGKILL), stoppable (SIGTERM) and freezable (SIGSTOP);
* ``stream_with_faults``: the simulator posting a known, signed, seeded event stream with
  duplicates while a fault script runs, every acknowledgement recorded in a ``Ledger``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from sgpipe.embedded.broker import EmbeddedKafka
from sgpipe.embedded.clickhouse import EmbeddedClickHouse
from sgpipe.embedded.credentials import EmbeddedCredentials, load_or_create_credentials
from sgpipe.runtime.settings import EmbeddedSettings
from sgpipe.simulator.simulation import SimulationOptions, SimulationSummary, simulate
from tests import forked
from tests.faults.ledger import DEDUP_VIEW, Ledger, LedgerReport, counts_by_event
from tests.integration.kafka_tools import FAST_GROUP_SETTINGS
from tests.integration.processes import SGPIPE
from tests.ports import free_port
from tests.raw_auth_support import RAW_AUTH_DOCUMENT

T = TypeVar("T")

SERVICE_TIMEOUT = 90.0
Stage = Literal["ingest", "process", "sink"]
STAGES: tuple[Stage, ...] = ("ingest", "process", "sink")


class BackgroundLoop:
    """An event loop running in its own thread for as long as the services it owns.

    Children spawned from it (tansu, weed) are tied to this thread's life by
    PR_SET_PDEATHSIG, which is why the broker is started and restarted only through it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="faults", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = SERVICE_TIMEOUT) -> T:
        """Run ``coroutine`` on the background loop, blocking the caller."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the background loop, awaited from another loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self.loop))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(SERVICE_TIMEOUT)
        self.loop.close()


class BrokerUnderTest:
    """The embedded broker as `sgpipe up` runs it (supervised: a killed process is restarted
    after a short backoff), on a port that survives restarts."""

    def __init__(
        self,
        background: BackgroundLoop,
        data_dir: Path,
        storage: Literal["durable", "memory"] = "durable",
    ) -> None:
        self._background = background
        self.data_dir = data_dir
        self.storage = storage
        self.port = free_port()
        self.kafka: EmbeddedKafka | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _settings(self) -> EmbeddedSettings:
        return EmbeddedSettings(kafka_port=self.port, broker_storage=self.storage)

    async def _start(self) -> None:
        kafka = EmbeddedKafka(self._settings(), self.data_dir)
        await kafka.start()
        self.kafka = kafka

    async def _stop(self) -> None:
        kafka, self.kafka = self.kafka, None
        if kafka is not None:
            await kafka.stop()

    def start(self) -> None:
        self._background.run(self._start())

    def stop(self) -> None:
        self._background.run(self._stop())

    async def start_async(self) -> None:
        await self._background.call(self._start())

    async def stop_async(self) -> None:
        await self._background.call(self._stop())

    def kill_broker(self) -> None:
        """SIGKILL tansu; the supervisor restarts it."""
        assert self.kafka is not None and self.kafka.broker is not None
        self.kafka.broker.kill()

    def kill_storage(self) -> None:
        """SIGKILL SeaweedFS; the supervisor restarts it."""
        assert self.kafka is not None and self.kafka.storage is not None
        self.kafka.storage.kill()

    def restarts(self) -> dict[str, int]:
        assert self.kafka is not None
        return self.kafka.restarts()

    def alive(self) -> bool:
        return self.kafka is not None and self.kafka.alive()


class ClickHouseUnderTest:
    """The embedded engine served over HTTP with credentials (the writer's go to the sink),
    restartable on the same port and data path."""

    def __init__(self, background: BackgroundLoop, directory: Path) -> None:
        self._background = background
        self.data_path = directory / "store"
        self.credentials: EmbeddedCredentials = load_or_create_credentials(directory)
        self.port = 0
        self._store: EmbeddedClickHouse | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The writer's URL, credentials included (a `clickhouse.url` setting)."""
        writer = self.credentials.writer
        return f"http://{writer.name}:{writer.password}@127.0.0.1:{self.port}"

    async def _start(self) -> None:
        store = EmbeddedClickHouse(self.data_path, self.credentials)
        url = await store.start(port=self.port)
        self.port = int(url.rsplit(":", 1)[1])
        self._store = store

    async def _stop(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            await store.stop()

    def start(self) -> None:
        self._background.run(self._start())

    def stop(self) -> None:
        self._background.run(self._stop())

    async def start_async(self) -> None:
        await self._background.call(self._start())

    async def stop_async(self) -> None:
        await self._background.call(self._stop())

    def query(self, sql: str) -> str:
        writer = self.credentials.writer
        request = urllib.request.Request(
            self.base_url,
            data=sql.encode(),
            method="POST",
            headers={"X-ClickHouse-User": writer.name, "X-ClickHouse-Key": writer.password},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return str(response.read().decode())

    def rows_by_event(self, database: str, relation: str, final: bool) -> Counter[str]:
        text = self.query(
            f"SELECT sg_event_id, count() FROM {database}.{relation}"
            f"{' FINAL' if final else ''} GROUP BY sg_event_id FORMAT TabSeparated"
        )
        return counts_by_event(text)

    def has_relation(self, database: str, name: str) -> bool:
        return self.query(f"EXISTS TABLE {database}.{name}").strip() == "1"

    def check(
        self, ledger: Ledger, database: str, expected: set[str] | None = None
    ) -> LedgerReport:
        """The ledger against ``{database}.email_events`` (through FINAL) and, when the schema
        has it, the dedup view."""
        if not self.has_relation(database, "email_events"):
            return ledger.compare(Counter(), rows=0, expected=expected)
        stored = self.rows_by_event(database, "email_events", final=True)
        rows = int(self.query(f"SELECT count() FROM {database}.email_events").strip())
        view = (
            self.rows_by_event(database, DEDUP_VIEW, final=False)
            if self.has_relation(database, DEDUP_VIEW)
            else None
        )
        return ledger.compare(stored, rows=rows, view=view, expected=expected)


@dataclass
class StageProcess:
    stage: Stage
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class StageProcesses:
    """The three stages of one pipeline as separate `sgpipe` processes."""

    directory: Path
    config: Path
    ingest_port: int
    current: dict[str, StageProcess] = field(default_factory=dict)
    # Every process started, killed ones included (for logs and exit codes).
    history: list[StageProcess] = field(default_factory=list)

    @property
    def webhook_url(self) -> str:
        return f"http://127.0.0.1:{self.ingest_port}/webhooks/main"

    def start(self, stage: Stage) -> StageProcess:
        number = sum(1 for started in self.history if started.stage == stage) + 1
        log = self.directory / f"{stage}-{number}.log"
        with log.open("wb") as output:
            process = forked.Popen(
                [*SGPIPE, stage, "--config", str(self.config)],
                stdout=output,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        started = StageProcess(stage, process, log)
        self.current[stage] = started
        self.history.append(started)
        return started

    def start_replica(self, stage: Stage) -> StageProcess:
        """Another process of ``stage`` beside the current one (a replica, a scale-out):
        not ``current``, so the single-process helpers leave it alone; ``kill_all`` and
        ``logs`` include it."""
        number = sum(1 for started in self.history if started.stage == stage) + 1
        log = self.directory / f"{stage}-{number}.log"
        with log.open("wb") as output:
            process = forked.Popen(
                [*SGPIPE, stage, "--config", str(self.config)],
                stdout=output,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        started = StageProcess(stage, process, log)
        self.history.append(started)
        return started

    def start_all(self) -> None:
        for stage in STAGES:
            self.start(stage)
        self.wait_ingress_ready()

    def kill(self, stage: Stage) -> None:
        """kill -9, as a crash or the OOM killer would; returns once it is gone."""
        victim = self.current[stage].process
        victim.kill()
        victim.wait(SERVICE_TIMEOUT)

    def terminate(self, stage: Stage, timeout: float = SERVICE_TIMEOUT) -> int:
        """SIGTERM (a rolling restart); returns its exit code once it stopped."""
        victim = self.current[stage].process
        victim.send_signal(signal.SIGTERM)
        return victim.wait(timeout)

    def freeze(self, stage: Stage) -> None:
        """SIGSTOP: connections are still accepted by the kernel, nothing is answered."""
        os.kill(self.current[stage].process.pid, signal.SIGSTOP)

    def thaw(self, stage: Stage) -> None:
        os.kill(self.current[stage].process.pid, signal.SIGCONT)

    def wait_ingress_ready(self, timeout: float = SERVICE_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        ingress = self.current["ingest"]
        while time.monotonic() < deadline:
            if ingress.process.poll() is not None:
                raise AssertionError(f"sgpipe ingest exited:\n{ingress.output()}")
            try:
                url = f"http://127.0.0.1:{self.ingest_port}/readyz"
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.HTTPError):
                pass
            time.sleep(0.1)
        raise AssertionError(f"sgpipe ingest not ready in {timeout} s:\n{ingress.output()}")

    def assert_running(self) -> None:
        """Every current stage is still running: none stopped itself during the faults."""
        for started in self.current.values():
            assert started.process.poll() is None, (
                f"sgpipe {started.stage} exited with {started.process.returncode}:\n"
                f"{started.output()[-4000:]}"
            )

    def stop_all(self, timeout: float = SERVICE_TIMEOUT) -> dict[str, int]:
        """SIGTERM every current stage; their exit codes (0: a clean stop in time)."""
        codes: dict[str, int] = {}
        for started in self.current.values():
            if started.process.poll() is None:
                started.process.send_signal(signal.SIGTERM)
        for stage, started in self.current.items():
            try:
                codes[stage] = started.process.wait(timeout)
            except subprocess.TimeoutExpired:
                started.process.kill()
                started.process.wait()
                codes[stage] = -signal.SIGKILL
        return codes

    def kill_all(self) -> None:
        for started in self.history:
            if started.process.poll() is None:
                started.process.kill()
                started.process.wait()

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(
            f"--- {started.log.name} (exit {started.process.poll()})\n{started.output()[-tail:]}"
            for started in self.history
        )


def pipeline_config(
    *,
    bootstrap_servers: str,
    clickhouse_url: str,
    suffix: str,
    ingest_port: int,
    public_key: str,
) -> dict[str, Any]:
    """One pipeline's settings: its own topics, groups and database; short timeouts and
    backoffs so that a fault and its recovery fit in seconds (production keeps the defaults)."""
    stage_common = {
        "health_host": "127.0.0.1",
        "health_port": 0,
        "retry_backoff_initial_seconds": 0.1,
        "retry_backoff_max_seconds": 1.0,
        "stop_timeout_seconds": 15,
    }
    return {
        "kafka": {
            "bootstrap_servers": bootstrap_servers,
            **FAST_GROUP_SETTINGS,
            "request_timeout_ms": 5000,
            "start_timeout_seconds": 60,
            "topics": {
                "raw": f"raw-{suffix}",
                "events": f"events-{suffix}",
                "dead_letter": f"dlq-{suffix}",
                "partitions": 2,
            },
        },
        "clickhouse": {"url": clickhouse_url, "database": f"faults_{suffix}"},
        "webhooks": [{"name": "main", "public_keys": [public_key]}],
        "ingest": {
            "host": "127.0.0.1",
            "port": ingest_port,
            "publish_timeout_seconds": 3,
            "readiness_probe_interval_seconds": 0.3,
        },
        "processor": {"group_id": f"processor-{suffix}", **stage_common},
        "sink": {"group_id": f"sink-{suffix}", "batch_max_seconds": 0.2, **stage_common},
        "logging": {"format": "json"},
        "raw_auth": RAW_AUTH_DOCUMENT,
    }


@contextmanager
def stage_processes(directory: Path, document: dict[str, Any]) -> Iterator[StageProcesses]:
    """The three stages started on ``document`` (ingress ready on return); every process this
    pipeline started is killed on the way out if still running."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "sgpipe.yaml"
    config.write_text(yaml.safe_dump(document))
    processes = StageProcesses(directory, config, int(document["ingest"]["port"]))
    try:
        processes.start_all()
        yield processes
    finally:
        processes.kill_all()


# --- streaming -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stream:
    """A fixed-rate simulated SendGrid stream: seeded (the same bodies every run), signed, with
    duplicates (single events re-sent and whole batches posted again).

    It lasts as long as the fault script (``stream_with_faults``), which waits for what it
    needs -- events flowing before the fault, the fault observed, events flowing end to end
    through what it broke -- and ``seconds`` at least: 0 by default, since a fixed length
    proves nothing a condition does not (it only made every fault test stream for 12 s
    whatever its faults took). A test whose last fault needs traffic after it that no
    condition waits for (a member's session expiring) sets it."""

    seed: int
    seconds: float = 0.0
    rate: float = 300.0  # events per second, copies included
    duplicates: float = 0.1
    flush_interval_seconds: float = 0.2  # ~60 events per POST at the default rate

    def options(self, url: str, private_key: ec.EllipticCurvePrivateKey) -> SimulationOptions:
        return SimulationOptions(
            url=url,
            private_key=private_key,
            events=None,
            duration_seconds=self.seconds or None,  # None: as long as the faults last
            rate=self.rate,
            duplicates=self.duplicates,
            concurrency=4,
            seed=self.seed,
            flush_interval_seconds=self.flush_interval_seconds,
            request_timeout_seconds=20.0,
            # SendGrid retries for 24 h, doubling up to an hour; compressed for a test run.
            retry_for_seconds=180.0,
            initial_backoff_seconds=0.2,
            max_backoff_seconds=2.0,
        )


FaultScript = Callable[[], Awaitable[None]]


async def stream_with_faults(
    options: SimulationOptions, ledger: Ledger, faults: FaultScript
) -> SimulationSummary:
    """Run the simulator and ``faults`` side by side; returns the simulator's summary once
    every planned POST was acknowledged or given up on. A failing fault script stops the
    simulation.

    The stream lasts ``options.duration_seconds`` *and* until the fault script is done: on a
    busy machine the faults wait for what they need (events flowing, the fault observed, the
    restart done) for as long as that takes, and the traffic they are injected into goes on
    meanwhile instead of ending under them."""
    stop = asyncio.Event()
    endless = dataclasses.replace(options, events=None, duration_seconds=None)
    simulation = asyncio.create_task(
        simulate(endless, stop=stop, on_post=ledger.on_post, on_acknowledged=ledger.on_acknowledged)
    )
    try:
        await asyncio.gather(faults(), asyncio.sleep(options.duration_seconds or 0.0))
    except BaseException:
        simulation.cancel()
        raise
    stop.set()
    return await simulation


# --- waiting on what a fault needs, never on the clock -----------------------------------------
# Each wait has a deadline and says what it waited for when it expires. The stream goes on
# until the fault script is done (stream_with_faults), so a slow machine only makes it longer.

FAULT_WAIT_SECONDS = 120.0


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` (in a thread: it may ask ClickHouse) until it holds; fail naming
    ``what`` after FAULT_WAIT_SECONDS."""
    deadline = time.monotonic() + FAULT_WAIT_SECONDS
    while not await asyncio.to_thread(condition):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {FAULT_WAIT_SECONDS} s waiting for {what}")
        await asyncio.sleep(0.1)


async def events_flowing(ledger: Ledger, stored_rows: Callable[[], int], moment: str) -> None:
    """Wait until events acknowledged from now on are stored (``stored_rows`` grows): every
    stage is up and working (none is still starting), so the next fault hits a running
    pipeline, however busy the machine."""
    acknowledged = ledger.posts_acknowledged
    stored = await asyncio.to_thread(stored_rows)
    await wait_for(
        lambda: ledger.posts_acknowledged > acknowledged and stored_rows() > stored,
        f"events acknowledged and stored end to end {moment}",
    )


async def wait_until_stored(
    clickhouse: ClickHouseUnderTest,
    ledger: Ledger,
    database: str,
    *,
    expected: set[str] | None = None,
    timeout: float = 120.0,
) -> LedgerReport:
    """Poll until every expected (by default: acknowledged) event is stored, then return the
    report (which may still show losses if ``timeout`` passed first)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            report = await asyncio.to_thread(clickhouse.check, ledger, database, expected)
        except OSError:
            report = None
        if report is not None and not report.lost and not report.view_lost:
            return report
        if time.monotonic() >= deadline:
            if report is None:
                report = await asyncio.to_thread(clickhouse.check, ledger, database, expected)
            return report
        await asyncio.sleep(0.5)


def log_events(text: str, event: str) -> list[dict[str, Any]]:
    """The JSON log lines of a process output whose event is ``event``."""
    found = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if entry.get("event") == event:
                found.append(entry)
    return found
