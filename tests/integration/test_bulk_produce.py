"""The bulk writer (sgpipe.runtime.kafka.send_all) against a real Kafka-protocol broker (tansu):
every record arrives exactly once with its key and headers, on its key's partition, in order
per key. (That the write returns only once every batch is acknowledged is tested with a fake
producer in tests/unit/test_kafka_partitioning.py: right after an acks=all write, tansu's end
offsets undercount -- 1,915 of 3,000 with per-record sends too -- so they cannot show it here.)"""

from __future__ import annotations

from collections import Counter

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from sgpipe.runtime.kafka import (
    BULK_RECORD_MAX_BYTES,
    OutgoingRecord,
    create_producer,
    partition_for_key,
    send_all,
)
from tests.integration.kafka_tools import kafka_test_settings, read_topic

pytestmark = pytest.mark.kafka

PARTITIONS = 4


async def create_topic(servers: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    finally:
        await admin.close()


async def test_every_record_arrives_once_with_key_and_headers_on_its_partition(
    kafka_bootstrap_servers: str, unique_name: str
) -> None:
    settings = kafka_test_settings(kafka_bootstrap_servers, unique_name)
    topic = f"bulk-{unique_name}"
    await create_topic(kafka_bootstrap_servers, topic)
    # Enough records that every partition gets several batches (batches hold 1 MiB), a key
    # repeated on many records, unkeyed records, and records above the bulk size limit.
    records = [
        OutgoingRecord(
            topic,
            f"value-{index}-".encode() + bytes(2_000),
            key=f"key-{index % 700}".encode(),
            headers=[("index", str(index).encode()), ("sgpipe-schema", b"email_event/1")],
        )
        for index in range(3_000)
    ]
    records += [
        OutgoingRecord(topic, f"unkeyed-{i}".encode(), headers=[("index", f"u{i}".encode())])
        for i in range(5)
    ]
    records += [
        OutgoingRecord(
            topic,
            f"large-{i}-".encode() + bytes(BULK_RECORD_MAX_BYTES + 10),
            key=f"key-{i}".encode(),
            headers=[("index", f"L{i}".encode())],
        )
        for i in range(2)
    ]
    producer = create_producer(settings.kafka)
    await producer.start()
    try:
        await send_all(producer, records)
    finally:
        await producer.stop()

    received = await read_topic(kafka_bootstrap_servers, topic, expected=len(records))
    by_index = {dict(r.headers)["index"]: r for r in received}
    counts = Counter(dict(r.headers)["index"] for r in received)
    assert [index for index, count in counts.items() if count != 1] == []
    assert len(received) == len(records)
    for record in records:
        assert record.headers is not None
        got = by_index[record.headers[0][1]]
        assert (got.key, got.value, list(got.headers)) == (
            record.key,
            record.value,
            record.headers,
        )
        if record.key is not None:
            assert got.partition == partition_for_key(record.key, PARTITIONS)
    # Same key -> same partition, and the keyed records used every partition.
    partitions_by_key: dict[bytes, set[int]] = {}
    for r in received:
        if r.key is not None:
            partitions_by_key.setdefault(r.key, set()).add(r.partition)
    assert all(len(partitions) == 1 for partitions in partitions_by_key.values())
    assert {r.partition for r in received if r.key is not None} == set(range(PARTITIONS))
    # Within a partition, the records of one key keep their order.
    positions: dict[bytes, list[int]] = {}
    for r in sorted(received, key=lambda r: (r.partition, r.offset)):
        index = dict(r.headers)["index"]
        if r.key is not None and index.isdigit():
            positions.setdefault(r.key, []).append(int(index))
    assert all(order == sorted(order) for order in positions.values())


async def test_a_record_above_the_request_limit_fails_as_with_a_single_send(
    kafka_bootstrap_servers: str, unique_name: str
) -> None:
    from aiokafka.errors import MessageSizeTooLargeError

    settings = kafka_test_settings(kafka_bootstrap_servers, unique_name)
    topic = f"bulk-large-{unique_name}"
    await create_topic(kafka_bootstrap_servers, topic)
    producer = create_producer(settings.kafka)
    await producer.start()
    try:
        too_large = bytes(settings.kafka.max_request_size + 1)
        with pytest.raises(MessageSizeTooLargeError):
            await send_all(producer, [OutgoingRecord(topic, too_large, key=b"k")])
    finally:
        await producer.stop()
