"""Retention for the durable embedded broker, which has none of its own.

tansu stores each produced record batch as one S3 object,
``clusters/<cluster>/topics/<topic>/partitions/<10-digit partition>/records/<20-digit base
offset>.batch``, and does not implement ``DeleteRecords``. A sweep deletes, per partition, the
oldest batch objects that are both older than ``embedded.retention_hours`` and entirely below
the smallest offset committed by every sgpipe consumer group reading that topic. tansu then
serves the first remaining batch as the beginning of the partition (measured).

Rules that keep it safe:
- a batch is known to be consumed only when the *next* batch starts at or below the committed
  offset (its own last offset is below the next one's base): the newest batch of a partition
  is never deleted;
- deletion stops at the first batch that may not go: the log stays contiguous;
- a partition any group has no committed offset for is left alone, and so is every topic
  without an sgpipe group (the dead-letter topic: dead letters wait for a human).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import structlog
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition

from sgpipe.embedded.s3 import MAX_KEYS_PER_REQUEST, S3Client, S3Object

log = structlog.get_logger(__name__)

BATCH_SUFFIX = ".batch"


@dataclass(frozen=True)
class StoredBatch:
    key: str
    base_offset: int
    size: int
    last_modified: datetime


@dataclass
class RetentionReport:
    """What one sweep deleted."""

    batches: int = 0
    bytes: int = 0
    # (topic, partition) -> new first offset
    partitions: dict[tuple[str, int], int] = field(default_factory=dict)


def parse_batch(item: S3Object) -> StoredBatch | None:
    name = item.key.rsplit("/", 1)[-1]
    if not name.endswith(BATCH_SUFFIX) or not name[: -len(BATCH_SUFFIX)].isdigit():
        return None
    return StoredBatch(item.key, int(name[: -len(BATCH_SUFFIX)]), item.size, item.last_modified)


def consumed_and_expired(
    current: StoredBatch, following: StoredBatch, committed_offset: int, older_than: datetime
) -> bool:
    """Whether ``current`` may go: older than ``older_than``, and every record in it below
    ``committed_offset``, which ``following`` (the next batch) proves by starting at or below
    it. Offsets may have gaps (a kill during a produce); this stays conservative across them."""
    return following.base_offset <= committed_offset and current.last_modified < older_than


def batches_to_delete(
    batches: Sequence[StoredBatch], committed_offset: int, older_than: datetime
) -> list[StoredBatch]:
    """The leading batches (in offset order) that may go; stops at the first that may not."""
    deletable: list[StoredBatch] = []
    for current, following in zip(batches, batches[1:], strict=False):
        if not consumed_and_expired(current, following, committed_offset, older_than):
            break
        deletable.append(current)
    return deletable


def partition_prefix(cluster: str, topic: str) -> str:
    return f"clusters/{cluster}/topics/{topic}/partitions/"


class RetentionSweeper:
    """Deletes consumed, expired batches of the topics in ``groups_by_topic``."""

    def __init__(
        self,
        s3: S3Client,
        bucket: str,
        cluster: str,
        bootstrap_servers: str,
        groups_by_topic: Mapping[str, Sequence[str]],
    ) -> None:
        self._s3 = s3
        self._bucket = bucket
        self._cluster = cluster
        self._bootstrap_servers = bootstrap_servers
        self._groups_by_topic = {topic: tuple(groups) for topic, groups in groups_by_topic.items()}

    async def sweep(self, older_than: datetime) -> RetentionReport:
        report = RetentionReport()
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self._bootstrap_servers, client_id="sgpipe-retention"
        )
        await admin.start()
        try:
            for topic, groups in self._groups_by_topic.items():
                if not groups:
                    continue
                partitions = await self._partitions(topic)
                if not partitions:
                    continue
                committed = await _min_committed(admin, topic, partitions, groups)
                for partition in partitions:
                    offset = committed.get(partition)
                    if offset is None:
                        continue
                    await self._sweep_partition(topic, partition, offset, older_than, report)
        finally:
            await admin.close()
        return report

    async def _partitions(self, topic: str) -> list[int]:
        prefix = partition_prefix(self._cluster, topic)
        listing = await self._s3.list_objects(self._bucket, prefix, delimiter="/")
        partitions = []
        for common in listing.common_prefixes:
            name = common[len(prefix) :].strip("/")
            if name.isdigit():
                partitions.append(int(name))
        return sorted(partitions)

    async def _sweep_partition(
        self,
        topic: str,
        partition: int,
        committed_offset: int,
        older_than: datetime,
        report: RetentionReport,
    ) -> None:
        prefix = f"{partition_prefix(self._cluster, topic)}{partition:010d}/records/"
        # Key order is offset order (zero-padded): stream the listing, delete in chunks, stop
        # at the first batch that must stay.
        doomed: list[StoredBatch] = []
        previous: StoredBatch | None = None
        async for item in self._s3.iterate_objects(self._bucket, prefix):
            batch = parse_batch(item)
            if batch is None:
                continue
            if previous is not None:
                if not consumed_and_expired(previous, batch, committed_offset, older_than):
                    break
                doomed.append(previous)
                if len(doomed) >= MAX_KEYS_PER_REQUEST:
                    await self._delete(topic, partition, doomed, batch.base_offset, report)
                    doomed = []
            previous = batch
        if doomed and previous is not None:
            await self._delete(topic, partition, doomed, previous.base_offset, report)

    async def _delete(
        self,
        topic: str,
        partition: int,
        doomed: list[StoredBatch],
        first_kept: int,
        report: RetentionReport,
    ) -> None:
        await self._s3.delete_objects(self._bucket, [batch.key for batch in doomed])
        report.batches += len(doomed)
        report.bytes += sum(batch.size for batch in doomed)
        report.partitions[(topic, partition)] = first_kept


async def _min_committed(
    admin: AIOKafkaAdminClient, topic: str, partitions: Sequence[int], groups: Sequence[str]
) -> dict[int, int]:
    """Per partition, the smallest offset committed by the groups; absent where any group has
    none (tansu cannot list a group's offsets without naming the partitions)."""
    named = [TopicPartition(topic, partition) for partition in partitions]
    smallest: dict[int, int] = {}
    missing: set[int] = set()
    for group in groups:
        offsets = await admin.list_consumer_group_offsets(group, partitions=named)
        for partition in partitions:
            committed = offsets.get(TopicPartition(topic, partition))
            if committed is None or committed.offset < 0:
                missing.add(partition)
                continue
            smallest[partition] = min(committed.offset, smallest.get(partition, committed.offset))
    return {partition: offset for partition, offset in smallest.items() if partition not in missing}
