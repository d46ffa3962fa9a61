"""Fault injection: the stages as separate processes (`sgpipe ingest`, `sgpipe process`,
`sgpipe sink`) on the durable embedded broker (tansu on SeaweedFS) and the real ClickHouse
engine served over HTTP with credentials, while the simulator streams a known, signed, seeded
event set with SendGrid's duplicates -- and something is broken on purpose.

After each fault, the promise (docs/guarantees.md):
* every event the ingress acknowledged (a 2xx) is in ``email_events`` exactly once through
  FINAL (and in the dedup view, once the schema has it), and nothing else is;
* every refused request got a retryable answer (503, a timeout, a refused or cut connection):
  never a 4xx or a 500 for a valid batch;
* the simulator's retries eventually land every event;
* every stage still runs, and stops cleanly (exit 0) within its stop deadline.

The broker and ClickHouse are shared by the tests of this module (each test has its own
topics, groups and database); a test that breaks one of them restores it before it returns.
"""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.consumer.group_coordinator import GroupCoordinator
from aiokafka.errors import (
    CommitFailedError,
    KafkaError,
    NoOffsetForPartitionError,
    UnknownTopicOrPartitionError,
)
from aiokafka.structs import OffsetAndMetadata, TopicPartition
from cryptography.hazmat.primitives.asymmetric import ec

from schemas.email_event import EmailEventCodec
from sgpipe.runtime import kafka as kafka_module
from sgpipe.runtime.kafka import (
    CommittedTopicMissing,
    OutgoingRecord,
    ReadBack,
    TopicWriter,
    create_admin,
    create_consumer,
    create_producer,
    create_reader,
    ensure_topics,
    probe_topics,
)
from sgpipe.runtime.settings import Settings
from sgpipe.simulator.keys import generate_private_key, public_key_base64
from sgpipe.simulator.simulation import SimulationSummary
from tests.faults import harness
from tests.faults.harness import (
    FAULT_WAIT_SECONDS,
    SERVICE_TIMEOUT,
    BackgroundLoop,
    BrokerUnderTest,
    ClickHouseUnderTest,
    FaultScript,
    Stage,
    StageProcess,
    StageProcesses,
    Stream,
    log_events,
    pipeline_config,
    stage_processes,
    stream_with_faults,
    wait_for,
    wait_until_stored,
)
from tests.faults.ledger import (
    Ledger,
    LedgerReport,
    event_ids,
    refusals,
    unacceptable_refusals,
)
from tests.integration.kafka_tools import FAST_GROUP_SETTINGS
from tests.ports import free_port
from tests.promise_report import REPORT, FaultOutcome

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]
# The fault tests run on two xdist workers (make test: --dist loadgroup), each with its own
# module-scoped broker and ClickHouse: two pipelines under faults at a time at most, on a
# 2-core machine, while the longest group still fits the suite's time.
FAULTS_A = pytest.mark.xdist_group("faults-a")
FAULTS_B = pytest.mark.xdist_group("faults-b")

# What a stage logs when a rebalance takes its partitions (sgpipe/runtime/stage.py).
REVOKED = "partitions revoked; their uncommitted records are left to their next owner"


@pytest.fixture(scope="module")
def background() -> Iterator[BackgroundLoop]:
    loop = BackgroundLoop()
    try:
        yield loop
    finally:
        loop.close()


