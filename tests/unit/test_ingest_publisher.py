"""How the publisher classifies what the Kafka client does while a broker restarts: every
failure is a PublishError (503), a batch over the client's size limit a PublishRejected (413),
and after a failure nothing is sent until a probe has seen the raw topic again.

A stand-in producer raises the Kafka client's own error classes here; what a real broker does
when it dies is tested against tansu in tests/integration/test_ingest_broker_loss.py."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NodeNotReadyError,
    NotLeaderForPartitionError,
    RequestTimedOutError,
    UnknownError,
    UnknownTopicOrPartitionError,
)
from aiokafka.structs import TopicPartition

from ingest.publisher import (
    AcknowledgeHealth,
    KafkaRawBatchPublisher,
    PublishError,
    PublishRejected,
)
from schemas.raw_auth import verify_raw_record
from schemas.raw_batch import RawBatch
from sgpipe.runtime import kafka as kafka_module
from sgpipe.runtime.kafka import (
    READ_BACK_MAX_RECORDS,
    NotServed,
    OutgoingRecord,
    ReadBack,
    Written,
    topic_health,
)
from sgpipe.runtime.settings import Settings
from tests.raw_auth_support import RAW_AUTH_DOCUMENT, TEST_RAW_AUTH_KEY

BATCH = RawBatch(
    webhook="main",
    body=b"[]",
    received_at_ms=1,
    request_id="r-1",
    signature_timestamp=None,
    authenticated_by="none",
)


class StandInClient:
    """Answers a Metadata request as a broker listing ``topics`` (one led partition each)."""

    def __init__(self, topics: set[str]) -> None:
        self.topics = topics
        self.checks = 0

    def get_random_node(self) -> int:
        return 0

    async def send(self, node: int, request: Any) -> Any:
        # aiokafka's MetadataRequest keeps what it was given until a version is chosen.
        assert request._allow_auto_topic_creation is False, "a check must never create a topic"
        self.checks += 1
        names = request._topics
        return SimpleNamespace(
            topics=[
                (0, name, False, [(0, 0, 0, [0], [0])]) if name in self.topics else (3, name, [])
                for name in names
            ]
        )


class StandInProducer:
    """``send`` raises ``on_send`` or returns a future failing with ``on_ack`` (or never
    resolving when both are None). Its client's broker lists the raw topic."""

    def __init__(
        self, on_send: BaseException | None = None, on_ack: BaseException | None = None
    ) -> None:
        self.on_send = on_send
        self.on_ack = on_ack
        self.sent: list[bytes] = []
        self.headers: list[Any] = []
        self.client = StandInClient({"sgpipe.raw"})
        # What the broker serves at each offset of partition 0 when read: what was written
        # there, unless ``ghosts`` holds another record for that offset.
        self.ghosts: dict[int, bytes] = {}

    async def send(self, topic: str, value: bytes, headers: Any = None) -> asyncio.Future[None]:
        if self.on_send is not None:
            raise self.on_send
        self.headers.append(headers)
        self.sent.append(value)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.on_ack is not None:
            future.set_exception(self.on_ack)
        return future


RAW_PARTITION = TopicPartition("sgpipe.raw", 0)


class StandInReader:
    """Serves what ``producer`` wrote (``sent``, at offsets 0, 1, ...), or its ghosts, in
    order from where it was sought; ``reads`` counts the reads."""

    def __init__(self, producer: StandInProducer) -> None:
        self.producer = producer
        self.reads = 0
        self.position_now = 0

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def assign(self, partitions: list[TopicPartition]) -> None:
        assert partitions == [RAW_PARTITION]

    def unsubscribe(self) -> None:
        return None

    async def beginning_offsets(
        self, partitions: list[TopicPartition]
    ) -> dict[TopicPartition, int]:
        return dict.fromkeys(partitions, 0)

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        return dict.fromkeys(partitions, len(self.producer.sent))

    async def position(self, partition: TopicPartition) -> int:
        return self.position_now

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self.reads += 1
        self.position_now = offset

    async def getmany(self, partition: TopicPartition, **_: Any) -> dict[TopicPartition, Any]:
        records = [
            SimpleNamespace(offset=offset, key=None, value=self.producer.ghosts.get(offset, value))
            for offset, value in enumerate(self.producer.sent)
            if offset >= self.position_now
        ]
        self.position_now = len(self.producer.sent)
        return {partition: records} if records else {}


