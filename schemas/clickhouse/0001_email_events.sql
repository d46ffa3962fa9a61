-- Every SendGrid event, kept for good. One row per sg_event_id after merges; FINAL (or the
-- `argMax` idiom) gives exactly one row per event before them, whatever was redelivered.
--
-- ORDER BY is the deduplication key of a ReplacingMergeTree. It leads with the columns that
-- dashboards filter on; `event` and the day are pure functions of the event itself, so
-- redelivered copies of one event always share the key (and the partition).
--
-- Placeholders (sgpipe/runtime/migrations.py): on one server {local}, {on_cluster} and
-- {replicated} are empty, so this is the foundation's statement as released; with
-- clickhouse.cluster the table is email_events_local on every node, replicated, behind the
-- Distributed table email_events.
CREATE TABLE IF NOT EXISTS {database}.email_events{local} {on_cluster}
(
    webhook       LowCardinality(String) COMMENT 'sgpipe webhook that received the event',
    event         LowCardinality(String) COMMENT 'SendGrid event type, as sent',
    sg_event_id   String COMMENT 'SendGrid unique event id (dedup key)',
    event_time    DateTime64(3, 'UTC') COMMENT 'SendGrid timestamp',
    email         Nullable(String) COMMENT 'recipient; personal data',
    sg_message_id Nullable(String),
    smtp_id       Nullable(String) COMMENT 'the smtp-id field',
    category      Array(String),
    custom_args   Map(String, String) COMMENT 'unique_args / custom_args set by the sender',
    received_at   DateTime64(3, 'UTC') COMMENT 'when sgpipe received the batch',
    request_id    String COMMENT 'ingress request that carried the batch',
    raw           String CODEC(ZSTD(3)) COMMENT 'the event as SendGrid sent it (JSON)',
    inserted_at   DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = {replicated}ReplacingMergeTree(received_at)
PARTITION BY toYYYYMM(event_time)
ORDER BY (event, toDate(event_time), sg_event_id);

-- cluster-only: the table the sink writes and every reader reads. A row goes to the shard of
-- its message (or of the event, without one): redelivered copies of an event always land on
-- the same shard, so FINAL on each shard deduplicates exactly, and a message's lifecycle is
-- built on one shard.
CREATE TABLE IF NOT EXISTS {database}.email_events {on_cluster}
AS {database}.email_events_local
ENGINE = Distributed({cluster}, {database}, email_events_local, cityHash64(ifNull(sg_message_id, sg_event_id)))