@pytest.fixture(scope="module")
def durable_broker(
    background: BackgroundLoop, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerUnderTest]:
    broker = BrokerUnderTest(background, tmp_path_factory.mktemp("durable-broker"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def clickhouse(
    background: BackgroundLoop, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ClickHouseUnderTest]:
    served = ClickHouseUnderTest(background, tmp_path_factory.mktemp("clickhouse"))
    served.start()
    try:
        yield served
    finally:
        served.stop()


@dataclass
class Pipeline:
    processes: StageProcesses
    clickhouse: ClickHouseUnderTest
    database: str
    private_key: ec.EllipticCurvePrivateKey
    ledger: Ledger


@pytest.fixture
async def pipeline(
    durable_broker: BrokerUnderTest,
    clickhouse: ClickHouseUnderTest,
    tmp_path: Path,
    unique_name: str,
) -> AsyncIterator[Pipeline]:
    """The three stages on the shared durable broker and ClickHouse, ingress ready."""
    async with running_pipeline(durable_broker, clickhouse, tmp_path, unique_name) as running:
        yield running


@asynccontextmanager
async def running_pipeline(
    broker: BrokerUnderTest,
    clickhouse: ClickHouseUnderTest,
    tmp_path: Path,
    suffix: str,
    *,
    partitions: int | None = None,
) -> AsyncIterator[Pipeline]:
    # A test that failed half-way may have left a service down: the next one starts healthy.
    if not broker.alive():
        await broker.stop_async()
        await broker.start_async()
    if clickhouse.port == 0 or not await asyncio.to_thread(_answers, clickhouse):
        await clickhouse.stop_async()
        await clickhouse.start_async()
    private_key = generate_private_key()
    document = pipeline_config(
        bootstrap_servers=broker.bootstrap_servers,
        clickhouse_url=clickhouse.url,
        suffix=suffix,
        ingest_port=free_port(),
        public_key=public_key_base64(private_key),
    )
    if partitions is not None:
        document["kafka"]["topics"]["partitions"] = partitions
    context = stage_processes(tmp_path / "stages", document)
    processes = await asyncio.to_thread(context.__enter__)
    try:
        yield Pipeline(
            processes, clickhouse, document["clickhouse"]["database"], private_key, Ledger()
        )
    finally:
        await asyncio.to_thread(context.__exit__, None, None, None)


async def wait_until_consuming(pipeline: Pipeline, stage: Stage, timeout: float = 90.0) -> None:
    """Wait until the current ``stage`` process logged that it consumes (started, migrated)."""
    await wait_until_logged(
        pipeline.processes.current[stage],
        "consuming",
        lambda entry: entry.get("stage") == stage,
        f"sgpipe {stage} consuming",
        timeout,
    )


async def wait_until_logged(
    started: StageProcess,
    event: str,
    matches: Callable[[dict[str, Any]], bool],
    what: str,
    timeout: float = 90.0,
) -> None:
    """Wait until ``started`` logged ``event`` with an entry that ``matches``; fail naming
    ``what`` if it exits or the deadline passes first."""
    deadline = time.monotonic() + timeout
    while not any(matches(entry) for entry in log_events(started.output(), event)):
        if time.monotonic() >= deadline or started.process.poll() is not None:
            raise AssertionError(
                f"not within {timeout:.0f} s: {what} (exit {started.process.poll()}):\n"
                f"{started.output()[-3000:]}"
            )
        await asyncio.sleep(0.1)


async def wait_for_stored_rows(pipeline: Pipeline, minimum: int, timeout: float = 90.0) -> int:
    """Wait until ``email_events`` holds at least ``minimum`` rows: events flow end to end."""
    deadline = time.monotonic() + timeout
    query = f"SELECT count() FROM {pipeline.database}.email_events"
    rows = 0
    while time.monotonic() < deadline:
        try:
            rows = int((await asyncio.to_thread(pipeline.clickhouse.query, query)).strip())
        except (OSError, ValueError):
            rows = 0  # the sink has not created the table yet
        if rows >= minimum:
            return rows
        await asyncio.sleep(0.1)
    raise AssertionError(
        f"{pipeline.database}.email_events did not reach {minimum} rows in {timeout:.0f} s "
        f"(has {rows}):\n{pipeline.processes.logs()}"
    )


def _answers(clickhouse: ClickHouseUnderTest) -> bool:
    try:
        return clickhouse.query("SELECT 1").strip() == "1"
    except OSError:
        return False


async def run_faults(
    pipeline: Pipeline,
    stream: Stream,
    faults: FaultScript,
    *,
    name: str,
    injected: int,
    expected: Callable[[Ledger], set[str]] | None = None,
    stop_replicas: Sequence[StageProcess] = (),
) -> tuple[SimulationSummary, LedgerReport]:
    """Stream while ``faults`` runs, then check the promise; records the outcome for the
    run's closing summary. ``expected``: which acknowledged events must be stored, once the
    stream ended (all of them unless the configuration documents a loss). ``stop_replicas``:
    processes beside the current ones that must still run and stop cleanly too."""
    options = stream.options(pipeline.processes.webhook_url, pipeline.private_key)
    streamed_from = time.monotonic()
    summary = await stream_with_faults(options, pipeline.ledger, faults)
    must_be_stored = (
        set(pipeline.ledger.acknowledged) if expected is None else expected(pipeline.ledger)
    )
    # Every refusal was one SendGrid retries, and the retries landed everything.
    assert unacceptable_refusals(summary.responses) == {}, (
        summary.to_dict(),
        pipeline.processes.logs(),
    )
    assert summary.posts_rejected == 0 and summary.ok, summary.to_dict()
    report = await wait_until_stored(
        pipeline.clickhouse, pipeline.ledger, pipeline.database, expected=must_be_stored
    )
    REPORT.record_fault(
        FaultOutcome(
            test=name,
            faults=injected,
            acknowledged=report.acknowledged,
            lost=len(report.lost),
            duplicates=report.duplicates,
            refusals=refusals(summary.responses),
            memory_losses_by_design=len(
                set(pipeline.ledger.acknowledged) - must_be_stored - _stored_ids(pipeline)
            ),
        )
    )
    assert report.holds(), (
        report.describe()
        + "\n"
        + _when_acknowledged(pipeline.ledger, report.lost, streamed_from)
        + "\n"
        + pipeline.processes.logs()
    )
    assert report.acknowledged == report.sent  # every unique event was acknowledged in the end
    pipeline.processes.assert_running()
    for replica in stop_replicas:
        assert replica.process.poll() is None, (
            f"a {replica.stage} replica exited:\n" + (replica.output()[-4000:])
        )
        replica.process.terminate()
    for replica in stop_replicas:
        code = await asyncio.to_thread(replica.process.wait, 90)
        assert code == 0, f"a {replica.stage} replica stopped with {code}:\n{replica.output()}"
    # Stop deadlines hold after the faults: every stage stops by itself, cleanly.
    codes = await asyncio.to_thread(pipeline.processes.stop_all)
    assert codes == {"ingest": 0, "process": 0, "sink": 0}, pipeline.processes.logs()
    print(f"\n{name}: {report.describe()}; refused: {refusals(summary.responses)}")
    return summary, report


def _when_acknowledged(ledger: Ledger, lost: Sequence[str], streamed_from: float) -> str:
    """When the lost events' acknowledgements arrived, in seconds from the stream's start (a
    loss confined to a moment points at the fault; an event acknowledged more than once is a
    SendGrid duplicate)."""
    if not lost:
        return ""
    times = [
        [round(at - streamed_from, 2) for at in ledger.acknowledged.get(event, [])]
        for event in lost
    ]
    firsts = sorted(acks[0] for acks in times if acks) or [0.0]
    repeated = sum(1 for acks in times if len(acks) > 1)
    wall_clock_start = time.time() - (time.monotonic() - streamed_from)
    started = time.strftime("%H:%M:%S", time.gmtime(wall_clock_start))
    return (
        f"lost events first acknowledged from +{firsts[0]} s to +{firsts[-1]} s of the stream "
        f"(started {started} UTC, the stage logs' clock) "
        f"(median +{firsts[len(firsts) // 2]} s); acknowledged more than once: {repeated}; "
        f"e.g. {times[:3]}"
    )


def _stored_ids(pipeline: Pipeline) -> set[str]:
    return set(pipeline.clickhouse.rows_by_event(pipeline.database, "email_events", final=True))


# --- waiting on what a fault needs, never on the clock (harness.wait_for) ---------------------


def stored_rows(pipeline: Pipeline) -> int:
    """Rows in the pipeline's email_events so far (0 before the sink created it)."""
    database = pipeline.database
    try:
        if not pipeline.clickhouse.has_relation(database, "email_events"):
            return 0
        return int(pipeline.clickhouse.query(f"SELECT count() FROM {database}.email_events"))
    except OSError:
        return 0


async def events_flowing(pipeline: Pipeline, moment: str) -> None:
    await harness.events_flowing(pipeline.ledger, lambda: stored_rows(pipeline), moment)


async def kill_and_restart(pipeline: Pipeline, stage: Stage) -> None:
    """kill -9 (returns once the process is gone: the fault happened), restart at once."""
    await asyncio.to_thread(pipeline.processes.kill, stage)
    await asyncio.to_thread(pipeline.processes.start, stage)


async def posts_in_flight_to_the_frozen_ingress(pipeline: Pipeline) -> None:
    """With the ingress frozen (SIGSTOP), wait until two POSTs were planned since: the first
    of them has been sent and sits unanswered, accepted by the kernel."""
    planned = pipeline.ledger.posts_planned
    await wait_for(
        lambda: pipeline.ledger.posts_planned >= planned + 2,
        "two POSTs in flight to the frozen ingress",
    )


async def ingress_refuses(pipeline: Pipeline) -> None:
    """The ingress reports the broker's outage: /readyz stops answering 200."""

    def not_ready() -> bool:
        url = f"http://127.0.0.1:{pipeline.processes.ingest_port}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return int(response.status) != 200
        except (OSError, urllib.error.HTTPError):
            return True

    await wait_for(not_ready, "the ingress to report the broker down (/readyz not 200)")


def sink_met_the_outage(pipeline: Pipeline) -> bool:
    sink_logs = "".join(p.output() for p in pipeline.processes.history if p.stage == "sink")
    return bool(log_events(sink_logs, "write failed; retrying"))


# --- the faults ------------------------------------------------------------------------------


@FAULTS_A
async def test_processor_killed_twice_mid_stream(pipeline: Pipeline) -> None:
    async def faults() -> None:
        await events_flowing(pipeline, "before the first kill")
        await kill_and_restart(pipeline, "process")
        await events_flowing(pipeline, "through the restarted processor")
        await kill_and_restart(pipeline, "process")
        await events_flowing(pipeline, "through the processor restarted twice")

    await run_faults(pipeline, Stream(seed=101), faults, name="processor kill -9 x2", injected=2)
    killed = [p for p in pipeline.processes.history if p.stage == "process"][:2]
    assert [p.process.returncode for p in killed] == [-9, -9]


@FAULTS_B
async def test_sink_killed_twice_mid_stream(pipeline: Pipeline) -> None:
    async def faults() -> None:
        await events_flowing(pipeline, "before the first kill")
        await kill_and_restart(pipeline, "sink")
        await events_flowing(pipeline, "through the restarted sink")
        await kill_and_restart(pipeline, "sink")
        # Stopped only once it runs again: a stop during its start is another test's subject.
        await events_flowing(pipeline, "through the sink restarted twice")

    await run_faults(pipeline, Stream(seed=102), faults, name="sink kill -9 x2", injected=2)
    killed = [p for p in pipeline.processes.history if p.stage == "sink"][:2]
    assert [p.process.returncode for p in killed] == [-9, -9]


@FAULTS_B
async def test_broker_killed_and_restarted_by_its_supervisor(
    pipeline: Pipeline, durable_broker: BrokerUnderTest
) -> None:
    before = durable_broker.restarts()["broker"]

    async def faults() -> None:
        await events_flowing(pipeline, "before the kill")
        durable_broker.kill_broker()
        await wait_for(
            lambda: durable_broker.restarts()["broker"] == before + 1 and durable_broker.alive(),
            "the supervisor to restart tansu",
        )
        await events_flowing(pipeline, "through the restarted broker")

    await run_faults(pipeline, Stream(seed=103), faults, name="tansu kill -9", injected=1)
    assert durable_broker.restarts()["broker"] == before + 1


@FAULTS_B
async def test_broker_stopped_for_seconds_then_restarted_on_its_data_dir(
    pipeline: Pipeline, durable_broker: BrokerUnderTest
) -> None:
    async def faults() -> None:
        await events_flowing(pipeline, "before the stop")
        await durable_broker.stop_async()  # tansu, then SeaweedFS
        await ingress_refuses(pipeline)
        await durable_broker.start_async()  # same data dir, same ports
        await events_flowing(pipeline, "through the restarted broker")

    summary, _ = await run_faults(
        pipeline,
        Stream(seed=104),
        faults,
        name="broker stopped until the ingress refused",
        injected=1,
    )
    # The outage was felt: the ingress refused batches meanwhile (and SendGrid retried them).
    assert refusals(summary.responses), summary.responses


@FAULTS_A
async def test_storage_killed_and_restarted_by_its_supervisor(
    pipeline: Pipeline, durable_broker: BrokerUnderTest
) -> None:
    before = durable_broker.restarts()["storage"]

    async def faults() -> None:
        await events_flowing(pipeline, "before the kill")
        durable_broker.kill_storage()
        await wait_for(
            lambda: durable_broker.restarts()["storage"] == before + 1,
            "the supervisor to restart SeaweedFS",
        )
        await events_flowing(pipeline, "through the restarted storage")

    await run_faults(pipeline, Stream(seed=105), faults, name="weed kill -9", injected=1)
    assert durable_broker.restarts()["storage"] == before + 1


@FAULTS_B
async def test_clickhouse_unavailable_for_seconds(pipeline: Pipeline) -> None:
    async def faults() -> None:
        # The sink writing first: a sink still starting would not meet the outage.
        await events_flowing(pipeline, "before ClickHouse goes down")
        await pipeline.clickhouse.stop_async()
        await wait_for(lambda: sink_met_the_outage(pipeline), "the sink to report ClickHouse down")
        await pipeline.clickhouse.start_async()  # same port, same data path
        await events_flowing(pipeline, "once ClickHouse is back")

    summary, _ = await run_faults(
        pipeline,
        Stream(seed=106),
        faults,
        name="ClickHouse down until the sink felt it",
        injected=1,
    )
    # ClickHouse's outage is the sink's problem only: the ingress kept acknowledging.
    assert refusals(summary.responses) == {}, summary.responses
    assert sink_met_the_outage(pipeline), "the sink never met the outage"


@FAULTS_A
async def test_ingress_restarted_with_requests_in_flight(pipeline: Pipeline) -> None:
    processes = pipeline.processes
    stop_codes: list[int] = []

    async def faults() -> None:
        await events_flowing(pipeline, "before the freeze")
        # Frozen, the ingress leaves the simulator's POSTs in flight (accepted by the kernel,
        # unanswered); SIGTERM arrives while they wait, then it runs again and stops.
        processes.freeze("ingest")
        await posts_in_flight_to_the_frozen_ingress(pipeline)
        ingress = processes.current["ingest"].process
        ingress.send_signal(signal.SIGTERM)  # pending once sent: delivered when it runs again
        processes.thaw("ingest")
        stop_codes.append(await asyncio.to_thread(ingress.wait, SERVICE_TIMEOUT))
        await asyncio.to_thread(processes.start, "ingest")
        await events_flowing(pipeline, "through the restarted ingress")

    summary, _ = await run_faults(
        pipeline, Stream(seed=107), faults, name="ingress SIGTERM, requests in flight", injected=1
    )
    assert stop_codes == [0], processes.logs()
    assert refusals(summary.responses), summary.responses  # the restart was felt


@FAULTS_B
async def test_ingress_killed_with_requests_in_flight(pipeline: Pipeline) -> None:
    processes = pipeline.processes

    async def faults() -> None:
        await events_flowing(pipeline, "before the freeze")
        processes.freeze("ingest")
        await posts_in_flight_to_the_frozen_ingress(pipeline)
        await kill_and_restart(pipeline, "ingest")
        await events_flowing(pipeline, "through the restarted ingress")

    summary, _ = await run_faults(
        pipeline, Stream(seed=108), faults, name="ingress kill -9, requests in flight", injected=1
    )
    # The POSTs in flight were cut: SendGrid sees a broken connection and retries.
    assert refusals(summary.responses).get("connection error", 0) >= 1, summary.responses


@FAULTS_A
async def test_a_topic_a_restarted_broker_re_created_on_the_fly_is_read_whole(
    background: BackgroundLoop, tmp_path: Path, unique_name: str
) -> None:
    """A broker that came back empty creates a topic on the first metadata request naming it,
    with a partition count of its own (tansu: 4) -- the stage consumer's own request, as
    it looks for the lost topic. Its cached view still listed the old partitions, and with
    aiokafka's default metadata age (5 min) it read those only: what the ingress wrote to the
    others waited unread, and the memory-broker fault counted ~229 acknowledged events as
    lost (issue 21). ``kafka.metadata_max_age_ms`` bounds the wait (1 s here; 30 s by
    default). Mutation caught: the clients not given ``metadata_max_age_ms``."""
    broker = BrokerUnderTest(background, tmp_path / "memory-broker", storage="memory")
    await broker.start_async()
    topic = f"raw-{unique_name}"
    settings = Settings.model_validate(
        {
            "kafka": {
                "bootstrap_servers": broker.bootstrap_servers,
                "metadata_max_age_ms": 1000,
                **FAST_GROUP_SETTINGS,
                "topics": {"raw": topic, "partitions": 2},
            }
        }
    )
    consumer = create_consumer(settings.kafka, group_id=f"processor-{unique_name}")
    producer = create_producer(settings.kafka)
    try:
        await ensure_topics(settings.kafka)
        consumer.subscribe([topic])
        await consumer.start()
        await _poll_until(consumer, lambda read: len(consumer.assignment()) == 2)
        await _restart_empty(broker)
        # The consumer's own lookups re-create the topic; then one record lands in each of
        # its partitions, as the ingress's partitioner spreads them.
        deadline = time.monotonic() + FAULT_WAIT_SECONDS
        partitions = 0
        while partitions == 0:
            assert time.monotonic() < deadline, "the consumer's lookups never re-created it"
            await _poll_until(consumer, lambda read: True)
            partitions = await _partition_count(settings, topic)
        assert partitions != 2, "the broker re-created the topic as configured, not on the fly"
        await producer.start()
        for partition in range(partitions):
            await producer.send_and_wait(topic, b"after the restart", partition=partition)
        read = await _poll_until(consumer, lambda read: len(read) == partitions)
        assert sorted(read) == list(range(partitions)), read
    finally:
        await asyncio.gather(consumer.stop(), producer.stop(), return_exceptions=True)
        await broker.stop_async()


async def _memory_broker(
    background: BackgroundLoop, tmp_path: Path, suffix: str, *, partitions: int = 2
) -> tuple[BrokerUnderTest, Settings]:
    """A started memory broker of its own, and Kafka settings for a pipeline's topics on it."""
    broker = BrokerUnderTest(background, tmp_path / "memory-broker", storage="memory")
    await broker.start_async()
    topics = {"events": f"events-{suffix}", "raw": f"raw-{suffix}", "partitions": partitions}
    kafka = {"bootstrap_servers": broker.bootstrap_servers, **FAST_GROUP_SETTINGS, "topics": topics}
    return broker, Settings.model_validate({"kafka": kafka})


async def _restart_empty(broker: BrokerUnderTest) -> None:
    restarts = broker.restarts()["broker"]
    broker.kill_broker()
    await wait_for(
        lambda: broker.restarts()["broker"] == restarts + 1 and broker.alive(),
        "the memory broker restarted by its supervisor",
    )


@FAULTS_A
async def test_a_stage_writer_never_counts_a_write_into_a_topic_the_broker_does_not_list(
    background: BackgroundLoop,
    tmp_path: Path,
    unique_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A broker that restarted empty acknowledges writes to a topic it no longer lists (tansu's
    in-memory store): consumers read them but cannot commit. The processor wrote its batches
    there -- with its cached metadata, or as aiokafka resent a batch in flight at the
    restart -- and the memory-broker fault lost ~3,000 events (issue 21). The stage's writer
    refuses to write while the broker does not list the topic, and fails a write whose topic
    vanished before it was acknowledged: both are UnknownTopicOrPartitionError, on which the
    stage re-creates its topics and writes again. Mutations caught: no check before the
    write (it reaches send_all), no check after it (the write into the unlisted log counts
    as done)."""
    broker, settings = await _memory_broker(background, tmp_path, unique_name)
    topic = settings.kafka.topics.events
    sent: list[int] = []
    real_send_all = kafka_module.send_all

    async def counted_send_all(producer: Any, records: Sequence[OutgoingRecord]) -> Any:
        sent.append(len(records))
        return await real_send_all(producer, records)

    monkeypatch.setattr(kafka_module, "send_all", counted_send_all)
    producer = create_producer(settings.kafka)
    writer: TopicWriter[bytes] = TopicWriter(
        producer,
        topic,
        lambda value: OutgoingRecord(topic, value),
        output="x",
        read_back=ReadBack(settings.kafka),
    )
    try:
        await ensure_topics(settings.kafka)
        await producer.start()
        await writer.write([b"before"], None)
        assert sent == [1]

        await _restart_empty(broker)
        outcome = await _write_until_the_broker_answers(writer, [b"after the restart"])
        assert outcome == "UnknownTopicOrPartitionError", outcome
        assert sent == [1], "the writer wrote into a topic the broker does not list"
        assert (await probe_topics(producer, [topic]))[topic].missing, "the check created it"

        # Created again; then the broker dies between the check and the write.
        await ensure_topics(settings.kafka)
        await writer.write([b"into the new log"], None)

        async def restart_then_send_all(producer: Any, records: Sequence[OutgoingRecord]) -> Any:
            await _restart_empty(broker)
            return await counted_send_all(producer, records)

        monkeypatch.setattr(kafka_module, "send_all", restart_then_send_all)
        with pytest.raises(UnknownTopicOrPartitionError):
            await asyncio.wait_for(writer.write([b"in flight"], None), FAULT_WAIT_SECONDS)
        assert sent == [1, 1, 1], "the write in flight was not sent to the restarted broker"
    finally:
        await writer.stop()
        await producer.stop()
        await broker.stop_async()


@FAULTS_A
async def test_a_commit_in_flight_at_the_restart_never_lands_in_the_new_group(
    background: BackgroundLoop, tmp_path: Path, unique_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tansu, come back empty, takes a rejoining member's old identity back: the JoinGroup
    of the forgotten member id is accepted and the generation numbered from 0 again. A commit
    of the old log's offsets still on its way then carried a valid membership, was accepted
    into the new group, and the sink resumed at the old log's end in the new one: the
    memory-broker fault lost the new log's first 188 and 158 records (issue 21). The commit's
    request is held until the member rejoined; a rejoin must have cancelled it. Mutations
    caught: MemberCommits.end_all not cancelling the unsent request (the rejoin then waits on
    the held request: the member never rejoins); the stage's listener not ending the commits
    (the commit is not refused)."""
    broker, settings = await _memory_broker(background, tmp_path, unique_name, partitions=1)
    kafka = settings.kafka
    topic = TopicPartition(kafka.topics.events, 0)
    connected = asyncio.Event()
    real_commit = GroupCoordinator._do_commit_offsets
    real_heartbeat = GroupCoordinator._do_heartbeat
    # From the kill to the rejoin, the member's heartbeats stay home: one refused by the new
    # broker would have it forget its id, and the rejoin that keeps it is what is tested. Held
    # no longer than that: with a 1 s session, a member whose heartbeats stayed home after its
    # rejoin was expelled by the new broker and rejoined again, over and over under load (the
    # wait below timed out once in a loaded `make test`).
    heartbeats_held = False
    rejoined = asyncio.Event()

    class ReleaseHeartbeatsWhenAssigned(ConsumerRebalanceListener):  # type: ignore[misc]
        def on_partitions_revoked(self, revoked: Any) -> None:
            pass

        def on_partitions_assigned(self, assigned: Any) -> None:
            if heartbeats_held:
                rejoined.set()

    async def held_until_connected(self: Any, assignment: Any, offsets: Any) -> Any:
        await connected.wait()  # the connection to the restarted broker, being made
        return await real_commit(self, assignment, offsets)

    async def heartbeat(self: Any) -> Any:
        held = heartbeats_held and not rejoined.is_set()
        return True if held else await real_heartbeat(self)

    monkeypatch.setattr(GroupCoordinator, "_do_heartbeat", heartbeat)
    monkeypatch.setattr(GroupCoordinator, "_do_commit_offsets", held_until_connected)
    consumer = create_consumer(kafka, group_id=f"sink-{unique_name}")
    producer = create_producer(kafka)
    try:
        await ensure_topics(kafka)
        await producer.start()
        for value in range(20):
            await producer.send_and_wait(topic.topic, b"old %d" % value, partition=0)
        # GroupMemberConsumer puts its own listener around this one.
        consumer.subscribe([topic.topic], listener=ReleaseHeartbeatsWhenAssigned())
        await consumer.start()
        assert [value async for value in _read(consumer, 20)][-1] == b"old 19"
        coordinator = consumer._coordinator
        identity = (coordinator.generation, coordinator.member_id)
        commit = asyncio.ensure_future(consumer.commit({topic: OffsetAndMetadata(20, "")}))

        heartbeats_held = True
        await _restart_empty(broker)
        await ensure_topics(kafka)
        for value in range(5):
            await _send_until_the_broker_answers(producer, topic, b"new %d" % value)
        coordinator.request_rejoin()

        def where_the_member_is() -> str:
            commits = consumer._member_commits
            return (
                f"coordinator {coordinator.coordinator_id}, generation {coordinator.generation}, "
                f"member {coordinator.member_id!r}, need_rejoin "
                f"{coordinator.need_rejoin(consumer._subscription.subscription)}, assignment "
                f"{consumer.assignment()}, rejoining {commits.rejoining}, commit sends "
                f"{len(commits._sends)}, the held commit {commit!r}"
            )

        try:
            await wait_for(
                lambda: (
                    coordinator.coordinator_id is not None
                    and not coordinator.need_rejoin(consumer._subscription.subscription)
                    and consumer.assignment() == {topic}
                ),
                "the member rejoined the restarted broker's group",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {where_the_member_is()}") from None
        heartbeats_held = False
        assert (coordinator.generation, coordinator.member_id) == identity, (
            "tansu no longer hands the old identity back: this test no longer sees the fault"
        )
        connected.set()
        with pytest.raises(CommitFailedError):
            await asyncio.wait_for(commit, FAULT_WAIT_SECONDS)
        assert await consumer.committed(topic) is None, "the old log's offset was committed"
        assert [value async for value in _read(consumer, 5)] == [b"new %d" % n for n in range(5)]
    finally:
        connected.set()
        await consumer.stop()
        await producer.stop()
        await broker.stop_async()


async def _read(consumer: Any, count: int) -> AsyncIterator[bytes]:
    """The next ``count`` values ``consumer`` reads (from the beginning, for a new group)."""
    deadline = time.monotonic() + FAULT_WAIT_SECONDS
    read = 0
    while read < count:
        assert time.monotonic() < deadline, f"read {read} of {count}"
        try:
            polled = await consumer.getmany(timeout_ms=200)
        except NoOffsetForPartitionError as exc:
            await consumer.seek_to_beginning(*exc.args)
            continue
        for records in polled.values():
            for record in records:
                read += 1
                yield record.value


async def _send_until_the_broker_answers(
    producer: Any, topic: TopicPartition, value: bytes
) -> None:
    deadline = time.monotonic() + FAULT_WAIT_SECONDS
    while True:
        try:
            await producer.send_and_wait(topic.topic, value, partition=topic.partition)
            return
        except KafkaError as exc:
            assert time.monotonic() < deadline, f"the restarted broker never answered: {exc!r}"
            await asyncio.sleep(0.1)


async def _write_until_the_broker_answers(writer: TopicWriter[bytes], values: list[bytes]) -> str:
    """Write until the failure is no longer the broker being unreachable; returns the failure's
    class name ("written" for none)."""
    deadline = time.monotonic() + FAULT_WAIT_SECONDS
    while True:
        try:
            await writer.write(values, None)
            return "written"
        except UnknownTopicOrPartitionError as exc:
            return type(exc).__name__
        except KafkaError as exc:
            assert time.monotonic() < deadline, f"the restarted broker never answered: {exc!r}"
            await asyncio.sleep(0.1)


@FAULTS_A
@pytest.mark.parametrize("writer_started", ["before the restart", "after the restart"])
async def test_a_write_acknowledged_where_a_kept_log_sits_is_read_back_and_fails(
    background: BackgroundLoop, tmp_path: Path, unique_name: str, writer_started: str
) -> None:
    """tansu restarted on memory:// keeps what was written to a topic it no longer lists; once
    the topic is created again, those records hold the new log's first offsets, and a write
    acknowledged at one of them is never served (issue 21: 559 acknowledged events lost in a
    full run). The writer reads each partition back until the broker serves what it
    acknowledged: a write at a kept record's offset fails (NotServed, retriable), and every
    write that succeeded is served. A writer started after the restart (a stage process
    restarted meanwhile) has seen neither the old log nor the topic missing: it doubts each
    partition at its first write all the same. Mutations caught: no read back (acknowledged
    writes are not served), reading back at the acknowledged offset instead of from the
    partition's start (tansu serves the batch that starts there: the same), no doubt when an
    acknowledgement comes below the last one (the same), no doubt at a partition's first
    acknowledgement (the writer started after the restart: the same)."""
    broker, settings = await _memory_broker(background, tmp_path, unique_name, partitions=1)
    topic = settings.kafka.topics.events
    producer = create_producer(settings.kafka)
    read_back = ReadBack(settings.kafka)
    writer: TopicWriter[bytes] = TopicWriter(
        producer, topic, lambda value: OutgoingRecord(topic, value), output="x", read_back=read_back
    )
    try:
        await ensure_topics(settings.kafka)
        await producer.start()
        for index in range(20):
            await writer.write([b"before %d" % index], None)
        await _restart_empty(broker)
        # As aiokafka resends a batch in flight at the restart: ten records into the topic the
        # broker no longer lists (the producer still has its metadata), acknowledged.
        kept = [b"kept %d" % index for index in range(10)]
        await asyncio.wait_for(_send_one_batch(producer, topic, kept), FAULT_WAIT_SECONDS)
        await ensure_topics(settings.kafka)
        if writer_started == "after the restart":
            await read_back.stop()
            read_back = ReadBack(settings.kafka)
            writer = TopicWriter(
                producer,
                topic,
                lambda value: OutgoingRecord(topic, value),
                output="x",
                read_back=read_back,
            )

        written: list[bytes] = []
        failures: list[str] = []
        while len(written) < 5:
            assert len(failures) < 50, f"the writer never got past the kept log: {failures}"
            value = b"new %d" % (len(written) + len(failures))
            try:
                await writer.write([value], None)
                written.append(value)
            except KafkaError as exc:
                failures.append(type(exc).__name__)
        served = await _read_whole_partition(settings, TopicPartition(topic, 0))
        assert set(written) <= set(served), (
            f"acknowledged, never served: {sorted(set(written) - set(served))}; "
            f"served: {served}; failures: {failures}"
        )
        assert "NotServed" in failures, failures
    finally:
        await read_back.stop()
        await producer.stop()
        await broker.stop_async()


async def _send_one_batch(producer: Any, topic: str, values: list[bytes]) -> None:
    """Send ``values`` as one batch to partition 0, unchecked, retrying until acknowledged."""
    while True:
        batch = producer.create_batch()
        for value in values:
            batch.append(timestamp=None, key=None, value=value)
        batch.close()
        try:
            await (await producer.send_batch(batch, topic, partition=0))
            return
        except KafkaError:
            await asyncio.sleep(0.1)


async def _read_whole_partition(settings: Settings, partition: TopicPartition) -> list[bytes]:
    """Every value a group-less reader is served from the partition's start to its end."""
    reader = create_reader(settings.kafka)
    await reader.start()
    try:
        reader.assign([partition])
        await reader.seek_to_beginning(partition)
        end = (await reader.end_offsets([partition]))[partition]
        values: list[bytes] = []
        deadline = time.monotonic() + FAULT_WAIT_SECONDS
        while await reader.position(partition) < end:
            assert time.monotonic() < deadline, f"not read to {end} within the deadline"
            fetched = await reader.getmany(partition, timeout_ms=500)
            values += [record.value or b"" for record in fetched.get(partition, [])]
        return values
    finally:
        await reader.stop()


@FAULTS_A
async def test_a_commit_into_a_topic_the_broker_does_not_list_fails_at_once(
    background: BackgroundLoop, tmp_path: Path, unique_name: str
) -> None:
    """The consumer's side of the same log: a member that read records a restarted broker
    keeps but does not list commits them; the broker answers UnknownTopicOrPartition, which
    aiokafka retries forever (the sink stalled for the rest of the fault run). It is raised
    at once as CommittedTopicMissing, which the stage answers by starting the topic over
    (tests/unit/test_stage_loop.py). Mutation caught: GroupMemberConsumer not converting it
    (the commit never returns)."""
    broker, settings = await _memory_broker(background, tmp_path, unique_name)
    topic = settings.kafka.topics.events
    consumer = create_consumer(settings.kafka, group_id=f"sink-{unique_name}")
    producer = create_producer(settings.kafka)
    try:
        await ensure_topics(settings.kafka)
        await producer.start()
        consumer.subscribe([topic])
        await consumer.start()
        # The consumer's own metadata request, as it reconnects to the restarted broker, may
        # create the topic anew (tansu creates a topic a metadata request names) before the
        # write below: the broker then lists it, and the scene is set again -- a precondition
        # of this test, not its subject (seen once in a loaded full run).
        for _ in range(5):
            await _restart_empty(broker)
            # With the producer's cached metadata, as the processor did before it checked.
            await asyncio.wait_for(
                producer.send_and_wait(topic, b"unlisted", partition=0), FAULT_WAIT_SECONDS
            )
            if (await probe_topics(producer, [topic]))[topic].missing:
                break
        else:
            raise AssertionError(f"{topic} was listed again after each of 5 broker restarts")

        deadline = time.monotonic() + FAULT_WAIT_SECONDS
        outcome: BaseException | None = None
        while not isinstance(outcome, CommittedTopicMissing):
            assert time.monotonic() < deadline, f"no commit refused as missing: {outcome!r}"
            read = await _poll_until(consumer, lambda partitions: 0 in partitions)
            assert read
            try:
                await asyncio.wait_for(consumer.commit(), 10)
                outcome = None
            except CommitFailedError as exc:  # not a member yet: rejoins by polling on
                outcome = exc
            except CommittedTopicMissing as exc:
                outcome = exc
            except TimeoutError as exc:
                raise AssertionError("the commit into the unlisted topic hangs") from exc
            assert outcome is not None, "the broker stored a commit for a topic it does not list"
    finally:
        await asyncio.gather(consumer.stop(), producer.stop(), return_exceptions=True)
        await broker.stop_async()


async def _poll_until(
    consumer: Any, done: Callable[[set[int]], bool], *, seconds: float = 30.0
) -> set[int]:
    """Poll ``consumer`` (a new group's partitions start at their beginning) until ``done``
    holds for the partitions it read records from; the deadline failing names them."""
    deadline = time.monotonic() + seconds
    read: set[int] = set()
    while time.monotonic() < deadline:
        try:
            polled = await consumer.getmany(timeout_ms=200)
        except NoOffsetForPartitionError as exc:
            await consumer.seek_to_beginning(*exc.args)
            continue
        except KafkaError:  # the broker restarting
            await asyncio.sleep(0.1)
            continue
        read.update(partition.partition for partition, records in polled.items() if records)
        if done(read):
            return read
    raise AssertionError(f"after {seconds:g} s, read from partitions {sorted(read)} only")


async def _partition_count(settings: Settings, topic: str) -> int:
    """The topic's partitions as the broker has them now (0: no such topic)."""
    admin = create_admin(settings.kafka)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return 0 if described.get("error_code") else len(described["partitions"])


@FAULTS_A
async def test_memory_broker_restarted_empty(
    background: BackgroundLoop,
    clickhouse: ClickHouseUnderTest,
    tmp_path: Path,
    unique_name: str,
) -> None:
    """`embedded.broker_storage: memory` (tests, demos): a broker that dies comes back empty.
    What was acknowledged and not yet in ClickHouse is lost -- documented -- but everything
    acknowledged after the restart must land: the ingress must not acknowledge into a topic
    the broker created on the fly, and the consumers must start over at the new log's
    beginning instead of waiting for offsets that no longer exist."""
    broker = BrokerUnderTest(background, tmp_path / "memory-broker", storage="memory")
    await broker.start_async()
    restarted: list[float] = []

    try:
        async with running_pipeline(broker, clickhouse, tmp_path, unique_name) as pipeline:

            async def faults() -> None:
                # The broker dies once events flow end to end: the sink has read and stored
                # some, so every consumer holds a position in the log that is about to vanish
                # (with the sink still starting, the restart would test nothing of it).
                await wait_for_stored_rows(pipeline, minimum=200)
                await _restart_empty(broker)
                restarted.append(time.monotonic())

            await wait_until_consuming(pipeline, "sink")
            try:
                await run_faults(
                    pipeline,
                    Stream(seed=109, seconds=14),
                    faults,
                    name="memory broker restarted empty",
                    injected=1,
                    expected=lambda ledger: ledger.acknowledged_between(restarted[0]),
                )
            except AssertionError as failed:
                # Lost once in a while in full runs only (issue 21): say on which topic the
                # lost events still are, while the broker still has them.
                lost = pipeline.ledger.acknowledged_between(restarted[0]) - _stored_ids(pipeline)
                where = await _where_on_the_broker(broker.bootstrap_servers, unique_name, lost)
                raise AssertionError(f"{where}\n{failed}") from None
            assert pipeline.ledger.acknowledged_between(restarted[0]), "nothing after restart"
    finally:
        await broker.stop_async()


async def _where_on_the_broker(bootstrap_servers: str, suffix: str, lost: set[str]) -> str:
    """Which of ``lost`` the pipeline's raw and events topics hold now, per partition and
    offset, and what the group reading each topic has committed there (a post-mortem: each
    topic read whole by a group-less reader)."""
    settings = Settings.model_validate({"kafka": {"bootstrap_servers": bootstrap_servers}})
    codec = EmailEventCodec()

    def raw_ids(value: bytes) -> list[str]:
        return event_ids(value)

    def event_id(value: bytes) -> list[str]:
        return [str(codec.decode(value)["sg_event_id"])]

    lines = [f"{len(lost)} lost events, on the broker now:"]
    for topic, ids_of in ((f"raw-{suffix}", raw_ids), (f"events-{suffix}", event_id)):
        reader = create_reader(settings.kafka)
        await reader.start()
        try:
            await reader.topics()  # fetches the metadata partitions_for_topic reads
            assigned = [
                TopicPartition(topic, partition)
                for partition in sorted(reader.partitions_for_topic(topic) or set())
            ]
            reader.assign(assigned)
            await reader.seek_to_beginning(*assigned)
            ends = await reader.end_offsets(assigned)
            read = dict.fromkeys((tp.partition for tp in assigned), 0)
            found: dict[int, list[int]] = {}
            deadline = time.monotonic() + 30
            while sum(read.values()) < sum(ends.values()) and time.monotonic() < deadline:
                for tp, records in (await reader.getmany(timeout_ms=500)).items():
                    for record in records:
                        read[tp.partition] += 1
                        if lost & set(ids_of(record.value or b"")):
                            found.setdefault(tp.partition, []).append(record.offset)
            lines.append(
                f"  {topic}: ends { {tp.partition: ends[tp] for tp in assigned} }, read {read}; "
                f"records holding lost events at offsets {found}"
            )
            # What the group reading the topic has committed there (not joining it: asking).
            group = f"{'processor' if topic.startswith('raw-') else 'sink'}-{suffix}"
            member = create_consumer(settings.kafka, group_id=group)
            await member.start()
            try:
                committed = {tp.partition: await member.committed(tp) for tp in assigned}
            finally:
                await member.stop()
            lines.append(f"  {group} committed: {committed}")
        except Exception as exc:  # noqa: BLE001 - a post-mortem says what it could not read
            lines.append(f"  {topic}: not read ({exc!r})")
        finally:
            await reader.stop()
    return "\n".join(lines)


@FAULTS_A  # on the module's broker and ClickHouse of a fault worker, not a third pair of them
async def test_replicas_joining_and_leaving_mid_stream(
    durable_broker: BrokerUnderTest,
    clickhouse: ClickHouseUnderTest,
    tmp_path: Path,
    unique_name: str,
) -> None:
    """Scale-out and scale-in as Kubernetes replicas or KEDA do them (issue 16): two
    processors and two sinks consume; a third of each joins, takes partitions, and leaves --
    once with SIGTERM, once with kill -9 (its membership then times out). Every acknowledged
    event is stored exactly once (FINAL and the dedup view), and the survivors ride every
    rebalance out: still running, never restarted, a clean stop at the end."""
    async with running_pipeline(
        durable_broker, clickhouse, tmp_path, unique_name, partitions=4
    ) as pipeline:
        processes = pipeline.processes
        # The replicas start once the first sink has migrated the database (one at a time).
        await wait_until_consuming(pipeline, "sink")
        survivors = [processes.current["process"], processes.current["sink"]]
        survivors += [processes.start_replica("process"), processes.start_replica("sink")]
        for replica in survivors[2:]:
            await wait_until_logged(
                replica, "consuming", lambda e: True, f"the second {replica.stage} consuming"
            )
        leavers: list[StageProcess] = []

        async def join_and_leave(stage: Stage) -> None:
            for leave in ("SIGTERM", "kill -9"):
                third = processes.start_replica(stage)
                leavers.append(third)
                await wait_until_logged(
                    third,
                    "partitions assigned",
                    lambda entry: entry.get("stage") == stage and bool(entry.get("partitions")),
                    f"a third {stage} owning partitions",
                )
                if leave == "SIGTERM":
                    third.process.terminate()
                    code = await asyncio.to_thread(third.process.wait, SERVICE_TIMEOUT)
                    assert code == 0, third.output()
                else:
                    third.process.kill()
                    await asyncio.to_thread(third.process.wait, SERVICE_TIMEOUT)

        async def faults() -> None:
            await asyncio.gather(join_and_leave("process"), join_and_leave("sink"))

        await run_faults(
            pipeline,
            Stream(seed=110, seconds=16),
            faults,
            name="replicas join and leave (SIGTERM, kill -9)",
            injected=4,
            stop_replicas=survivors[2:],
        )
        assert [third.process.returncode for third in leavers].count(0) == 2, processes.logs()
        for survivor in survivors:
            # One process for its whole life: it took part in the rebalances, never crashed.
            text = survivor.output()
            revocations = [
                entry for entry in log_events(text, REVOKED) if entry.get("stage") == survivor.stage
            ]
            assert len(revocations) >= 2, text[-3000:]
            assert not log_events(text, "stage stopped on a fatal error"), text[-3000:]
