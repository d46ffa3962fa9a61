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

from sgpipe.settings import KafkaSettings

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
        "bootstrap_servers": settings.bootstrap_servers.split(","),
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


class CommitLoop:
    """poll -> accumulate -> flush -> commit, the delivery contract of every consuming stage.

    Records accumulate until ``max_records`` or ``max_seconds`` since the first buffered one;
    then ``flush`` writes them downstream and only after it returns are their offsets
    committed. A failing flush is retried with capped exponential backoff, holding the
    buffer, until it succeeds or the loop is stopped (then nothing is committed and the
    records are redelivered: at-least-once, duplicates absorbed downstream). Before
    partitions are revoked in a rebalance the buffer is flushed and committed.
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

    async def run(self, stop: asyncio.Event, *, drain: bool = False) -> None:
        """Until ``stop`` is set; then flushes and commits what it holds and returns.

        With ``drain``, a stop first keeps consuming until a poll comes back empty: for the
        embedded in-memory broker, whatever is left unconsumed at shutdown would be lost.
        """
        while True:
            stopping = stop.is_set()
            if stopping and not drain:
                break
            polled = await self._consumer.getmany(
                timeout_ms=_DRAIN_POLL_MS if stopping else self._poll_timeout_ms(),
                max_records=max(1, self._max_records - len(self._buffer)),
            )
            received = 0
            for records in polled.values():
                if records and not self._buffer:
                    self._buffer_started = time.monotonic()
                self._buffer.extend(records)
                received += len(records)
            if self._buffer and (stopping or self._due()):
                await self._flush_with_retries(stop)
            if stopping and received == 0:
                break
        if self._buffer:
            await self._flush_with_retries(stop)

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

    async def _flush_with_retries(self, stop: asyncio.Event) -> None:
        delay = 0.2
        while True:
            try:
                await self.flush_and_commit()
                return
            except Exception as exc:  # noqa: BLE001 - every flush failure is retried
                if stop.is_set():
                    log.warning(
                        "flush failed while stopping; records will be redelivered",
                        stage=self._name,
                        records=len(self._buffer),
                        error=repr(exc),
                    )
                    self._buffer.clear()
                    return
                log.warning(
                    "flush failed; retrying",
                    stage=self._name,
                    records=len(self._buffer),
                    retry_in_seconds=delay,
                    error=repr(exc),
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=delay)
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
