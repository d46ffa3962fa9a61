"""The bulk writer (sgpipe.runtime.kafka.send_all): how it picks a keyed record's partition
(partition_for_key, the contract docs/consuming.md gives consumers), one future per partition
batch, and returning only once every batch is acknowledged."""

from __future__ import annotations

import asyncio
import zlib
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.structs import TopicPartition
from hypothesis import given
from hypothesis import strategies as st

from sgpipe.runtime.kafka import (
    BULK_RECORD_MAX_BYTES,
    OutgoingRecord,
    partition_for_key,
    send_all,
)


@given(key=st.binary(max_size=200), partition_count=st.integers(min_value=1, max_value=1000))
def test_a_key_always_lands_in_range_and_on_the_same_partition(
    key: bytes, partition_count: int
) -> None:
    partition = partition_for_key(key, partition_count)
    assert 0 <= partition < partition_count
    assert partition_for_key(bytes(key), partition_count) == partition


def test_the_documented_hash_is_crc32_modulo_the_partition_count() -> None:
    # Pinned values: a change of hash moves every key, which docs/consuming.md must announce.
    keys = (b"a", b"b", b"c", b"ev-1", b"")
    assert [partition_for_key(key, 6) for key in keys] == [3, 5, 3, 0, 0]
    assert [zlib.crc32(key) % 6 for key in keys] == [3, 5, 3, 0, 0]


def test_distinct_keys_spread_over_every_partition() -> None:
    keys = [f"{index:x}.filterdrecv-p3mdw1".encode() for index in range(6_000)]
    counts = [0] * 6
    for key in keys:
        counts[partition_for_key(key, 6)] += 1
    # Roughly even: no partition gets less than half or more than twice its share.
    assert all(500 < count < 2_000 for count in counts), counts


class FakeProducer:
    """What send_all uses of AIOKafkaProducer, with aiokafka's real BatchBuilder; every
    submitted batch (or single record) gets a future the test resolves by hand."""

    def __init__(self, partitions: int) -> None:
        self.partitions = set(range(partitions))
        self.submitted: list[tuple[str, int, int, asyncio.Future[Any]]] = []

    async def partitions_for(self, topic: str) -> set[int]:
        return self.partitions

    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(1_048_576, 0)

    async def send_batch(
        self, batch: BatchBuilder, topic: str, *, partition: int
    ) -> asyncio.Future[Any]:
        assert batch.closed()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.submitted.append((topic, partition, batch.record_count(), future))
        return future

    async def send(
        self, topic: str, value: bytes, *, key: bytes | None, headers: Any, partition: int
    ) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.submitted.append((topic, partition, 1, future))
        return future


def keyed_records(count: int) -> list[OutgoingRecord]:
    return [
        OutgoingRecord("events", bytes(3_000), key=f"key-{i}".encode(), headers=[("h", b"v")])
        for i in range(count)
    ]


async def settle() -> None:
    for _ in range(20):  # let send_all run as far as it can without any acknowledgement
        await asyncio.sleep(0)


async def test_send_all_returns_only_once_every_batch_is_acknowledged() -> None:
    producer = FakeProducer(partitions=3)
    large = OutgoingRecord("events", bytes(BULK_RECORD_MAX_BYTES + 1), key=b"large")
    records = [*keyed_records(1_000), large]
    writing = asyncio.create_task(send_all(producer, records))
    await settle()
    # One future per partition batch (3 MB of records: more than one batch per partition), not
    # one per record; the oversized record on its own.
    assert 4 < len(producer.submitted) < 20
    per_partition: Counter[int] = Counter()
    for _, partition, count, _ in producer.submitted:
        per_partition[partition] += count
    assert per_partition == Counter(partition_for_key(r.key or b"", 3) for r in records)
    assert not writing.done()
    # Each batch acknowledged at its partition's next offsets.
    next_offset: Counter[int] = Counter()
    metadata = []
    for topic, partition, count, _ in producer.submitted:
        metadata.append(
            SimpleNamespace(
                topic_partition=TopicPartition(topic, partition), offset=next_offset[partition]
            )
        )
        next_offset[partition] += count
    for (*_, future), acknowledged in list(zip(producer.submitted, metadata, strict=True))[1:]:
        future.set_result(acknowledged)
    await settle()
    assert not writing.done()  # the first batch is still unacknowledged
    producer.submitted[0][3].set_result(metadata[0])
    written = await asyncio.wait_for(writing, timeout=5)
    # Where each batch's first record was acknowledged (what ReadBack reads back): per
    # partition, the records in the order given, each batch's first one at the batch's offset.
    in_order: dict[int, list[OutgoingRecord]] = {}
    for record in records:
        in_order.setdefault(partition_for_key(record.key or b"", 3), []).append(record)
    assert len(written) == len(producer.submitted)
    for first in written:
        assert first.partition.topic == "events"
        assert first.record is in_order[first.partition.partition][first.offset]


async def test_send_all_raises_when_a_batch_fails() -> None:
    producer = FakeProducer(partitions=2)
    writing = asyncio.create_task(send_all(producer, keyed_records(10)))
    await settle()
    producer.submitted[0][3].set_exception(KafkaTimeoutError())
    for topic, partition, _, future in producer.submitted[1:]:
        future.set_result(
            SimpleNamespace(topic_partition=TopicPartition(topic, partition), offset=0)
        )
    with pytest.raises(KafkaTimeoutError):
        await asyncio.wait_for(writing, timeout=5)
