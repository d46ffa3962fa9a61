"""Kafka plumbing shared by every stage: clients from settings, topics, and the commit loop.

Production code stays broker-agnostic (Apache Kafka, MSK, Redpanda, Confluent, tansu); nothing
here assumes the embedded broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata, TopicPartition

from sgpipe.runtime.settings import KafkaSettings

log = structlog.get_logger(__name__)

# aiokafka ships no type information: a consumed record is ConsumerRecord[bytes, bytes].
Record: TypeAlias = ConsumerRecord
Headers = list[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class OutgoingRecord:
    topic: str
    value: bytes
    key: bytes | None = None
    headers: Headers | None = None


def _connection_options(settings: KafkaSettings) -> dict[str, Any]:
    if settings.bootstrap_servers is None:
        raise ValueError("kafka.bootstrap_servers is not set")
    options: dict[str, Any] = {
        "bootstrap_servers": [host.strip() for host in settings.bootstrap_servers.split(",")],
        "client_id": settings.client_id,
        "security_protocol": settings.security_protocol,
        "request_timeout_ms": settings.request_timeout_ms,
    }
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = ssl.create_default_context(
            cafile=str(settings.ssl_cafile) if settings.ssl_cafile else None
        )
    if settings.sasl_mechanism is not None:
        options["sasl_mechanism"] = settings.sasl_mechanism
        options["sasl_plain_username"] = settings.sasl_username
        options["sasl_plain_password"] = (
            settings.sasl_password.get_secret_value() if settings.sasl_password else None
        )
    return options


def create_producer(settings: KafkaSettings) -> AIOKafkaProducer[bytes, bytes]:
    """``acks=all``: a record counts as written only once every in-sync replica has it."""
    return AIOKafkaProducer(
        **_connection_options(settings),
        acks="all",
        enable_idempotence=settings.enable_idempotence,
        compression_type=None if settings.compression_type == "none" else settings.compression_type,
        linger_ms=settings.linger_ms,
        max_request_size=settings.max_request_size,
        max_batch_size=min(settings.max_request_size, 1_048_576),
    )


def create_consumer(settings: KafkaSettings, *, group_id: str) -> AIOKafkaConsumer[bytes, bytes]:
    """Offsets are committed by the stage after its output is durable, never automatically.

    The caller subscribes, with its CommitLoop's rebalance listener.
    """
    return AIOKafkaConsumer(
        **_connection_options(settings),
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        max_partition_fetch_bytes=settings.max_request_size,
        fetch_max_bytes=max(settings.max_request_size, 52_428_800),
    )


async def ensure_topics(settings: KafkaSettings) -> list[str]:
    """Create the pipeline's topics that do not exist yet; returns the names created.

    Explicit creation matters: brokers that auto-create (tansu does, with 4 partitions) would
    otherwise pick partition counts nobody chose.
    """
    topics = settings.topics
    wanted = [topics.raw, topics.events, topics.dead_letter]
    admin = AIOKafkaAdminClient(**_connection_options(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [name for name in wanted if name not in existing]
        if missing:
            await admin.create_topics(
                [
                    NewTopic(
                        name=name,
                        num_partitions=topics.partitions,
                        replication_factor=topics.replication_factor,
                    )
                    for name in missing
                ]
            )
            await _wait_for_topics(admin, missing)
        return missing
    finally:
        await admin.close()


async def _wait_for_topics(admin: AIOKafkaAdminClient, names: list[str]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if set(names) <= set(await admin.list_topics()):
            return
        await asyncio.sleep(0.1)
    raise KafkaError(f"topics {names} were not created within 30 s")


async def send_all(
    producer: AIOKafkaProducer[bytes, bytes], records: Sequence[OutgoingRecord]
) -> None:
    """Send every record and wait until each is acknowledged; raises the first failure."""
    pending = [
        await producer.send(record.topic, record.value, key=record.key, headers=record.headers)
        for record in records
    ]
    if pending:
        await asyncio.gather(*pending)


Flush = Callable[[Sequence[Record]], Awaitable[None]]

# How long a draining consumer waits for more records before it calls its topic empty.
_DRAIN_POLL_MS = 1000


class DrainIncomplete(RuntimeError):
    """A draining stage stopped with records it could not write: with an in-memory broker
    they are lost, so the process must not report a clean stop."""


class CommitLoop:
    """poll -> accumulate -> flush -> commit, the delivery contract of every consuming stage.

    Records accumulate until ``max_records`` or ``max_seconds`` since the first buffered one;
    then ``flush`` writes them downstream and only after it returns are their offsets
    committed. A failing flush is retried with capped exponential backoff, holding the
    buffer, for as long as the loop runs. Before partitions are revoked in a rebalance the
    buffer is flushed and committed.

    On stop, what is buffered is flushed (retrying until ``stop_timeout``). With ``drain``
    the loop also keeps consuming until a poll comes back empty. Records never written are
    never committed and the loop stops polling at once: Kafka redelivers them; with
    ``drain`` (in-memory broker, nothing to redeliver from) that raises DrainIncomplete.
    """

    def __init__(
        self,
        consumer: AIOKafkaConsumer[bytes, bytes],
        flush: Flush,
        *,
        name: str,
        max_records: int,
        max_seconds: float,
        retry_backoff_max_seconds: float = 30.0,
    ) -> None:
        self._consumer = consumer
        self._flush = flush
        self._name = name
        self._max_records = max_records
        self._max_seconds = max_seconds
        self._backoff_max = retry_backoff_max_seconds
        self._buffer: list[Record] = []
        self._buffer_started = 0.0
        self._lock = asyncio.Lock()

    def rebalance_listener(self) -> ConsumerRebalanceListener:
        return _FlushOnRevoke(self)

    async def run(
        self, stop: asyncio.Event, *, drain: bool = False, stop_timeout: float = 60.0
    ) -> None:
        """Until ``stop`` is set, then as the class says. Raises DrainIncomplete."""
        while not stop.is_set():
            await self._poll(self._poll_timeout_ms())
            if self._buffer and self._due():
                await self._flush_with_retries(stop=stop)

        deadline = time.monotonic() + stop_timeout
        drained = not drain
        while not self._buffer or await self._flush_with_retries(deadline=deadline):
            if drained or time.monotonic() >= deadline:
                break
            drained = await self._poll(_DRAIN_POLL_MS) == 0

        if self._buffer or not drained:
            unwritten = len(self._buffer)
            self._buffer = []
            if drain:
                raise DrainIncomplete(
                    f"{self._name}: stopped after {stop_timeout:.0f} s with {unwritten} records "
                    "not written and the topic not drained"
                )
            log.warning(
                "stopping with records not written; Kafka will redeliver them",
                stage=self._name,
                records=unwritten,
            )

    async def _poll(self, timeout_ms: int) -> int:
        polled = await self._consumer.getmany(
            timeout_ms=timeout_ms, max_records=max(1, self._max_records - len(self._buffer))
        )
        received = 0
        for records in polled.values():
            if records and not self._buffer:
                self._buffer_started = time.monotonic()
            self._buffer.extend(records)
            received += len(records)
        return received

    def _poll_timeout_ms(self) -> int:
        if not self._buffer:
            return 500
        remaining = self._max_seconds - (time.monotonic() - self._buffer_started)
        return max(0, min(500, int(remaining * 1000)))

    def _due(self) -> bool:
        return (
            len(self._buffer) >= self._max_records
            or time.monotonic() - self._buffer_started >= self._max_seconds
        )

    async def _flush_with_retries(
        self, *, stop: asyncio.Event | None = None, deadline: float | None = None
    ) -> bool:
        """True once flushed and committed; False when ``stop`` was set or ``deadline``
        passed first (the buffer is kept, nothing is committed)."""
        delay = 0.2
        while True:
            try:
                await self.flush_and_commit()
                return True
            except Exception as exc:  # noqa: BLE001 - every flush failure is retried
                wait = delay
                if deadline is not None:
                    wait = min(delay, deadline - time.monotonic())
                if (stop is not None and stop.is_set()) or wait <= 0:
                    log.warning(
                        "flush failed; giving up for now",
                        stage=self._name,
                        records=len(self._buffer),
                        error=repr(exc),
                    )
                    return False
                log.warning(
                    "flush failed; retrying",
                    stage=self._name,
                    records=len(self._buffer),
                    retry_in_seconds=round(wait, 2),
                    error=repr(exc),
                )
                if stop is None:
                    await asyncio.sleep(wait)
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=wait)
                delay = min(delay * 2, self._backoff_max)

    async def flush_and_commit(self) -> None:
        """Flush the buffer, then commit its offsets. Raises what ``flush`` raises."""
        async with self._lock:
            if not self._buffer:
                return
            records = self._buffer
            await self._flush(records)
            offsets: dict[TopicPartition, OffsetAndMetadata] = {}
            for record in records:
                offsets[TopicPartition(record.topic, record.partition)] = OffsetAndMetadata(
                    record.offset + 1, ""
                )
            self._buffer = []
            try:
                await self._consumer.commit(offsets)
            except CommitFailedError as exc:
                # The group rebalanced while we flushed: the new owner re-reads these
                # records, and the duplicates are absorbed downstream.
                log.warning("commit failed after rebalance", stage=self._name, error=str(exc))

    async def discard_revoked(self, revoked: set[TopicPartition]) -> None:
        async with self._lock:
            self._buffer = [
                record
                for record in self._buffer
                if TopicPartition(record.topic, record.partition) not in revoked
            ]


@dataclass(frozen=True, slots=True)
class StageOptions:
    """How a consuming stage batches, retries and stops."""

    name: str
    group_id: str
    topic: str
    max_records: int
    max_seconds: float
    retry_backoff_max_seconds: float
    stop_timeout_seconds: float
    drain: bool = False


async def run_consumer_stage(
    settings: KafkaSettings,
    options: StageOptions,
    producer: AIOKafkaProducer[bytes, bytes],
    flush: Flush,
    stop: asyncio.Event,
    ready: asyncio.Event | None = None,
) -> None:
    """Start ``producer`` and a consumer of ``options.topic``, run a CommitLoop around
    ``flush`` until ``stop`` (setting ``ready`` once consuming), then stop both."""
    consumer = create_consumer(settings, group_id=options.group_id)
    loop = CommitLoop(
        consumer,
        flush,
        name=options.name,
        max_records=options.max_records,
        max_seconds=options.max_seconds,
        retry_backoff_max_seconds=options.retry_backoff_max_seconds,
    )
    consumer.subscribe([options.topic], listener=loop.rebalance_listener())
    await producer.start()
    try:
        await consumer.start()
        try:
            if ready is not None:
                ready.set()
            await loop.run(stop, drain=options.drain, stop_timeout=options.stop_timeout_seconds)
        finally:
            await consumer.stop()
    finally:
        await producer.stop()


class _FlushOnRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, loop: CommitLoop) -> None:
        self._loop = loop

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        try:
            await self._loop.flush_and_commit()
        except Exception as exc:  # noqa: BLE001 - the new owner re-reads what we could not write
            log.warning("flush before revoke failed; records will be redelivered", error=repr(exc))
            await self._loop.discard_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        return None