def publisher_with(producer: StandInProducer, timeout: float = 5.0) -> KafkaRawBatchPublisher:
    settings = Settings.model_validate(
        {
            "kafka": {"bootstrap_servers": "127.0.0.1:1"},
            "ingest": {"publish_timeout_seconds": timeout},
            "raw_auth": RAW_AUTH_DOCUMENT,
        }
    )
    publisher = KafkaRawBatchPublisher(settings, AcknowledgeHealth())
    publisher._producer = producer
    publisher._topic_verified = True
    publisher._read_back = ReadBack(settings.kafka, new_reader=lambda: StandInReader(producer))
    return publisher


@pytest.mark.parametrize(
    "error",
    [
        UnknownError(),
        KafkaConnectionError("connection refused"),
        NotLeaderForPartitionError(),
        UnknownTopicOrPartitionError(),
        RequestTimedOutError(),
        KafkaTimeoutError(),
        NodeNotReadyError("node 111"),
        ConnectionResetError("reset by peer"),
        RuntimeError("anything else the client may raise"),
    ],
    ids=lambda error: type(error).__name__,
)
async def test_every_failure_while_the_broker_restarts_is_a_publish_error(
    error: Exception,
) -> None:
    publisher = publisher_with(StandInProducer(on_ack=error))
    with pytest.raises(PublishError) as caught:
        await publisher.publish(BATCH)
    assert caught.value.reason == type(error).__name__

    # Until a probe sees the topic again, nothing more is sent.
    producer = StandInProducer()
    publisher._producer = producer
    with pytest.raises(PublishError) as refused:
        await publisher.publish(BATCH)
    assert refused.value.reason == "topic_unverified"
    assert producer.sent == []


async def test_an_acknowledgement_that_never_comes_is_a_timeout() -> None:
    publisher = publisher_with(StandInProducer(), timeout=0.05)
    with pytest.raises(PublishError) as caught:
        await publisher.publish(BATCH)
    assert caught.value.reason == "timeout"


async def test_a_record_over_the_client_limit_is_rejected_not_retried() -> None:
    too_large = MessageSizeTooLargeError("larger than the maximum request size")
    publisher = publisher_with(StandInProducer(on_send=too_large))
    with pytest.raises(PublishRejected):
        await publisher.publish(BATCH)


async def test_the_broker_refusing_the_size_is_retried_not_rejected() -> None:
    # Broker-side (message.max.bytes): a configuration to fix while SendGrid keeps retrying.
    publisher = publisher_with(StandInProducer(on_ack=MessageSizeTooLargeError()))
    with pytest.raises(PublishError):
        await publisher.publish(BATCH)


async def test_an_acknowledged_batch_returns() -> None:
    future_ok = StandInProducer()
    future_ok.send = _acknowledging(future_ok)  # type: ignore[method-assign]
    await publisher_with(future_ok).publish(BATCH)
    assert future_ok.sent == [b"[]"]


async def test_a_batch_acknowledged_where_the_broker_serves_another_record_is_a_503() -> None:
    # tansu restarted on memory:// keeps the records of a topic it no longer lists; once the
    # topic is created again they hold the new log's first offsets, and a batch acknowledged
    # at one of them is never served (issue 21: 559 events lost). Once the log may be a new
    # one, each partition is read back until the broker serves what it acknowledged, then
    # trusted. Mutations caught: no read back (200), trusting the partition after a failed
    # read back (200), no doubt once the topic went missing (200), a read per publish, no
    # doubt at a partition's first acknowledgement (a publisher started after the restart
    # has no last one to compare with: 200).
    producer = StandInProducer()
    producer.send = _acknowledging(producer)  # type: ignore[method-assign]
    publisher = publisher_with(producer)
    reader = StandInReader(producer)
    publisher._read_back = ReadBack(Settings().kafka, new_reader=lambda: reader)
    await publisher.publish(BATCH)
    assert reader.reads == 1, "a partition's first acknowledgement is read back"
    await publisher.publish(BATCH)
    assert reader.reads == 1, "once one was served, a healthy broker's are trusted"

    # A new log (an acknowledgement below the last one), beneath two kept records.
    producer.sent.clear()
    producer.ghosts = {0: b"a ghost", 1: b"another ghost"}
    for _ in range(2):
        with pytest.raises(PublishError) as refused:
            await publisher.publish(BATCH)
        assert refused.value.reason == "not_served"
        assert "is served another record there" in str(refused.value)
    await publisher.publish(BATCH)  # offset 2: served, so the partition is trusted
    await publisher.publish(BATCH)
    assert reader.reads == 4

    # The topic went missing (the check after an acknowledgement): doubted again, whatever
    # the offsets say.
    producer.client.topics = set()
    with pytest.raises(PublishError, match="does not list"):
        await publisher.publish(BATCH)
    producer.client.topics = {"sgpipe.raw"}
    publisher._topic_verified = True
    producer.ghosts = {5: b"a ghost"}
    with pytest.raises(PublishError, match="served another record"):
        await publisher.publish(BATCH)
    assert reader.reads == 5


