-- Column codecs, measured on simulated traffic (bench/clickhouse_storage.py, docs/clickhouse.md):
-- ZSTD(1) for the long, high-cardinality strings (ids, addresses, custom args: about a third
-- smaller than the default LZ4), Delta + ZSTD for event_time (sorted within each event type and
-- day). Only parts written or merged from now on use them: nothing is rewritten at once.
-- Generated from the field table (python -m schemas.event_fields codecs).
ALTER TABLE {database}.email_events{local} {on_cluster}
    MODIFY COLUMN `sg_event_id` CODEC(ZSTD(1)),
    MODIFY COLUMN `event_time` CODEC(Delta(8), ZSTD(1)),
    MODIFY COLUMN `email` CODEC(ZSTD(1)),
    MODIFY COLUMN `sg_message_id` CODEC(ZSTD(1)),
    MODIFY COLUMN `smtp_id` CODEC(ZSTD(1)),
    MODIFY COLUMN `category` CODEC(ZSTD(1)),
    MODIFY COLUMN `custom_args` CODEC(ZSTD(1)),
    MODIFY COLUMN `received_at` CODEC(ZSTD(1)),
    MODIFY COLUMN `request_id` CODEC(ZSTD(1)),
    MODIFY COLUMN `raw` CODEC(ZSTD(3)),
    MODIFY COLUMN `reason` CODEC(ZSTD(1)),
    MODIFY COLUMN `response` CODEC(ZSTD(1)),
    MODIFY COLUMN `ip` CODEC(ZSTD(1)),
    MODIFY COLUMN `useragent` CODEC(ZSTD(1)),
    MODIFY COLUMN `url` CODEC(ZSTD(1));
