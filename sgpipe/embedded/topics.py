"""How many partitions the topics on the embedded broker get when none is configured.

Fewer than on a real Kafka cluster (``kafka.topics.partitions``, 6): tansu on SeaweedFS turns
every record batch it is sent into storage objects and requests, and a producer sends one
batch per partition it writes to, so small batches spread over six partitions cost six
times the storage work of one. Measured (bench/broker_small.py: 2 KB records produced as the
ingress does, 32 in flight, then read back by a committing group; CPU of tansu, SeaweedFS and
the clients per record): 948-1,107 µs on 6 partitions, 540 on 3, 348-477 on 2, 228-363 on 1,
against 47-68 on the in-memory broker; under a whole `sgpipe up` on 2 KB batches, tansu and
SeaweedFS used 2.3x less CPU on 2 partitions than on 6 (docs/embedded.md#partitions).

Two keep room for two processors and two sinks (a consumer group gives each partition to one
member); a machine with more cores for `sgpipe up` sets ``kafka.topics.partitions`` (it
applies to topics created from then on: existing topics keep their partitions).
"""

from __future__ import annotations

from typing import Final

from sgpipe.runtime.settings import TopicSettings

EMBEDDED_TOPIC_PARTITIONS: Final = 2


def embedded_topics(topics: TopicSettings) -> TopicSettings:
    """``topics`` with the embedded broker's partition count, unless one was configured."""
    if "partitions" in topics.model_fields_set:
        return topics
    return topics.model_copy(update={"partitions": EMBEDDED_TOPIC_PARTITIONS})