async def test_a_publisher_started_after_the_restart_doubts_its_first_acknowledgement() -> None:
    # A publisher that never saw the old log nor the topic missing (the ingress restarted
    # meanwhile): its first batch lands beneath a kept record, and is refused.
    producer = StandInProducer()
    producer.send = _acknowledging(producer)  # type: ignore[method-assign]
    producer.ghosts = {0: b"a ghost"}
    publisher = publisher_with(producer)
    with pytest.raises(PublishError, match="served another record"):
        await publisher.publish(BATCH)
    await publisher.publish(BATCH)


async def test_a_partition_longer_than_a_new_log_is_trusted_without_a_read() -> None:
    # A long partition is not a new log: reading it from its start would cost more than it
    # proves.
    producer = StandInProducer()
    reader = StandInReader(producer)
    read_back = ReadBack(Settings().kafka, new_reader=lambda: reader)
    read_back.forget(RAW_PARTITION.topic)

    def written(offset: int) -> Written:
        return Written(RAW_PARTITION, offset, OutgoingRecord(RAW_PARTITION.topic, b"[]"))

    await read_back.confirm([written(READ_BACK_MAX_RECORDS + 1)])
    assert reader.reads == 0
    with pytest.raises(NotServed, match="is served nothing there"):
        await read_back.confirm([written(READ_BACK_MAX_RECORDS)])
    assert reader.reads == 1


class StalledReader(StandInReader):
    """A broker that serves nothing below the partition's end (tansu's new log beside a kept
    batch, until the log's end passes the batch's)."""

    def __init__(self, producer: StandInProducer, clock: list[float]) -> None:
        super().__init__(producer)
        self.clock = clock
        self.fetches = 0

    async def getmany(self, partition: TopicPartition, **_: Any) -> dict[TopicPartition, Any]:
        self.fetches += 1
        self.clock[0] += 0.2  # each fetch waits out its 200 ms
        return {}


