-- Dead letters, kept in ClickHouse so that they survive a restart of the (possibly in-memory)
-- broker, can be listed (`sgpipe dlq list`), replayed (`sgpipe dlq replay`) and shown in BI.
-- Written by the sink's dead-letter stage from the dead-letter topic (sinks/dead_letters.py).
--
-- One row per original element after merges; query with FINAL. ORDER BY is the identity of a
-- dead letter: where the record came from and which element of it. A redelivered dead letter
-- has the same identity and version, so it replaces itself. A replay keeps the identity (the
-- replayed record carries it in `sgpipe-replay-of`), so its outcome replaces the row instead
-- of adding one. `version` = 2 * replay_generation, + 1 once `sgpipe dlq replay` has replayed
-- that generation: the newest state wins whatever order the rows arrive in. No PARTITION BY:
-- the versions of one letter carry different times, and ReplacingMergeTree only replaces
-- within a partition. (Placeholders: sgpipe/runtime/migrations.py; on one server this is the
-- statement as first released.)
CREATE TABLE IF NOT EXISTS {database}.dead_letters{local} {on_cluster}
(
    source_topic      LowCardinality(String) COMMENT 'topic of the record that could not be processed',
    source_partition  UInt32,
    source_offset     UInt64,
    event_index       Int32 COMMENT 'position of the element in the raw batch; -1: the whole record',
    reason            LowCardinality(String) COMMENT 'stable reason code (docs/dead-letters.md)',
    detail            String COMMENT 'what went wrong, for people',
    stage             LowCardinality(String) COMMENT 'the stage that dead-lettered it: process or sink',
    webhook           LowCardinality(String) COMMENT 'sgpipe webhook that received the batch ("" when unknown)',
    request_id        String COMMENT 'ingress request that carried the batch ("" when unknown)',
    received_at       Nullable(DateTime64(3, 'UTC')) COMMENT 'when sgpipe received the batch',
    headers           Map(String, String) COMMENT 'every header of the dead letter: sgpipe-dlq-*, sgpipe-original-* and the raw batch\'s own',
    payload           String CODEC(ZSTD(3)) COMMENT 'the original bytes: one element as SendGrid sent it, or the whole record; personal data',
    dead_lettered_at  DateTime64(3, 'UTC') COMMENT 'when the stage dead-lettered it (the dead-letter record\'s timestamp)',
    replay_generation UInt32 COMMENT 'how many replays came before this dead letter (0: never replayed)',
    replayed_at       Nullable(DateTime64(3, 'UTC')) COMMENT 'when `sgpipe dlq replay` replayed it; null: pending',
    version           UInt64 COMMENT '2 * replay_generation, + 1 once replayed',
    inserted_at       DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = {replicated}ReplacingMergeTree(version)
ORDER BY (source_topic, source_partition, source_offset, event_index);

-- cluster-only: every version of one dead letter goes to the same shard (its identity), so
-- FINAL on each shard keeps its newest state.
CREATE TABLE IF NOT EXISTS {database}.dead_letters {on_cluster}
AS {database}.dead_letters_local
ENGINE = Distributed({cluster}, {database}, dead_letters_local, cityHash64(source_topic, source_partition, source_offset, event_index))
