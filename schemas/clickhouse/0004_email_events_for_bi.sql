-- email_events for BI: look-ups by recipient and message, idempotent inserts, and a view that
-- needs no FINAL. The table's key and partitions stay the foundation's: (event, day,
-- sg_event_id) already serves the dashboards' filters (event type and time range) and collapses
-- redeliveries, so no copy of the data is needed (docs/clickhouse.md says why).

-- A bloom filter per granule (8192 rows): `WHERE email = '...'` and `WHERE sg_message_id = ...`
-- read only the granules that may hold the value (1% false positives) instead of the table.
ALTER TABLE {database}.email_events{local} {on_cluster}
    ADD INDEX IF NOT EXISTS email_bloom email TYPE bloom_filter(0.01) GRANULARITY 1,
    ADD INDEX IF NOT EXISTS sg_message_id_bloom sg_message_id TYPE bloom_filter(0.01) GRANULARITY 1;

-- The rows stored before this migration get the indexes too (a background mutation).
ALTER TABLE {database}.email_events{local} {on_cluster} MATERIALIZE INDEX email_bloom;
ALTER TABLE {database}.email_events{local} {on_cluster} MATERIALIZE INDEX sg_message_id_bloom;

-- Idempotent inserts: the table remembers the deduplication tokens of its last 1000 inserted
-- blocks (the sink's token names the Kafka offsets of its batch), so a retried insert is not
-- stored twice. Replicated tables keep such a log by default; this is the same for one server.
-- Retention (clickhouse.retention_days, a TTL) drops whole month partitions, never rewrites them.
ALTER TABLE {database}.email_events{local} {on_cluster}
    MODIFY SETTING non_replicated_deduplication_window = 1000, ttl_only_drop_parts = 1;

-- Every event once, as BI tools can query it without knowing about FINAL. FINAL collapses the
-- copies of an event (same sorting key) at read time whether or not merges have run yet.
-- A view's columns are fixed when it is created: a migration that adds columns to
-- email_events replaces this view too (a test checks they match).
CREATE OR REPLACE VIEW {database}.email_events_dedup {on_cluster} AS
SELECT * FROM {database}.email_events FINAL;