async def test_a_read_back_that_gets_nothing_below_the_end_gives_up_in_seconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Without the bound, a writer waited the whole request timeout (30 s) for each such read
    # back (a fault test: 31 s for one batch). Mutation caught: no bound (150 fetches).
    clock = [0.0]
    monkeypatch.setattr(kafka_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    producer = StandInProducer()
    producer.sent = [b"a kept batch hides this"]
    reader = StalledReader(producer, clock)
    read_back = ReadBack(Settings().kafka, new_reader=lambda: reader)
    read_back.forget(RAW_PARTITION.topic)
    with pytest.raises(NotServed, match="is served nothing there"):
        await read_back.confirm(
            [Written(RAW_PARTITION, 0, OutgoingRecord(RAW_PARTITION.topic, b"ours"))]
        )
    assert reader.fetches <= 15, reader.fetches


async def test_an_acknowledgement_into_a_topic_the_broker_no_longer_lists_is_a_503() -> None:
    # A batch in flight when the broker died is resent by aiokafka by itself; tansu back
    # empty acknowledged it into a log it no longer lists, which consumers cannot commit from
    # (issue 21). Mutation caught: no topic check after the acknowledgement (200).
    producer = StandInProducer()
    producer.send = _acknowledging(producer)  # type: ignore[method-assign]
    producer.client.topics = set()
    publisher = publisher_with(producer)
    with pytest.raises(PublishError) as refused:
        await publisher.publish(BATCH)
    assert refused.value.reason == "UnknownTopicOrPartitionError"
    assert producer.sent == [b"[]"]
    # Distrusted: nothing more is published until a probe sees the topic again.
    with pytest.raises(PublishError, match="waiting for the broker to confirm"):
        await publisher.publish(BATCH)


async def test_publishes_acknowledged_together_share_one_topic_check() -> None:
    # One check per publish cost 2 KB batches ~30% of the ingress's throughput (bench/ingest.py).
    # Each still waits for a check sent after its own acknowledgement.
    producer = StandInProducer()
    producer.send = _acknowledging(producer)  # type: ignore[method-assign]
    publisher = publisher_with(producer)
    await asyncio.gather(*(publisher.publish(BATCH) for _ in range(10)))
    assert producer.client.checks == 1
    await publisher.publish(BATCH)
    assert producer.client.checks == 2
    assert len(producer.sent) == 11


async def test_the_published_record_carries_the_ingress_hmac() -> None:
    producer = StandInProducer()
    producer.send = _acknowledging(producer)  # type: ignore[method-assign]
    await publisher_with(producer).publish(BATCH)
    assert producer.sent == [b"[]"]
    assert verify_raw_record([TEST_RAW_AUTH_KEY], b"[]", producer.headers[0]) == TEST_RAW_AUTH_KEY


def _acknowledging(producer: StandInProducer) -> Any:
    """A ``send`` acknowledging each record at the next offset of partition 0."""

    async def send(topic: str, value: bytes, headers: Any = None) -> asyncio.Future[Any]:
        producer.sent.append(value)
        producer.headers.append(headers)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        offset = len(producer.sent) - 1
        future.set_result(SimpleNamespace(topic_partition=RAW_PARTITION, offset=offset))
        return future

    return send


async def test_not_connected_is_a_publish_error() -> None:
    settings = Settings.model_validate(
        {"kafka": {"bootstrap_servers": "127.0.0.1:1"}, "raw_auth": RAW_AUTH_DOCUMENT}
    )
    publisher = KafkaRawBatchPublisher(settings)
    with pytest.raises(PublishError) as caught:
        await publisher.publish(BATCH)
    assert caught.value.reason == "not_connected"
    assert publisher.health.producer_check() == (False, "not started")


LED: list[tuple[Any, ...]] = [(0, 0, 111, [111], [111], []), (0, 1, 111, [111], [111], [])]


@pytest.mark.parametrize(
    ("topics", "ok", "missing"),
    [
        pytest.param([(0, "raw", False, LED)], True, False, id="led"),
        pytest.param([(0, "raw", LED)], True, False, id="metadata-v0-layout"),
        pytest.param([(3, "raw", False, [])], False, True, id="unknown-topic"),
        pytest.param([(0, "raw", False, [])], False, True, id="no-partitions"),
        pytest.param([], False, True, id="absent"),
        pytest.param([(0, "other", False, LED)], False, True, id="other-topic-only"),
        pytest.param(
            [(0, "raw", False, [(0, 0, -1, [], [], []), *LED[1:]])], False, False, id="leaderless"
        ),
        pytest.param([(29, "raw", False, [])], False, False, id="not-authorized"),
    ],
)
def test_topic_health_reads_every_metadata_layout(
    topics: list[tuple[Any, ...]], ok: bool, missing: bool
) -> None:
    health = topic_health(topics, "raw", 0.002)
    assert (health.ok, health.missing) == (ok, missing)
    assert "raw" in health.detail


class StandInAccumulator:
    def __init__(self) -> None:
        self.failed_with: list[BaseException] = []

    def fail_all(self, exception: BaseException) -> None:
        self.failed_with.append(exception)


async def test_a_failed_publish_replaces_the_producer_and_fails_what_it_queues() -> None:
    producer = StandInProducer(on_ack=KafkaConnectionError("gone"))
    accumulator = StandInAccumulator()
    stopped: list[bool] = []

    async def stop() -> None:
        stopped.append(True)

    producer._message_accumulator = accumulator  # type: ignore[attr-defined]
    producer.stop = stop  # type: ignore[attr-defined]
    publisher = publisher_with(producer)
    with pytest.raises(PublishError):
        await publisher.publish(BATCH)

    # What run() does next: batches answered 503 must not reach a broker that comes back.
    assert publisher._abandon_producer
    await publisher._abandon()
    assert [type(error) for error in accumulator.failed_with] == [KafkaConnectionError]
    assert stopped == [True]
    assert publisher.health.producer_check() == (False, "not started")
    with pytest.raises(PublishError) as refused:
        await publisher.publish(BATCH)
    assert refused.value.reason == "not_connected"
